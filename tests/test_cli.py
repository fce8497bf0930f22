"""The CLI contract: merge, compress, switch apply, methods; exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from mergeflow.codecs.switch import load_switch
from mergeflow.io.checkpoint import Checkpoint
from mergeflow.methods.tswitch import ternarize

runner = CliRunner()


@pytest.fixture()
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (16, 8), "layer.bias": (16,), "scalar": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(4)
    paths = []
    for i, name in enumerate(["base", "m0", "m1"]):
        sd = (
            dict(base)
            if i == 0
            else {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        )
        d = tmp_path / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "tiny"}))
        paths.append(d)
    return paths


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_task_arithmetic_cli(models, tmp_path):
    base, m0, m1 = models
    res = invoke(
        "merge", "--method", "task_arithmetic", "--base", base, "--out", tmp_path / "out", "--set", "scaling=0.5", m0, m1
    )
    assert res.exit_code == 0, res.output
    b, a, c = (Checkpoint(p) for p in models)
    out = Checkpoint(tmp_path / "out")
    for name in ("layer.weight", "layer.bias", "scalar"):
        want = b.get(name) + 0.5 * ((a.get(name) - b.get(name)) + (c.get(name) - b.get(name)))
        assert torch.allclose(out.get(name), want, atol=1e-6)
    assert torch.equal(out.get("position_ids"), torch.arange(4))
    assert (tmp_path / "out" / "config.json").exists()


def test_tswitch_dynamic_and_compact(models, tmp_path):
    base, m0, m1 = models
    res = invoke("merge", "--method", "tswitch", "--base", base, "--out", tmp_path / "dyn", m0, m1)
    assert res.exit_code == 0, res.output
    b = Checkpoint(base)
    for i, m in enumerate((m0, m1)):
        task = Checkpoint(tmp_path / "dyn" / f"task_{i}")
        tau = Checkpoint(m).get("layer.weight") - b.get("layer.weight")
        t, s = ternarize(tau, 0.6)
        assert torch.allclose(task.get("layer.weight"), b.get("layer.weight") + s * t.float(), atol=1e-6)
    res = invoke("merge", "--method", "tswitch", "--base", base, "--out", tmp_path / "sw", "--set", "store=switches", m0, m1)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == [
        ".mergeflow-output",
        "task_0.switch.safetensors",
        "task_1.switch.safetensors",
    ]


def test_compress_then_apply_rebuilds_task_model(models, tmp_path):
    base, m0, _ = models
    res = invoke("compress", "--base", base, "--model", m0, "--out", tmp_path / "t.switch.safetensors", "--set", "drop=0.5")
    assert res.exit_code == 0, res.output
    assert "bits/param" in res.output
    sw = load_switch(tmp_path / "t.switch.safetensors")
    assert sw.metadata["drop"] == "0.5"
    res = invoke("switch", "apply", "--base", base, "--switch", tmp_path / "t.switch.safetensors", "--out", tmp_path / "rebuilt")
    assert res.exit_code == 0, res.output
    b, m = Checkpoint(base), Checkpoint(m0)
    out = Checkpoint(tmp_path / "rebuilt")
    t, s = ternarize(m.get("layer.weight") - b.get("layer.weight"), 0.5)
    assert torch.allclose(out.get("layer.weight"), b.get("layer.weight") + s * t.float(), atol=1e-6)
    assert torch.allclose(out.get("scalar"), m.get("scalar"))  # 0-dim kept dense: exact


def test_methods_lists_registry():
    res = invoke("methods")
    assert res.exit_code == 0
    for name in ("weight_average", "task_arithmetic", "tswitch"):
        assert name in res.output
    assert "scaling = 0.3" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "task_arithmetic", "--set", "scaling=abc"], "scaling: expected float"),
        (["--method", "task_arithmetic", "--set", "density=0.2"], "density: unknown hyper-parameter"),
    ],
)
def test_bad_merge_input(models, tmp_path, args, message):
    base, m0, _ = models
    res = invoke("merge", *args, "--base", base, "--out", tmp_path / "out", m0)
    assert res.exit_code != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mismatched_model_no_output(models, tmp_path):
    base, _, _ = models
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"layer.weight": torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    res = invoke("merge", "--method", "task_arithmetic", "--base", base, "--out", tmp_path / "out", bad)
    assert res.exit_code != 0 and "bad" in res.stderr and "tensor" in res.stderr
    assert not (tmp_path / "out").exists()


def test_nan_input_names_tensor(models, tmp_path):
    base, _, _ = models
    d = tmp_path / "nan"
    d.mkdir()
    sd = Checkpoint(base).state_dict()
    sd["layer.bias"] = sd["layer.bias"].clone()
    sd["layer.bias"][3] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    res = invoke("merge", "--method", "task_arithmetic", "--base", base, "--out", tmp_path / "out", d)
    assert res.exit_code != 0 and "layer.bias contains NaN" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
@pytest.mark.timeout(60)
def test_console_script_exit_status(tmp_path):
    """The installed entry point: non-zero exit and one line on stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "merge",
            "--method",
            "x",
            "--base",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mergeflow: error: unknown method 'x' (known: ")
