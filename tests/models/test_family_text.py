"""Text classification from the hub, offline: tiny RoBERTa models and GLUE-like datasets in a
Hugging Face cache.

The real loading code runs (hub resolution, the family's prepare, heads, tokenised splits,
evaluation), checked against transformers' own AutoModelForSequenceClassification and against
scikit-learn / SciPy metrics.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergeflow.errors import MergeflowError
from tests.hfcache import add_folder, pipeline_workspace, reported_rows, sh

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "roberta-glue.yaml"
WORDS = (
    "the cat dog sat ran on in a park mat quick brown fox lazy men play guitar is this sentence "
    "good bad very not two woman eats food man reads book"
).split()
NUM_LABELS = {"cola": 2, "stsb": 1, "mnli": 3}
MAX_LENGTH = 24


def sentences(rng, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def tiny_tokenizer(folder: Path):
    """A byte-level BPE trained on the word list, as RoBERTa's tokenizer (<s>=0, <pad>=1, </s>=2)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences(np.random.default_rng(0), 200),
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    (folder / "merges.txt").unlink()
    (folder / "vocab.json").unlink()
    tok = RobertaTokenizer(vocab=bpe.get_vocab(), merges=merges)
    tok.save_pretrained(str(folder))
    return tok


def tiny_config(vocab_size: int, **kw):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=kw.pop("intermediate_size", 64),
        max_position_embeddings=MAX_LENGTH + 2 + 8,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        initializer_range=0.3,
        **kw,
    )  # wide enough that inputs' CLS states differ


