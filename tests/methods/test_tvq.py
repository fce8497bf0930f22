"""TVQ / RTVQ (Kim et al., ICCV 2025): mergeflow.codecs.quant and the tvq / rtvq methods.

Expectations come from the definitions (docs/quant-format.md), computed here with plain
torch: per-tensor asymmetric min-max, codes round((x - lo) / step) with step = (hi - lo) /
(2^b - 1), values lo + q (hi - lo) / (2^b - 1); RTVQ base = mean of the task vectors, offsets
against the dequantised base.
"""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import mergeflow.methods.tvq as tvq_module  # registers tvq and rtvq
from mergeflow import methods
from mergeflow.codecs.quant import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QTensor,
    dequantise,
    load_rtvq,
    load_tvq,
    pack,
    qdq,
    quant_stats,
    quantise,
    rtvq_bytes,
    rtvq_dequantise,
    rtvq_qdq,
    rtvq_quantise,
    save_rtvq,
    save_tvq,
    tvq_bytes,
    unpack,
)
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import MemoryCheckpoint, TaskVectors, merge, merge_state_dicts

BITS = range(2, 9)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_qdq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The definition, in float64."""
    x64 = x.double()
    lo, hi = float(x.min()), float(x.max())
    levels = 2**bits - 1
    if hi == lo:
        return torch.full_like(x, lo, dtype=torch.float32)
    q = ((x64 - lo) / ((hi - lo) / levels)).round().clamp(0, levels)
    return (lo + q * (hi - lo) / levels).float()


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# --------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_error_within_half_a_step_and_ends_exact(bits, scale):
    x = randn(37, 11, seed=bits, scale=scale) + 0.1 * scale
    q = quantise(x, bits)
    y = dequantise(q)
    assert y.dtype == torch.float32 and y.shape == x.shape
    lo, hi = float(x.min()), float(x.max())
    assert (q.min, q.max) == (lo, hi)
    step = (hi - lo) / (2**bits - 1)
    assert q.step == pytest.approx(step, rel=1e-12)
    eps = 4 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))
    assert float((x - y).abs().max()) <= step / 2 + eps
    assert float(y.min()) == lo and float(y.max()) == hi  # both ends reproduced exactly
    assert len(torch.unique(y)) <= 2**bits
    assert torch.allclose(y, reference_qdq(x, bits), rtol=0, atol=eps)


def test_eight_bits_within_half_a_step():
    x = randn(4096, seed=1, scale=0.01)
    y = qdq(x, 8)
    step = float(x.max() - x.min()) / 255
    assert float((x - y).abs().max()) <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_qdq_equals_dequantise_of_quantise(bits):
    for seed, shape in enumerate([(5,), (3, 7), (2, 3, 4), (1000,), ()]):
        x = randn(*shape, seed=seed)
        assert torch.equal(qdq(x, bits), dequantise(quantise(x, bits)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 1001])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n), codes)
    # the bit order: code i's bit j is stream bit i*b + j, stream bit k in byte k//8 at k%8
    stream = [(int(packed[k // 8]) >> (k % 8)) & 1 for k in range(8 * packed.numel())]
    for i, c in enumerate(codes.tolist()):
        assert sum(stream[i * bits + j] << j for j in range(bits)) == c
    assert not any(stream[n * bits :])  # padding bits are zero


def test_pack_worked_example():
    """docs/quant-format.md's example, and two more packings worked out by hand."""
    x = torch.tensor([-0.5, 0.25, 1.0, 0.0, -0.25])
    q = quantise(x, 2)
    assert (q.min, q.max, q.step) == (-0.5, 1.0, 0.5) and q.packed.tolist() == [0x78, 0x00]
    assert unpack(q.packed, 2, 5).tolist() == [0, 2, 3, 1, 0]  # 1.5 -> 2 and 0.5 -> 0: half to even
    assert dequantise(q).tolist() == [-0.5, 0.5, 1.0, 0.0, -0.5]
    assert pack(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0x39, 0x01]
    assert pack(torch.tensor([5, 0, 7], dtype=torch.uint8), 3).tolist() == [0xC5, 0x01]


