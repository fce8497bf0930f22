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


def eval_split(ts: TaskSources) -> str:
    split = ts.options.get("split")
    if split:
        return split
    name = glue_name(ts.options.get("subset")) or glue_name(ts.name)
    return "validation_matched" if name == "mnli" else "validation"


def prepare_texts(ts: TaskSources, tokenizer, max_length: int, pool: int, seed: int, cfg, folder: Path, log) -> dict:
    """Tokenise the evaluation split and a seeded sample of the train split into ``folder``."""
    from mergeflow.models.data import load_split

    dataset = ts.dataset
    assert dataset is not None, "the caller checks download.tasks.<task>.dataset"
    columns = text_columns(ts)
    label_col = ts.options.get("label_column") or "label"
    subset = ts.options.get("subset")
    regression = cfg.num_labels == 1
    split = eval_split(ts)
    test = load_split(dataset, split, subset, [*columns, label_col])
    where = f"{dataset.ref}" + (f" ({subset})" if subset else "") + f" split {split!r}"
    labels = _labels(test, label_col, regression, cfg.num_labels, where)
    write_texts(folder / "test.parquet", *_with_labels(_tokenize(tokenizer, test, columns, max_length), labels, regression))
    rows = {"test": len(labels)}
    train_split = ts.options.get("train_split")
    if pool and train_split:
        try:
            train = load_split(dataset, train_split, subset, [*columns, label_col])
        except MergeflowError as exc:
            log(f"download: {ts.name}: no query pool ({exc})")
            return rows
        if len(train) > pool:
            gen = torch.Generator().manual_seed(seed)
            train = train.select(sorted(torch.randperm(len(train), generator=gen)[:pool].tolist()))
        tw = f"{dataset.ref} split {train_split!r}"
        tl = _labels(train, label_col, regression, cfg.num_labels, tw)
        write_texts(folder / "train.parquet", *_with_labels(_tokenize(tokenizer, train, columns, max_length), tl, regression))
        rows["train"] = len(tl)
    return rows


def _with_labels(tokens: tuple, labels, regression: bool) -> tuple:
    """``write_texts``' arguments after the path: ids, labels, regression, types."""
    ids, types = tokens
    return ids, labels, regression, types


def _labels(ds, column: str, regression: bool, num_labels: int, where: str):
    import numpy as np

    y = np.asarray(list(ds[column]))
    if len(y) == 0:
        raise MergeflowError(f"{where}: no rows")
    if regression:
        return y.astype(np.float32).tolist()
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
