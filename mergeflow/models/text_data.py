"""Text-classification data: a task's splits tokenised at download by the base's tokenizer into
``data/<task>/{test,train}.parquet`` (``input_ids`` and ``label``), and read back for evaluation
(no tokenizer, no ``datasets``). Columns and splits default to GLUE's (see docs/family-text.md).

transformers and datasets are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import TaskSources
from mergeflow.models.text_metrics import glue_defaults, glue_name

_TOKENIZE_CHUNK = 1024


@dataclass
class Texts:
    """A task's tokenised split: token ids of every row back to back (``offsets`` [n + 1]) and labels
    (int64 class ids, or float32 values for a regression task)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    types: torch.Tensor | None = None  # token_type_ids, back to back as ``ids`` (BERT-style sentence pairs)

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def batches(self, rows: torch.Tensor | None, batch_size: int, pad_id: int, device):
        """(positions in ``rows``, the model's inputs) per batch: ``input_ids`` and ``attention_mask``
        [b, L], and ``token_type_ids`` where the tokenizer gave them (a pair's second sentence is
        segment 1, as in transformers' own inference). Rows sorted by length (less padding), each
        batch right-padded with ``pad_id`` to its longest row."""
        rows = torch.arange(len(self)) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        lengths = self.lengths()[rows]
        order = torch.argsort(lengths, descending=True, stable=True)
        for start in range(0, len(order), batch_size):
            pos = order[start : start + batch_size]
            sel = rows[pos]
            width = int(lengths[pos].max())
            ids = torch.full((len(sel), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(sel), width), dtype=torch.long)
            src_types = self.types
            types = None if src_types is None else torch.zeros((len(sel), width), dtype=torch.long)
            for i, r in enumerate(sel.tolist()):
                a, b = int(self.offsets[r]), int(self.offsets[r + 1])
                ids[i, : b - a] = self.ids[a:b]
                mask[i, : b - a] = 1
                if types is not None and src_types is not None:
                    types[i, : b - a] = src_types[a:b]
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if types is not None:
                inputs["token_type_ids"] = types.to(device)
            yield pos, inputs


