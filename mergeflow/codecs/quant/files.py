"""The quantised task-vector file (``mergeflow.tvq``): writing and reading it whole.

A checked container (``mergeflow.codecs._container``) holding ``payload`` (every tensor's
packed codes), ``ranges`` (lo and hi per tensor) and a compressed JSON index whose ``kind``
says what the file holds: ``per_task`` (one task's quantised task vector) or ``residual``
(a shared base and every task's offsets against it). Version 1 files, whose kinds were named
after the merging methods, are still read: their kind is taken from their layout. Bad input
raises MergeflowError before any write; a bad file, one naming it. Spec: docs/quant-format.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from mergeflow import __version__
from mergeflow.codecs._container import fail as _fail, open_index, read as _read, write
from mergeflow.codecs.quant.arithmetic import RANGE_BYTES, QTensor, check_bits, dequantise, unpack
from mergeflow.errors import MergeflowError

FORMAT_NAME = "mergeflow.tvq"
FORMAT_VERSION = 2  # 2: the kinds below (version 1 named them after the merging methods)
PER_TASK = "per_task"  # one task's quantised task vector: every part is "task"
RESIDUAL = "residual"  # the shared base (part "base") and each task's offsets (parts 0 .. n_tasks - 1)
KINDS = (PER_TASK, RESIDUAL)


@dataclass
class QuantStats:
    """Storage figures of a quantised file. ``payload_bytes`` = sum over tensors of code bytes
    + 8 (the ``tvq_bytes`` of each); ``n_params`` counts each stored tensor's elements (a
    residual file: the base's and every offset's); ``bits_per_param`` = 8 * payload / n_params."""

    n_params: int
    payload_bytes: int
    file_bytes: int
    bits_per_param: float


@dataclass
class TVQFile:
    """A ``kind: per_task`` file: one task's quantised tensors and string metadata."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def dequantise(self) -> dict[str, torch.Tensor]:
        return {name: dequantise(q) for name, q in self.tensors.items()}


