"""Causal LMs' evaluation data: texts tokenised with the base's tokenizer, joined with EOS and cut
into blocks of ``block_size`` tokens; ``data/<task>/{test,train}.safetensors`` write and read.

See docs/family-causal.md. transformers and datasets are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import MergeflowError
from mergeflow.models.family import TaskSources


@dataclass
class Blocks:
    """A task's split: token blocks [n, block_size] (int64)."""

    input_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenise_blocks(tokenizer, texts, block_size: int, max_blocks: int | None, where: str) -> torch.Tensor:
    """[n, block_size] int64: the texts tokenised (no special tokens), concatenated with EOS after
    each, cut into blocks; the ragged tail is dropped; at most ``max_blocks`` blocks (tokenising
    stops once they are filled). ``texts`` yields lists of strings (None and "" are skipped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MergeflowError(f"{where}: the base's tokenizer has no EOS token to join texts with")
    need = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    for batch in texts:
        for t in batch:
            if t is not None and not isinstance(t, str):
                raise MergeflowError(f"{where}: holds a {type(t).__name__}, not text")
        batch = [t for t in batch if t]
        if batch:
            for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                ids.extend(row)
                ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.int64).reshape(n, block_size)


def _text_batches(ds, column: str, batch: int = 1000):
    for start in range(0, len(ds), batch):
        yield ds[start : start + batch][column]


def _save_blocks(path: Path, blocks: torch.Tensor, metadata: dict[str, str]) -> None:
    from mergeflow.io.checkpoint import save_tensors

    dtype = torch.int32 if blocks.numel() == 0 or int(blocks.max()) < 2**31 else torch.int64
    save_tensors(path, {"input_ids": blocks.to(dtype)}, metadata=metadata)


def load_blocks(path: Path, limit: int | None = None) -> Blocks:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise MergeflowError(f"{path}: split not found (run the download stage)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            if "input_ids" not in fh.keys():
                raise MergeflowError(f"{path}: no tensor 'input_ids'")
            ids = fh.get_slice("input_ids")
            n = ids.get_shape()[0]
            ids = ids[: n if not limit else min(limit, n)]
    except SafetensorError as exc:
        raise MergeflowError(f"{path}: not a safetensors file ({exc})") from None
    return Blocks(ids.to(torch.int64))


def load_tokenizer(folder: Path):
    """The base's tokenizer (``AutoTokenizer``); one that does not load is a one-line MergeflowError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise MergeflowError(f"{folder}: cannot load the tokenizer ({' '.join(str(exc).split())[:160]})") from None


def prepare_blocks(ts: TaskSources, tokenizer, block: int, max_blocks: int | None, pool: int, folder: Path, log) -> dict:
    """A task's evaluation blocks (``max_blocks`` at most) and query blocks (``pool`` at most, from the
    train split, else the evaluation split's first) into ``folder``; their counts for sources.json."""
    from mergeflow.models.data import load_split

    if ts.dataset is None:
        raise MergeflowError(f"download.tasks.{ts.name}.dataset: required for family causal_lm (a text dataset)")
    o = ts.options
    col = o["text_column"]
    where = f"{ts.dataset.ref}" + (f" ({o['subset']})" if o["subset"] else "")
    test_ds = load_split(ts.dataset, o["split"], o["subset"], [col])
    test = tokenise_blocks(tokenizer, _text_batches(test_ds, col), block, max_blocks, f"{where} column {col!r}")
    if len(test) == 0:
        raise MergeflowError(f"{where}: split {o['split']!r} holds less than one block of {block} tokens")
    train, train_from = None, o["train_split"]
    if train_from and train_from != o["split"]:
        try:
            train_ds = load_split(ts.dataset, train_from, o["subset"], [col], evaluation=False)
        except MergeflowError as exc:
            if f"no split {train_from!r}" not in str(exc):
                raise
        else:
            train = tokenise_blocks(tokenizer, _text_batches(train_ds, col), block, pool, f"{where} column {col!r}")
            if len(train) == 0:
                train = None
    if train is None:
        log(
            f"download: {ts.name}: no usable train split {train_from!r} in {where}: Auto-Switch's query blocks "
            f"come from the evaluation split {o['split']!r}"
        )
        train, train_from = test[:pool], o["split"]
    meta = {"dataset": ts.dataset.ref, "block_size": str(block), "text_column": col}
    _save_blocks(folder / "test.safetensors", test, {**meta, "split": o["split"]})
    _save_blocks(folder / "train.safetensors", train, {**meta, "split": train_from})
    log(
        f"download: {ts.name}: {len(test)} evaluation blocks of {block} tokens ({o['split']}), "
        f"{len(train)} query blocks ({train_from})"
    )
    return {"test": len(test), "train": len(train), "train_split": train_from}
