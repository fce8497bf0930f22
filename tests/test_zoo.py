"""The built-in zoo (zoo://digits) and the CLIP-vision adapter, on a tiny zoo built in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergeflow.errors import MergeflowError
from mergeflow.models import vision
from mergeflow.zoo import TASKS, ZooSpec, build_zoo

TINY = ZooSpec(
    n_tasks=2,
    max_samples=400,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    projection_dim=16,
    pretrain_epochs=10,
    pretrain_lr=3e-3,
    finetune_epochs=8,
    finetune_lr=3e-3,
    finetune_embed_lr_scale=1.0,
    batch_size=32,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """A tiny model gains nothing from threads, and threads spin badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tensors(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / name / "model.safetensors"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("zoo")
        messages: list[str] = []
        manifest = build_zoo(root, seed=0, spec=TINY, progress=messages.append)
    finally:
        torch.set_num_threads(before)
    return root, manifest, messages


def test_task_names():
    assert len(TASKS) == 8 and len(set(TASKS)) == 8
    assert all(t.isidentifier() and t == t.lower() for t in TASKS)
    assert ZooSpec().tasks() == TASKS
    with pytest.raises(MergeflowError, match="n_tasks"):
        ZooSpec(n_tasks=0).tasks()


def test_manifest_and_progress(zoo):
    root, manifest, messages = zoo
    tasks = list(TASKS[:2])
    assert manifest["source"] == "zoo://digits"
    assert manifest["seed"] == 0
    assert manifest["spec"]["n_tasks"] == 2
    assert manifest["tasks"] == tasks
    assert manifest["base"] == "checkpoints/base"
    assert manifest["experts"] == {t: f"checkpoints/{t}" for t in tasks}
    json.dumps(manifest)  # serialisable
    assert any("pretrain" in m for m in messages)
    for t in tasks:
        assert any(t in m for m in messages)


def test_layout(zoo):
    from transformers import CLIPVisionConfig

    root, manifest, _ = zoo
    config = CLIPVisionConfig.from_pretrained(root / "checkpoints" / "base")
    assert (config.hidden_size, config.num_hidden_layers, config.projection_dim) == (32, 2, 16)
    assert config.num_channels == 1
    assert vision.load_config(root / "checkpoints" / "base").to_dict() == config.to_dict()
    base = _tensors(root, "base")
    assert "visual_projection.weight" in base
    assert all(v.dtype == torch.float32 for v in base.values())
    for task in manifest["tasks"]:
        expert = _tensors(root, task)
        assert list(expert) == list(base) or sorted(expert) == sorted(base)
        assert all(expert[k].shape == base[k].shape for k in base)
        assert any(not torch.equal(expert[k], base[k]) for k in base)
        assert (root / "checkpoints" / task / "config.json").exists()

        path = root / "heads" / f"{task}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
            assert list(fh.keys()) == ["weight"]
        classes = json.loads(meta["classes"])
        assert meta["task"] == task
        weight, scale = vision.load_head(path)
        assert scale == float(meta["logit_scale"]) > 0
        assert weight.shape == (len(classes), 16) and weight.dtype == torch.float32
        torch.testing.assert_close(weight.norm(dim=-1), torch.ones(len(classes)))


def test_splits(zoo):
    import pyarrow.parquet as pq

    root, manifest, _ = zoo
    indices = {}
    for task in manifest["tasks"]:
        data_dir = root / "data" / task
        x_tr, y_tr = vision.load_split(data_dir, "train")
        x_te, y_te = vision.load_split(data_dir, "test")
        assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
        assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
        assert len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
        assert len(y_tr) + len(y_te) == 400 and len(y_te) == 100
        n_classes = len(json.loads((data_dir / "meta.json").read_text())["classes"])
        assert set(y_tr.tolist()) == set(range(n_classes))
        train_ids = pq.read_table(data_dir / "train.parquet").column("index").to_pylist()
        test_ids = pq.read_table(data_dir / "test.parquet").column("index").to_pylist()
        assert not set(train_ids) & set(test_ids), "train and test share digits"
        indices[task] = (train_ids, test_ids)
    # one split per seed, the same for every task
    assert len({json.dumps(v) for v in indices.values()}) == 1


def test_load_split_errors(tmp_path):
    with pytest.raises(MergeflowError, match="test.parquet"):
        vision.load_split(tmp_path, "test")


def test_experts_beat_base(zoo):
    root, manifest, _ = zoo
    config = vision.load_config(root / "checkpoints" / "base")
    base = vision.build_model(config, _tensors(root, "base"))
    for task in manifest["tasks"]:
        head, scale = vision.load_head(root / "heads" / f"{task}.safetensors")
        x, y = vision.load_split(root / "data" / task, "test")
        expert = vision.build_model(config, _tensors(root, task))
        acc_base = vision.accuracy(base, head, scale, x, y)
        acc_expert = vision.accuracy(expert, head, scale, x, y)
        assert acc_expert > acc_base + 0.05, (task, acc_base, acc_expert)
        assert manifest["accuracy"][task]["expert"] == pytest.approx(acc_expert, abs=1e-6)
        emb = vision.image_embeddings(expert, x[:10], batch_size=3)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(10))


def test_build_model_strict(zoo):
    root, _, _ = zoo
    config = vision.load_config(root / "checkpoints" / "base")
    state = _tensors(root, "base")
    model = vision.build_model(config, state)
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])

    missing = dict(state)
    del missing["visual_projection.weight"]
    with pytest.raises(MergeflowError, match="visual_projection.weight"):
        vision.build_model(config, missing)
    extra = dict(state, **{"vision_model.bogus.weight": torch.zeros(2)})
    with pytest.raises(MergeflowError, match="vision_model.bogus.weight"):
        vision.build_model(config, extra)
    wrong = dict(state, **{"visual_projection.weight": torch.zeros(3, 3)})
    with pytest.raises(MergeflowError, match="visual_projection.weight"):
        vision.build_model(config, wrong)


def test_deterministic(zoo, tmp_path):
    root, _, _ = zoo
    again = tmp_path / "again"
    again.mkdir()
    build_zoo(again, seed=0, spec=TINY)
    for name in ["base", *TASKS[:2]]:
        a, b = _tensors(root, name), _tensors(again, name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for task in TASKS[:2]:
        assert (root / "heads" / f"{task}.safetensors").read_bytes() == (again / "heads" / f"{task}.safetensors").read_bytes()
        for split in ("train", "test"):
            xa, ya = vision.load_split(root / "data" / task, split)
            xb, yb = vision.load_split(again / "data" / task, split)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)

    other = tmp_path / "other"
    other.mkdir()
    build_zoo(other, seed=1, spec=TINY)
    a, b = _tensors(root, "base"), _tensors(other, "base")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    _, y0 = vision.load_split(root / "data" / TASKS[0], "test")
    x1, y1 = vision.load_split(other / "data" / TASKS[0], "test")
    assert not torch.equal(y0, y1)