def test_unpack_rejects_bad_sizes_and_padding():
    with pytest.raises(ValueError, match="0 .. 3"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="expected 2 uint8"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 5)
    with pytest.raises(ValueError, match="padding"):
        unpack(torch.tensor([0, 0x04], dtype=torch.uint8), 2, 5)  # bit 10 lies past code 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 200), bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_pack_round_trip_property(n, bits, seed):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack(pack(codes, bits), bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_constant_single_and_empty_tensors_exact(bits):
    for x in (torch.full((4, 5), -0.375), torch.tensor([2.5]), torch.tensor(7.25), torch.zeros(3)):
        q = quantise(x, bits)
        assert q.step == 0 and not q.packed.any()
        assert torch.equal(dequantise(q), x) and torch.equal(qdq(x, bits), x)
    e = quantise(torch.zeros(0, 4), bits)
    assert e.packed.numel() == 0 and dequantise(e).shape == (0, 4)


def test_bad_bits_and_values():
    x = torch.ones(3)
    for bits in (1, 9, 4.0, True, "4"):
        with pytest.raises(MergeflowError, match="bits"):
            quantise(x, bits)
    with pytest.raises(MergeflowError, match="non-finite"):
        qdq(torch.tensor([0.0, float("nan")]), 4)
    with pytest.raises(MergeflowError, match="non-finite"):
        qdq(torch.tensor([0.0, float("inf")]), 4)


def test_low_and_high_precision_inputs():
    x = randn(64, seed=3).bfloat16()
    y = qdq(x, 4)
    assert y.dtype == torch.float32 and torch.equal(y, qdq(x.float(), 4))
    x64 = randn(64, seed=4).double()
    kept = x64.clone()
    assert qdq(x64, 3).dtype == torch.float32 and torch.equal(x64, kept)  # the input is left alone


# --------------------------------------------------------------------------- RTVQ


def test_rtvq_definition_and_error_bound():
    taus = [randn(50, 20, seed=s, scale=0.01) + 0.02 for s in range(4)]
    r = rtvq_quantise(taus, 3, 2)
    mean = torch.stack(taus).mean(0)
    base_hat = qdq(mean, 3)
    assert torch.allclose(dequantise(r.base), base_hat) and (r.base.bits, r.offsets[0].bits) == (3, 2)
    assert abs(r.base.min - float(mean.min())) < 1e-9 and abs(r.base.max - float(mean.max())) < 1e-9
    rebuilt = rtvq_dequantise(r)
    fast = rtvq_qdq(taus, 3, 2)
    for t, tau in enumerate(taus):
        offset = tau - base_hat  # against the dequantised base (error correction)
        assert r.offsets[t].min == float(offset.min()) and r.offsets[t].max == float(offset.max())
        assert torch.equal(rebuilt[t], fast[t])
        assert torch.equal(rebuilt[t], base_hat + qdq(offset, 2))
        step = float(offset.max() - offset.min()) / 3
        assert float((tau - rebuilt[t]).abs().max()) <= step / 2 + 1e-7
    # with the offsets at 2 bits RTVQ beats TVQ at 2 bits (the shared part is at 3)
    tvq_err = sum(float((tau - qdq(tau, 2)).pow(2).sum()) for tau in taus)
    rtvq_err = sum(float((tau - x).pow(2).sum()) for tau, x in zip(taus, rebuilt))
    assert rtvq_err < tvq_err


def test_rtvq_single_task_and_constant():
    tau = randn(33, seed=5)
    (rebuilt,) = rtvq_qdq([tau], 3, 2)
    base_hat = qdq(tau, 3)
    assert torch.equal(rebuilt, base_hat + qdq(tau - base_hat, 2))
    same = [torch.full((4,), 0.5)] * 3
    assert all(torch.equal(x, same[0]) for x in rtvq_qdq(same))
    with pytest.raises(MergeflowError, match="at least one"):
        rtvq_qdq([])


# --------------------------------------------------------------------------- files


