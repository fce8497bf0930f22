"""Lazy, tensor-by-tensor checkpoint access in Hugging Face layout, and atomic checkpoint writes.

A checkpoint reference is a directory (``config.json`` + ``model.safetensors``, or sharded
``*.safetensors`` with ``model.safetensors.index.json``; failing those ``pytorch_model.bin`` or
its sharded ``pytorch_model.bin.index.json`` form), a single ``.safetensors`` file, or a single
``.bin``/``.pt``/``.pth`` file.

Safetensors files are never memory-mapped: the constructor reads and validates each header
(names, dtypes, shapes, byte ranges, file size), and ``get`` reads one tensor's byte range with
``pread`` into a fresh tensor. Resident memory therefore holds only the tensors the caller keeps,
never the pages of whole files. ``.bin``/``.pt`` files are loaded only through
``torch.load(weights_only=True)``, memory-mapped when they are in the zip format (their touched
pages are file-backed, so the kernel can drop them; one file is mapped at a time). The reader
is here; names and dtypes, header, containment, torch loading, checks, writes: checkpoint_*.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from mergeflow.errors import MergeflowError
from mergeflow.io.checkpoint_checks import check_compatible, check_finite
from mergeflow.io.checkpoint_format import (
    ADAPTER_WEIGHTS_NAME,
    BIN_INDEX_NAME,
    BIN_WEIGHTS_NAME,
    DTYPES,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    ST_DTYPES,
    TORCH_SUFFIXES,
    WEIGHTS_NAME,
    TensorInfo,
    _one_line,
)
from mergeflow.io.checkpoint_header import read_safetensors_header
from mergeflow.io.checkpoint_member import member_of
from mergeflow.io.checkpoint_torch import _torch_load
from mergeflow.io.checkpoint_write import canonical_header, save_tensors, write_checkpoint

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "BIN_INDEX_NAME",
    "BIN_WEIGHTS_NAME",
    "DTYPES",
    "INDEX_NAME",
    "MAX_HEADER_BYTES",
    "ST_DTYPES",
    "TORCH_SUFFIXES",
    "WEIGHTS_NAME",
    "Checkpoint",
    "TensorInfo",
    "canonical_header",
    "check_compatible",
    "check_finite",
    "member_of",
    "read_safetensors_header",
    "save_tensors",
    "write_checkpoint",
]


class Checkpoint:
    """Read-only lazy view of a checkpoint: ``names``, ``shape``, ``tensor_dtype``, ``dtype``, ``get``.

    Every file's header is read and validated up front, so a corrupt, truncated or inconsistent
    checkpoint fails here, before any work, with a one-line error naming the file (and tensor).
    Open file handles are released by ``close()`` (or ``with Checkpoint(ref) as ck:``).
    """

    def __init__(self, ref: str | os.PathLike):
        self.path = Path(ref)
        if not self.path.exists():
            raise MergeflowError(f"checkpoint not found: {self.path}")
        self.config_path: Path | None = None
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._torch_cache: tuple[Path, dict[str, torch.Tensor]] | None = None  # one mapped .bin at a time
        if self.path.is_file():
            self._infos = self._scan(self.path)
        else:
            if (self.path / "config.json").exists():
                self.config_path = self.member("config.json")
            for index_name, single_name in (
                (INDEX_NAME, WEIGHTS_NAME),
                (BIN_INDEX_NAME, BIN_WEIGHTS_NAME),
                (None, ADAPTER_WEIGHTS_NAME),
            ):
                if index_name and (self.path / index_name).exists():
                    self._infos = self._scan_sharded(self.member(index_name))
                    break
                if (self.path / single_name).exists():
                    self._infos = self._scan(self.member(single_name))
                    break
            else:
                raise MergeflowError(
                    f"{self.path}: no {WEIGHTS_NAME}, {INDEX_NAME}, {BIN_WEIGHTS_NAME}, {BIN_INDEX_NAME} or "
                    f"{ADAPTER_WEIGHTS_NAME} in checkpoint directory"
                )
        self._files: dict[str, Path] = {name: info.file for name, info in self._infos.items()}

    def member(self, rel: str, what: str = "") -> Path:
        """The file ``rel`` of this checkpoint folder, refused in one line if it lies outside it
        (see :func:`member_of`)."""
        return member_of(self.path, rel, what)

    # --- scanning -------------------------------------------------------------------------

    def _scan(self, file: Path) -> dict[str, TensorInfo]:
        if not file.is_file():
            raise MergeflowError(f"checkpoint file not found: {file}")
        if file.suffix in TORCH_SUFFIXES:
            tensors = _torch_load(file)
            self._torch_cache = (file, tensors)
            return {name: TensorInfo(file, t.dtype, tuple(t.shape)) for name, t in sorted(tensors.items())}
        return read_safetensors_header(file)

    def _scan_sharded(self, index: Path) -> dict[str, TensorInfo]:
        """All shards of an index; every listed tensor must be in its shard and nothing else there."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not a mapping of tensor names to files")
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise MergeflowError(f"{index}: not a valid checkpoint index ({_one_line(exc)})") from None
        infos: dict[str, TensorInfo] = {}
        for shard in sorted(set(weight_map.values())):
            listed = sorted(n for n, s in weight_map.items() if s == shard)[0]
            file = member_of(index.parent, shard, f"{index}: tensor {listed} is in shard {shard!r}, which")
            if not file.is_file():
                raise MergeflowError(f"{index}: tensor {listed} is in shard {shard}, which is missing")
            for name, info in self._scan(file).items():
                if weight_map.get(name) != shard:
                    raise MergeflowError(f"{file}: tensor {name} is not listed for this shard in {index.name}")
                infos[name] = info
        if missing := sorted(set(weight_map) - set(infos)):
            raise MergeflowError(f"{index}: tensor {missing[0]} listed for {weight_map[missing[0]]} but not in that file")
        return infos

    # --- metadata -------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MergeflowError(f"{self.path}: tensor {name} not in checkpoint") from None

    def file_of(self, name: str) -> Path:
        """The file (shard) holding ``name``."""
        return self.info(name).file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The stored dtype of one tensor (from the header: no data is read)."""
        return self.info(name).dtype

    def dtype(self) -> torch.dtype:
        """The dominant floating dtype of the checkpoint (what merged outputs are written in)."""
        counts: dict[torch.dtype, int] = {}
        for info in self._infos.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
        floats = {k: v for k, v in counts.items() if k in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
        return max(floats, key=floats.__getitem__) if floats else torch.float32

    # --- data -----------------------------------------------------------------------------

    def get(self, name: str, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """One tensor, freshly allocated on the CPU (the caller owns it; nothing else is kept).

        ``alloc(nbytes)`` may supply the memory instead: a uint8 CPU tensor of at least
        ``nbytes`` (the engine passes reused buffers: fresh memory costs a page fault per page)."""
        info = self.info(name)
        if info.start < 0:
            return self._get_torch(name, info)
        if sys.byteorder != "little":
            raise MergeflowError(f"{info.file}: tensor {name} cannot be read: safetensors needs a little-endian host")
        nbytes = info.end - info.start
        buf = torch.empty(nbytes, dtype=torch.uint8) if alloc is None else alloc(nbytes)[:nbytes]
        if len(buf):
            try:
                _pread_full(self._fd(info.file), buf.numpy().data, info.start)
            except (OSError, EOFError) as exc:
                raise MergeflowError(f"{info.file}: cannot read tensor {name} ({_one_line(exc) or 'file cut short'})") from None
        return buf.view(info.dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        """A read-only descriptor of ``file``, opened on first use and kept until ``close()``."""
        with self._lock:
            if file not in self._fds:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._fds[file] = fd
            return self._fds[file]

    def _get_torch(self, name: str, info: TensorInfo) -> torch.Tensor:
        with self._lock:
            if self._torch_cache is None or self._torch_cache[0] != info.file:
                self._torch_cache = None  # unmap the previous file first
                self._torch_cache = (info.file, _torch_load(info.file))
            tensors = self._torch_cache[1]
        t = tensors.get(name)
        if t is None or t.dtype != info.dtype or tuple(t.shape) != info.shape:
            raise MergeflowError(f"{info.file}: tensor {name} changed since the checkpoint was opened")
        return torch.empty(info.shape, dtype=info.dtype).copy_(t)

    def items(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names() if names is None else names:
            yield name, self.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close open files (a later ``get`` reopens them)."""
        with self._lock:
            fds, self._fds, self._torch_cache = self._fds, {}, None
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            try:
                self.close()
            except Exception:  # interpreter shutdown
                pass

    def __getstate__(self) -> dict:
        """Picklable (for process pools): open files and the lock stay behind."""
        return {**self.__dict__, "_fds": {}, "_lock": None, "_torch_cache": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._infos)} tensors)"


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional reads: thread-safe, no seek state)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends {len(buf) - done} bytes early (truncated since it was opened)")
        done += n
