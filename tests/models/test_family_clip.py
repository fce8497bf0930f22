"""CLIP vision from the hub, offline: tiny CLIP models and image datasets in a Hugging Face cache.

The real loading code runs (hub resolution, the family's prepare, the zero-shot heads, the
model's own processor, evaluation), checked against transformers' own CLIPModel.
"""

from __future__ import annotations

import io
import json
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergeflow.errors import MergeflowError
from tests.hfcache import add_folder, pipeline_workspace, reported_rows, sh

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "clip-vit-b32.yaml"
TASKS = {"mnist": ["0", "1", "2"], "eurosat": ["annual_crop", "forest", "river", "sea_lake"]}


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=VOCAB_SIZE - 2,
            eos_token_id=VOCAB_SIZE - 1,
            pad_token_id=VOCAB_SIZE - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


CHARS = sorted(set(string.printable.strip()))
VOCAB_SIZE = 2 * len(CHARS) + 2


def save_tokenizer_and_processor(folder: Path) -> None:
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab |= {c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)}
    vocab |= {"<|startoftext|>": VOCAB_SIZE - 2, "<|endoftext|>": VOCAB_SIZE - 1}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))


def perturb(model, seed: int, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "visual_projection.")):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def image_dataset(folder: Path, classes: list[str], seed: int, n_test: int = 12, n_train: int = 20) -> None:
    """Parquet splits data/{train,test}-00000-of-00001.parquet with an Image and a ClassLabel column."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = [], []
        for i in range(n):
            arr = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)  # not square: the processor resizes and crops
            buf = io.BytesIO()
            PILImage.fromarray(arr).save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
            labels.append(i % len(classes))
        ds = Dataset.from_dict(
            {"image": images, "label": labels}, features=Features({"image": Image(), "label": ClassLabel(names=classes)})
        )
        (folder / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline hub cache: a tiny CLIP base, a vision-only and a full CLIP fine-tune, two datasets."""
    from transformers import CLIPVisionModel

    work = tmp_path_factory.mktemp("clip")
    cache = work / "hub"
    base = tiny_clip()
    d = work / "base"
    base.save_pretrained(str(d))
    save_tokenizer_and_processor(d)
    commits = {"base": add_folder(cache, "openai/clip-tiny", d)}
    # mnist: saved as a bare CLIPVisionModel (no visual_projection), as tanganke's fine-tunes are
    # (theirs, saved by transformers 4, name tensors vision_model.*; transformers 5 drops the prefix)
    ft = perturb(tiny_clip(), 1)
    vis = CLIPVisionModel(ft.config.vision_config)
    vis.load_state_dict(ft.vision_model.state_dict())
    vis.save_pretrained(str(work / "mnist"))
    commits["mnist"] = add_folder(cache, "tanganke/clip-tiny_mnist", work / "mnist")
    # eurosat: a full CLIPModel with its vision tower fine-tuned
    perturb(tiny_clip(), 2).save_pretrained(str(work / "eurosat"))
    commits["eurosat"] = add_folder(cache, "tanganke/clip-tiny_eurosat", work / "eurosat")
    for i, (task, classes) in enumerate(TASKS.items()):
        image_dataset(work / f"ds_{task}", classes, seed=10 + i)
        commits[f"ds_{task}"] = add_folder(cache, f"tanganke/tiny-{task}", work / f"ds_{task}", repo_type="dataset")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield {"work": work, "cache": cache, "commits": commits}


def swapped_preset(tasks=("mnist", "eurosat")) -> dict:
    """The CLIP preset with its model and dataset names swapped for the tiny cached ones."""
    params = yaml.safe_load(PRESET.read_text())
    assert params["download"]["family"] == "clip_vision"
    assert params["download"]["base"] == "hf://openai/clip-vit-base-patch32"
    params["download"]["base"] = "hf://openai/clip-tiny"
    params["download"]["tasks"] = {
        t: {
            **params["download"]["tasks"][t],
            "model": f"hf://tanganke/clip-tiny_{t}",
            "dataset": f"hf://datasets/tanganke/tiny-{t}",
        }
        for t in tasks
    }
    params["download"]["options"]["query_pool"] = 16
    params["compress"]["queries"] = 5
    params["merge"]["autoswitch"] = {"k": 3, "batch_size": 8}
    params["evaluate"]["batch_size"] = 8
    params["experiment"] = "clip-tiny"
    return params


@pytest.fixture(scope="module")
def prepared(hub, tmp_path_factory):
    """The download stage on the swapped preset: artifacts and sources.json."""
    from mergeflow import stages
    from mergeflow.params import validate

    root = tmp_path_factory.mktemp("prep")
    p = validate(swapped_preset())
    stages.run("download", p, root)
    return root, p


def test_preset_lists_the_suite():
    from mergeflow.params import load_params

    p = load_params(PRESET)
    assert list(p.download.tasks) == ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    for task, spec in p.download.tasks.items():
        assert spec["model"].startswith("hf://tanganke/clip-vit-base-patch32_")
        assert spec["dataset"].startswith("hf://datasets/")
    assert p.compress.drop == 0.6 and p.merge.hyper("autoswitch")["k"] == 10


def test_sources_pin_commits(prepared, hub):
    root, _ = prepared
    sources = json.loads((root / "artifacts/sources.json").read_text())
    c = hub["commits"]
    assert sources["family"] == "clip_vision" and sources["tasks"] == ["mnist", "eurosat"]
    assert sources["base"]["commit"] == c["base"] and sources["base"]["pinned_ref"] == f"hf://openai/clip-tiny@{c['base']}"
    for t in TASKS:
        assert sources["refs"][t]["model"]["commit"] == c[t]
        assert sources["refs"][t]["dataset"]["commit"] == c[f"ds_{t}"]
        assert sources["refs"][t]["dataset"]["repo_type"] == "dataset"


def test_checkpoints_hold_the_vision_tower_only(prepared, hub):
    from transformers import CLIPModel

    from mergeflow.io.checkpoint import Checkpoint

    root, _ = prepared
    ck = {n: Checkpoint(root / "artifacts/checkpoints" / n) for n in ("base", *TASKS)}
    names = set(ck["base"].names())
    assert names and all(n.startswith(("vision_model.", "visual_projection.")) for n in names)
    for t in TASKS:
        assert set(ck[t].names()) == names
    base = CLIPModel.from_pretrained(str(hub["work"] / "base"))
    eurosat = CLIPModel.from_pretrained(str(hub["work"] / "eurosat"))
    for name in names:
        assert torch.equal(ck["base"].get(name), base.state_dict()[name])
        assert torch.equal(ck["eurosat"].get(name), eurosat.state_dict()[name])
    # the bare vision fine-tune keeps the base's projection
    assert torch.equal(ck["mnist"].get("visual_projection.weight"), base.visual_projection.weight)
    assert not torch.equal(ck["mnist"].get("vision_model.post_layernorm.weight"), base.vision_model.post_layernorm.weight)