def finetune(base, tok, num_labels: int, seed: int, **kw):
    """A RobertaForSequenceClassification: the base's body perturbed, a random head whose classes
    are balanced on a few sentences (so that predictions vary)."""
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    model = RobertaForSequenceClassification(tiny_config(base.config.vocab_size, num_labels=num_labels, **kw)).eval()
    if not kw:
        model.roberta.load_state_dict(base.roberta.state_dict(), strict=False)
    gen = torch.Generator().manual_seed(seed)
    enc = tok(
        sentences(np.random.default_rng(seed), 40), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("roberta."):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.classifier.out_proj.weight.mul_(5.0)
        if num_labels > 1:
            model.classifier.out_proj.bias.sub_(model(**enc).logits.mean(0))
    return model


def glue_like(
    folder: Path, task: str, columns: list[str], num_labels: int, seed: int, layout: str, splits=("train", "validation", "test")
) -> None:
    """Parquet splits in nyu-mll/glue's layout (<task>/<split>-00000-of-00001.parquet, configs in the
    README) or the plain one (data/<split>-00000-of-00001.parquet)."""
    from datasets import ClassLabel, Dataset, Features, Value

    rng = np.random.default_rng(seed)
    sizes = {"train": 30, "test": 6}
    for split in splits:
        n = sizes.get(split, 12)
        data = {c: sentences(rng, n) for c in columns}
        if num_labels == 1:
            data["label"] = rng.uniform(0, 5, n).astype(np.float32).tolist()
            label = Value("float32")
        else:
            data["label"] = rng.integers(0, num_labels, n).tolist() if split != "test" else [-1] * n
            label = ClassLabel(num_classes=num_labels)
        data["idx"] = list(range(n))
        feats = Features({**{c: Value("string") for c in columns}, "label": label, "idx": Value("int32")})
        sub = folder / (task if layout == "glue" else "data")
        sub.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(data, features=feats).to_parquet(str(sub / f"{split}-00000-of-00001.parquet"))


def glue_readme(folder: Path, configs: dict[str, tuple]) -> None:
    lines = ["---", "configs:"]
    for task, splits in configs.items():
        lines += [f"- config_name: {task}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: {task}/{s}-*" for s in splits]
    (folder / "README.md").write_text("\n".join(lines + ["---", "# tiny GLUE"]) + "\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline hub cache: a tiny RoBERTa base (masked LM), a repo with a folder per fine-tune (cola
    saved without the roberta. prefix, stsb a regression head), an mnli fine-tune as pytorch_model.bin,
    a GLUE-layout dataset and a plain-layout one."""
    from safetensors.torch import save_file
    from transformers import RobertaForMaskedLM

    work = tmp_path_factory.mktemp("text")
    cache = work / "hub"
    base_dir = work / "base"
    base_dir.mkdir()
    tok = tiny_tokenizer(base_dir)
    torch.manual_seed(0)
    base = RobertaForMaskedLM(tiny_config(len(tok))).eval()
    base.save_pretrained(str(base_dir))
    commits = {"base": add_folder(cache, "FacebookAI/roberta-tiny", base_dir)}
    refs = {}
    multi = work / "multi"
    for i, task in enumerate(("cola", "stsb")):
        ft = finetune(base, tok, NUM_LABELS[task], seed=10 + i)
        refs[task] = work / f"ref_{task}"
        ft.save_pretrained(str(refs[task]))
        tok.save_pretrained(str(refs[task]))
        sub = multi / task / "roberta-base_lr1e-05"
        shutil.copytree(refs[task], sub)
        if task == "cola":  # saved without the body prefix
            sd = {k.removeprefix("roberta."): v.contiguous() for k, v in ft.state_dict().items()}
            (sub / "model.safetensors").unlink()
            save_file(sd, str(sub / "model.safetensors"), metadata={"format": "pt"})
    commits["multi"] = add_folder(cache, "glue-team/roberta-tiny-glue", multi)
    refs["mnli"] = work / "ref_mnli"  # DARE-style: pytorch_model.bin, read with weights_only
    refs["mnli"].mkdir()
    ft = finetune(base, tok, 3, seed=12)
    ft.config.save_pretrained(str(refs["mnli"]))
    torch.save(ft.state_dict(), refs["mnli"] / "pytorch_model.bin")
    commits["mnli"] = add_folder(cache, "glue-team/roberta-tiny_mnli", refs["mnli"])
    glue = work / "glue"
    glue_like(glue, "cola", ["sentence"], 2, seed=20, layout="glue")
    glue_like(glue, "stsb", ["sentence1", "sentence2"], 1, seed=21, layout="glue")
    glue_readme(glue, {"cola": ("train", "validation", "test"), "stsb": ("train", "validation", "test")})
    commits["glue"] = add_folder(cache, "nyu-mll/tiny-glue", glue, repo_type="dataset")
    mnli = work / "ds_mnli"
    glue_like(
        mnli,
        "mnli",
        ["premise", "hypothesis"],
        3,
        seed=22,
        layout="plain",
        splits=("train", "validation_matched", "validation_mismatched"),
    )
    commits["ds_mnli"] = add_folder(cache, "glue-team/tiny-mnli", mnli, repo_type="dataset")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only wait for each other on a shared machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_CACHE", str(cache))
            mp.setenv("HF_HUB_OFFLINE", "1")
            yield {"work": work, "cache": cache, "commits": commits, "refs": refs, "base": base_dir}
    finally:
        torch.set_num_threads(threads)


def swapped_preset(tasks=("cola", "stsb", "mnli")) -> dict:
    """The RoBERTa preset with its model and dataset names swapped for the tiny cached ones."""
    params = yaml.safe_load(PRESET.read_text())
    assert params["download"]["family"] == "text_classification"
    assert params["download"]["base"] == "hf://FacebookAI/roberta-base"
    params["download"]["base"] = "hf://FacebookAI/roberta-tiny"
    swap = {
        t: {
            **params["download"]["tasks"][t],
            "model": "hf://glue-team/roberta-tiny-glue",
            "dataset": "hf://datasets/nyu-mll/tiny-glue",
        }
        for t in ("cola", "stsb")
    }
    swap["mnli"] = {"model": "hf://glue-team/roberta-tiny_mnli", "dataset": "hf://datasets/glue-team/tiny-mnli"}
    params["download"]["tasks"] = {t: swap[t] for t in tasks}
    params["download"]["options"] = {"max_length": MAX_LENGTH, "query_pool": 16}
    params["compress"]["queries"] = 5
    params["merge"]["autoswitch"] = {"k": 3, "batch_size": 8}
    params["evaluate"]["batch_size"] = 5
    params["experiment"] = "roberta-tiny"
    return params


@pytest.fixture(scope="module")
def prepared(hub, tmp_path_factory):
    """The download stage on the swapped preset: artifacts and sources.json."""
    from mergeflow import stages
    from mergeflow.params import validate

    root = tmp_path_factory.mktemp("prep")
    stages.run("download", validate(swapped_preset()), root)
    return root


def raw_rows(hub, task: str, split: str) -> dict:
    """A split as the dataset repo holds it, read with pyarrow."""
    import pyarrow.parquet as pq

    if task == "mnli":
        snap = hub["cache"] / "datasets--glue-team--tiny-mnli" / "snapshots" / hub["commits"]["ds_mnli"] / "data"
    else:
        snap = hub["cache"] / "datasets--nyu-mll--tiny-glue" / "snapshots" / hub["commits"]["glue"] / task
    return pq.read_table(str(snap / f"{split}-00000-of-00001.parquet")).to_pydict()


COLUMNS = {"cola": ["sentence"], "stsb": ["sentence1", "sentence2"], "mnli": ["premise", "hypothesis"]}
EVAL_SPLIT = {"cola": "validation", "stsb": "validation", "mnli": "validation_matched"}


def reference_outputs(hub, task: str, rows: dict):
    """transformers' own model and tokenizer, one row at a time (no padding): (logits, CLS states)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hub["base"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(hub["refs"][task])).eval()
    logits, cls = [], []
    with torch.no_grad():
        for i in range(len(rows["label"])):
            enc = tok(*[rows[c][i] for c in COLUMNS[task]], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            out = model(**enc, output_hidden_states=True)
            logits.append(out.logits[0])
            cls.append(out.hidden_states[-1][0, 0])
    return torch.stack(logits), torch.stack(cls)


# --- the preset ------------------------------------------------------------------------------


def test_preset_lists_the_glue_suite():
    from mergeflow.params import load_params

    p = load_params(PRESET)
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert p.download.family == "text_classification" and p.download.base == "hf://FacebookAI/roberta-base"
    assert list(p.download.tasks) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    for task, spec in p.download.tasks.items():
        assert spec["dataset"] == "hf://datasets/nyu-mll/glue" and spec["subset"] == task
        assert spec["model"].startswith("hf://") and spec["subfolder"].startswith(f"{task}/")
    assert p.compress.drop == 0.7 and p.merge.hyper("autoswitch")["k"] == 5
    assert p.merge.methods == default["merge"]["methods"]


# --- download ----------------------------------------------------------------------------------


def test_sources_pin_commits_and_metrics(prepared, hub):
    sources = json.loads((prepared / "artifacts/sources.json").read_text())
    c = hub["commits"]
    assert sources["family"] == "text_classification" and sources["tasks"] == ["cola", "stsb", "mnli"]
    assert sources["base"]["commit"] == c["base"]
    assert sources["refs"]["cola"]["model"]["commit"] == sources["refs"]["stsb"]["model"]["commit"] == c["multi"]
    assert sources["refs"]["mnli"]["dataset"]["commit"] == c["ds_mnli"]
    assert sources["metrics"] == {"cola": "matthews_correlation", "stsb": "pearson_spearmanr", "mnli": "accuracy"}
    assert sources["num_labels"] == NUM_LABELS
    assert sources["rows"] == {
        "cola": {"test": 12, "train": 16},
        "stsb": {"test": 12, "train": 16},
        "mnli": {"test": 12, "train": 16},
    }


def test_checkpoints_hold_the_body_only(prepared, hub):
    from transformers import AutoModelForSequenceClassification, RobertaForMaskedLM, RobertaForSequenceClassification

    from mergeflow.io.checkpoint import Checkpoint

    art = prepared / "artifacts"
    ck = {n: Checkpoint(art / "checkpoints" / n) for n in ("base", *NUM_LABELS)}
    base = RobertaForMaskedLM.from_pretrained(str(hub["base"]))
    want = {
        k: tuple(v.shape)
        for k, v in RobertaForSequenceClassification(base.config).state_dict().items()
        if not k.startswith("classifier.")
    }
    for name, c in ck.items():
        assert {n: tuple(c.shape(n)) for n in c.names()} == want, name
    assert all(n.startswith("roberta.") for n in want)
    for name in want:
        assert torch.equal(ck["base"].get(name), base.state_dict()[name])
    for task in NUM_LABELS:
        ref = AutoModelForSequenceClassification.from_pretrained(str(hub["refs"][task])).state_dict()
        for name in want:
            assert torch.equal(ck[task].get(name), ref[name]), (task, name)
        assert not torch.equal(
            ck[task].get("roberta.encoder.layer.1.output.dense.weight"),
            ck["base"].get("roberta.encoder.layer.1.output.dense.weight"),
        )
    # the base folder carries the tokenizer: it tokenises as the original
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(art / "checkpoints/base"))("the cat sat", "on the mat")["input_ids"]
    assert a == AutoTokenizer.from_pretrained(str(hub["base"]))("the cat sat", "on the mat")["input_ids"]


def test_heads_are_the_finetunes_classifiers(prepared, hub):
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    for task, n in NUM_LABELS.items():
        ref = AutoModelForSequenceClassification.from_pretrained(str(hub["refs"][task])).state_dict()
        with safe_open(str(prepared / "artifacts/heads" / f"{task}.safetensors"), framework="pt") as fh:
            assert set(fh.keys()) == {k for k in ref if k.startswith("classifier.")}
            for k in fh.keys():
                assert torch.equal(fh.get_tensor(k), ref[k])
            assert RobertaConfig.from_dict(json.loads(fh.metadata()["config"])).num_labels == n
        assert ref["classifier.out_proj.weight"].shape[0] == n


# --- evaluation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(prepared):
    from mergeflow.models import get_family

    return get_family("text_classification")(prepared / "artifacts", "cpu", batch_size=5)


def test_expert_predictions_match_transformers(prepared, hub, family):
    """build(expert body) + the task's head = the fine-tune's own AutoModelForSequenceClassification."""
    from mergeflow.io.checkpoint import Checkpoint

    for task in NUM_LABELS:
        rows = raw_rows(hub, task, EVAL_SPLIT[task])
        logits, _ = reference_outputs(hub, task, rows)
        model = family.build(Checkpoint(prepared / "artifacts/checkpoints" / task).state_dict())
        data = family.load_data(task, "test")
        assert len(data) == len(rows["label"]) == 12
        pred = family.predict(model, task, data)
        if task == "stsb":
            assert pred.dtype == torch.float32
            torch.testing.assert_close(pred, logits[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(data.labels, torch.tensor(rows["label"], dtype=torch.float32))
        else:
            assert torch.equal(pred, logits.argmax(-1)) and len(set(pred.tolist())) > 1
            assert torch.equal(data.labels, torch.tensor(rows["label"]))
        sub = torch.tensor([7, 0, 3])
        torch.testing.assert_close(family.predict(model, task, data, sub), pred[sub], atol=1e-5, rtol=0)


def test_features_are_the_cls_state(prepared, hub, family):
    from mergeflow.io.checkpoint import Checkpoint

    rows = raw_rows(hub, "mnli", "validation_matched")
    _, cls = reference_outputs(hub, "mnli", rows)
    model = family.build(Checkpoint(prepared / "artifacts/checkpoints/mnli").state_dict())
    data = family.load_data("mnli", "test")
    feats = family.features(model, data)
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (12, 32)
    torch.testing.assert_close(feats, cls, atol=1e-5, rtol=1e-5)
    rows_ = torch.tensor([11, 2])
    torch.testing.assert_close(family.features(model, data, rows_), cls[rows_], atol=1e-5, rtol=1e-5)


def test_scores_match_sklearn_and_scipy(prepared, family):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from mergeflow.models.text import glue_score

    # hand-computed: TP 2, TN 1, FP 1, FN 1 -> MCC (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6; acc 3/5; F1 4/6
    y, p = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert glue_score("matthews_correlation", torch.tensor(p), torch.tensor(y))["score"] == pytest.approx(1 / 6)
    r = glue_score("accuracy_f1", torch.tensor(p), torch.tensor(y))
    assert (r["accuracy"], r["f1"], r["score"]) == pytest.approx((0.6, 2 / 3, (0.6 + 2 / 3) / 2))
    # ranks 1 2 3 4 against 1 3 2 4: Spearman = Pearson = 1 - 6*2/(4*15) = 0.8
    r = glue_score("pearson_spearmanr", torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4]))
    assert (r["pearson"], r["spearmanr"], r["score"]) == pytest.approx((0.8, 0.8, 0.8))
    assert glue_score("pearson_spearmanr", torch.ones(4), torch.tensor([1.0, 3, 2, 4]))["score"] == 0.0  # constant
    # through the family, with each task's metric, on made-up outputs
    rng = np.random.default_rng(1)
    for task in NUM_LABELS:
        data = family.load_data(task, "test")
        yy = data.labels.numpy()
        if task == "stsb":
            out = torch.tensor(yy + rng.normal(0, 1.5, len(yy)), dtype=torch.float32)
            want = (pearsonr(out.numpy(), yy)[0] + spearmanr(out.numpy(), yy)[0]) / 2
            got = family.score(task, out, data)
            assert got["pearson"] == pytest.approx(pearsonr(out.numpy(), yy)[0])
        else:
            out = torch.tensor(np.where(rng.random(len(yy)) < 0.6, yy, rng.integers(0, NUM_LABELS[task], len(yy))))
            want = matthews_corrcoef(yy, out.numpy()) if task == "cola" else accuracy_score(yy, out.numpy())
            got = family.score(task, out, data)
            assert got["accuracy"] == pytest.approx(accuracy_score(yy, out.numpy()))
        assert got["metric"] == {"cola": "matthews_correlation", "stsb": "pearson_spearmanr", "mnli": "accuracy"}[task]
        assert got["score"] == pytest.approx(want) and math.isfinite(got["score"])
    yb, pb = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert glue_score("f1", torch.tensor(pb), torch.tensor(yb))["score"] == pytest.approx(f1_score(yb, pb))


def test_tensors_are_the_live_body(prepared, family):
    """tensors(model) are the model's own body tensors (shared with the state dict): edits show."""
    from mergeflow.io.checkpoint import Checkpoint

    sd = Checkpoint(prepared / "artifacts/checkpoints/base").state_dict()
    model = family.build(sd)
    live = family.tensors(model)
    assert set(live) == set(sd)
    assert all(live[k].data_ptr() == sd[k].data_ptr() for k in sd)
    data = family.load_data("cola", "test")
    before = family.features(model, data)
    pred_before = family.predict(model, "stsb", data)
    name = "roberta.encoder.layer.1.output.dense.weight"
    live[name].mul_(-3.0)
    after = family.features(model, data)
    assert not torch.allclose(before, after)
    edited = {k: v.clone() for k, v in sd.items()}
    torch.testing.assert_close(family.features(family.build(edited), data), after)
    assert not torch.allclose(family.predict(model, "stsb", data), pred_before)


def test_query_pool_is_a_seeded_sample(prepared, hub, family):
    from transformers import AutoTokenizer

    train = family.load_data("cola", "train")
    assert len(train) == 16 and len(family.load_data("cola", "test", limit=5)) == 5
    picked = sorted(torch.randperm(30, generator=torch.Generator().manual_seed(0))[:16].tolist())
    raw = raw_rows(hub, "cola", "train")
    tok = AutoTokenizer.from_pretrained(str(hub["base"]))
    for i, r in enumerate(picked):
        want = tok(raw["sentence"][r], truncation=True, max_length=MAX_LENGTH)["input_ids"]
        assert train.ids[train.offsets[i] : train.offsets[i + 1]].tolist() == want
        assert int(train.labels[i]) == raw["label"][r]


# --- bad sources -------------------------------------------------------------------------------


def sources_for(hub, task: str, model: Path, **options):
    from mergeflow.models.family import Source, Sources, TaskSources
    from mergeflow.models.text import TextClassification

    ds = hub["work"] / ("ds_mnli" if task == "mnli" else "glue")
    topts = {**TextClassification.task_options, "subset": None if task == "mnli" else task, **options}
    return Sources(
        "text_classification",
        Source(str(hub["base"]), hub["base"]),
        {task: TaskSources(task, Source(str(model), model), Source(str(ds), ds), topts)},
        {**TextClassification.options, "max_length": MAX_LENGTH, "query_pool": 4},
    )


def one_line_error(hub, tmp_path, sources) -> str:
    from mergeflow.models.text import TextClassification

    import tempfile

    with pytest.raises(MergeflowError) as exc:  # a fresh folder each time, as the download stage gives
        TextClassification.prepare(sources, Path(tempfile.mkdtemp(dir=tmp_path)), lambda _: None)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_mismatched_body_is_one_line_error(hub, tmp_path):
    from transformers import AutoTokenizer, RobertaForMaskedLM, RobertaModel

    base = RobertaForMaskedLM.from_pretrained(str(hub["base"]))
    odd = tmp_path / "odd"
    finetune(base, AutoTokenizer.from_pretrained(str(hub["base"])), 2, seed=5, intermediate_size=48).save_pretrained(str(odd))
    msg = one_line_error(hub, tmp_path, sources_for(hub, "cola", odd))
    assert "roberta.encoder.layer.0.intermediate.dense.weight" in msg and str(odd / "model.safetensors") in msg
    assert "[48, 32]" in msg and "[64, 32]" in msg
    headless = tmp_path / "headless"
    RobertaModel(base.config, add_pooling_layer=False).save_pretrained(str(headless))
    msg = one_line_error(hub, tmp_path, sources_for(hub, "cola", headless))
    assert "classifier.dense.weight missing" in msg and str(headless) in msg
    # GLUE's test split has no labels; a wrong column is named
    msg = one_line_error(hub, tmp_path, sources_for(hub, "cola", hub["refs"]["cola"], split="test"))
    assert "label -1" in msg and "'test'" in msg
    msg = one_line_error(hub, tmp_path, sources_for(hub, "cola", hub["refs"]["cola"], text_columns=["text"]))
    assert "no column 'text'" in msg
    msg = one_line_error(hub, tmp_path, sources_for(hub, "stsb", hub["refs"]["stsb"], metric="accuracy"))
    assert "download.tasks.stsb.metric" in msg and "regression" in msg


# --- the whole pipeline ------------------------------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_preset_runs_every_stage_offline(hub, tmp_path, prefect_server):
    """`mergeflow run --params <the RoBERTa preset>` with tiny cached names, no network."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = swapped_preset()
    params["download"]["offline"] = True
    params["evaluate"]["limit"] = 8
    ws = pipeline_workspace(tmp_path / "ws", params)
    dvc = [sys.executable, "-m", "dvc"]
    res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert metrics["task_metrics"] == {"cola": "matthews_correlation", "stsb": "pearson_spearmanr", "mnli": "accuracy"}
    rows = reported_rows(params["merge"]["methods"])  # the preset's methods: every family runs them all
    assert {"tsv_m", "iso_cts", "cart", "lines", "cabs", "tvq", "rtvq", "tsv_c"} <= rows
    assert set(metrics["methods"]) == rows
    for row in [metrics["base"], metrics["experts"], *metrics["methods"].values()]:
        assert set(row["acc"]) == set(NUM_LABELS) and all(-1.0 <= a <= 1.0 for a in row["acc"].values())
    assert set(metrics["experts"]["pearson"]) == {"stsb"} and set(metrics["experts"]["accuracy"]) == {"cola", "mnli"}
    assert "up to date" in sh(dvc + ["status", "download"], ws)
