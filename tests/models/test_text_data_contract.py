"""The text data contract (docs/data.md; issue 17, friction 3): a dataset is a folder or one file
(parquet, CSV, JSON lines, a ``save_to_disk`` folder); the evaluation split is found or named;
string and named labels go through the expert's ``label2id``; every task is checked before any
is written, and all problems come in one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from mergeflow.errors import MergeflowError
from tests.models.test_family_bert import CFG, tokenizer

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

ROWS = {"text": ["the cat sat", "a dog ran", "not good", "very bad", "quick fox"], "label": ["pos", "neg", "neg", "NEG", "pos"]}
IDS = [1, 0, 0, 0, 1]  # the expert's label2id: neg 0, pos 1


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    tok = tokenizer(tmp / "base")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), **CFG)).save_pretrained(tmp / "base")
    for name, labels in (("named", {0: "neg", 1: "pos"}), ("plain", None)):
        extra = {"id2label": labels, "label2id": {v: k for k, v in labels.items()}} if labels else {"num_labels": 2}
        cfg = transformers.BertConfig(vocab_size=len(tok), **CFG, **extra)
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp / name)
    return tmp


def prepare(models: Path, tasks: dict[str, tuple[Path, str, dict]], out: Path | None = None):
    """The family's download on ``{task: (dataset, expert folder name, task options)}``; the artifacts folder."""
    from mergeflow.models.family import Source, Sources, TaskSources
    from mergeflow.models.text import TextClassification

    ts = {
        t: TaskSources(
            t,
            Source(e, models / e),
            Source(str(ds), ds),
            {**TextClassification.task_options, "text_columns": ["text"], "metric": "accuracy", **o},
        )
        for t, (ds, e, o) in tasks.items()
    }
    out = out or Path(tempfile.mkdtemp(dir=models))
    sources = Sources(
        "text_classification",
        Source("base", models / "base"),
        ts,
        {**TextClassification.options, "max_length": 16, "query_pool": 8},
    )
    TextClassification.prepare(sources, out, lambda _: None)
    return out


def labels_of(out: Path, task: str, split: str = "test") -> list:
    from mergeflow.models.text_data import read_texts

    return read_texts(out / "data" / task / f"{split}.parquet").labels.tolist()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "tsv", "save_to_disk"])
def test_one_file_or_a_saved_dataset_is_a_dataset(models, tmp_path, kind):
    ds = datasets.Dataset.from_dict(ROWS)
    path = tmp_path / f"data.{kind}"
    if kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "tsv":
        ds.to_csv(str(path), index=False, sep="\t")
    elif kind == "jsonl":
        ds.to_json(str(path), lines=True)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"validation": ds, "train": ds}).save_to_disk(str(path))
    out = prepare(models, {"sst": (path, "named", {})})
    assert labels_of(out, "sst") == IDS  # strings through label2id, "NEG" as "neg"
    assert (out / "data/sst/train.parquet").exists() == (kind == "save_to_disk")  # one file: no query pool


def test_the_evaluation_split_is_found_or_named(models, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        datasets.Dataset.from_dict({k: v[:n] for k, v in ROWS.items()}).to_csv(str(folder / f"{split}.csv"), index=False)
    out = prepare(models, {"sst": (folder, "named", {})})
    assert labels_of(out, "sst") == IDS[:3] and len(labels_of(out, "sst", "train")) == 5  # no validation: test
    with pytest.raises(MergeflowError, match=r"^.*ds: no split 'dev' \(has train, test\)$"):
        prepare(models, {"sst": (folder, "named", {"split": "dev"})})


def test_named_classes_are_mapped_by_name(models, tmp_path):
    """A ClassLabel whose order differs from the expert's: ids follow the names, not the positions."""
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])})
    ds = datasets.Dataset.from_dict(
        {"text": ROWS["text"], "label": [0 if v.lower() == "pos" else 1 for v in ROWS["label"]]}, features=feats
    )
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "saved").mkdir()
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))
    out = prepare(models, {"sst": (tmp_path / "saved", "named", {})})
    assert labels_of(out, "sst") == IDS


