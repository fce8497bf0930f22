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
pages are file-backed, so the kernel can drop them; one file is mapped at a time).
"""
from __future__ import annotations

import math
import json
import os
import pickle
import re
import shutil
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file

from mergeflow.errors import MergeflowError
from mergeflow.io.atomic import atomic_dir, atomic_file

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # a PEFT adapter folder (LoRA factors)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# safetensors dtype codes -> torch dtypes (those this torch has; sub-byte formats are left out).
ST_DTYPES: dict[str, torch.dtype] = {
    code: dt
    for code, dt in {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": getattr(torch, "uint64", None), "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None), "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None), "C64": torch.complex64,
    }.items()
    if dt is not None
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and (safetensors only) absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = -1  # -1: a torch (.bin/.pt) file, read through torch.load
    end: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Checkpoint:
    """Read-only lazy view of a checkpoint: ``names``, ``shape``, ``tensor_dtype``, ``dtype``, ``get``.

    Every file's header is read and validated up front, so a corrupt, truncated or inconsistent
    checkpoint fails here, before any work, with a one-line error naming the file (and tensor).
    Open file handles are released by ``close()`` (or ``with Checkpoint(ref) as ck:``).
    """

    def __init__(self, ref: str | Path):
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
            for index_name, single_name in ((INDEX_NAME, WEIGHTS_NAME), (BIN_INDEX_NAME, BIN_WEIGHTS_NAME),
                                            (None, ADAPTER_WEIGHTS_NAME)):
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
        return max(floats, key=floats.get) if floats else torch.float32

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
                _pread_full(self._fd(info.file), memoryview(buf.numpy()), info.start)
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


_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the files of ``folder`` may really live: the folder itself, and for a folder inside a
    Hugging Face cache snapshot (``<cache>/models--org--name/snapshots/<commit>/...``) the
    repository's ``blobs/``, which the snapshot's files link to."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    for a in (real, *real.parents):
        if _SNAPSHOT.fullmatch(a.name) and a.parent.name == "snapshots" and a.parent.parent.name.startswith(
                ("models--", "datasets--")):
            roots.append(a.parent.parent / "blobs")
            break
    return roots


def member_of(folder: str | Path, rel: str, what: str = "") -> Path:
    """``folder / rel`` for a file named inside a checkpoint (an index's shard, a config, an
    adapter), refused in one line when the name or the file it leads to (through any symbolic
    link) lies outside the folder, or outside its Hugging Face cache snapshot. Reads never leave
    the checkpoint they belong to."""
    folder = Path(folder)
    who = what or f"{folder}: {rel!r}"
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel or "\x00" in rel:
        raise MergeflowError(f"{who} names a file outside the checkpoint folder {folder}; refused")
    path = folder / rel
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in _allowed_roots(folder)):
        raise MergeflowError(f"{who} leads outside the checkpoint folder {folder} (to {real}); refused")
    return path


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header, reading no tensor data.

    Checks what safetensors' ``safe_open`` checks (known dtypes, byte ranges matching shapes,
    ranges tiling the data without gaps or overlaps, the file size covering them exactly) and
    reports a failure as one line naming the file and, when known, the tensor.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MergeflowError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise MergeflowError(f"{file}: not a safetensors file (header length {n} does not fit in the file's {size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise MergeflowError(f"{file}: cannot read ({_one_line(exc)})") from None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise MergeflowError(f"{file}: invalid safetensors header JSON ({_one_line(exc)})") from None
    if not isinstance(header, dict):
        raise MergeflowError(f"{file}: invalid safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in sorted(header.items()):
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not all(_is_count(x) for x in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise MergeflowError(f"{file}: tensor {name} has an invalid header entry {_one_line(json.dumps(entry))[:120]}") from None
        if code not in ST_DTYPES:
            raise MergeflowError(f"{file}: tensor {name} has dtype {code}, which this torch cannot read")
        info = TensorInfo(file, ST_DTYPES[code], tuple(shape), base + begin, base + end)
        if end - begin != info.nbytes:
            raise MergeflowError(
                f"{file}: tensor {name} has data_offsets [{begin}, {end}] for shape {list(shape)} {code} ({info.nbytes} bytes)"
            )
        infos[name] = info
    expect = base
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != expect:
            raise MergeflowError(f"{file}: tensor {name} data overlaps another tensor or leaves a gap (corrupt header)")
        if info.end > size:
            raise MergeflowError(f"{file}: tensor {name} is cut short: its data ends at byte {info.end}, the file has {size} (truncated file)")
        expect = info.end
    if expect != size:
        raise MergeflowError(f"{file}: {size - expect} stray bytes after the last tensor (corrupt file)")
    return infos


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A ``.bin``/``.pt`` state dict through ``torch.load(weights_only=True)`` (mapped when zip format)."""
    try:
        with open(file, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the refusal says it
            warnings.simplefilter("ignore")
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|Please use|$)", str(exc), re.S)
        if reason:
            why = _one_line(reason.group(1)).rstrip(".") or "unsupported pickle content"
            raise MergeflowError(
                f"{file}: refused by torch.load(weights_only=True): it holds more than tensors, or is not a "
                f"torch.save file ({why})") from None
        raise MergeflowError(f"{file}: corrupt or truncated torch file ({_one_line(exc)})") from None
    except Exception as exc:  # torch.load raises many kinds on damaged files
        first = re.split(r"(?<=\.)\s", _one_line(exc), maxsplit=1)[0]
        raise MergeflowError(f"{file}: corrupt or truncated torch file ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise MergeflowError(f"{file}: not a state dict of tensors (top level is a {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else f"{value.layout} tensor"
            hint = " (nested state dicts are not supported)" if isinstance(value, dict) else ""
            raise MergeflowError(f"{file}: tensor {key} is a {kind}, not a dense tensor{hint}")
    return {str(k): v for k, v in obj.items()}


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (positional reads: thread-safe, no seek state)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends {len(buf) - done} bytes early (truncated since it was opened)")
        done += n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())[:300]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_compatible(base: Checkpoint, other: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Same tensor names, shapes and floating dtypes as the base, or a one-line error naming the first difference."""
    want = set(base.names() if names is None else names)
    have = set(other.names())
    if missing := sorted(want - have):
        raise MergeflowError(f"{other.path}: tensor {missing[0]} of the base is missing")
    if names is None and (extra := sorted(have - want)):
        raise MergeflowError(f"{other.path}: tensor {extra[0]} is not in the base {base.path}")
    for name in sorted(want):
        if base.shape(name) != other.shape(name):
            raise MergeflowError(
                f"{other.path}: tensor {name} has shape {list(other.shape(name))}, base has {list(base.shape(name))}"
            )
        bdt, odt = base.tensor_dtype(name), other.tensor_dtype(name)
        if bdt != odt and (bdt.is_floating_point or odt.is_floating_point):
            raise MergeflowError(
                f"{other.path}: tensor {name} has dtype {_dtype_name(odt)}, base {base.path} has {_dtype_name(bdt)}"
            )


def check_finite(name: str, tensor: torch.Tensor, source: Path | str) -> None:
    """A one-line error if a floating tensor holds NaN or Inf.

    One min/max reduction (NaN propagates through both, an Inf becomes one of them): no
    temporary the size of the tensor, unlike ``isfinite(t).all()``."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor.detach().reshape(-1))
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        kind = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise MergeflowError(f"{source}: tensor {name} contains {kind}")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically, with a canonical header (same inputs, same bytes)."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        canonical_header(tmp)


def canonical_header(file: str | Path) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted.

    safetensors' writer puts ``__metadata__`` keys in hash-map order, which changes from one
    process to the next, so identical content would give different bytes (and DVC hashes). The
    header keeps its length (the same JSON, reordered; spaces pad as the format allows)."""
    with open(file, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # cannot happen for a header safetensors wrote: keep the file as it is
            return
        fh.seek(8)
        fh.write(raw + b" " * (n - len(raw)))


def write_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    like: Checkpoint | None = None,
    dtype: torch.dtype | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint in Hugging Face layout (config.json copied from ``like``), atomically.

    Floating tensors are cast to ``dtype`` (default: the dtype of ``like``); others keep theirs.
    """
    out_dir = Path(out_dir)
    dtype = dtype or (like.dtype() if like is not None else None)
    with atomic_dir(out_dir) as tmp:
        cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(cast, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if like is not None and like.config_path is not None:
            shutil.copyfile(like.config_path, tmp / "config.json")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir
