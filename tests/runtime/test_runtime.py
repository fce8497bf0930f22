"""The switch runtime against independent expectations: bitwise restoration, T-Switch's task
model theta_0 + s*B (``apply_switch`` and the definition), the weighted sum of METHODS.md's
Auto-Switch, grouped serving, the backup's extent and the bit packing."""

from __future__ import annotations

import math

import pytest
import torch

import mergeflow.runtime.chunks as rtmod  # the chunk kernels and arena the failure tests replace
from mergeflow.codecs.switch import Switch, SwitchTensor, load_switch, save_switch
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint, write_checkpoint
from mergeflow.methods.tswitch import apply_switch, compress
from mergeflow.runtime import (
    PackedSwitch,
    PackedTensor,
    SwitchModel,
    SwitchRuntime,
    load_runtime,
    pack_ternary,
    unpack_ternary,
)

TASKS = ("a", "b", "c")
SHAPES = {
    "enc.weight": (37, 29),  # 1073 entries: not a multiple of 8
    "enc.bias": (29,),
    "dec.weight": (64, 37),
    "one": (1,),
    "head.weight": (5, 64),  # kept dense (a per-task head)
    "logit_scale": (),  # 0-dim: dense
    "frozen": (16,),  # all-zero task vectors: skipped
}
DROP = 0.6


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (bitwise comparison, signed zeros and NaNs included)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def make_base(dtype: torch.dtype = torch.float32, seed: int = 0, specials: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = {name: (torch.randn(shape, generator=g) * 0.02).to(dtype) for name, shape in SHAPES.items()}
    if specials:  # signed zeros, a tiny value and exact zeros: restoration must be bitwise
        flat = base["enc.weight"].view(-1)
        flat[::5] = -0.0
        flat[1::5] = 0.0
        flat[2::11] = 1e-30 if dtype != torch.float16 else 1e-7
    return base


def make_taus(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    taus = {name: torch.randn(shape, generator=g) * 0.004 for name, shape in SHAPES.items()}
    taus["frozen"] = torch.zeros(SHAPES["frozen"])
    return taus


def make_switches() -> dict[str, Switch]:
    return {t: compress(make_taus(10 + i).items(), DROP, keep_dense=["head.weight"]) for i, t in enumerate(TASKS)}


@pytest.fixture(params=["auto", "torch"], autouse=True)
def kernel_mode(request, monkeypatch):
    """Every test on both CPU paths: the fused numba kernels (float32/bfloat16 chunks) and
    torch's ops (MERGEFLOW_KERNELS=torch)."""
    monkeypatch.setenv("MERGEFLOW_KERNELS", request.param)
    return request.param


@pytest.fixture(scope="module")
def switches() -> dict[str, Switch]:
    return make_switches()


def expected_sum(
    base: dict[str, torch.Tensor], switches: dict[str, Switch], weights: dict[str, float]
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_t w_t s_t B_t (dense: + w_t dense_t), computed directly in float64."""
    out = {}
    for name, theta in base.items():
        acc = theta.double().clone()
        for task, w in weights.items():
            sw = switches[task]
            if name in sw.tensors:
                acc += w * sw.tensors[name].scale * sw.tensors[name].ternary.double()
            elif name in sw.dense:
                acc += w * sw.dense[name].double()
        out[name] = acc
    return out


# --- bitwise restoration ---------------------------------------------------------------------------

WEIGHTS = [
    {"a": 1.0},  # one-hot
    {"b": 1.0},
    {"a": 0.3, "b": 0.7},  # fractional (Auto-Switch's shares)
    {"a": 0.1, "b": 0.2, "c": 0.7},
    {"a": -0.8},  # negative
    {"a": 1.5, "c": -0.25},
    {"a": 0.0, "b": 0.0, "c": 0.0},  # zero
    {},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk,workers", [(None, None), (64, 1), (64, 2)])
def test_apply_remove_restores_bitwise(switches, dtype, chunk, workers):
    base = make_base(dtype)
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, chunk=chunk, workers=workers)
    for weights in WEIGHTS:
        rt.apply(weights)
        changed = any(not same_bits(base[k], snapshot[k]) for k in base)
        assert changed == any(w != 0 for w in weights.values()), weights
        assert rt.active == weights
        rt.remove()
        assert rt.active is None and rt.backup_nbytes == 0
        for name in base:
            assert same_bits(base[name], snapshot[name]), (dtype, weights, name)
    rt.close()


def test_many_rounds_and_special_values(switches):
    base = make_base(torch.float32)
    flat = base["dec.weight"].view(-1)
    flat[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38])
    flat[4:8] = torch.tensor([1e-45, -1e-45, 1e-38, -2.0])  # subnormals, the smallest normal
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, chunk=128)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        w = (torch.rand(3, generator=g) * 4 - 2).tolist()
        with rt.use(dict(zip(TASKS, w))):
            pass
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def test_strided_parameter(switches):
    base = make_base(torch.float32)
    base["dec.weight"] = torch.randn(37, 64).mul_(0.02).t()  # a transposed view: not contiguous
    assert not base["dec.weight"].is_contiguous()
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, chunk=64)
    rt.apply({"b": 1.0})
    assert torch.equal(base["dec.weight"], apply_switch(snapshot, switches["b"])["dec.weight"])
    rt.remove()
    assert same_bits(base["dec.weight"], snapshot["dec.weight"])


# --- the task model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 64])
def test_one_hot_equals_apply_switch_and_definition(switches, chunk):
    base = make_base(torch.float32, specials=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, chunk=chunk)
    for task in TASKS:
        reference = apply_switch(snapshot, switches[task])
        sw = switches[task]
        with rt.use({task: 1.0}):
            for name, theta in snapshot.items():
                assert torch.equal(base[name], reference[name]), (task, name)
                # the definition, written out: theta_0 + s * B, dense tensors added, skipped kept
                if name in sw.tensors:
                    definition = theta + sw.tensors[name].scale * sw.tensors[name].ternary.to(torch.float32)
                elif name in sw.dense:
                    definition = theta + sw.dense[name]
                else:
                    definition = theta
                assert torch.equal(base[name], definition), (task, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_hot_half_types_equal_apply_switch(switches, dtype):
    base = make_base(dtype, specials=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches)
    with rt.use({"c": 1.0}):
        reference = apply_switch(snapshot, switches["c"])
        for name in base:
            assert torch.equal(base[name], reference[name]), name


@pytest.mark.parametrize("weights", [{"a": 0.3, "b": 0.7}, {"a": 0.1, "b": 0.2, "c": 0.7}, {"a": -0.8, "c": 2.5}, {"b": 0.25}])
def test_fractional_weights_match_the_weighted_sum(switches, weights):
    base = make_base(torch.float32, specials=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    expected = expected_sum(snapshot, switches, weights)
    rt = SwitchRuntime(base, switches, chunk=64)
    with rt.use(weights):
        for name in base:
            assert torch.allclose(base[name].double(), expected[name], rtol=1e-6, atol=1e-8), name


def test_weights_as_a_row_follow_switch_order(switches):
    base = make_base(torch.float32, specials=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches)
    assert rt.names == list(TASKS)
    with rt.use(torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64)):
        assert rt.active == {"a": 0.0, "b": 0.4, "c": 0.6}
        expected = expected_sum(snapshot, switches, {"b": 0.4, "c": 0.6})
        assert all(torch.allclose(base[k].double(), expected[k], rtol=1e-6, atol=1e-8) for k in base)


def test_dense_and_skipped_tensors(switches):
    assert "head.weight" in switches["a"].dense and "logit_scale" in switches["a"].dense
    assert switches["a"].skipped == ["frozen"]
    base = make_base(torch.float32, specials=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches)
    with rt.use({"a": 0.5, "b": -1.0}):
        for name in ("head.weight", "logit_scale"):
            expected = snapshot[name] + 0.5 * switches["a"].dense[name] - 1.0 * switches["b"].dense[name]
            assert torch.allclose(base[name], expected, rtol=1e-6, atol=1e-8)
        assert same_bits(base["frozen"], snapshot["frozen"])  # skipped: untouched
        assert rt._backup["head.weight"].full is not None  # dense tensors are saved whole
        assert "frozen" not in rt._backup
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def test_integer_tensors_are_never_changed():
    base = {"w": torch.randn(4, 4), "ids": torch.arange(16).reshape(4, 4)}
    switch = Switch(
        tensors={
            "w": SwitchTensor(torch.ones(4, 4, dtype=torch.int8), 0.5),
            "ids": SwitchTensor(torch.ones(4, 4, dtype=torch.int8), 0.5),
        }
    )
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, {"t": switch})
    with rt.use({"t": 1.0}):
        assert torch.equal(base["ids"], snapshot["ids"])
        assert torch.equal(base["w"], apply_switch(snapshot, switch)["w"])


# --- state and errors ---------------------------------------------------------------------------------

SWITCH_SEQUENCE = [
    {"a": 1.0},
    {"b": 1.0},
    {"a": 0.3, "b": 0.7},
    {"a": 0.3, "b": 0.7},
    {"c": -0.8},
    {},
    {"a": 0.1, "b": 0.2, "c": 0.7},
    {"b": 1.0},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_switch_equals_remove_then_apply(switches, dtype):
    """switch() leaves the weights, and the entries it saves, bitwise as remove() + apply() do;
    the base comes back bitwise at the end (dense, strided and untouched tensors included)."""
    base, twin = make_base(dtype), make_base(dtype)
    base["dec.weight"] = base["dec.weight"].t().contiguous().t()  # strided: not fused
    twin["dec.weight"] = twin["dec.weight"].t().contiguous().t()
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, workers=2)
    ref = SwitchRuntime(twin, switches, workers=2)
    for weights in SWITCH_SEQUENCE:
        rt.switch(weights)
        ref.remove()
        ref.apply(weights)
        assert rt.active == ref.active == weights
        for name in base:
            assert same_bits(base[name], twin[name]), (weights, name)
        saved = {
            name: sorted(
                (int(p.start) + int(i), int(v))
                for p in b.pieces
                for i, v in zip(
                    p.pos.long(), p.vals.view(-1).view(torch.int16 if p.vals.element_size() == 2 else torch.int32).long()
                )
            )
            for name, b in rt._backup.items()
        }
        want = {
            name: sorted(
                (int(p.start) + int(i), int(v))
                for p in b.pieces
                for i, v in zip(
                    p.pos.long(), p.vals.view(-1).view(torch.int16 if p.vals.element_size() == 2 else torch.int32).long()
                )
            )
            for name, b in ref._backup.items()
        }
        assert saved == want, weights
    rt.remove()
    assert all(same_bits(base[k], snapshot[k]) for k in base)
    rt.close()
    ref.close()


def test_a_failing_switch_restores_the_base(switches, monkeypatch):
    base = {f"w{i}": torch.randn(40_000, generator=torch.Generator().manual_seed(i)) * 0.02 for i in range(3)}
    g = torch.Generator().manual_seed(9)
    sw = {t: compress([(k, torch.randn(v.shape, generator=g) * 3e-3) for k, v in base.items()], DROP) for t in "xy"}
    snapshot = {k: v.clone() for k, v in base.items()}
    monkeypatch.setattr(rtmod._Arena, "BLOCK", 3000)  # many pieces, many kernel calls
    rt = SwitchRuntime(base, sw, workers=1, chunk=1024)
    rt.apply({"x": 1.0})
    from mergeflow import kernels

    calls = []  # the 5th call fails: of the fused swap kernel, or of torch's chunk loop
    monkeypatch.setattr(kernels, "switch_swap", failing_call(kernels.switch_swap, calls, 5, "worker died"))
    monkeypatch.setattr(rtmod, "_apply_chunks", failing_call(rtmod._apply_chunks, calls, 5, "worker died"))
    with pytest.raises(RuntimeError, match="worker died"):
        rt.switch({"x": 0.5, "y": 0.5})
    assert len(calls) == 5
    assert rt.active is None and rt.backup_nbytes == 0
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def test_apply_twice_without_remove_errors(switches):
    base = make_base()
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches)
    rt.apply({"a": 1.0})
    after_first = {k: v.clone() for k, v in base.items()}
    with pytest.raises(MergeflowError, match="already applied"):
        rt.apply({"b": 1.0})
    assert rt.active == {"a": 1.0}
    assert all(same_bits(base[k], after_first[k]) for k in base)  # the failed call changed nothing
    rt.remove()
    rt.remove()  # nothing applied: a no-op
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def test_use_restores_when_the_block_raises(switches):
    base = make_base()
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches)
    with pytest.raises(ValueError):
        with rt.use({"a": 0.5, "c": 0.5}):
            raise ValueError("boom")
    assert rt.active is None
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def failing_call(real, calls: list, nth: int, message: str):
    """``real``, except that the nth call counted in ``calls`` (shared by several wrappers) raises."""

    def run(*args):
        calls.append(1)
        if len(calls) == nth:
            raise RuntimeError(message)
        return real(*args)

    return run


def test_a_failing_apply_is_undone(switches, monkeypatch):
    base = make_base()
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, chunk=64, workers=1)
    calls = []
    for name in ("_apply_chunks", "_apply_chunks_fused"):  # the 4th range fails, on either path
        monkeypatch.setattr(rtmod, name, failing_call(getattr(rtmod, name), calls, 4, "device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        rt.apply({"a": 0.4, "b": 0.6})
    assert len(calls) == 4
    assert rt.active is None and rt.backup_nbytes == 0
    assert all(same_bits(base[k], snapshot[k]) for k in base)


def test_bad_weights_and_switches(switches):
    base = make_base()
    rt = SwitchRuntime(base, switches)
    with pytest.raises(MergeflowError, match="no such switch"):
        rt.apply({"zzz": 1.0})
    with pytest.raises(MergeflowError, match="not finite"):
        rt.apply({"a": float("nan")})
    with pytest.raises(MergeflowError, match="2 switch weights for 3"):
        rt.apply(torch.tensor([0.5, 0.5]))
    assert rt.active is None
    with pytest.raises(MergeflowError, match="not among the model's parameters"):
        SwitchRuntime({k: v for k, v in base.items() if k != "enc.bias"}, switches)
    bad = dict(base, **{"enc.weight": torch.zeros(29, 37)})
    with pytest.raises(MergeflowError, match="shape"):
        SwitchRuntime(bad, switches)
    tied = dict(base, **{"dec.weight": base["enc.weight"]})
    tied_switch = Switch(
        tensors={"enc.weight": switches["a"].tensors["enc.weight"], "dec.weight": switches["a"].tensors["enc.weight"]}
    )
    with pytest.raises(MergeflowError, match="share memory"):
        SwitchRuntime(tied, {"t": tied_switch})


# --- memory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backup_holds_only_touched_entries(dtype):
    g = torch.Generator().manual_seed(5)
    base = {f"w{i}": (torch.randn(300, 257, generator=g) * 0.02).to(dtype) for i in range(3)}
    base["w0"].view(-1)[::3] = -0.0  # signed zeros that no switch touches must not be saved
    taus = [{k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()} for _ in range(2)]
    switches = {f"t{i}": compress(t.items(), DROP) for i, t in enumerate(taus)}
    rt = SwitchRuntime(base, switches, chunk=4096)
    full = sum(v.numel() * v.element_size() for v in base.values())
    for weights in ({"t0": 1.0}, {"t0": 0.5, "t1": 0.5}):
        assert rt.backup_nbytes == 0
        with rt.use(weights):
            assert 0 < rt.backup_nbytes < full / 2
            for name, backup in rt._backup.items():
                union = torch.zeros(base[name].numel(), dtype=torch.bool)
                for task in weights:
                    union |= switches[task].tensors[name].ternary.reshape(-1) != 0
                positions = torch.cat([p.pos.long() + p.start for p in backup.pieces])
                assert positions.numel() == positions.unique().numel()
                assert bool(union[positions].all()), name  # a subset of the touched entries
                assert positions.numel() < union.sum()
        assert rt.backup_nbytes == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_backup_arena_and_both_paths_save_the_same_entries(dtype, monkeypatch, kernel_mode):
    """Arena blocks only a little bigger than one kernel call needs: the fused kernel stops at
    tile boundaries and the pieces chain across blocks. Whatever the path, the saved entries
    (position, original bits) are exactly those where y - d would not give x back, and removal
    is bitwise."""
    from mergeflow import kernels

    monkeypatch.setattr(rtmod._Arena, "BLOCK", kernels.SWITCH_TILE + kernels.SWITCH_SLACK + 40)
    g = torch.Generator().manual_seed(8)
    base = {f"w{i}": (torch.randn(n, generator=g) * 0.02).to(dtype) for i, n in enumerate((70_001, 9_000, 5))}
    taus = [{k: torch.randn(v.shape, generator=g) * 3e-3 for k, v in base.items()} for _ in range(2)]
    switches = {f"t{i}": compress(t.items(), DROP) for i, t in enumerate(taus)}
    snapshot = {k: v.clone() for k, v in base.items()}
    rt = SwitchRuntime(base, switches, workers=2)
    for weights in ({"t0": 1.0}, {"t0": 0.4, "t1": -1.3}):
        rt.apply(weights)
        for name, x in snapshot.items():
            d = torch.zeros(x.numel())  # the step, summed in float32 from +0.0 in switch order
            for task, w in weights.items():
                st = switches[task].tensors[name]
                d += torch.tensor(w * st.scale, dtype=torch.float32).item() * st.ternary.reshape(-1).float()
            y = (x.float() - (0 - d)).to(dtype)
            z = (y.float() - d).to(dtype)
            ibits = torch.int32 if dtype == torch.float32 else torch.int16
            want = torch.nonzero(z.view(ibits) != x.view(ibits)).squeeze(1)
            assert same_bits(base[name], y), name
            pieces = rt._backup[name].pieces
            got = torch.cat([p.pos.long() + p.start for p in pieces])
            assert torch.equal(got, want), (name, got.numel(), want.numel())
            vals = torch.cat([p.vals.view(ibits) for p in pieces])  # original values, or their bits (fused)
            assert torch.equal(vals, x.view(ibits)[want]), name
            if kernel_mode == "auto" and name == "w0":
                assert len(pieces) > 2  # the arena ran short several times
        rt.remove()
        assert all(same_bits(base[k], snapshot[k]) for k in base)
    rt.close()


def test_packed_switch_memory(switches):
    packed = PackedSwitch.from_switch(switches["a"])
    n = sum(t.ternary.numel() for t in switches["a"].tensors.values())
    dense = sum(d.numel() * d.element_size() for d in switches["a"].dense.values())
    bitmaps = sum(2 * math.ceil(t.ternary.numel() / 8) + 4 for t in switches["a"].tensors.values())
    assert packed.nbytes == bitmaps + dense
    assert (packed.nbytes - dense) * 8 / n < 2.3  # about 2 bits per parameter
    assert packed.skipped == ["frozen"]


# --- bit packing --------------------------------------------------------------------------------------

PACK_SHAPES = [(1,), (7,), (8,), (9,), (15,), (16,), (17,), (3, 5), (2, 3, 7), (1, 1, 13), (64,), (33, 65), (4, 8, 8)]


@pytest.mark.parametrize("shape", PACK_SHAPES)
def test_pack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for density in (0.0, 0.1, 0.4, 1.0):
        keep = torch.rand(shape, generator=g) < density
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1, 1)
        ternary = (keep * sign).to(torch.int8)
        packed = pack_ternary(ternary)
        n = ternary.numel()
        assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 8), 2)
        flat = ternary.reshape(-1).tolist()
        for i, v in enumerate(flat):  # the documented layout, bit by bit
            assert (int(packed[i // 8, 0]) >> (i % 8)) & 1 == (v != 0)
            assert (int(packed[i // 8, 1]) >> (i % 8)) & 1 == (v < 0)
        assert torch.equal(unpack_ternary(packed, n), ternary.reshape(-1))
        pt = PackedTensor.from_ternary(ternary, 0.25)
        assert torch.equal(pt.ternary(), ternary) and pt.n_kept == int(keep.sum())
        assert pt.nbytes == 2 * math.ceil(n / 8) + 4
        for start in range(0, n, 8):  # any sub-range starting on a byte
            stop = min(n, start + 1 + (start * 7) % 19)
            assert torch.equal(unpack_ternary(packed, n, start, stop), ternary.reshape(-1)[start:stop])


def test_pack_rejects_non_ternary():
    with pytest.raises(MergeflowError):
        pack_ternary(torch.tensor([0, 2, -1], dtype=torch.int8))
    with pytest.raises(MergeflowError):
        pack_ternary(torch.tensor([0.0, 1.0]))
    with pytest.raises(MergeflowError):
        unpack_ternary(pack_ternary(torch.ones(16, dtype=torch.int8)), 16, start=3)


# --- serving ------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def model_switches(model: torch.nn.Module) -> dict[str, Switch]:
    out = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(100 + i)
        taus = ((name, torch.randn(p.shape, generator=g) * 0.2) for name, p in model.named_parameters())
        out[task] = compress(taus, DROP)
    return out


def test_grouped_predict_equals_each_row_alone():
    model = tiny_model()
    switches = model_switches(model)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sm = SwitchModel(model, switches)
    rows = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0], [0.5, 0.5, 0], [0, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    x = torch.randn(len(rows), 6, generator=torch.Generator().manual_seed(1))
    applied = []
    real_switch = sm.runtime.switch

    def counting_switch(weights):
        applied.append(sm.runtime.weights_dict(weights))
        return real_switch(weights)

    sm.runtime.switch = counting_switch
    out = sm.predict(x, rows)
    assert len(applied) == 5  # one switch per distinct combination
    assert len({tuple(sorted(w.items())) for w in applied}) == 5
    assert sm.runtime.active is None
    sm.runtime.switch = real_switch
    assert all(same_bits(v, snapshot[k]) for k, v in model.state_dict().items())
    # each row alone: the definition's model for that row, built without the runtime
    for i in range(len(rows)):
        weights = dict(zip(TASKS, rows[i].tolist()))
        params = {k: v.float() for k, v in expected_sum(snapshot, switches, weights).items()}
        ref = torch.func.functional_call(model, params, (x[i : i + 1],))
        assert torch.allclose(out[i : i + 1], ref, rtol=1e-5, atol=1e-6), i
        with sm.runtime.use(weights):
            alone = model(x[i : i + 1])
        assert torch.allclose(out[i : i + 1], alone, rtol=1e-5, atol=1e-6), i


def test_predict_router_forward_and_mapping_inputs():
    model = tiny_model(1)
    switches = model_switches(model)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    hard = torch.eye(3)[torch.tensor([2, 0, 2, 1, 0])]
    sm = SwitchModel(model, switches, router=lambda inputs: hard)
    routed = sm.predict(x)
    explicit = sm.predict(x, hard)
    assert torch.equal(routed, explicit)
    via_mapping = sm.predict({"x": x}, hard, forward=lambda m, batch: m(batch["x"]))
    assert torch.equal(via_mapping, explicit)
    whole = sm.predict(x, {"b": 1.0})  # one combination for the whole batch
    with sm.runtime.use({"b": 1.0}):
        assert torch.equal(whole, model(x))
    assert all(same_bits(v, snapshot[k]) for k, v in model.state_dict().items())
    with pytest.raises(MergeflowError, match="weights must be"):
        sm.predict(x, hard[:3])
    with pytest.raises(MergeflowError, match="router"):
        SwitchModel(model, switches).predict(x)


# --- loading and devices ------------------------------------------------------------------------------


def test_load_runtime_from_files(tmp_path, switches):
    base = make_base(torch.float32, specials=False)
    write_checkpoint(tmp_path / "base", base)
    paths = {}
    for task in ("a", "c"):
        paths[task] = tmp_path / f"{task}.switch.safetensors"
        save_switch(paths[task], switches[task])
    state, rt = load_runtime(tmp_path / "base", paths)
    assert rt.names == ["a", "c"]
    snapshot = {k: v.clone() for k, v in state.items()}
    with Checkpoint(tmp_path / "base") as ckpt:
        reference = apply_switch(ckpt, load_switch(paths["c"]))
    with rt.use({"c": 1.0}):
        for name in reference:
            assert torch.equal(state[name], reference[name]), name
    assert all(same_bits(state[k], snapshot[k]) for k in state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_restores(switches, dtype):
    cpu = make_base(dtype)
    snapshot = {k: v.clone() for k, v in cpu.items()}
    gpu = {k: v.cuda() for k, v in cpu.items()}
    rt_gpu = SwitchRuntime(gpu, switches)
    rt_cpu = SwitchRuntime(cpu, switches)
    assert all(t.bits.is_cuda for s in rt_gpu.switches.values() for t in s.tensors.values())
    for weights in ({"a": 1.0}, {"a": 0.3, "b": 0.7}, {"c": -0.5}):
        with rt_gpu.use(weights), rt_cpu.use(weights):
            for name in cpu:
                assert same_bits(gpu[name].cpu(), cpu[name]), (weights, name)
        for name in cpu:
            assert same_bits(gpu[name].cpu(), snapshot[name]), (weights, name)
    if dtype == torch.float32:
        with rt_gpu.use({"b": 1.0}):
            reference = apply_switch(snapshot, switches["b"])
            assert all(torch.equal(gpu[k].cpu(), reference[k]) for k in cpu)
