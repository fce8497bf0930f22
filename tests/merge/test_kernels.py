"""The fused CPU kernels against their definitions and against the torch code they replace,
and the engine giving the same merge through either path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergeflow import kernels, methods
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import ReadBuffers, TaskVectors, merge, merge_to_disk
from mergeflow.methods.ties import disjoint_mean, trim
from tests.merge.test_engine import save_dir

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba kernels unavailable")


def kth_by_sort(x: torch.Tensor, k: int) -> float:
    """The definition: sort |x| descending, take the k-th (float32)."""
    return float(torch.sort(x.float().abs().reshape(-1), descending=True).values[k - 1])


def kth_fused(base: torch.Tensor, ft: torch.Tensor, subtract: bool, k: int) -> float:
    return kernels.kth_abs_tau(kernels.as_array(base.reshape(-1)), kernels.as_array(ft.reshape(-1)), subtract, k)


ADVERSARIAL = {
    "one": lambda g: torch.tensor([-3.5]),
    "all_equal": lambda g: torch.full((5000,), 0.25),
    "zeros": lambda g: torch.zeros(3000),
    "signed_zeros": lambda g: torch.tensor([0.0, -0.0] * 700 + [1.0, -2.0]),
    "half_zeros": lambda g: torch.cat([torch.zeros(4000), torch.randn(4000, generator=g)]),
    "denormals": lambda g: torch.randn(6000, generator=g) * 1e-40,
    "many_ties": lambda g: torch.randint(-3, 4, (9000,), generator=g).float() * 0.5,
    "huge_and_tiny": lambda g: torch.cat([torch.full((10,), 3e38), torch.randn(4000, generator=g) * 1e-30]),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_abs_adversarial_matches_sort(case, dtype):
    g = torch.Generator().manual_seed(1)
    tau = ADVERSARIAL[case](g).to(dtype)
    n = tau.numel()
    for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
        # as a stored task vector (no subtraction) ...
        assert kth_fused(torch.zeros_like(tau), tau, False, k) == kth_by_sort(tau, k), (case, k)
        # ... and as a fine-tune minus a base, tau = f32(ft) - f32(base)
        base = (torch.randn(n, generator=g) * 0.1).to(dtype)
        ft = (base.float() + tau.float()).to(dtype)
        assert kth_fused(base, ft, True, k) == kth_by_sort(ft.float() - base.float(), k), (case, k)


@pytest.mark.parametrize("seed", range(6))
def test_kth_abs_large_random_matches_sort(seed):
    """Above 1M elements the sampled bracket runs: bf16 fine-tunes (few distinct |tau|, many
    ties at the threshold) and float32 ones (all distinct), several densities."""
    g = torch.Generator().manual_seed(seed)
    n = (1 << 20) + 12345 * seed
    dtype = torch.bfloat16 if seed % 2 == 0 else torch.float32
    base = torch.randn(n, generator=g).to(dtype)
    ft = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    tau = ft.float() - base.float()
    for q in (0.003, 0.2, 0.9):
        k = int(q * n)
        assert kth_fused(base, ft, True, k) == kth_by_sort(tau, k), (dtype, q)


def test_kth_abs_when_the_sample_misleads():
    """A strided sample that sees only the large values: the bracket misses, the full radix
    passes still give the exact answer."""
    n = 1 << 21
    tau = torch.full((n,), 1e-3)
    stride = n // (1 << 16)
    tau[::stride] = 5.0
    k = n // 3
    assert kth_fused(torch.zeros(n), tau, False, k) == kth_by_sort(tau, k) == pytest.approx(1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kth_abs_when_the_band_overflows(monkeypatch, dtype):
    """A gather buffer too small for the band: the pass switches to histograms with per-bin
    key ranges and the narrowing passes finish exactly."""
    monkeypatch.setattr(kernels, "_band_size", lambda n: 7)
    g = torch.Generator().manual_seed(5)
    for n in (5000, (1 << 20) + 3):
        base = torch.randn(n, generator=g).to(dtype)
        ft = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
        for k in (1, n // 7, n // 2, n):
            assert kth_fused(base, ft, True, k) == kth_by_sort(ft.float() - base.float(), k), (n, k)


def test_kth_abs_rejects_k_out_of_range():
    x = torch.ones(10)
    for k in (0, 11):
        with pytest.raises(ValueError, match="out of range"):
            kth_fused(x, x, False, k)


def stack(*ts):
    return torch.stack(ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 1023, 1025, 5000])
def test_ties_block_equals_torch_ties_bitwise(dtype, n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).to(dtype)
    fts = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(4)]
    taus = [f.float() - base.float() for f in fts]
    thresholds = [0.0, float("inf"), kth_by_sort(taus[2], max(1, n // 5)), kth_by_sort(taus[3], max(1, n // 2))]
    want = disjoint_mean([trim(t, 0.0, torch.tensor(th)) for t, th in zip(taus, thresholds)]).mul_(0.7).add_(base.float())
    out = np.empty(n, np.float32)
    kernels.ties_block(kernels.as_array(base), kernels.as_array(stack(*fts)), True, thresholds, 0.7, out)
    assert torch.equal(torch.from_numpy(out), want)


def test_ties_block_hand_case():
    """Three tasks on four entries, thresholds keep |tau| >= 1 (METHODS.md: trim, elect, disjoint mean)."""
    taus = torch.tensor([[2.0, -1.0, 0.5, 1.0], [-3.0, -2.0, 3.0, -1.0], [4.0, 0.5, -1.0, 0.0]])
    out = np.empty(4, np.float32)
    kernels.ties_block(np.zeros(4, np.float32), kernels.as_array(taus), False, [1.0, 1.0, 1.0], 1.0, out)
    # entry 0: kept 2, -3, 4 -> sum 3 > 0 -> mean(2, 4) = 3; entry 1: -1, -2 (0.5 trimmed) -> -1.5;
    # entry 2: 3, -1 (0.5 trimmed) -> sum 2 > 0 -> 3; entry 3: 1, -1 -> sum 0 -> no sign agrees -> 0
    assert out.tolist() == [3.0, -1.5, 3.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_block_matches_torch(dtype):
    g = torch.Generator().manual_seed(3)
    n = 3001
    base = torch.randn(n, generator=g).to(dtype)
    fts = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    taus = [f.float() - base.float() for f in fts]
    want = taus[0] * 0.3
    for t in taus[1:]:
        want.add_(t, alpha=0.3)
    want.add_(base.float())
    out = np.empty(n, np.float32)
    kernels.linear_block(kernels.as_array(base), kernels.as_array(stack(*fts)), True, [0.3] * 3, out)
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-6, atol=1e-7)
    mean = np.empty(n, np.float32)
    kernels.linear_block(kernels.as_array(base), kernels.as_array(stack(*fts)), True, [1.0] * 3, mean, divisor=3)
    torch.testing.assert_close(torch.from_numpy(mean), torch.stack([f.float() for f in fts]).mean(0), rtol=1e-6, atol=1e-6)


def test_mode_env(monkeypatch):
    monkeypatch.setenv("MERGEFLOW_KERNELS", "torch")
    assert not kernels.available() and not kernels.wanted(10**12, 0)
    monkeypatch.setenv("MERGEFLOW_KERNELS", "numba")
    assert kernels.wanted(1, 10**12)
    monkeypatch.setenv("MERGEFLOW_KERNELS", "auto")
    assert kernels.wanted(10**12, 10**9) and not kernels.wanted(10**6, 10**9)
    monkeypatch.setenv("MERGEFLOW_KERNELS", "gpu")
    with pytest.raises(Exception, match="MERGEFLOW_KERNELS"):
        kernels.mode()


# --- the engine: same merge through either path ----------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """bf16 base + 3 fine-tunes, one tensor above 1M elements (sampled selection), sharded base."""
    root = tmp_path_factory.mktemp("kernels")
    g = torch.Generator().manual_seed(0)
    base = {
        "big.weight": torch.randn(1100, 1000, generator=g).bfloat16(),
        "small.weight": torch.randn(7, 9, generator=g).bfloat16(),
        "norm.weight": torch.ones(9),
        "ids": torch.arange(5),
    }
    fts = [
        {
            k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    b = save_dir(root / "base", base, [["big.weight", "ids"], ["small.weight", "norm.weight"]])
    return b, [save_dir(root / f"ft{i}", sd) for i, sd in enumerate(fts)]


def _merge_to(tmp, ckpts, method, hp, mode, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_KERNELS", mode)
    b, fts = ckpts
    base = Checkpoint(b)
    out = tmp / f"{method}-{mode}"
    merge_to_disk(methods.get(method), base, [TaskVectors.from_model(base, f) for f in fts], hp, out)
    return {
        **load_file(str(out / "model-00001-of-00002.safetensors")),
        **load_file(str(out / "model-00002-of-00002.safetensors")),
    }


@pytest.mark.parametrize(
    "method,hp",
    [
        ("ties", {"density": 0.2}),
        ("ties", {"density": 0.5, "scope": "global"}),
        ("task_arithmetic", {"scaling": 0.4}),
        ("weight_average", {}),
    ],
)
def test_engine_same_merge_fused_and_torch(tmp_path, ckpts, monkeypatch, method, hp):
    fused = _merge_to(tmp_path, ckpts, method, hp, "numba", monkeypatch)
    plain = _merge_to(tmp_path, ckpts, method, hp, "torch", monkeypatch)
    assert fused.keys() == plain.keys()
    for name in plain:
        assert fused[name].dtype == plain[name].dtype
        if method == "ties":  # no multiply-add to contract: bit for bit
            assert torch.equal(fused[name], plain[name]), name
        else:  # written in bf16: at most one bf16 rounding step apart
            torch.testing.assert_close(fused[name].float(), plain[name].float(), rtol=1e-2, atol=1e-6)


def test_read_buffers_are_reused_and_merge_results_survive_reuse(tmp_path, ckpts, monkeypatch):
    """In-memory merges keep their results while later tensors are read into reused buffers."""
    bufs = ReadBuffers(1 << 20)
    a = bufs.take(100_000)
    bufs.give([a])
    assert bufs.take(90_000) is a  # reused (within 2x)
    bufs.give([a])
    assert bufs.take(40_000) is not a  # too big a buffer for a small tensor
    bufs.give([torch.empty(2 << 20, dtype=torch.uint8)])
    assert sum(b.numel() for b in bufs.free) <= 1 << 20  # beyond ``keep`` the largest go

    monkeypatch.setenv("MERGEFLOW_KERNELS", "torch")
    b, fts = ckpts
    base = Checkpoint(b)
    got = merge(methods.get("task_arithmetic"), base, [TaskVectors.from_model(base, f) for f in fts], {"scaling": 0.5})[0]
    for name in base.names():
        theta0 = base.get(name)
        if not theta0.is_floating_point():
            assert torch.equal(got[name], theta0)
            continue
        want = theta0.float() + 0.5 * sum(Checkpoint(f).get(name).float() - theta0.float() for f in fts)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5)


def test_parallel_reads_into_reused_buffers_give_every_input_its_own_memory(tmp_path, ckpts, monkeypatch):
    """Several tensors through the engine's read path (two reader threads, reused buffers):
    every input arrives bit for bit as stored, and no two inputs of a tensor share memory."""
    from mergeflow.merge.reading import _prefetched

    b, fts = ckpts
    base = Checkpoint(b)
    sources = [TaskVectors.from_model(base, f) for f in fts]
    bufs = ReadBuffers(64 << 20)
    for rep in range(2):  # the second pass reads into buffers the first gave back
        for name, (theta0, raws) in _prefetched(base, sources, base.names() * 3, bufs):
            assert torch.equal(theta0, base.get(name))
            if raws is None:
                continue
            for f, raw in zip(fts, raws):
                assert torch.equal(raw, Checkpoint(f).get(name)), name
            ptrs = [t.data_ptr() for t in [theta0, *raws]]
            assert len(set(ptrs)) == len(ptrs)


# --- switch runtime kernels --------------------------------------------------------------------------


def _switch_bits(rng: np.random.Generator, t: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keep [t, n] bool, sign [t, n] bool, byte pairs uint16 [t, ceil(n/8)], coefficients float32)."""
    keep, sign = rng.random((t, n)) < 0.4, rng.random((t, n)) < 0.5
    pairs = np.ascontiguousarray(
        np.stack([np.packbits(keep, axis=-1, bitorder="little"), np.packbits(sign, axis=-1, bitorder="little")], -1)
    ).view(np.uint16)[..., 0]
    return keep, sign, pairs, rng.uniform(-3e-3, 3e-3, t).astype(np.float32)


