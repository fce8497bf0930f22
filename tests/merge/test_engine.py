"""The streaming engine and writer: layout like the base, dtypes, atomicity, CLI merge end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergeflow import methods
from mergeflow.cli import app
from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.io.writer import CheckpointWriter
from mergeflow.merge import TaskVectors, merge, merge_state_dicts, merge_to_disk


def pico(seed: int, scale: float = 0.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny LLaMA-like state dict: bf16 matrices, a float32 norm, an int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "embed.weight": torch.randn(16, 8, generator=g).bfloat16(),
            "layers.0.q.weight": torch.randn(8, 8, generator=g).bfloat16(),
            "layers.0.norm.weight": torch.ones(8),
            "position_ids": torch.arange(16),
        }
    return {
        k: ((v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v)
        for k, v in base.items()
    }


def save_dir(path, sd, shards: list[list[str]] | None = None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "pico"}))
    if not shards:
        save_file(sd, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: sd[n] for n in names}, str(path / fname))
        weight_map.update({n: fname for n in names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def models(tmp_path):
    base = pico(0)
    fts = [pico(i + 1, 0.1, base) for i in range(3)]
    shards = [["embed.weight", "position_ids"], ["layers.0.q.weight", "layers.0.norm.weight"]]
    b = save_dir(tmp_path / "base", base, shards)
    ft = [save_dir(tmp_path / f"ft{i}", sd) for i, sd in enumerate(fts)]
    return base, fts, b, ft


def expected_ta(base, fts, scaling):
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            out[k] = (v.float() + scaling * sum(f[k].float() - v.float() for f in fts)).to(v.dtype)
        else:
            out[k] = v
    return out


def test_writer_mirrors_base_shards_dtypes_and_config(models, tmp_path):
    base, fts, b, ft = models
    ck = Checkpoint(b)
    out = tmp_path / "out"
    sources = [TaskVectors.from_model(ck, p) for p in ft]
    merge_to_disk(methods.get("task_arithmetic"), ck, sources, {"scaling": 0.3}, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    src_index = json.loads((b / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"]
    assert json.loads((out / "config.json").read_text()) == {"model_type": "pico"}
    got = Checkpoint(out).state_dict()
    want = expected_ta(base, fts, 0.3)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k  # each tensor keeps the base's dtype
        assert torch.equal(got[k], want[k]), k
    sizes = sum((out / f).stat().st_size for f in set(index["weight_map"].values()))
    data = sum(t.numel() * t.element_size() for t in want.values())
    assert index["metadata"]["total_size"] == data < sizes
    # files are plain safetensors: the reference reader agrees and the data start is 8-byte aligned
    for f in set(index["weight_map"].values()):
        raw = (out / f).read_bytes()
        assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0
        ref = load_file(str(out / f))
        for k, v in ref.items():
            assert torch.equal(v, want[k])
        with safe_open(str(out / f), "pt") as fh:
            assert fh.metadata()["mergeflow_method"] == "task_arithmetic"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_out_dtype_and_dynamic_layout(models, tmp_path):
    base, fts, b, ft = models
    ck = Checkpoint(b)
    sources = [TaskVectors.from_model(ck, p) for p in ft]
    out = tmp_path / "dyn"
    paths = merge_to_disk(methods.get("tswitch"), ck, sources, {"drop": 0.5}, out, dtype=torch.float32)
    assert paths == [out / f"task_{i}" for i in range(3)]
    in_memory = merge(methods.get("tswitch"), ck, sources, {"drop": 0.5})
    for p, sd in zip(paths, in_memory):
        got = Checkpoint(p).state_dict()
        assert got["embed.weight"].dtype == torch.float32 and got["position_ids"].dtype == torch.int64
        for k, v in sd.items():
            assert torch.equal(got[k], v if not v.is_floating_point() else v.float()), k


def test_failure_leaves_no_output(models, tmp_path):
    base, fts, b, ft = models
    bad = dict(fts[1])
    bad["layers.0.q.weight"] = bad["layers.0.q.weight"].clone()
    bad["layers.0.q.weight"][3, 3] = float("nan")
    badp = save_dir(tmp_path / "bad", bad)
    ck = Checkpoint(b)
    for name in ("task_arithmetic", "emr"):
        out = tmp_path / f"out_{name}"
        sources = [TaskVectors.from_model(ck, p) for p in (ft[0], badp)]
        with pytest.raises(MergeflowError, match=r"bad.*layers\.0\.q\.weight.*NaN"):
            merge_to_disk(methods.get(name), ck, sources, {}, out)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "base", "ft0", "ft1", "ft2"]


def test_existing_output_kept_on_failure(models, tmp_path):
    base, fts, b, ft = models
    from mergeflow.io.atomic import atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:  # a previous output of mergeflow's
        (tmp / "keep.txt").write_text("old")
    ck = Checkpoint(b)
    with pytest.raises(MergeflowError, match="never written"):
        with CheckpointWriter(out, like=ck) as w:
            w.write("embed.weight", base["embed.weight"])  # the other tensors never come
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in out.iterdir()) == [".mergeflow-output", "keep.txt"]
    with pytest.raises(MergeflowError, match="shape"):
        with CheckpointWriter(out, like=ck) as w:
            w.write("embed.weight", torch.zeros(3))
    assert (out / "keep.txt").exists()


def test_memory_api_matches_disk_and_keeps_inputs(models):
    base, fts, _, _ = models
    before = {k: v.clone() for k, v in base.items()}
    [got] = merge_state_dicts(methods.get("ties"), base, fts, {"density": 0.5})
    assert all(torch.equal(before[k], base[k]) for k in base)  # inputs untouched
    assert got["embed.weight"].dtype == torch.float32 and torch.equal(got["position_ids"], base["position_ids"])


def test_cli_merge_end_to_end(models, tmp_path):
    base, fts, b, ft = models
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        [
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            str(b),
            "--out",
            str(out),
            "--set",
            "scaling=0.5",
            "--device",
            "cpu",
            *map(str, ft),
        ],
    )
    assert res.exit_code == 0, res.output
    got = Checkpoint(out).state_dict()
    for k, v in expected_ta(base, fts, 0.5).items():
        assert torch.equal(got[k], v), k
    res = CliRunner().invoke(app, ["merge", "--method", "emr", "--base", str(b), "--out", str(tmp_path / "emr"), *map(str, ft)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "emr").iterdir()) == [".mergeflow-output", "task_0", "task_1", "task_2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "density=2"], "density"),
        (["--set", "nope=1"], "nope"),
        (["--set", "scope=layer"], "scope"),
    ],
)
def test_cli_merge_bad_hyper_parameters(models, tmp_path, args, message):
    _, _, b, ft = models
    out = tmp_path / "x"
    res = CliRunner().invoke(app, ["merge", "--method", "ties", "--base", str(b), "--out", str(out), *args, *map(str, ft)])
    assert res.exit_code != 0 and message in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(models):
    base, fts, _, _ = models
    for name in ("task_arithmetic", "ties", "dare", "emr", "tall_mask", "tswitch"):
        m = methods.get(name)
        cpu = merge_state_dicts(m, base, fts, {}, device="cpu")
        gpu = merge_state_dicts(m, base, fts, {}, device="cuda")
        for a, g in zip(cpu, gpu):
            for k in a:
                assert torch.allclose(a[k].float(), g[k].float(), rtol=1e-5, atol=1e-6), (name, k)


@pytest.mark.parametrize(
    "name, hp",
    [
        ("task_arithmetic", {"scaling": 0.4}),
        ("weight_average", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.3, "scope": "global"}),
        ("ties", {"density": 1.0}),
        ("ties", {"density": 0.0}),
    ],
)
def test_blockwise_equals_whole_tensor(monkeypatch, name, hp):
    """Block-wise methods give what the method computes on whole tensors, for any block size."""
    import mergeflow.merge.engine as engine

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(37, 11, generator=g), "v": torch.randn(50, generator=g).round(decimals=1)}
    models = [{k: v + torch.randn(v.shape, generator=g).round(decimals=1) for k, v in base.items()} for _ in range(3)]
    m = methods.get(name)
    assert m.is_blockwise(m.hyper(hp))
    [whole] = merge_state_dicts(m, base, models, hp)  # one block: the tensors are small
    monkeypatch.setattr(engine, "BLOCK_CPU", 16)
    [blocks] = merge_state_dicts(m, base, models, hp)
    for k in base:
        assert torch.equal(whole[k], blocks[k]), k
    if hp.get("scope") != "global":
        full = m.hyper(hp)
        for k in base:
            want = base[k] + m(k, base[k], [md[k] - base[k] for md in models], **full)
            assert torch.allclose(blocks[k], want, atol=1e-6), k


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _reshape(path):
    sd = load_file(str(path / "model.safetensors"))
    sd["layers.0.q.weight"] = sd["layers.0.q.weight"][:4]
    save_file(sd, str(path / "model.safetensors"))


def _drop(path):
    sd = load_file(str(path / "model.safetensors"))
    del sd["layers.0.norm.weight"]
    save_file(sd, str(path / "model.safetensors"))


def _retype(path):
    sd = load_file(str(path / "model.safetensors"))
    sd["layers.0.q.weight"] = sd["layers.0.q.weight"].half()
    save_file(sd, str(path / "model.safetensors"))


def _nan(path):
    sd = load_file(str(path / "model.safetensors"))
    sd["embed.weight"][2, 2] = float("inf")
    save_file(sd, str(path / "model.safetensors"))


def _extra(path):
    sd = load_file(str(path / "model.safetensors"))
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "damage, words",
    [
        (_truncate, ["model.safetensors"]),
        (_reshape, ["layers.0.q.weight", "shape"]),
        (_drop, ["layers.0.norm.weight", "missing"]),
        (_retype, ["layers.0.q.weight", "float16"]),
        (_nan, ["embed.weight", "Inf"]),
        (_extra, ["extra.weight"]),
    ],
)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr"])
def test_cli_merge_refuses_damaged_input(models, tmp_path, damage, words, method):
    """A damaged fine-tune: exit non-zero, one line naming the file and tensor, no output."""
    _, _, b, ft = models
    damage(ft[1])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["merge", "--method", method, "--base", str(b), "--out", str(out), *map(str, ft)])
    assert res.exit_code != 0
    err = res.output.strip().splitlines()[-1]
    assert err.startswith("mergeflow: error:") and "ft1" in err, err
    for w in words:
        assert w in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
