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
    return tmp, tok, experts


@pytest.fixture(scope="module")
def family(bert):
    return prepare(bert[0])


def prepare(tmp: Path):
    from mergeflow.models.family import Source, Sources, TaskSources
    from mergeflow.models.text import TextClassification

    tasks = {}
    for task, cols in (("single", ["text"]), ("pair", ["a", "b"])):
        model, ds = tmp / "experts" / task, tmp / "data" / task
        opts = {
            **TextClassification.task_options,
            "text_columns": cols,
            "metric": "accuracy" if task == "single" else "pearson_spearmanr",
        }
        tasks[task] = TaskSources(task, Source(str(model), model), Source(str(ds), ds), opts)
    out = tmp / "artifacts"
    sources = Sources(
        "text_classification",
        Source(str(tmp / "base"), tmp / "base"),
        tasks,
        {**TextClassification.options, "max_length": MAX_LENGTH, "query_pool": 0},
    )
    TextClassification.prepare(sources, out, lambda _: None)
    return TextClassification(out, "cpu", batch_size=4)


def test_pairs_are_scored_with_their_segments(bert, family):
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


def test_a_bare_bert_base_with_a_legacy_buffer_is_the_body(bert, family):
    tmp, _, experts = bert
    body = load_file(str(tmp / "artifacts/checkpoints/base/model.safetensors"))
    assert "embeddings.position_ids" not in body and not [k for k in body if k.startswith("classifier")]
    want = {k for k, v in experts["single"].bert.state_dict().items() if v.is_floating_point()}
    assert {k.removeprefix("bert.") for k in body} == want