def sample_tensors(seed=0) -> dict[str, torch.Tensor]:
    return {
        "layers.0.weight": randn(16, 9, seed=seed, scale=0.01),
        "layers.0.bias": randn(9, seed=seed + 1, scale=0.01),
        "logit_scale": torch.tensor(0.25),
        "norm.weight": torch.zeros(7),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_tvq_file_round_trip_equals_qdq(tmp_path, bits):
    tensors = sample_tensors()
    path = tmp_path / "task.tvq.safetensors"
    stats = save_tvq(path, {k: quantise(v, bits) for k, v in tensors.items()}, {"task": "mnist"})
    f = load_tvq(path)
    assert f.metadata == {"task": "mnist"} and list(f.tensors) == list(tensors)
    for name, t in tensors.items():
        assert f.tensors[name].bits == bits and f.tensors[name].shape == tuple(t.shape)
        assert torch.equal(dequantise(f.tensors[name]), qdq(t, bits)), name
        assert torch.equal(f.dequantise()[name], qdq(t, bits))
    # storage: exactly the bit budget, ceil(n b / 8) + 8 per tensor
    want = sum(tvq_bytes(t.numel(), bits) for t in tensors.values())
    assert stats.payload_bytes == want == quant_stats(path).payload_bytes
    assert stats.n_params == sum(t.numel() for t in tensors.values())
    assert stats.bits_per_param == pytest.approx(8 * want / stats.n_params)
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        assert meta["format"] == FORMAT_NAME and meta["format_version"] == str(FORMAT_VERSION)
        payload, ranges = fh.get_tensor("payload"), fh.get_tensor("ranges")
    assert payload.numel() + 8 * ranges.shape[0] == want  # the file's own payload bytes
    assert stats.file_bytes == path.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_rtvq_file_round_trip_and_storage(tmp_path):
    tasks = [sample_tensors(seed) for seed in (0, 10, 20)]
    base, offsets = {}, [{} for _ in tasks]
    for name in tasks[0]:
        r = rtvq_quantise([t[name] for t in tasks], 3, 2)
        base[name] = r.base
        for i, o in enumerate(r.offsets):
            offsets[i][name] = o
    path = tmp_path / "set.rtvq.safetensors"
    stats = save_rtvq(path, base, offsets, {"tasks": "a,b,c"})
    f = load_rtvq(path)
    assert f.metadata == {"tasks": "a,b,c"} and len(f.offsets) == 3
    for i in range(3):
        got = f.dequantise(i)
        for name in tasks[0]:
            assert torch.equal(got[name], rtvq_qdq([t[name] for t in tasks], 3, 2)[i]), (i, name)
    want = sum(rtvq_bytes(t.numel(), 3, 3, 2) for t in tasks[0].values())
    assert want == sum(math.ceil(t.numel() * 3 / 8) + 8 + 3 * (math.ceil(t.numel() * 2 / 8) + 8) for t in tasks[0].values())
    assert stats.payload_bytes == want == quant_stats(path).payload_bytes
    with safe_open(str(path), "pt") as fh:
        assert fh.get_tensor("payload").numel() + 8 * fh.get_tensor("ranges").shape[0] == want
    with pytest.raises(MergeflowError, match="rtvq file, not tvq"):
        load_tvq(path)
    with pytest.raises(MergeflowError, match="task 1.*bias"):
        save_rtvq(tmp_path / "bad", base, [offsets[0], {k: v for k, v in offsets[1].items() if k != "layers.0.bias"}])


def test_bad_files_fail_loudly(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tvq(path, {"w": quantise(randn(40, seed=1), 4)})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last stored byte (inside a tensor)
    (tmp_path / "corrupt").write_bytes(bytes(raw))
    with pytest.raises(MergeflowError, match="corrupt"):
        load_tvq(tmp_path / "corrupt")
    (tmp_path / "short").write_bytes(bytes(raw[:50]))
    with pytest.raises(MergeflowError, match="short"):
        load_tvq(tmp_path / "short")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other"), metadata={"format": "pt"})
    with pytest.raises(MergeflowError, match="not a mergeflow.tvq file"):
        load_tvq(tmp_path / "other")
    # a newer format version is refused
    with safe_open(str(path), "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = dict(fh.metadata())
    save_file(stored, str(tmp_path / "newer"), metadata=meta | {"format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(MergeflowError, match="newer than this mergeflow reads"):
        load_tvq(tmp_path / "newer")
    # the index is what its checksum says
    index = json.loads(zlib.decompress(stored["index"].numpy().tobytes()))
    assert index["kind"] == "per_task" and index["tensors"][0] == {
        "part": "task",
        "name": "w",
        "shape": [40],
        "bits": 4,
        "bytes": 20,
    }


def test_save_refuses_bad_input_before_writing(tmp_path):
    good = quantise(randn(10, seed=2), 3)
    bad = [
        QTensor(good.packed[:-1], good.shape, 3, good.min, good.max),
        QTensor(good.packed, good.shape, 9, good.min, good.max),
        QTensor(good.packed, good.shape, 3, good.max + 1, good.max),
        QTensor(good.packed, good.shape, 3, 0.1, good.max),  # 0.1 is not a float32 value
    ]
    for q in bad:
        with pytest.raises(MergeflowError, match="quantised tensor w"):
            save_tvq(tmp_path / "x", {"w": q})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- methods


def toy(n_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(12, 6, generator=g), "a.bias": torch.randn(6, generator=g), "scale": torch.tensor(1.5)}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)]
    return base, models


def taus_of(base, models, name):
    return [m[name] - base[name] for m in models]


def test_tvq_task_arithmetic_equals_ta_on_quantised_vectors():
    base, models = toy()
    (got,) = merge_state_dicts(methods.get("tvq"), base, models, {"bits": 3, "options": {"scaling": 0.5}})
    for name in base:
        q = [reference_qdq(t, 3) for t in taus_of(base, models, name)]
        want = base[name] + 0.5 * (q[0] + q[1] + q[2])
        assert torch.allclose(got[name], want, atol=1e-6), name
        exact = [qdq(t, 3) for t in taus_of(base, models, name)]
        assert torch.equal(got[name], methods.get("task_arithmetic")(name, base[name], exact, scaling=0.5) + base[name])
    # default: 4 bits, task arithmetic with its own default scaling 0.3
    (dflt,) = merge_state_dicts(methods.get("tvq"), base, models)
    q = [qdq(t, 4) for t in taus_of(base, models, "a.weight")]
    assert torch.allclose(dflt["a.weight"], base["a.weight"] + 0.3 * sum(q), atol=1e-6)


def test_tvq_ties_equals_ties_on_quantised_vectors():
    base, models = toy(seed=1)
    (got,) = merge_state_dicts(methods.get("tvq"), base, models, {"bits": 4, "merge": "ties", "options": {"density": 0.5}})
    ties = methods.get("ties")
    for name in base:
        q = [qdq(t, 4) for t in taus_of(base, models, name)]
        want = base[name] + ties(name, base[name], q, density=0.5, scaling=1.0, scope="tensor")
        assert torch.allclose(got[name], want, atol=1e-6), name
    # on these models quantising changes the TIES merge (the test is not vacuous)
    (plain,) = merge_state_dicts(ties, base, models, {"density": 0.5})
    assert not torch.allclose(plain["a.weight"], got["a.weight"], atol=1e-6)


def test_prepare_sees_quantised_vectors():
    """TIES with a model-wide threshold: tvq equals TIES global on the quantised models."""
    _, models = toy(seed=2)
    for m in models:
        m["a.bias"] = m["a.bias"] * 10  # tensors of different scales: a global threshold differs
    base = {k: torch.zeros_like(v) for k, v in models[0].items()}  # theta_0 = 0: the models are the task vectors
    hp = {"density": 0.3, "scope": "global"}
    (got,) = merge_state_dicts(methods.get("tvq"), base, models, {"bits": 2, "merge": "ties", "options": hp})
    quantised = [{k: qdq(v, 2) for k, v in m.items()} for m in models]
    (want,) = merge_state_dicts(methods.get("ties"), base, quantised, hp)
    for name in base:
        assert torch.equal(got[name], want[name]), name
    (per_tensor,) = merge_state_dicts(methods.get("ties"), base, quantised, {"density": 0.3})
    assert not torch.equal(per_tensor["a.bias"], want["a.bias"])  # the global scope mattered


def test_rtvq_method_equals_merge_on_rebuilt_vectors():
    base, models = toy(seed=3)
    for merge_name, options in (("task_arithmetic", {"scaling": 0.4}), ("ties", {"density": 0.5})):
        (got,) = merge_state_dicts(methods.get("rtvq"), base, models, {"merge": merge_name, "options": options})
        inner = methods.get(merge_name)
        for name in base:
            rebuilt = rtvq_qdq(taus_of(base, models, name), 3, 2)
            want = base[name] + inner(name, base[name], rebuilt, **inner.hyper(options))
            assert torch.allclose(got[name], want, atol=1e-6), (merge_name, name)


def test_defaults_and_validated_options():
    assert methods.get("tvq").hyper() == {"bits": 4, "merge": "task_arithmetic", "options": {"scaling": 0.3}}
    assert methods.get("rtvq").hyper() == {
        "base_bits": 3,
        "offset_bits": 2,
        "merge": "task_arithmetic",
        "options": {"scaling": 0.3},
    }
    hp = methods.get("tvq").hyper({"merge": "ties", "options": {"density": 0.5}})
    assert hp["options"] == {"density": 0.5, "scaling": 1.0, "scope": "tensor"}
    assert methods.get("tvq").hyper(hp) == hp  # idempotent: the engine validates again


@pytest.mark.parametrize("method", ["tvq", "rtvq"])
@pytest.mark.parametrize(
    "given, pattern",
    [
        ({"merge": "ties", "options": {"densty": 0.5}}, r"^w\.options\.densty: unknown hyper-parameter of ties"),
        ({"merge": "ties", "options": {"density": 2.0}}, r"^w\.options\.density: 2\.0 is outside"),
        ({"options": {"scaling": "big"}}, r"^w\.options\.scaling: expected float"),
        ({"merge": "nope"}, r"^w\.merge: unknown method 'nope'"),
        ({"merge": "tswitch"}, r"^w\.merge: tswitch cannot run on quantised task vectors"),
        ({"merge": "tvq"}, r"^w\.merge: tvq cannot run"),
        ({"merge": "rtvq"}, r"^w\.merge: rtvq cannot run"),
        ({"merge": "emr"}, r"^w\.merge: emr is a dynamic method"),
        ({"merge": "tall_mask"}, r"^w\.merge: tall_mask is a dynamic method"),
        ({"merge": "cat"}, r"^w\.merge: cat needs layer-input"),
        ({"options": [1]}, r"^w\.options: expected a mapping"),
        ({"bogus": 1}, r"^w\.bogus: unknown hyper-parameter"),
    ],
)
def test_bad_options_name_the_key(method, given, pattern):
    with pytest.raises(MergeflowError, match=pattern):
        methods.get(method).hyper(given, where="w.")


@pytest.mark.parametrize("method, key", [("tvq", "bits"), ("rtvq", "base_bits"), ("rtvq", "offset_bits")])
@pytest.mark.parametrize("value", [1, 9, 4.0, "4"])
def test_bad_bits_name_the_key(method, key, value):
    with pytest.raises(MergeflowError, match=rf"^w\.{key}: "):
        methods.get(method).hyper({key: value}, where="w.")


def test_storage():
    n, t = 1001, 8
    assert methods.get("tvq").storage_bytes(n, t) == t * math.ceil(n * 4 / 8)
    assert methods.get("rtvq").storage_bytes(n, t) == math.ceil(n * 3 / 8) + t * math.ceil(n * 2 / 8)
    assert tvq_module.storage_bytes(methods.get("tvq").hyper({"bits": 3}), n, t) == t * math.ceil(n * 3 / 8)
    hp = methods.get("rtvq").hyper({"base_bits": 4, "offset_bits": 3})
    assert tvq_module.storage_bytes(hp, n, t) == math.ceil(n * 4 / 8) + t * math.ceil(n * 3 / 8)
    # the paper's storage table, 8 tasks: INT4 is 1/8 of FP32 and B3O2 a little over INT2
    fp32 = t * n * 4
    assert tvq_module.storage_bytes({"bits": 4}, n, t) == pytest.approx(fp32 / 8, rel=1e-2)
    assert (
        tvq_module.storage_bytes({"bits": 2}, n, t)
        < methods.get("rtvq").storage_bytes(n, t)
        < tvq_module.storage_bytes({"bits": 3}, n, t)
    )


# --------------------------------------------------------------------------- the engine


def save_checkpoint(path, sd):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(7)
    base = {
        "emb.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "q.weight": torch.randn(8, 8, generator=g),
        "norm.weight": torch.ones(8),
        "position_ids": torch.arange(16),
    }
    fts = [
        {
            k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    b = save_checkpoint(tmp_path / "base", base)
    return base, fts, b, [save_checkpoint(tmp_path / f"ft{i}", sd) for i, sd in enumerate(fts)]


@pytest.mark.parametrize(
    "method, hp",
    [
        ("tvq", {"bits": 3, "merge": "task_arithmetic", "options": {"scaling": 0.3}}),
        ("tvq", {"merge": "ties", "options": {"density": 0.5}}),
        ("rtvq", {"merge": "task_arithmetic", "options": {"scaling": 0.3}}),
        ("rtvq", {"base_bits": 4, "offset_bits": 3, "merge": "ties", "options": {"density": 0.4, "scope": "global"}}),
    ],
)
def test_engine_runs_tvq_and_rtvq(checkpoints, method, hp):
    base, fts, b, ft = checkpoints
    ck = Checkpoint(b)
    (got,) = merge(methods.get(method), ck, [TaskVectors.from_model(ck, p) for p in ft], hp)
    assert torch.equal(got["position_ids"], base["position_ids"])
    full = methods.get(method).hyper(hp)
    inner = methods.get(full["merge"])
    names = [k for k in base if base[k].is_floating_point()]
    taus = {k: [f[k].float() - base[k].float() for f in fts] for k in names}
    if method == "tvq":
        quantised = {k: [qdq(t, full["bits"]) for t in taus[k]] for k in names}
    else:
        quantised = {k: rtvq_qdq(taus[k], full["base_bits"], full["offset_bits"]) for k in names}
    ctx = {}
    if inner.prepare is not None:
        ctx = {"ctx": inner.prepare(lambda: ((k, base[k].float(), quantised[k]) for k in names), full["options"])}
    for k in names:
        want = inner(k, base[k].float(), quantised[k], **full["options"], **ctx) + base[k].float()
        assert torch.allclose(got[k].float(), want, atol=1e-6), k


# --------------------------------------------------------------------------- CUDA


@CUDA
@pytest.mark.parametrize("bits", BITS)
def test_cuda_matches_cpu(bits):
    x = randn(3001, 7, seed=bits, scale=0.02)
    q_cpu, q_gpu = quantise(x, bits), quantise(x.cuda(), bits)
    assert q_gpu.packed.is_cuda and (q_gpu.min, q_gpu.max) == (q_cpu.min, q_cpu.max)
    assert torch.equal(q_gpu.packed.cpu(), q_cpu.packed)
    y = dequantise(q_gpu)
    assert y.is_cuda and torch.equal(y.cpu(), dequantise(q_cpu))
    assert torch.equal(qdq(x.cuda(), bits).cpu(), qdq(x, bits))
    taus = [randn(500, seed=s, scale=0.01) for s in range(3)]
    for a, c in zip(rtvq_qdq([t.cuda() for t in taus]), rtvq_qdq(taus)):
        assert torch.equal(a.cpu(), c)


@CUDA
def test_cuda_engine_and_file(checkpoints, tmp_path):
    base, fts, b, ft = checkpoints
    ck = Checkpoint(b)
    sources = [TaskVectors.from_model(ck, p) for p in ft]
    hp = {"merge": "ties", "options": {"density": 0.5}}
    (gpu,) = merge(methods.get("rtvq"), ck, sources, hp, device=torch.device("cuda"))
    (cpu,) = merge(methods.get("rtvq"), ck, sources, hp)
    for k in cpu:
        assert torch.allclose(gpu[k].float(), cpu[k].float(), atol=1e-5), k
    x = randn(100, seed=9).cuda()
    save_tvq(tmp_path / "g", {"x": quantise(x, 5)})
    assert torch.equal(dequantise(load_tvq(tmp_path / "g").tensors["x"]), qdq(x, 5).cpu())


# --------------------------------------------------------------------------- codec files in the pipeline


def test_reader_decodes_one_tensor_at_a_time_as_the_file_holds(checkpoints, tmp_path):
    """``QuantReader`` gives each tensor exactly as ``load_tvq`` / ``load_rtvq`` decode it, which
    is the definition's qdq / rebuilt base^ + o_t^ of the task vector."""
    from mergeflow.codecs.quant import QuantReader, save_rtvq_from, save_tvq_from
    from mergeflow.vectors import extract_task_vector

    base, fts, b, ft = checkpoints
    ck = Checkpoint(b)
    vecs = [
        Checkpoint(extract_task_vector(ck, Checkpoint(p), tmp_path / f"v{i}.safetensors", {}) and tmp_path / f"v{i}.safetensors")
        for i, p in enumerate(ft)
    ]
    names = [k for k in base if base[k].is_floating_point()]
    taus = {k: [f[k].float() - base[k].float() for f in fts] for k in names}
    stats = save_tvq_from(vecs, 3, tmp_path / "codes", ["t0", "t1", "t2"])
    for i, st in enumerate(stats):
        path = tmp_path / "codes" / f"t{i}.tvq"
        whole = load_tvq(path).dequantise()
        view = QuantReader(path).task()
        assert set(view.names()) == set(names) and st.payload_bytes == sum(tvq_bytes(base[k].numel(), 3) for k in names)
        for k in names:
            assert torch.equal(view.get(k), whole[k]) and torch.equal(view.get(k), qdq(taus[k][i], 3))
    save_rtvq_from(vecs, 4, 2, tmp_path / "all.rtvq")
    reader, whole = QuantReader(tmp_path / "all.rtvq"), load_rtvq(tmp_path / "all.rtvq")
    for i in range(3):
        for k in names:
            assert torch.equal(reader.task(i).get(k), whole.dequantise(i)[k])
            assert torch.equal(reader.task(i).get(k), rtvq_qdq(taus[k], 4, 2)[i])
    with pytest.raises(MergeflowError, match=r"all\.rtvq: no quantised tensor nope"):
        reader.tensor("nope", 0)
    with pytest.raises(MergeflowError, match=r"all\.rtvq: task 3 is not one of its 3"):
        reader.tensor(names[0], 3)
    # one flipped payload byte: refused on open, naming the file
    from mergeflow.codecs.quant import save_tvq

    q = {"w": quantise(randn(1000, seed=1), 4)}
    save_tvq(tmp_path / "bad.tvq", q)
    data = bytearray((tmp_path / "bad.tvq").read_bytes())
    with safe_open(str(tmp_path / "bad.tvq"), framework="pt") as f:
        assert f.get_tensor("payload").numel() == q["w"].packed.numel()
    start = data.index(bytes(q["w"].packed[:16].tolist()))
    data[start + 3] ^= 0xFF
    (tmp_path / "bad.tvq").write_bytes(bytes(data))
    with pytest.raises(MergeflowError, match=r"bad\.tvq: tensor payload: checksum mismatch"):
        QuantReader(tmp_path / "bad.tvq")


@pytest.mark.parametrize(
    "method, hp",
    [
        ("tvq", {"bits": 3, "merge": "task_arithmetic", "options": {"scaling": 0.3}}),
        ("rtvq", {"base_bits": 4, "offset_bits": 3, "merge": "ties", "options": {"density": 0.4, "scope": "global"}}),
    ],
)
def test_pipeline_merge_writes_the_codec_and_merges_from_it(checkpoints, tmp_path, method, hp):
    """The merge stage keeps TVQ / RTVQ as codec files (``merged/<method>/codes``) and runs the
    wrapped merge on what it reads back: the merged model equals the in-memory method's bit for
    bit, the files decode to the definition, and storage is their payload (= exact_storage)."""
    from pathlib import Path

    import yaml

    from mergeflow import stages
    from mergeflow.params import validate
    from mergeflow.vectors import extract_task_vector

    base, fts, b, ft = checkpoints
    root = tmp_path / "ws"
    lay = stages.Layout(root)
    ck = save_checkpoint(lay.checkpoints / "base", base)
    tasks = ["t0", "t1", "t2"]
    lay.vectors.mkdir(parents=True)
    for t, p in zip(tasks, ft):
        extract_task_vector(Checkpoint(ck), Checkpoint(p), lay.vectors / f"{t}.safetensors", {"task": t})
    lay.sources.write_text(json.dumps({"source": "test", "tasks": tasks}))
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["device"] = "cpu"
    params["merge"]["methods"] = [method]
    params["merge"][method] = hp
    p = validate(params)
    work = tmp_path / "work"
    work.mkdir()
    meta = stages.run_unit("merge", p, root, method, work)
    dst = work / method
    got = Checkpoint(dst).state_dict()
    base_ck = Checkpoint(lay.checkpoints / "base")
    names = [k for k in base if base[k].is_floating_point()]
    full = methods.get(method).hyper(hp)
    taus = {k: [f[k].float() - base[k].float() for f in fts] for k in names}
    # the definition: the wrapped merge on the quantised-dequantised task vectors, held in memory
    if method == "tvq":
        quantised = {k: [qdq(t, full["bits"]) for t in taus[k]] for k in names}
    else:
        quantised = {k: rtvq_qdq(taus[k], full["base_bits"], full["offset_bits"]) for k in names}
    held = [TaskVectors(base_ck, MemoryCheckpoint({k: quantised[k][i] for k in names}), True) for i in range(len(tasks))]
    (want,) = merge(methods.get(full["merge"]), base_ck, held, full["options"])
    # (``merge`` returns float32; the stage writes each tensor in the base's dtype)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in got)
    # and so does the in-memory tvq / rtvq method
    (mem,) = merge(
        methods.get(method), base_ck, [TaskVectors.from_vector(base_ck, lay.vectors / f"{t}.safetensors") for t in tasks], hp
    )
    assert all(torch.equal(got[k], mem[k].to(got[k].dtype)) for k in got)
    shapes = {k: tuple(base[k].shape) for k in names}
    assert meta["storage_bytes"] == tvq_module.exact_storage(full, 0, len(tasks), shapes)
    taus = {k: [f[k].float() - base[k].float() for f in fts] for k in names}
    if method == "tvq":
        assert meta["codes"] == [f"{t}.tvq" for t in tasks]
        for i, t in enumerate(tasks):
            dec = load_tvq(dst / "codes" / f"{t}.tvq").dequantise()
            assert all(torch.equal(dec[k], qdq(taus[k][i], full["bits"])) for k in names)
        assert meta["storage_bytes"] == sum(quant_stats(dst / "codes" / f"{t}.tvq").payload_bytes for t in tasks)
    else:
        assert meta["codes"] == ["tasks.rtvq"]
        r = load_rtvq(dst / "codes" / "tasks.rtvq")
        for k in names:
            assert all(
                torch.equal(r.dequantise(i)[k], v)
                for i, v in enumerate(rtvq_qdq(taus[k], full["base_bits"], full["offset_bits"]))
            )
        assert meta["storage_bytes"] == quant_stats(dst / "codes" / "tasks.rtvq").payload_bytes
    assert sorted(x.name for x in work.iterdir()) == [method]  # no scratch left
