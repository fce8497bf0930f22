"""The method contract, for every registered method (``methods.names()``): a new method file is
covered without editing this one.

Each property is the contract's own (docs/adding-a-method.md): the signature convention, one
output per task for a dynamic or routed method, shapes and float32 out, non-floating tensors
copied from the base, inputs unchanged, the same result twice and on disk as in memory, the
declared ranges enforced, old spellings accepted, and a storage figure between nothing and
one float32 copy per task plus the base.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from mergeflow import methods
from mergeflow.errors import MergeflowError
from mergeflow.layer_stats import InputStats
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.merge import TaskVectors, merge_state_dicts, merge_to_disk
from mergeflow.methods.registry import DATA, KINDS, POSITIONAL

NAMES = methods.names()
SHAPES = {"embed.s": (), "layers.0.v": (7,), "layers.0.m": (6, 5), "layers.1.m": (6, 5), "layers.1.t": (2, 3, 4)}


def model(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    sd["ids"] = torch.arange(5, dtype=torch.int64)
    sd["flag"] = torch.tensor([True, False, True])
    sd["u8"] = torch.tensor([1, 2, 255], dtype=torch.uint8)
    return sd


def finetunes(base: dict[str, torch.Tensor], n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            k: (v + 0.5 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        for _ in range(n)
    ]


def data_for(method: methods.Method, base: dict[str, torch.Tensor], n_tasks: int):
    """What a data-driven method needs, of the right form, per task (synthetic but valid)."""
    if method.data == "none":
        return None
    if method.data == "layer_inputs":
        g = torch.Generator().manual_seed(7)
        out = []
        for _ in range(n_tasks):
            stats = {}
            for k, v in base.items():
                if v.is_floating_point() and v.dim() == 2:
                    x = torch.randn(20, v.shape[1], generator=g)
                    stats[k] = InputStats("linear", x.T @ x / 20, 20)
                elif v.is_floating_point() and v.dim() == 1:
                    stats[k] = InputStats("scale", torch.rand(v.shape, generator=g) + 0.1, 20)
            out.append(stats)
        return out
    pytest.fail(f"{method.name}: the contract tests have no data of kind {method.data!r}: add it to data_for")


def merged(name: str, base, models, hp=None):
    m = methods.get(name)
    return merge_state_dicts(m, base, models, hp or {}, data=data_for(m, base, len(models)))


def test_registry_is_not_empty_and_capabilities_are_known():
    assert len(NAMES) >= 20
    for name in NAMES:
        m = methods.get(name)
        assert m.kind in KINDS and m.data in DATA, name
        assert m.dynamic == (m.kind != "static")
        assert m.summary and m.reference, name


@pytest.mark.parametrize("name", NAMES)
def test_signature_convention(name):
    m = methods.get(name)
    params = list(inspect.signature(m.fn).parameters.values())
    assert [p.name for p in params[:3]] == list(POSITIONAL)
    rest = params[3:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), name
    assert [p.name for p in rest if p.name not in ("ctx", "stats")] == list(m.params)
    for key, p in zip(m.params, (p for p in rest if p.name in m.params)):
        assert m.params[key].default == p.default and m.params[key].help, (name, key)
        assert key.isidentifier() and key != "base", (name, key)
    defaults = m.hyper()
    assert list(defaults) == list(m.params)
    for key, p in m.params.items():
        if dict not in p.kinds:  # a dict of another method's options comes back validated (its defaults filled in)
            assert defaults[key] == p.default, (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_shapes_and_dtypes(name):
    m = methods.get(name)
    base = model(0)
    out = merged(name, base, finetunes(base))
    assert len(out) == (3 if m.dynamic else 1)
    for sd in out:
        assert list(sd) == list(base)
        for k, v in base.items():
            assert sd[k].shape == v.shape, (name, k)
            if v.is_floating_point():
                assert sd[k].dtype == torch.float32 and torch.isfinite(sd[k]).all(), (name, k)
            else:
                assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), (name, k)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_precisions_give_float32(name, dtype):
    base = model(2, dtype)
    for sd in merged(name, base, finetunes(base, 2)):
        for k, v in base.items():
            if v.is_floating_point():
                assert sd[k].dtype == torch.float32 and sd[k].shape == v.shape, (name, k)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_unchanged_and_deterministic(name):
    base = model(3)
    models = finetunes(base, 3, seed=4)
    models[1]["layers.0.v"] = base["layers.0.v"]  # a tensor shared with the base (a fine-tune that left it as is)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *models)]
    first = merged(name, base, models)
    for sd, ref in zip((base, *models), before):
        for k in ref:
            assert torch.equal(sd[k], ref[k]), (name, k)
    for a, b in zip(first, merged(name, base, models)):
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


@pytest.mark.parametrize("name", NAMES)
def test_on_disk_equals_in_memory(name, tmp_path):
    from safetensors.torch import save_file

    m = methods.get(name)
    base = model(5)
    models = finetunes(base, 2, seed=6)
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, sd in enumerate(models):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    ck = Checkpoint(tmp_path / "base.safetensors")
    sources = [TaskVectors.from_model(ck, Checkpoint(tmp_path / f"m{i}.safetensors")) for i in range(2)]
    merge_to_disk(m, ck, sources, {}, tmp_path / "out", dtype=torch.float32, data=data_for(m, base, 2))
    dirs = [tmp_path / "out" / f"task_{i}" for i in range(2)] if m.dynamic else [tmp_path / "out"]
    for folder, mem in zip(dirs, merged(name, base, models)):
        disk = Checkpoint(folder).state_dict()
        for k in base:
            assert torch.allclose(disk[k].float(), mem[k].float(), atol=1e-6), (name, k)


@pytest.mark.parametrize("name", NAMES)
def test_declared_ranges_choices_and_unknown_keys_enforced(name):
    m = methods.get(name)
    with pytest.raises(MergeflowError, match=r"bogus_knob: unknown hyper-parameter of " + re.escape(name)):
        m.hyper({"bogus_knob": 1})
    for key, p in m.params.items():
        if p.low is not None:
            with pytest.raises(MergeflowError, match=re.escape(key)):
                m.hyper({key: p.low - 1})
        if p.high is not None:
            with pytest.raises(MergeflowError, match=re.escape(key)):
                m.hyper({key: p.high + (0 if p.high_open else 1)})
        if p.choices is not None:
            with pytest.raises(MergeflowError, match=re.escape(key)):
                m.hyper({key: "no-such-choice"})


@pytest.mark.parametrize("name", [n for n in NAMES if any(p.aliases for p in methods.get(n).params.values())])
def test_old_spellings_accepted_and_not_beside_the_new(name):
    m = methods.get(name)
    for key, p in m.params.items():
        for old in p.aliases:
            value = p.default if p.default is not None else p.low
            assert m.hyper({old: value})[key] == m.hyper({key: value})[key]
            with pytest.raises(MergeflowError, match=f"{old}: the old name of {key}"):
                m.hyper({old: value, key: value})


@pytest.mark.parametrize("name", NAMES)
def test_storage_between_nothing_and_a_float32_copy_per_task(name):
    m = methods.get(name)
    shapes = {"a": (64, 32), "b": (32,)}
    n = sum(math.prod(s) for s in shapes.values())
    for n_tasks in (2, 8):
        got = m.storage_bytes(n, n_tasks, 4, hp={}, shapes=shapes)
        assert isinstance(got, int) and 0 < got <= (n_tasks + 1) * n * 4, (name, n_tasks, got)
        assert m.storage_bytes(4 * n, n_tasks, 4) >= m.storage_bytes(n, n_tasks, 4), name  # grows with the model


@pytest.mark.parametrize("name", [n for n in NAMES if methods.get(n).data != "none"])
def test_data_driven_methods_refuse_to_run_without_their_data(name):
    base = model(8)
    with pytest.raises(MergeflowError, match=re.escape(name)):
        merge_state_dicts(methods.get(name), base, finetunes(base, 2), {})