def test_every_problem_at_once_in_one_line(models, tmp_path):
    ds = datasets.Dataset.from_dict(ROWS)
    ds.to_csv(str(tmp_path / "ok.csv"), index=False)
    datasets.Dataset.from_dict({**ROWS, "label": ["pos", "meh", "neg", "so-so", "pos"]}).to_csv(
        str(tmp_path / "odd.csv"), index=False
    )
    datasets.Dataset.from_dict({"sentence": ROWS["text"], "label": IDS}).to_csv(str(tmp_path / "cols.csv"), index=False)
    with pytest.raises(MergeflowError) as exc:
        tasks = {"a": ("odd.csv", "named"), "b": ("ok.csv", "plain"), "c": ("cols.csv", "named"), "d": ("ok.csv", "named")}
        prepare(models, {t: (tmp_path / f, e, {}) for t, (f, e) in tasks.items()}, tmp_path / "out")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("3 tasks' data or experts are wrong: task a: ")
    assert "odd.csv split 'file': label 'meh' is not one of the expert's labels (neg, pos); 2 unknown" in msg
    assert "task b: " in msg and "holds strings, and the expert's config has no label names (id2label is LABEL_0, LABEL_1)" in msg
    assert "task c: " in msg and "cols.csv split 'file': no column 'text' (has sentence, label)" in msg
    assert "task d" not in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written, for any task


def test_one_file_is_the_evaluation_split_of_every_family(tmp_path):
    """The vision and causal families name their splits (test, train): one file is the evaluation
    split whatever the name, and never a train split (no query pool drawn from the test rows)."""
    from mergeflow.models.data import load_split
    from mergeflow.models.family import Source

    datasets.Dataset.from_dict(ROWS).to_json(str(tmp_path / "d.jsonl"), lines=True)
    src = Source("d.jsonl", tmp_path / "d.jsonl")
    assert list(load_split(src, "test", None, ["text"])["label"]) == ROWS["label"]
    with pytest.raises(MergeflowError, match=r"^d.jsonl: no split 'train' \(one file: the evaluation split only\)$"):
        load_split(src, "train", None, evaluation=False)


def test_splits_map_the_dataset_s_own_names(models, tmp_path):
    """params ``splits: {validation: heldout, train: fit}``: the dataset's own split names."""
    from mergeflow.params import split_options, validate

    folder = tmp_path / "ds"
    parts = {
        split: datasets.Dataset.from_dict({k: v[:n] for k, v in ROWS.items()})
        for split, n in (("fit", 5), ("heldout", 4), ("test", 3))
    }
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    spec = {"model": "m", "dataset": "d", "text_columns": ["text"], "splits": {"validation": "heldout", "train": "fit"}}
    validate({"download": {"family": "text_classification", "base": "b", "tasks": {"sst": spec}}})  # accepted
    options = {k: v for k, v in split_options(spec).items() if k not in ("model", "dataset")}
    assert options == {"text_columns": ["text"], "split": "heldout", "train_split": "fit"}
    out = prepare(models, {"sst": (folder, "named", {k: v for k, v in options.items() if k != "text_columns"})})
    assert labels_of(out, "sst") == IDS[:4] and len(labels_of(out, "sst", "train")) == 5
    for bad, message in [
        ({"dev": "x"}, r"tasks.sst.splits.dev: not one of validation, test, evaluation, train"),
        ({"validation": "a", "test": "b"}, r"tasks.sst.splits: validation and test both name the evaluation split"),
    ]:
        with pytest.raises(MergeflowError, match=message):
            validate({"download": {"family": "text_classification", "base": "b", "tasks": {"sst": {**spec, "splits": bad}}}})
    with pytest.raises(MergeflowError, match=r"tasks.sst: splits.validation and split both given"):
        validate({"download": {"family": "text_classification", "base": "b", "tasks": {"sst": {**spec, "split": "x"}}}})