def _step(keep: np.ndarray, sign: np.ndarray, coefs: np.ndarray) -> torch.Tensor:
    """The definition: d = +0.0 + sum_t c_t * B_t, in float32, in switch order."""
    d = torch.zeros(keep.shape[1])
    for k, s, c in zip(keep, sign, coefs):
        d = d + float(c) * torch.from_numpy(np.where(k, np.where(s, -1.0, 1.0), 0.0).astype(np.float32))
    return d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("n", [5, 2048, 2049, 40_001])
def test_switch_kernels_against_their_definition(dtype, t, n):
    """apply writes y = x - (0 - d) (bf16: rounded once), saves exactly the entries where
    y - d misses x bitwise (ascending positions, original bits); remove restores x bitwise."""
    rng = np.random.default_rng(n + t)
    x = (torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.02).to(dtype)
    x[:4] = torch.tensor([0.0, -0.0, 1e-30, float("inf")]).to(dtype)  # zeros keep their sign; tiny entries get saved
    keep, sign, pairs, coefs = _switch_bits(rng, t, n)
    d = _step(keep, sign, coefs)
    ibits = torch.int32 if dtype == torch.float32 else torch.int16
    y = (x.float() - (0 - d)).to(dtype)
    z = (y.float() - d).to(dtype)
    want = torch.nonzero(z.view(ibits) != x.view(ibits)).squeeze(1)
    xa = kernels.as_array(x.clone())
    cap = n + kernels.SWITCH_TILE + kernels.SWITCH_SLACK
    pos, vals = np.empty(cap, np.int32), np.empty(cap, np.uint32 if dtype == torch.float32 else np.uint16)
    done, saved = kernels.switch_apply(xa, pairs, coefs, pos, vals)
    assert done == n
    assert torch.equal(torch.from_numpy(xa.view(np.int32 if dtype == torch.float32 else np.int16)), y.view(ibits))
    assert np.array_equal(pos[:saved], want.numpy())
    assert np.array_equal(vals[:saved].view(np.int32 if dtype == torch.float32 else np.int16), x.view(ibits)[want].numpy())
    kernels.switch_remove(xa, pairs, coefs, pos[:saved], vals[:saved])
    assert np.array_equal(xa.view(vals.dtype), kernels.as_array(x).view(vals.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ta,tb", [(1, 1), (1, 2), (3, 1)])
def test_switch_swap_equals_remove_then_apply_and_stops_when_short(dtype, ta, tb):
    """One pass from combination A to B leaves x and B's saved entries bitwise as remove(A) +
    apply(B) do; with a short pos buffer it stops at a tile boundary and resumes from there."""
    n = 3 * kernels.SWITCH_TILE + 77
    rng = np.random.default_rng(ta * 10 + tb)
    x0 = kernels.as_array((torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.02).to(dtype)).copy()
    vdt = np.uint32 if dtype == torch.float32 else np.uint16
    *_, bits_a, coefs_a = _switch_bits(rng, ta, n)
    *_, bits_b, coefs_b = _switch_bits(rng, tb, n)

    def buffers(cap):
        return np.empty(cap, np.int32), np.empty(cap, vdt)

    x = x0.copy()
    pa, va = buffers(n + 4096)
    _, ka = kernels.switch_apply(x, bits_a, coefs_a, pa, va)
    twin = x.copy()
    kernels.switch_remove(twin, bits_a, coefs_a, pa[:ka], va[:ka])
    pr, vr = buffers(n + 4096)
    _, kr = kernels.switch_apply(twin, bits_b, coefs_b, pr, vr)
    # a pos buffer for one tile at a time: the swap stops after each tile
    got_pos, got_vals, start, calls = [], [], 0, 0
    while start < n:
        pb, vb = buffers(kernels.SWITCH_TILE + kernels.SWITCH_SLACK)
        stop, kb = kernels.switch_swap(x, bits_a, coefs_a, pa[:ka], va[:ka], bits_b, coefs_b, start, pb, vb)
        assert stop == min(n, start + kernels.SWITCH_TILE)
        got_pos.append(pb[:kb] + start)
        got_vals.append(vb[:kb])
        start, calls = stop, calls + 1
    assert calls == 4
    assert np.array_equal(x.view(vdt), twin.view(vdt))
    assert np.array_equal(np.concatenate(got_pos), pr[:kr]) and np.array_equal(np.concatenate(got_vals), vr[:kr])
    kernels.switch_remove(x, bits_b, coefs_b, pr[:kr], vr[:kr])
    assert np.array_equal(x.view(vdt), x0.view(vdt))
