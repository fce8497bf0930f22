"""mergeflow.select: exact k-th largest / top-k masks without sorting, checked against sorting."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergeflow.select as select
from mergeflow.select import global_threshold, global_thresholds, kth_largest, magnitude_mask, topk_mask

INF = math.inf


@pytest.fixture(params=["auto", "torch"], autouse=True)
def kernel_mode(request, monkeypatch):
    """Every test on both CPU paths: the fused numba kernel (float32/bfloat16) and the
    portable numpy path (MERGEFLOW_KERNELS=torch)."""
    monkeypatch.setenv("MERGEFLOW_KERNELS", request.param)
    return request.param


def sorted_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.reshape(-1).sort(descending=True).values[k - 1]


def check_all_k(values: torch.Tensor, ks=None) -> None:
    n = values.numel()
    ranked = values.reshape(-1).sort(descending=True).values
    for k in ks or sorted({k for k in (1, 2, n // 3 + 1, n // 2 + 1, n - 1, n) if 1 <= k <= n}):
        got = kth_largest(values, k)
        assert got.dtype == values.dtype and got.dim() == 0
        assert got == ranked[k - 1], (k, got, ranked[k - 1])


ADVERSARIAL = {
    "one element": torch.tensor([3.5]),
    "all equal": torch.full((1000,), 0.25),
    "all zero": torch.zeros(257),
    "many ties": torch.randint(0, 4, (5000,)).float(),
    "mostly zero": torch.cat([torch.zeros(900), torch.rand(100)]),
    "denormals": torch.tensor([1e-40, 1e-45, 0.0, 2e-40, 1e-38, 1e-40, 3e-39]),
    "inf": torch.tensor([INF, 1.0, INF, 0.0, 3e38, 1e-40]),
    "huge range": torch.logspace(-44, 38, 999),
    "two values": torch.tensor([1.0, 2.0]),
    "random N-D": torch.rand(3, 4, 5, 6),
    "bit-adjacent": torch.tensor(1.0).view(torch.int32).add(torch.arange(300, dtype=torch.int32)).view(torch.float32),
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_matches_sort(name):
    check_all_k(ADVERSARIAL[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_exact(dtype):
    torch.manual_seed(0)
    for values in (
        torch.randn(4096).abs(),
        torch.randint(0, 3, (999,)),
        torch.tensor([1e-300, 0.0, 5e-324], dtype=torch.float64),
    ):
        check_all_k(values.to(dtype))


def test_negative_zero_is_zero():
    values = torch.tensor([-0.0, 0.0, -0.0, 1.0])
    assert kth_largest(values, 2) == 0 and kth_largest(values, 4) == 0
    assert topk_mask(values, 2).tolist() == [True, True, True, True]


@pytest.mark.parametrize("shortcut", ["hit", "miss", "band too big", "tie block", "signed zeros"])
def test_sample_shortcut_and_its_fallback(monkeypatch, shortcut):
    """The sampled bracket must never change the answer, whether it holds the k-th or not."""
    torch.manual_seed(1)
    monkeypatch.setattr(select, "SAMPLE_MIN_N", 1 << 10)
    monkeypatch.setattr(select, "_SAMPLE", 1 << 8)
    monkeypatch.setattr(select, "_CPU_CHUNK", 1 << 12)
    n = 1 << 16
    values = torch.randn(n).abs()
    if shortcut == "miss":  # every sampled position holds a large value: the bracket lies
        values[:: n // (1 << 8)] = 100.0
    if shortcut == "band too big":
        monkeypatch.setattr(select, "_MAX_BAND", 10)
    if shortcut == "tie block":  # the bracket collapses to one value: counted, not gathered
        values[torch.rand(n) < 0.9] = 0.75
    if shortcut == "signed zeros":
        values[torch.rand(n) < 0.6] = 0.0
        values[torch.rand(n) < 0.3] = -0.0
    for k in (1, 7, n // 10, n // 2, n - 3, n):
        assert kth_largest(values, k) == sorted_kth(values, k)


def test_large_tensor_uses_shortcut_exactly():
    torch.manual_seed(2)
    values = torch.randn(select.SAMPLE_MIN_N + 5).abs()
    values[::3] = 0.5  # a heavy tie
    check_all_k(values, ks=[1, values.numel() // 3, values.numel() // 10, values.numel()])


finite_or_inf = st.floats(min_value=0.0, allow_nan=False, allow_infinity=True, allow_subnormal=True, width=32)
values_strategy = st.lists(st.one_of(finite_or_inf, st.sampled_from([0.0, 1e-40, 1.0, INF])), min_size=1, max_size=200)


@settings(max_examples=200, deadline=None)
@given(values=values_strategy, data=st.data())
def test_threshold_properties(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, x.numel()))
    t = kth_largest(x, k)
    assert t == sorted_kth(x, k)
    mask = topk_mask(x, k)
    assert int(mask.sum()) >= k
    assert int((x > t).sum()) < k
    assert torch.equal(mask, x >= t)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=100), data=st.data())
def test_magnitude_mask_matches_topk(values, data):
    x = torch.tensor(values)
    keep = data.draw(st.integers(0, x.numel() + 2))
    mask = magnitude_mask(x, keep)
    if keep == 0:
        assert not mask.any()
    elif keep >= x.numel():
        assert mask.all()
    else:
        ref = torch.topk(x.abs(), keep).values[-1]
        assert torch.equal(mask, x.abs() >= ref)


def test_topk_mask_edges():
    x = torch.rand(2, 5)
    assert not topk_mask(x, 0).any() and topk_mask(x, 0).shape == x.shape
    assert topk_mask(x, 10).all() and topk_mask(x, 99).all()
    assert topk_mask(torch.zeros(0), 0).numel() == 0
    assert int(topk_mask(torch.tensor([1.0, 2.0, 2.0, 3.0]), 2).sum()) == 3  # tie at the threshold kept


@pytest.mark.parametrize("k", [0, -1, 6])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k="):
        kth_largest(torch.rand(5), k)


def test_rejects_nan_and_negatives():
    with pytest.raises(ValueError, match="NaN"):
        kth_largest(torch.tensor([1.0, math.nan]), 1)
    with pytest.raises(ValueError, match="NaN"):
        magnitude_mask(torch.tensor([-1.0, math.nan]), 1)
    with pytest.raises(ValueError, match="non-negative"):
        topk_mask(torch.tensor([1.0, -2.0]), 1)
    with pytest.raises(TypeError):
        kth_largest(torch.tensor([1, 2]), 1)


def test_global_threshold_equals_concatenation():
    torch.manual_seed(3)
    tensors = [torch.randn(100, 30), torch.randn(7), torch.randn(()), torch.randn(2, 3, 4).to(torch.bfloat16), torch.zeros(50)]
    flat = torch.cat([t.float().reshape(-1).abs() for t in tensors])
    for k in (1, 2, 100, flat.numel() // 2, flat.numel()):
        want = sorted_kth(flat, k)
        assert global_threshold(tensors, k) == want
        assert global_threshold(iter(tensors), k) == want
        got = global_threshold(lambda: (t for t in tensors), k)
        assert got == want and got.dtype == torch.float32 and got.dim() == 0


def test_global_thresholds_several_streams_at_once():
    torch.manual_seed(4)
    groups = [[torch.randn(40, 5), torch.randn(40, 5).round(decimals=1)] for _ in range(4)]  # stream 1 is tie-heavy
    groups.append([torch.zeros(3), torch.zeros(3)])
    flats = [torch.cat([g[i].reshape(-1).abs() for g in groups]) for i in range(2)]
    for ks in ([1, 1], [10, 400], [flats[0].numel(), 7], [0, 5]):
        got = global_thresholds(lambda: iter(groups), ks)
        for i, k in enumerate(ks):
            assert got[i] == (math.inf if k == 0 else sorted_kth(flats[i], k)), (ks, i)
    with pytest.raises(ValueError, match="k="):
        global_thresholds(lambda: iter(groups), [flats[0].numel() + 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        global_thresholds(lambda: iter([[torch.tensor([math.nan])]]), [1])


def test_global_threshold_errors():
    with pytest.raises(ValueError, match="k="):
        global_threshold([torch.ones(3)], 4)
    with pytest.raises(ValueError, match="k="):
        global_threshold(lambda: [torch.ones(3)], 0)
    with pytest.raises(ValueError, match="NaN"):
        global_threshold([torch.ones(3), torch.tensor([math.nan])], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_array_path_on_cpu(monkeypatch, dtype):
    """The torch-tensor path (the one CUDA takes) gives the same answers, run here on CPU."""
    torch.manual_seed(5)
    monkeypatch.setattr(select, "_NUMPY_DEVICES", ())
    monkeypatch.setattr(select, "SAMPLE_MIN_N", 1 << 10)
    monkeypatch.setattr(select, "_GPU_CHUNK", 1 << 12)
    values = torch.randn(1 << 14).abs().to(dtype)
    values[::7] = 0.5
    values[::11] = -0.0
    check_all_k(values)
    parts = [values[:1000].neg(), values[1000:]]
    assert global_threshold(parts, 3000) == kth_largest(values.float(), 3000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    x = torch.randn(select.SAMPLE_MIN_N + 17).abs()
    x[::5] = 1.0
    for k in (1, 1000, x.numel() // 3, x.numel()):
        got = kth_largest(x.cuda(), k)
        assert got.device.type == "cuda" and got.cpu() == kth_largest(x, k)
    assert torch.equal(topk_mask(x.cuda(), 1000).cpu(), topk_mask(x, 1000))
    parts = [x[:1000].cuda(), x[1000:].cuda()]
    assert global_threshold(parts, 5000) == kth_largest(x, 5000)