def test_zero_shot_heads_match_clip(prepared, hub):
    """The head is CLIP's zero-shot classifier: normalised mean over templates of normalised text features."""
    from transformers import AutoTokenizer, CLIPModel

    from mergeflow.models.vision import TEMPLATES, load_head

    root, _ = prepared
    base = CLIPModel.from_pretrained(str(hub["work"] / "base")).eval()
    tok = AutoTokenizer.from_pretrained(str(hub["work"] / "base"))
    for task, classes in TASKS.items():
        weight, scale = load_head(root / "artifacts/heads" / f"{task}.safetensors")
        assert scale == pytest.approx(float(base.logit_scale.detach().exp()))
        assert weight.shape == (len(classes), 16)
        for c, name in enumerate(classes):
            prompts = [t.format(name.replace("_", " ")) for t in TEMPLATES[task]]
            with torch.no_grad():
                out = base.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
            feats = out if isinstance(out, torch.Tensor) else out.pooler_output
            want = torch.nn.functional.normalize(torch.nn.functional.normalize(feats, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(weight[c], want, atol=1e-5, rtol=1e-5)


def test_expert_predictions_match_clip_logits(prepared, hub):
    """The family's prediction for a task = argmax of CLIPModel's logits_per_image against the head."""
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel

    from mergeflow.io.checkpoint import Checkpoint
    from mergeflow.models.vision import ClipVision, load_head

    root, _ = prepared
    fam = ClipVision(root / "artifacts", "cpu", batch_size=5)
    clip = CLIPModel.from_pretrained(str(hub["work"] / "eurosat")).eval()
    model = fam.build(Checkpoint(root / "artifacts/checkpoints/eurosat").state_dict())
    data = fam.load_data("eurosat", "test")
    assert len(data) == 12
    pred = fam.predict(model, "eurosat", data)
    # independently: the raw dataset images through the processor and CLIPModel's own image features
    import pyarrow.parquet as pq

    snap = hub["cache"] / "datasets--tanganke--tiny-eurosat" / "snapshots" / hub["commits"]["ds_eurosat"]
    table = pq.read_table(str(snap / "data/test-00000-of-00001.parquet"))
    images = [Image.open(io.BytesIO(r["bytes"])).convert("RGB") for r in table.column("image").to_pylist()]
    proc = AutoImageProcessor.from_pretrained(str(hub["work"] / "base"), backend="pil")
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(data.pixel_values(), pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=pixels)
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    head, scale = load_head(root / "artifacts/heads/eurosat.safetensors")
    want = (scale * torch.nn.functional.normalize(feats, dim=-1) @ head.T).argmax(-1)
    assert torch.equal(pred, want)
    labels = torch.tensor(table.column("label").to_pylist())
    assert fam.score("eurosat", pred, data) == {"score": float((want == labels).float().mean()), "metric": "accuracy"}
    # rows: a subset predicts the same as the whole
    rows = torch.tensor([3, 0, 7])
    assert torch.equal(fam.predict(model, "eurosat", data, rows), pred[rows])
    feats_rows = fam.features(model, data, rows)
    assert feats_rows.shape == (3, 16) and torch.allclose(feats_rows.norm(dim=-1), torch.ones(3))


def test_query_pool_is_a_seeded_sample(prepared):
    from mergeflow.models.vision import ClipVision

    root, _ = prepared
    fam = ClipVision(root / "artifacts")
    assert len(fam.load_data("mnist", "train")) == 16  # query_pool of the 20 train images
    assert len(fam.load_data("mnist", "test", limit=5)) == 5


def test_offline_missing_entry_names_repo_and_revision(hub, tmp_path):
    from mergeflow import stages
    from mergeflow.params import validate

    params = swapped_preset()
    params["download"]["tasks"]["eurosat"]["model"] = "hf://tanganke/clip-tiny_eurosat@v2"
    with pytest.raises(MergeflowError) as exc:
        stages.run("download", validate(params), tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "tanganke/clip-tiny_eurosat" in msg and "v2" in msg
    assert not (tmp_path / "artifacts/checkpoints").exists()  # nothing half-written
    params = swapped_preset()
    params["download"]["tasks"]["mnist"]["dataset"] = "hf://datasets/tanganke/nowhere"
    with pytest.raises(MergeflowError) as exc:
        stages.run("download", validate(params), tmp_path)
    assert "\n" not in str(exc.value) and "datasets/tanganke/nowhere@main" in str(exc.value)


def test_bad_sources_are_one_line(hub, tmp_path):
    from mergeflow import stages
    from mergeflow.params import validate

    params = swapped_preset(tasks=("mnist",))
    params["download"]["tasks"]["mnist"]["model"] = "hf://datasets/tanganke/tiny-mnist"
    with pytest.raises(MergeflowError, match=r"download\.tasks\.mnist\.model: .* is a dataset ref"):
        stages.run("download", validate(params), tmp_path)
    params = swapped_preset(tasks=("mnist",))
    params["download"]["tasks"]["mnist"]["label_column"] = "digit"
    with pytest.raises(MergeflowError, match=r"tiny-mnist.*no column 'digit'"):
        stages.run("download", validate(params), tmp_path)
    params = swapped_preset(tasks=("mnist",))
    params["download"]["tasks"]["mnist"]["colour"] = "red"
    with pytest.raises(MergeflowError, match=r"download\.tasks\.mnist\.colour: unknown task option"):
        validate(params)


def test_local_folders_work_the_same(hub, tmp_path):
    """Local paths instead of hf:// refs: pinned by a content fingerprint."""
    from mergeflow import stages
    from mergeflow.params import validate

    params = swapped_preset(tasks=("eurosat",))
    params["download"]["base"] = str(hub["work"] / "base")
    params["download"]["tasks"]["eurosat"] |= {"model": str(hub["work"] / "eurosat"), "dataset": str(hub["work"] / "ds_eurosat")}
    stages.run("download", validate(params), tmp_path)
    sources = json.loads((tmp_path / "artifacts/sources.json").read_text())
    from mergeflow.stages.download import fingerprint

    assert sources["base"]["sha256"] == fingerprint(hub["work"] / "base")
    assert len(sources["refs"]["eurosat"]["dataset"]["sha256"]) == 64
    assert (tmp_path / "artifacts/heads/eurosat.safetensors").exists()


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_preset_runs_every_stage_offline(hub, tmp_path, prefect_server):
    """Done-when: `mergeflow run --params <the CLIP preset>` with tiny cached names, no network."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = swapped_preset()
    params["download"]["offline"] = True
    ws = pipeline_workspace(tmp_path / "ws", params)
    dvc = [sys.executable, "-m", "dvc"]
    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    from mlflow import MlflowClient  # not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI to later tests

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("clip-tiny").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["source.base"] == f"hf://openai/clip-tiny@{hub['commits']['base']}"
    assert parent.data.tags["source.eurosat.dataset"] == f"hf://datasets/tanganke/tiny-eurosat@{hub['commits']['ds_eurosat']}"
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert metrics["task_metrics"] == {"mnist": "accuracy", "eurosat": "accuracy"}
    rows = reported_rows(params["merge"]["methods"])  # the preset's methods: every family runs them all
    assert {"tsv_m", "iso_cts", "cart", "lines", "cabs", "tvq", "rtvq", "tsv_c"} <= rows
    assert set(metrics["methods"]) == rows
    for row in [metrics["base"], metrics["experts"], *metrics["methods"].values()]:
        assert set(row["acc"]) == {"mnist", "eurosat"} and all(0.0 <= a <= 1.0 for a in row["acc"].values())
    assert "up to date" in sh(dvc + ["status", "download"], ws)  # the run was committed to DVC
    # a changed upstream revision (here: pinning the base to its commit under a tag) shows in dvc status
    params["download"]["base"] = f"hf://openai/clip-tiny@{hub['commits']['base']}"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(dvc + ["status", "download"], ws)
    assert "download" in status and "changed" in status


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_run_fails_in_download_on_a_missing_cache_entry(hub, tmp_path, prefect_server):
    """Done-when: offline, a missing cache entry stops `mergeflow run` in the download stage, one line."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = swapped_preset(tasks=("eurosat",))
    params["download"]["offline"] = True
    params["download"]["tasks"]["eurosat"]["model"] = "hf://tanganke/clip-tiny_eurosat@v2"
    ws = pipeline_workspace(tmp_path / "ws", params)
    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("mergeflow: error:")]
    assert len(errors) == 1 and "hf://tanganke/clip-tiny_eurosat@v2: " in errors[0] and "offline" in errors[0]
    assert not (ws / "artifacts/checkpoints").exists() and not (ws / "artifacts/sources.json").exists()


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_scheduled_rerun_skips_unless_upstream_moved(hub, tmp_path, prefect_server):
    """A rerun with nothing changed upstream does no stage work; a moved branch reruns the download."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.hfcache import add_folder

    params = swapped_preset(tasks=("eurosat",))
    params["download"]["offline"] = True
    params["merge"]["methods"] = ["task_arithmetic", "tswitch"]
    ws = pipeline_workspace(tmp_path / "ws", params)
    run = lambda: CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])  # noqa: E731
    first = run()
    assert first.exit_code == 0, first.output
    again = run()
    assert again.exit_code == 0, again.output
    assert "stages cached: download, extract, compress, merge, evaluate;" in again.output
    # the hub's main branch of the base moves to a new commit (same files): the download stage sees it
    refs = hub["cache"] / "models--openai--clip-tiny" / "refs" / "main"
    moved = add_folder(hub["cache"], "openai/clip-tiny", hub["work"] / "base", commit="f" * 40)
    try:
        third = run()
        assert third.exit_code == 0, third.output
        cached = next(line for line in third.output.splitlines() if line.startswith("stages cached:"))
        assert "download" not in cached
        assert json.loads((ws / "artifacts/sources.json").read_text())["base"]["commit"] == moved
    finally:
        refs.write_text(hub["commits"]["base"])
