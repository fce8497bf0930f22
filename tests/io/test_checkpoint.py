"""Checkpoint I/O: round trips, lazy access, atomic writes, clear errors on bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir
from mergeflow.io.checkpoint import Checkpoint, check_compatible, write_checkpoint


def make(tmp_path, name, tensors, config=True):
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    if config:
        (d / "config.json").write_text(json.dumps({"model_type": "test"}))
    return d


def test_round_trip_and_dtype(tmp_path):
    sd = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5)}
    ck = Checkpoint(make(tmp_path, "m", sd))
    assert ck.names() == ["a", "b"] and ck.shape("a") == (3, 4) and ck.dtype() == torch.bfloat16
    out = write_checkpoint(tmp_path / "out", {"a": sd["a"].float() * 2, "b": sd["b"]}, like=ck)
    back = Checkpoint(out)
    assert back.get("a").dtype == torch.bfloat16 and torch.equal(back.get("a"), (sd["a"].float() * 2).bfloat16())
    assert torch.equal(back.get("b"), sd["b"])
    assert json.loads((out / "config.json").read_text()) == {"model_type": "test"}


def test_sharded(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    ck = Checkpoint(d)
    assert sorted(ck.names()) == ["a", "b"] and torch.equal(ck.get("b"), torch.zeros(3))


def test_truncated_file_names_file(tmp_path):
    d = make(tmp_path, "m", {"a": torch.randn(100)})
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeflowError, match="model.safetensors"):
        Checkpoint(d).get("a")


def test_mismatch_errors_name_tensor(tmp_path):
    base = Checkpoint(make(tmp_path, "base", {"a": torch.zeros(2, 2), "b": torch.zeros(3)}))
    with pytest.raises(MergeflowError, match="tensor b of the base is missing"):
        check_compatible(base, Checkpoint(make(tmp_path, "m1", {"a": torch.zeros(2, 2)})))
    with pytest.raises(MergeflowError, match=r"tensor a has shape \[4\]"):
        check_compatible(base, Checkpoint(make(tmp_path, "m2", {"a": torch.zeros(4), "b": torch.zeros(3)})))
    with pytest.raises(MergeflowError, match="tensor c is not in the base"):
        check_compatible(
            base, Checkpoint(make(tmp_path, "m3", {"a": torch.zeros(2, 2), "b": torch.zeros(3), "c": torch.zeros(1)}))
        )


def test_missing_checkpoint(tmp_path):
    with pytest.raises(MergeflowError, match="checkpoint not found"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeflowError, match="no model.safetensors"):
        Checkpoint(tmp_path / "empty")


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("crash")
    assert (target / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left behind
