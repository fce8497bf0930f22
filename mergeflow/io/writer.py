"""Streaming checkpoint writer: tensors go to disk as they are produced, never held together.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's dtype,
shape and byte range, then the data. All of that is known before the first tensor exists
(the output has the base's names and shapes), so the writer lays out every file first and
then writes each tensor at its offset the moment the engine hands it over: peak memory is
one tensor, whatever the model's size. The output mirrors the base: one ``model.safetensors``
or the base's shard files with a ``model.safetensors.index.json``, ``config.json`` copied.
Everything is written inside a temporary directory renamed into place on success
(``atomic_dir``): a failure leaves the old output or none.
"""

from __future__ import annotations

import math
import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir
from mergeflow.io.checkpoint import ADAPTER_WEIGHTS_NAME, INDEX_NAME, ST_DTYPES, WEIGHTS_NAME, member_of
from mergeflow.io.checkpoint_like import ShardedLayout

CODES = {dt: code for code, dt in ST_DTYPES.items()}  # torch dtype -> safetensors code
COPIED_FILES = ("config.json", "generation_config.json", "adapter_config.json")  # small files a loader needs beside the weights


def shard_layout(ckpt: ShardedLayout) -> dict[str, list[str]]:
    """Output file name -> tensor names, mirroring the checkpoint's shards (one file if unsharded:
    ``model.safetensors``, or ``adapter_model.safetensors`` for a PEFT adapter, so PEFT loads it)."""
    files: dict[str, list[str]] = {}
    sharded = ckpt.path.is_dir() and (ckpt.path / INDEX_NAME).exists()
    for name in ckpt.names():
        single = ADAPTER_WEIGHTS_NAME if ckpt.file_of(name).name == ADAPTER_WEIGHTS_NAME else WEIGHTS_NAME
        files.setdefault(ckpt.file_of(name).name if sharded else single, []).append(name)
    return files


class _File:
    """One safetensors file being filled: header written up front, tensors at their offsets."""

    def __init__(self, path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]):
        self.path, self.entries, self.offsets = path, entries, {}
        header: dict = {"__metadata__": dict(metadata)}
        pos = 0
        for name, (dtype, shape) in entries.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + size]}
            self.offsets[name] = pos
            pos += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self.data_start = 8 + len(raw)
        self.size = self.data_start + pos
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, self.size)
        self.pending = set(entries)
        self.filled: dict[str, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.entries[name]
        if tuple(tensor.shape) != shape:
            raise MergeflowError(f"{self.path.name}: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        self.write_block(name, 0, tensor.reshape(-1))

    def write_block(self, name: str, start: int, flat: torch.Tensor) -> None:
        """Elements ``start .. start + numel`` of the flattened tensor ``name``."""
        dtype, shape = self.entries[name]
        n = math.prod(shape)
        if flat.dim() != 1 or start < 0 or start + flat.numel() > n:
            raise MergeflowError(
                f"{self.path.name}: tensor {name}: block [{start}, {start + flat.numel()}) is outside its {n} elements"
            )
        data = flat.detach().to(device="cpu", dtype=dtype).contiguous()
        if data.numel():
            _pwrite_all(
                self.fd, data.view(torch.uint8).numpy().data, self.data_start + self.offsets[name] + start * data.element_size()
            )
        self.filled[name] = done = self.filled.get(name, 0) + data.numel()
        if done >= n:
            self.pending.discard(name)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class CheckpointWriter:
    """Write a checkpoint laid out like ``like``, one tensor at a time, atomically.

    Floating tensors are cast to ``dtype`` (default: each tensor keeps the base's dtype);
    other tensors keep theirs. Use as a context manager; every tensor of the base must be
    written before it closes::

        with CheckpointWriter(out_dir, like=base) as w:
            for name in base.names():
                w.write(name, merged(name))
    """

    def __init__(
        self,
        out_dir: str | Path,
        like: ShardedLayout,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
        copy_files: Iterable[str] = COPIED_FILES,
        on_finish: Callable[[Path], None] | None = None,
    ):
        self.out_dir, self.like, self.dtype = Path(out_dir), like, dtype
        self.on_finish = on_finish  # called with the temporary folder once it is complete: more files
        self.metadata = {"format": "pt", **dict(metadata or {})}
        self.copy_files = tuple(copy_files)
        self._stack: ExitStack | None = None
        self._files: dict[str, _File] = {}
        self._file_of: dict[str, _File] = {}

    def _out_dtype(self, name: str) -> torch.dtype:
        dt = self.like.tensor_dtype(name)
        return self.dtype if self.dtype is not None and dt.is_floating_point else dt

    def __enter__(self) -> "CheckpointWriter":
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_dir(self.out_dir))
        self.tmp = tmp
        try:
            for fname, names in shard_layout(self.like).items():
                entries = {n: (self._out_dtype(n), tuple(self.like.shape(n))) for n in names}
                f = _File(tmp / fname, entries, self.metadata)
                self._files[fname] = f
                self._file_of.update({n: f for n in names})
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            f = self._file_of[name]
        except KeyError:
            raise MergeflowError(f"{self.out_dir}: tensor {name} is not in the base {self.like.path}") from None
        f.write(name, tensor)

    def write_block(self, name: str, start: int, flat: torch.Tensor) -> None:
        """Part of a tensor: elements ``start ..`` of its flattened form (blocks may come in any order)."""
        try:
            f = self._file_of[name]
        except KeyError:
            raise MergeflowError(f"{self.out_dir}: tensor {name} is not in the base {self.like.path}") from None
        f.write_block(name, start, flat)

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._abort()
            raise
        else:
            if exc_type is not None:
                self._abort(exc_type, exc, tb)
                return False
            for f in self._files.values():
                f.close()
            assert self._stack is not None  # set by __enter__
            self._stack.close()  # renames the temporary directory into place
        return False

    def _finish(self) -> None:
        for f in self._files.values():
            if f.pending:
                raise MergeflowError(f"{self.out_dir}: tensor {sorted(f.pending)[0]} was never written")
        if len(self._files) > 1:
            index = {
                "metadata": {"total_size": sum(f.size - f.data_start for f in self._files.values())},
                "weight_map": {n: f.path.name for n, f in self._file_of.items()},
            }
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.like.path.is_dir():
            for fname in self.copy_files:
                if (self.like.path / fname).exists():
                    shutil.copyfile(member_of(self.like.path, fname), self.tmp / fname)
        if self.on_finish is not None:
            self.on_finish(self.tmp)

    def _abort(self, *exc_info) -> None:
        for f in self._files.values():
            try:
                os.close(f.fd)
            except OSError:
                pass
        self._files.clear()
        assert self._stack is not None  # set by __enter__
        self._stack.__exit__(*(exc_info or (MergeflowError, MergeflowError("aborted"), None)))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
