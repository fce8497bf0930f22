"""BERT in the text-classification family (issue 17, friction 5): a bare BertModel base whose file
keeps the legacy ``embeddings.position_ids`` buffer, BertForSequenceClassification experts, and a
sentence-pair task scored with ``token_type_ids`` as transformers' own inference scores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

WORDS = "the cat dog sat ran on in a park mat quick brown fox lazy men play is good bad very not".split()
CFG = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=40,
    initializer_range=0.5,
)
MAX_LENGTH = 32


def tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    return tok


def sentences(rng, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 8)))) for _ in range(n)]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    tok, experts = make_bert(tmp)
    return tmp, tok, experts


def make_bert(tmp: Path):
    """``tmp/base`` (a bare BertModel with the legacy buffer and a WordPiece tokenizer),
    ``tmp/experts/{single,pair}`` (raw BertForSequenceClassification fine-tunes) and their
    datasets ``tmp/data/<task>/data/validation-*.parquet``: (tokenizer, {task: expert model})."""
    tok = tokenizer(tmp / "base")
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), **CFG)).eval()
    with torch.no_grad():
        base.embeddings.token_type_embeddings.weight.mul_(20)  # segments that matter to the scores
    base.save_pretrained(tmp / "base")
    sd = load_file(str(tmp / "base/model.safetensors"))
    sd["embeddings.position_ids"] = torch.arange(CFG["max_position_embeddings"]).unsqueeze(0)  # legacy buffer
    save_file(sd, str(tmp / "base/model.safetensors"), metadata={"format": "pt"})
    rng = np.random.default_rng(0)
    experts = {}
    for seed, (task, num_labels, columns) in enumerate([("single", 2, ["text"]), ("pair", 1, ["a", "b"])], 1):
        cfg = transformers.BertConfig(vocab_size=len(tok), num_labels=num_labels, **CFG)
        model = transformers.BertForSequenceClassification(cfg).eval()
        torch.manual_seed(seed)
        body = {k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items() if v.is_floating_point()}
        model.bert.load_state_dict(body, strict=False)
        with torch.no_grad():
            model.classifier.weight.normal_(0, 3.0)  # a head that reads the pooled state, not a constant
        model.save_pretrained(tmp / "experts" / task)  # names under `bert.`, a classifier head
        experts[task] = model
        data = {c: sentences(rng, 10) for c in columns}
        data["label"] = rng.uniform(0, 5, 10).astype(np.float32).tolist() if num_labels == 1 else rng.integers(0, 2, 10).tolist()
        folder = tmp / "data" / task / "data"
        folder.mkdir(parents=True)
        from datasets import Dataset

        Dataset.from_dict(data).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    return tok, experts


TASKS = {"single": (["text"], "accuracy"), "pair": (["a", "b"], "pearson_spearmanr")}
METHODS = ["task_arithmetic", "ties", "tswitch"]


@pytest.fixture(scope="module")
def workspace(bert):
    """The five stages in-process on a workspace whose params name the sources by relative paths,
    run from another folder (they start at the params file's folder)."""
    import os

    import yaml

    from mergeflow import stages
    from mergeflow.params import load_params

    tmp = bert[0]
    tasks = {t: {"model": f"experts/{t}", "dataset": f"data/{t}", "text_columns": c, "metric": m} for t, (c, m) in TASKS.items()}
    params = {
        "download": {
            "family": "text_classification",
            "base": "base",
            "tasks": tasks,
            "options": {"max_length": MAX_LENGTH, "query_pool": 0},
        },
        "merge": {"methods": METHODS},
        "evaluate": {"plots": False, "batch_size": 4},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    here = os.getcwd()
    os.chdir(tmp.parent)
    try:
        p = load_params(tmp / "params.yaml")
        for stage in stages.STAGES:
            stages.run(stage, p, tmp)
    finally:
        os.chdir(here)
    return tmp, p


@pytest.fixture(scope="module")
def family(workspace):
    from mergeflow.models.text import TextClassification

    return TextClassification(workspace[0] / "artifacts", "cpu", batch_size=4)


def test_pairs_are_scored_with_their_segments(bert, workspace, family):
    import pyarrow.parquet as pq

    from mergeflow.io.checkpoint import Checkpoint

    tmp, tok, experts = bert
    fam = family
    assert "token_type_ids" in pq.read_schema(str(tmp / "artifacts/data/pair/test.parquet")).names
    assert "token_type_ids" not in pq.read_schema(str(tmp / "artifacts/data/single/test.parquet")).names
    rows = pq.read_table(str(tmp / "data/pair/data/validation-00000-of-00001.parquet")).to_pydict()
    with torch.no_grad():
        enc = [tok(a, b, truncation=True, max_length=MAX_LENGTH, return_tensors="pt") for a, b in zip(rows["a"], rows["b"])]
        want = torch.stack([experts["pair"](**e).logits[0, 0] for e in enc])
        flat = torch.stack(
            [experts["pair"](**{**e, "token_type_ids": torch.zeros_like(e["token_type_ids"])}).logits[0, 0] for e in enc]
        )
    assert (want - flat).abs().max() > 1e-3  # the segments change the scores: a test that can fail
    model = fam.build(Checkpoint(tmp / "artifacts/checkpoints/pair").state_dict())
    got = fam.predict(model, "pair", fam.load_data("pair", "test"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_bare_bert_base_with_a_legacy_buffer_is_the_body(bert, workspace):
    tmp, _, experts = bert
    body = load_file(str(tmp / "artifacts/checkpoints/base/model.safetensors"))
    assert "embeddings.position_ids" not in body and not [k for k in body if k.startswith("classifier")]
    want = {k for k, v in experts["single"].bert.state_dict().items() if v.is_floating_point()}
    assert {k.removeprefix("bert.") for k in body} == want


def scores_of_export(folder: Path, tmp: Path, task: str) -> dict:
    """The exported folder through transformers' Auto classes on the task's tokenised test rows,
    scored by the task's metric (what metrics.json reports)."""
    import pyarrow.parquet as pq

    from mergeflow.models.text_metrics import glue_score

    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    table = pq.read_table(str(tmp / "artifacts/data" / task / "test.parquet")).to_pydict()
    outs = []
    with torch.no_grad():
        for i, ids in enumerate(table["input_ids"]):
            inputs = {"input_ids": torch.tensor([ids])}
            if "token_type_ids" in table:
                inputs["token_type_ids"] = torch.tensor([table["token_type_ids"][i]])
            logits = model.eval()(**inputs).logits[0]
            outs.append(logits[0] if model.config.num_labels == 1 else logits.argmax())
    return glue_score(TASKS[task][1], torch.stack(outs), torch.tensor(table["label"]))


@pytest.mark.parametrize("method, task", [("task_arithmetic", "single"), ("tswitch", "pair"), ("ties", "pair")])
def test_export_loads_in_transformers_and_scores_what_metrics_json_says(workspace, bert, method, task):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    tmp, _ = workspace
    out = tmp / "exports" / f"{method}-{task}"
    res = CliRunner().invoke(
        app, ["export", "--params", str(tmp / "params.yaml"), "--method", method, "--task", task, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp / "artifacts/eval/metrics.json").read_text())
    got = scores_of_export(out, tmp, task)
    assert got["score"] == pytest.approx(metrics["methods"][method]["acc"][task], abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and (out / "tokenizer_config.json").exists()
    assert transformers.AutoTokenizer.from_pretrained(out)("a cat")["input_ids"] == bert[1]("a cat")["input_ids"]
    record = json.loads((out / "mergeflow_export.json").read_text())
    assert record["method"] == method and record["task"] == task and record["merge"]


def test_export_refuses_what_is_not_there(workspace):
    from typer.testing import CliRunner

    from flows.cli import app

    tmp, _ = workspace
    for args, message in [
        (["--method", "emr", "--task", "pair"], "--method: 'emr' has no merge in"),
        (["--method", "ties", "--task", "nope"], "--task: 'nope' is not one of this workspace's tasks (single, pair)"),
    ]:
        res = CliRunner().invoke(app, ["export", "--params", str(tmp / "params.yaml"), *args, "--out", str(tmp / "x")])
        assert res.exit_code == 2 and message in res.output and not (tmp / "x").exists(), res.output