def read_texts(file: Path, limit: int | None = None) -> Texts:
    """A split written by ``prepare``: its first ``limit`` rows (all when None)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from mergeflow.models.data import read_table

    table = read_table(file, ("input_ids", "label"), limit)
    optional = "token_type_ids" in table.column_names

    def flat(name: str) -> np.ndarray:
        return np.asarray(pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False), dtype=np.int64)

    col = table.column("input_ids")
    lengths = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    label = table.column("label")
    dtype = np.float32 if pa.types.is_floating(label.type) else np.int64
    labels = np.asarray(label.to_numpy(zero_copy_only=False), dtype=dtype)
    types = torch.from_numpy(flat("token_type_ids").copy()) if optional else None
    return Texts(torch.from_numpy(flat("input_ids").copy()), torch.from_numpy(offsets), torch.from_numpy(labels.copy()), types)


def write_texts(path: Path, ids: list[list[int]], labels, regression: bool, types: list[list[int]] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mergeflow.io.atomic import atomic_file

    columns = {
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "label": pa.array(labels, type=pa.float32() if regression else pa.int64()),
    }
    if types is not None:
        columns["token_type_ids"] = pa.array(types, type=pa.list_(pa.int8()))
    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        pq.write_table(table, str(tmp))


def load_tokenizer(folders: list[Path]):
    """The tokenizer of the first folder that has one (the base's, normally)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json", "spm.model", "sentencepiece.bpe.model")
    for folder in folders:
        if any((Path(folder) / n).exists() for n in names):
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
                raise MergeflowError(f"{folder}: cannot load the tokenizer ({' '.join(str(exc).split())[:160]})") from None
    raise MergeflowError(f"{folders[0]}: no tokenizer files (tokenizer.json, vocab.json, ...) in the base or any fine-tune")


def text_columns(ts: TaskSources) -> list[str]:
    cols = ts.options.get("text_columns")
    where = f"download.tasks.{ts.name}.text_columns"
    if cols is None:
        glue = glue_defaults(ts)
        if glue is None:
            raise MergeflowError(f"{where}: required (task {ts.name!r} is not a GLUE task whose columns are known)")
        return list(glue[0])
    if isinstance(cols, str):
        cols = [cols]
    if not isinstance(cols, list) or not 1 <= len(cols) <= 2 or not all(isinstance(c, str) and c for c in cols):
        raise MergeflowError(f"{where}: expected one or two column names, got {cols!r}")
    return cols


def eval_split(ts: TaskSources) -> str | None:
    """The evaluation split params name (``split``; MNLI's is validation_matched), else None: the
    first of validation, validation_matched, dev, test the dataset has (its only split for one file)."""
    split = ts.options.get("split")
    if split:
        return split
    name = glue_name(ts.options.get("subset")) or glue_name(ts.name)
    return "validation_matched" if name == "mnli" else None


@dataclass
class TaskTexts:
    """A task's splits read and checked (``check_texts``), ready to tokenise and write."""

    columns: list[str]
    test: object
    test_labels: list
    train: object | None
    train_labels: list | None
    regression: bool
    note: str | None = None  # why there is no query pool


def check_texts(ts: TaskSources, cfg, pool: int, seed: int) -> TaskTexts:
    """Read and check a task's evaluation split and query pool: its columns, and its labels
    against the expert's head (string and named labels mapped through the expert's ``label2id``).
    Nothing is written; every problem is a one-line MergeflowError."""
    from mergeflow.models.data import load_dataset_dict, pick_split

    dataset = ts.dataset
    assert dataset is not None, "the caller checks download.tasks.<task>.dataset"
    columns = text_columns(ts)
    label_col = ts.options.get("label_column") or "label"
    subset = ts.options.get("subset")
    regression = cfg.num_labels == 1
    where0 = f"{dataset.ref}" + (f" ({subset})" if subset else "")
    dd = load_dataset_dict(dataset, subset)
    split = pick_split(dd, eval_split(ts), where0)
    test = _columns(dd[split], [*columns, label_col], f"{where0} split {split!r}")
    labels = _labels(test, label_col, regression, cfg, f"{where0} split {split!r}")
    train_split = ts.options.get("train_split")
    if not pool or not train_split:
        return TaskTexts(columns, test, labels, None, None, regression, "download.options.query_pool is 0" if not pool else None)
    if train_split not in dd or train_split == split:
        return TaskTexts(columns, test, labels, None, None, regression, f"no split {train_split!r} (has {', '.join(dd)})")
    train = _columns(dd[train_split], [*columns, label_col], f"{where0} split {train_split!r}")
    if len(train) > pool:
        gen = torch.Generator().manual_seed(seed)
        train = train.select(sorted(torch.randperm(len(train), generator=gen)[:pool].tolist()))
    tl = _labels(train, label_col, regression, cfg, f"{where0} split {train_split!r}")
    return TaskTexts(columns, test, labels, train, tl, regression)


def _columns(ds, wanted: list[str], where: str):
    for col in wanted:
        if col not in ds.column_names:
            raise MergeflowError(
                f"{where}: no column {col!r} (has {', '.join(ds.column_names)}); name it in params (text_columns, label_column)"
            )
    return ds


def prepare_texts(
    ts: TaskSources, tokenizer, max_length: int, pool: int, seed: int, cfg, folder: Path, log, checked: TaskTexts | None = None
) -> dict:
    """Tokenise the evaluation split and a seeded sample of the train split into ``folder``."""
    t = checked or check_texts(ts, cfg, pool, seed)
    write_texts(
        folder / "test.parquet", *_with_labels(_tokenize(tokenizer, t.test, t.columns, max_length), t.test_labels, t.regression)
    )
    rows = {"test": len(t.test_labels)}
    if t.train is None:
        if t.note:
            log(f"download: {ts.name}: no query pool ({t.note})")
        return rows
    write_texts(
        folder / "train.parquet",
        *_with_labels(_tokenize(tokenizer, t.train, t.columns, max_length), t.train_labels, t.regression),
    )
    rows["train"] = len(t.train_labels or [])
    return rows


def _with_labels(tokens: tuple, labels, regression: bool) -> tuple:
    """``write_texts``' arguments after the path: ids, labels, regression, types."""
    ids, types = tokens
    return ids, labels, regression, types


def _labels(ds, column: str, regression: bool, cfg, where: str):
    """The label column as the head's class ids (or values, regression): integers as they are,
    strings and ``ClassLabel`` names through the expert's ``label2id``; a mismatch is one line."""
    import numpy as np

    num_labels = cfg.num_labels
    raw = list(ds[column])
    if len(raw) == 0:
        raise MergeflowError(f"{where}: no rows")
    if regression:
        try:
            return np.asarray(raw, dtype=np.float32).tolist()
        except (TypeError, ValueError):
            raise MergeflowError(f"{where}: column {column!r} holds non-numbers; a regression head needs values") from None
    names: list[str] = list(getattr(ds.features.get(column), "names", None) or [])
    named = bool(names) and names != [str(i) for i in range(len(names))]  # ClassLabel(num_classes=n) names none
    if named and not all(n.startswith("LABEL_") for n in _label_names(cfg)):
        raw = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in raw]  # named classes: map by name
    if raw and isinstance(raw[0], str):
        label2id = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
        if not label2id or all(k.startswith("LABEL_") for k in label2id):
            raise MergeflowError(
                f"{where}: column {column!r} holds strings, and the expert's config has no label names "
                f"(id2label is {', '.join(_label_names(cfg))}): give class ids, or set id2label/label2id in its config.json"
            )
        by_name = {k.lower(): v for k, v in label2id.items()}  # "Positive" is the expert's "positive"
        unknown = sorted({str(v) for v in raw if str(v).lower() not in by_name})
        if unknown:
            raise MergeflowError(
                f"{where}: label {unknown[0]!r} is not one of the expert's labels ({', '.join(label2id)})"
                + (f"; {len(unknown)} unknown" if len(unknown) > 1 else "")
            )
        return [by_name[str(v).lower()] for v in raw]
    y = np.asarray(raw)
    if y.dtype.kind not in "iub":
        raise MergeflowError(f"{where}: column {column!r} holds {y.dtype} values, a classification head needs class ids")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise MergeflowError(
            f"{where}: {int((y < 0).sum())} rows have label {int(y.min())} (no label; GLUE's test "
            f"splits hide theirs: evaluate on validation)"
        )
    if (y >= num_labels).any():
        raise MergeflowError(f"{where}: label {int(y.max())} out of range for a head with num_labels {num_labels}")
    return y.tolist()


def _label_names(cfg) -> list[str]:
    id2label = getattr(cfg, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _tokenize(tokenizer, ds, columns: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """(input_ids, token_type_ids) per row; the types only for a pair whose tokenizer makes them
    (BERT's segments; RoBERTa's tokenizer gives none) and where some row has a nonzero one."""
    texts = [[str(t) for t in ds[c]] for c in columns]
    ids: list[list[int]] = []
    types: list[list[int]] | None = [] if len(columns) == 2 and "token_type_ids" in tokenizer.model_input_names else None
    for i in range(0, len(texts[0]), _TOKENIZE_CHUNK):
        enc = tokenizer(*[t[i : i + _TOKENIZE_CHUNK] for t in texts], truncation=True, max_length=max_length)
        ids.extend(enc["input_ids"])
        if types is not None:
            types.extend(enc["token_type_ids"])
    return ids, types if types and any(any(row) for row in types) else None