@dataclass
class RTVQFile:
    """A ``kind: residual`` file: the shared base and one offset set per task (in task order)."""

    base: dict[str, QTensor] = field(default_factory=dict)
    offsets: list[dict[str, QTensor]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def dequantise(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s rebuilt task vector, base^ + o_t^ per tensor."""
        return {name: dequantise(b) + dequantise(self.offsets[task][name]) for name, b in self.base.items()}


# --- writing -----------------------------------------------------------------------------------


def _check_entries(entries: list[tuple[Any, str, QTensor]], metadata: Mapping[str, str]) -> None:
    for part, name, q in entries:
        if not isinstance(name, str):
            raise MergeflowError(f"quantised tensor name {name!r} is not a string")
        if not isinstance(q, QTensor):
            raise MergeflowError(f"quantised tensor {name}: expected a QTensor, got {type(q).__name__}")
        check_bits(q.bits, f"quantised tensor {name}: bits")
        if not (math.isfinite(q.min) and math.isfinite(q.max)) or q.min > q.max:
            raise MergeflowError(f"quantised tensor {name}: bad range {q.min} .. {q.max}")
        if float(np.float32(q.min)) != q.min or float(np.float32(q.max)) != q.max:
            raise MergeflowError(f"quantised tensor {name}: range {q.min} .. {q.max} is not float32 values")
        if q.packed.dtype != torch.uint8 or q.packed.numel() != (q.numel * q.bits + 7) // 8:
            raise MergeflowError(
                f"quantised tensor {name}: {q.packed.numel()} packed {q.packed.dtype} values, "
                f"expected {(q.numel * q.bits + 7) // 8} uint8"
            )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MergeflowError(f"quantised file metadata {key!r}: keys and values must be strings")


def _save(
    path: str | os.PathLike, kind: str, entries: list[tuple[Any, str, QTensor]], extra: dict, metadata: Mapping[str, str] | None
) -> QuantStats:
    metadata = dict(metadata or {})
    _check_entries(entries, metadata)
    packed = [q.packed.detach().reshape(-1).cpu() for _, _, q in entries]
    stored = {
        "payload": torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8),
        "ranges": torch.tensor([[q.min, q.max] for _, _, q in entries], dtype=torch.float32).reshape(-1, 2),
    }
    index = {
        "kind": kind,
        **extra,
        "tensors": [
            {"part": part, "name": name, "shape": list(q.shape), "bits": q.bits, "bytes": q.packed.numel()}
            for part, name, q in entries
        ],
        "metadata": metadata,
        "writer": f"mergeflow {__version__}",
    }
    write(path, stored, index, FORMAT_NAME, FORMAT_VERSION)
    return _stats(index["tensors"], os.path.getsize(path))


def save_tvq(path: str | os.PathLike, tensors: Mapping[str, QTensor], metadata: Mapping[str, str] | None = None) -> QuantStats:
    """Write one task's quantised tensors (a ``per_task`` file) to ``path`` atomically (temporary
    file, fsync, rename); returns the file's stats. Bad input raises MergeflowError before any write."""
    return _save(path, PER_TASK, [("task", name, q) for name, q in tensors.items()], {}, metadata)


def save_rtvq(
    path: str | os.PathLike,
    base: Mapping[str, QTensor],
    offsets: Sequence[Mapping[str, QTensor]],
    metadata: Mapping[str, str] | None = None,
) -> QuantStats:
    """Write a residual set (the base and every task's offsets, one ``residual`` file) to ``path``
    atomically. Every task must have an offset for exactly the base's tensors, of the same shapes."""
    for t, off in enumerate(offsets):
        if set(off) != set(base):
            missing = sorted(set(base) ^ set(off))[0]
            raise MergeflowError(f"rtvq offsets of task {t}: tensor {missing} is not in both the base and the offsets")
        for name, q in off.items():
            if tuple(q.shape) != tuple(base[name].shape):
                raise MergeflowError(
                    f"rtvq offsets of task {t}: tensor {name} has shape {list(q.shape)}, the base {list(base[name].shape)}"
                )
    entries: list[tuple[Any, str, QTensor]] = [("base", name, q) for name, q in base.items()]  # part: "base" or a task
    entries += [(t, name, off[name]) for t, off in enumerate(offsets) for name in base]
    return _save(path, RESIDUAL, entries, {"n_tasks": len(offsets)}, metadata)


# --- reading -----------------------------------------------------------------------------------


def open_quant_index(path: str | os.PathLike, f: Any) -> dict:
    """The validated index of an open file (``f`` from ``safe_open``), its ``kind`` one of
    ``KINDS`` whatever the file's version."""
    index = open_index(path, f, FORMAT_NAME, FORMAT_VERSION, FORMAT_NAME, ("kind", "tensors", "metadata", "crc32"))
    if int(f.metadata()["format_version"]) == 1:  # its kind names a merging method: the layout says which
        index["kind"] = RESIDUAL if "n_tasks" in index else PER_TASK
    elif index["kind"] not in KINDS:
        raise _fail(path, f"corrupt {FORMAT_NAME} index (ValueError: unknown kind {index['kind']!r})")
    return index


def _load(path: str | os.PathLike) -> tuple[dict, list[tuple[Any, str, QTensor]]]:
    try:
        with safe_open(path, framework="pt") as f:
            index = open_quant_index(path, f)
            entries = index["tensors"]
            ranges = _read(path, f, index, "ranges", torch.float32)
            if tuple(ranges.shape) != (len(entries), 2):
                raise _fail(path, f"ranges has shape {list(ranges.shape)} for {len(entries)} tensors")
            payload = _read(path, f, index, "payload", torch.uint8)
            if payload.numel() != index["offsets"][-1]:
                raise _fail(path, f"payload has {payload.numel()} bytes, the index says {index['offsets'][-1]}")
            out = []
            for i, (entry, (lo, hi)) in enumerate(zip(entries, ranges.tolist())):
                name = entry.get("name")
                try:
                    shape, bits = tuple(int(d) for d in entry["shape"]), entry["bits"]
                    check_bits(bits)
                    if not lo <= hi:
                        raise ValueError(f"bad range {lo} .. {hi}")
                    q = QTensor(payload[index["offsets"][i] : index["offsets"][i + 1]].clone(), shape, bits, lo, hi)
                    unpack(q.packed, bits, q.numel)  # sizes and padding
                except (KeyError, TypeError, ValueError, MergeflowError) as e:
                    raise _fail(path, f"tensor {name}: cannot decode ({type(e).__name__}: {e})") from None
                out.append((entry["part"], name, q))
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
        raise _fail(path, f"not a readable {FORMAT_NAME} file ({type(e).__name__}: {e})") from None
    return index, out


def load_tvq(path: str | os.PathLike) -> TVQFile:
    """Read a ``per_task`` file (tensors on the CPU); a bad, corrupt or too-new file raises
    MergeflowError naming the file."""
    index, entries = _load(path)
    if index["kind"] != PER_TASK:
        raise _fail(path, "a residual set (an rtvq file, not tvq): read it with load_rtvq")
    return TVQFile({name: q for _, name, q in entries}, dict(index["metadata"]))


def load_rtvq(path: str | os.PathLike) -> RTVQFile:
    """Read a ``residual`` file (tensors on the CPU)."""
    index, entries = _load(path)
    if index["kind"] != RESIDUAL:
        raise _fail(path, "one task's vector (a tvq file, not rtvq): read it with load_tvq")
    n_tasks = int(index.get("n_tasks", 0))
    base: dict[str, QTensor] = {}
    offsets: list[dict[str, QTensor]] = [{} for _ in range(n_tasks)]
    for part, name, q in entries:
        if part == "base":
            base[name] = q
        elif isinstance(part, int) and 0 <= part < n_tasks:
            offsets[part][name] = q
        else:
            raise _fail(path, f"tensor {name}: part {part!r} is neither base nor a task below {n_tasks}")
    for t, off in enumerate(offsets):
        if set(off) != set(base):
            raise _fail(path, f"task {t}'s offsets do not cover the base's tensors")
    return RTVQFile(base, offsets, dict(index["metadata"]))


def _stats(entries: list[dict], file_bytes: int) -> QuantStats:
    n = sum(math.prod(e["shape"]) for e in entries)
    payload = sum(int(e["bytes"]) + RANGE_BYTES for e in entries)
    return QuantStats(n_params=n, payload_bytes=payload, file_bytes=file_bytes, bits_per_param=8 * payload / n if n else 0.0)


def quant_stats(path: str | os.PathLike) -> QuantStats:
    """The storage figures of a quantised file of either kind, read from its index (nothing is decoded)."""
    try:
        with safe_open(path, framework="pt") as f:
            return _stats(open_quant_index(path, f)["tensors"], Path(path).stat().st_size)
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable {FORMAT_NAME} file ({type(e).__name__}: {e})") from None
