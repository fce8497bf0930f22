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
from mergeflow.zoo import (
    DOMAINS,
    STYLES,
    TASKS,
    ZooSpec,
    apply_style,
    build_zoo,
    load_digits_split,
    style_pattern,
    task_content,
    task_transform,
)

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

N = 8  # the digits' side


@pytest.fixture(autouse=True)
def _one_thread():
    """A tiny model gains nothing from threads, and threads spin badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tensors(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / "checkpoints" / name / "model.safetensors"))


def _numbered() -> torch.Tensor:
    """One 8x8 image whose pixel (r, c) holds r * 8 + c, so every pixel can be traced."""
    return torch.arange(N * N, dtype=torch.float32).reshape(1, 1, N, N)


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


def test_every_task_has_its_own_domain():
    assert set(DOMAINS) == set(TASKS)
    assert len(set(DOMAINS.values())) == len(TASKS), "two tasks share a domain style"
    assert "plain" not in DOMAINS.values()  # the pre-training digits' look is no task's
    assert set(STYLES) == {"plain", *DOMAINS.values()}


# ----------------------------------------------------------------------------- content transforms


@pytest.mark.parametrize(
    "task, source",
    [
        ("rot90", lambda r, c: (c, N - 1 - r)),  # anticlockwise: the top row becomes the left column
        ("rot180", lambda r, c: (N - 1 - r, N - 1 - c)),
        ("hflip", lambda r, c: (r, N - 1 - c)),
        ("invert", lambda r, c: (r, c)),  # upright: its change is the negative style
        ("roll", lambda r, c: ((r - N // 2) % N, (c - N // 4) % N)),
        ("parity", lambda r, c: (c, r)),  # transposed
        ("mod3", lambda r, c: (N - 1 - r, c)),  # upside down
        ("plain", lambda r, c: (r, c)),
    ],
)
def test_content_moves_pixels(task, source):
    x = _numbered()
    out, _, _ = task_content(task, x, torch.tensor([3]))
    assert out.shape == x.shape
    for r in range(N):
        for c in range(N):
            sr, sc = source(r, c)
            assert out[0, 0, r, c] == x[0, 0, sr, sc], (task, r, c)


def test_shuffle_permutes_2x2_blocks():
    x = _numbered()
    out, y, _ = task_content("shuffle", x, torch.tensor([7]))
    assert y.tolist() == [7]

    def blocks(img):
        return [img[0, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] for i in range(4) for j in range(4)]

    src, dst = blocks(x), blocks(out)
    moved_to = []
    for b in dst:  # every output block is an intact input block, each used once
        hits = [k for k, s in enumerate(src) if torch.equal(b, s)]
        assert len(hits) == 1
        moved_to.append(hits[0])
    assert sorted(moved_to) == list(range(16))
    assert all(k != i for i, k in enumerate(moved_to)), "a block stayed in place"
    # the same permutation for every image and every call
    again, _, _ = task_content("shuffle", torch.cat([x, x + 100]), torch.tensor([1, 2]))
    assert torch.equal(again[0], out[0]) and torch.equal(again[1], out[0] + 100)


def test_label_maps():
    y = torch.arange(10)
    x = torch.zeros(10, 1, N, N)
    for task in TASKS:
        _, labels, classes = task_content(task, x, y)
        if task == "parity":
            assert labels.tolist() == [0, 1] * 5 and classes == ["even", "odd"]
        elif task == "mod3":
            assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] and classes == ["0 mod 3", "1 mod 3", "2 mod 3"]
        else:
            assert labels.tolist() == list(range(10)) and classes == [str(i) for i in range(10)]
    with pytest.raises(MergeflowError, match="unknown task 'nope'"):
        task_content("nope", x, y)


# ----------------------------------------------------------------------------- domain styles


def test_style_patterns():
    r = torch.arange(N).view(-1, 1).expand(N, N)
    c = torch.arange(N).view(1, -1).expand(N, N)
    expected = {
        "hstripes": 0.4 * (r % 2 == 0),
        "vstripes": 0.4 * (c % 2 == 0),
        "checker": 0.4 * ((r + c) % 2 == 0),
        "frame": 1.0 * ((r == 0) | (r == N - 1) | (c == 0) | (c == N - 1)),
    }
    for style, want in expected.items():
        torch.testing.assert_close(style_pattern(style, N), want.float(), msg=style)
    ramp = style_pattern("gradient", N)
    assert torch.equal(ramp, ramp[:, :1].expand(N, N)), "the ramp varies along the columns"
    assert ramp[0, 0] == 0 and ramp[-1, 0] == pytest.approx(0.6) and bool((ramp[1:, 0] > ramp[:-1, 0]).all())
    dots = style_pattern("dots", N)
    assert dots.unique().tolist() == [0.0, pytest.approx(0.6)]
    assert 0.1 < float((dots > 0).float().mean()) < 0.3  # sparse, but in every row
    assert bool((dots > 0).any(dim=1).all())
    for style in ("plain", "negative", "faded", "nope"):
        with pytest.raises(MergeflowError, match="pattern style"):
            style_pattern(style, N)


def test_apply_style_on_blank_and_full_images():
    blank, full = torch.zeros(1, 1, N, N), torch.ones(1, 1, N, N)
    assert torch.equal(apply_style("plain", blank), blank)
    assert torch.equal(apply_style("negative", blank), full) and torch.equal(apply_style("negative", full), blank)
    torch.testing.assert_close(apply_style("faded", blank), torch.full_like(blank, 0.3))
    torch.testing.assert_close(apply_style("faded", full), torch.full_like(full, 0.7))
    for style in ("hstripes", "vstripes", "checker", "frame", "gradient", "dots"):
        # the background shows the pattern, a full stroke stays full (screen blend)
        torch.testing.assert_close(apply_style(style, blank)[0, 0], style_pattern(style, N), msg=style)
        torch.testing.assert_close(apply_style(style, full), full, msg=style)
        # a half-grey pixel is lifted towards white by the pattern: 0.5 + p / 2
        half = apply_style(style, torch.full((1, 1, N, N), 0.5))[0, 0]
        torch.testing.assert_close(half, 0.5 + style_pattern(style, N) / 2, msg=style)


def test_styles_keep_images_in_range_and_strokes_readable():
    a = 0.1 + 0.9 * torch.rand(5, 1, N, N, generator=torch.Generator().manual_seed(0))
    b = a / 2  # differs from a at every pixel
    border = style_pattern("frame", N) > 0
    for style in STYLES:
        out = apply_style(style, a)
        assert out.shape == a.shape and float(out.min()) >= 0 and float(out.max()) <= 1, style
        # no information lost: different pixels stay different, except under the frame's white border
        differs = (out != apply_style(style, b)).all(dim=0)[0]
        assert torch.equal(differs, ~border) if style == "frame" else bool(differs.all()), style


def test_domains_look_different():
    """A blank image shows each domain's background: eight distinct ones, none of them plain."""
    blank = torch.zeros(1, 1, N, N)
    looks = {t: task_transform(t, blank, torch.tensor([0]))[0] for t in TASKS}
    plain = task_transform("plain", blank, torch.tensor([0]))[0]
    assert torch.equal(plain, blank)
    for i, a in enumerate(TASKS):
        assert not torch.equal(looks[a], plain), a
        for b in TASKS[i + 1 :]:
            assert (looks[a] - looks[b]).abs().max() >= 0.25, (a, b)


def test_task_transform_is_content_then_style():
    x = torch.rand(3, 1, N, N, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([4, 5, 9])
    for task in TASKS:
        content, labels, classes = task_content(task, x, y)
        out, out_labels, out_classes = task_transform(task, x, y)
        torch.testing.assert_close(out, apply_style(DOMAINS[task], content))
        assert torch.equal(out_labels, labels) and out_classes == classes


def test_upsampled_digits():
    x8, y8, _, _ = load_digits_split(0, ZooSpec(max_samples=40))
    x16, y16, _, _ = load_digits_split(0, ZooSpec(max_samples=40, image_size=16))
    assert x16.shape[1:] == (1, 16, 16) and torch.equal(y8, y16)
    assert torch.equal(x16[:, :, ::2, ::2], x8) and torch.equal(x16[:, :, 1::2, 1::2], x8)  # nearest
    with pytest.raises(MergeflowError, match="multiple of 8"):
        load_digits_split(0, ZooSpec(max_samples=40, image_size=12))


def test_spec_errors(tmp_path):
    with pytest.raises(MergeflowError, match="threads"):
        build_zoo(tmp_path, spec=ZooSpec(threads=0))
    with pytest.raises(MergeflowError, match="pretrain_domain_weight"):
        build_zoo(tmp_path, spec=ZooSpec(pretrain_domain_weight=-1.0))
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the built zoo


def test_manifest_and_progress(zoo):
    root, manifest, messages = zoo
    tasks = list(TASKS[:2])
    assert manifest["source"] == "zoo://digits"
    assert manifest["seed"] == 0
    assert manifest["spec"]["n_tasks"] == 2
    assert manifest["tasks"] == tasks
    assert manifest["base"] == "checkpoints/base"
    assert manifest["experts"] == {t: f"checkpoints/{t}" for t in tasks}
    assert manifest["domains"] == {t: DOMAINS[t] for t in tasks}
    assert 0 <= manifest["pretrain_accuracy"] <= 1 and 0 <= manifest["pretrain_domain_accuracy"] <= 1
    json.dumps(manifest)  # serialisable
    assert any("pretrain" in m and "domain" in m for m in messages)
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
    # only the zoo's own files, no temporary leftovers
    assert sorted(p.name for p in root.iterdir()) == ["checkpoints", "data", "heads"]
    assert not [p for p in root.rglob("*") if p.name.startswith(".") and p.name != ".mergeflow-output"]
    assert sorted(p.parent.name for p in root.rglob(".mergeflow-output")) == sorted(
        p.name for p in (root / "checkpoints").iterdir()
    )


def test_splits(zoo):
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits()
    root, manifest, _ = zoo
    indices = {}
    for task in manifest["tasks"]:
        data_dir = root / "data" / task
        meta = json.loads((data_dir / "meta.json").read_text())
        assert meta["domain"] == DOMAINS[task] and meta["task"] == task
        x_tr, y_tr = vision.load_split(data_dir, "train")
        x_te, y_te = vision.load_split(data_dir, "test")
        assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
        assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
        assert len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
        assert len(y_tr) + len(y_te) == 400 and len(y_te) == 100
        assert set(y_tr.tolist()) == set(range(len(meta["classes"])))
        train_ids = pq.read_table(data_dir / "train.parquet").column("index").to_pylist()
        test_ids = pq.read_table(data_dir / "test.parquet").column("index").to_pylist()
        assert not set(train_ids) & set(test_ids), "train and test share digits"
        indices[task] = (train_ids, test_ids)
        # each row is its scikit-learn digit put through the task (content, then domain style)
        for x, y, ids in ((x_tr, y_tr, train_ids), (x_te, y_te, test_ids)):
            src = torch.tensor(digits.images[ids], dtype=torch.float32).unsqueeze(1) / 16
            want_x, want_y, _ = task_transform(task, src, torch.tensor(digits.target[ids]))
            torch.testing.assert_close(x, want_x)
            assert torch.equal(y, want_y)
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


def test_base_tells_domains_apart(zoo):
    """CLIP-like pre-training: the base's embeddings route nearly every test input to its own
    task by nearest neighbours among train samples, as Auto-Switch does (plain-digit
    pre-training alone leaves a tenth or more of them on the wrong task)."""
    from mergeflow.autoswitch import route, routing_accuracy, sample_queries

    root, manifest, _ = zoo
    base = vision.build_model(vision.load_config(root / "checkpoints" / "base"), _tensors(root, "base"))
    tasks = manifest["tasks"]
    train = {t: vision.image_embeddings(base, vision.load_split(root / "data" / t, "train")[0]) for t in tasks}
    test = [vision.image_embeddings(base, vision.load_split(root / "data" / t, "test")[0]) for t in tasks]
    weights = route(sample_queries(train, 20, seed=0), torch.cat(test), k=5)
    truth = torch.cat([torch.full((len(e),), i) for i, e in enumerate(test)])
    assert routing_accuracy(weights, truth) >= 0.97
    assert manifest["pretrain_domain_accuracy"] >= 0.9  # the temporary domain head


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
    # the caller's RNG state and thread count survive the build, which runs on spec.threads
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    torch.set_num_threads(2)
    build_zoo(again, seed=0, spec=TINY)
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) == 3 * 3 + 2 + 3 * 2  # checkpoints (base + 2; config, weights, marker), heads, data
    for rel in files:  # every file byte for byte: checkpoints, heads, parquet splits, meta.json
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    other.mkdir()
    build_zoo(other, seed=1, spec=TINY)
    a, b = _tensors(root, "base"), _tensors(other, "base")
    assert not all(torch.equal(a[k], b[k]) for k in a)
    _, y0 = vision.load_split(root / "data" / TASKS[0], "test")
    x1, y1 = vision.load_split(other / "data" / TASKS[0], "test")
    assert not torch.equal(y0, y1)
