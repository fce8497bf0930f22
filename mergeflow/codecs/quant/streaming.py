"""Quantised task-vector files one tensor at a time: ``QuantReader`` (read) and
``save_tvq_from`` / ``save_rtvq_from`` (write from task-vector checkpoints).

For a merge over a model too big to decode whole: the reader verifies every checksum on open
(the payload's in a stream), then decodes only the bytes of the tensor asked for; the writers
quantise checkpoint tensor by tensor. The format: ``mergeflow.codecs.quant.files``.
"""

from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

from mergeflow.codecs._container import fail as _fail, raw, read as _read
from mergeflow.codecs.quant.files import FORMAT_NAME, PER_TASK, RESIDUAL, QuantStats, open_quant_index, save_rtvq, save_tvq
from mergeflow.codecs.quant.arithmetic import QTensor, check_bits, dequantise, quantise, rtvq_quantise
from mergeflow.errors import MergeflowError

_CRC_CHUNK = 1 << 26  # payload bytes per step of the streamed checksum


class QuantReader:
    """A quantised file (either kind) read one tensor at a time, for a merge over a model too big
    to decode whole (``load_tvq`` / ``load_rtvq`` decode everything). Every checksum is verified
    on open, the payload's in a stream; then ``tensor`` reads and decodes only the bytes of its
    tensor. ``task(t)`` is task t's view with the read side of a checkpoint (``in``, ``get``, ``path``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._f = safe_open(str(path), framework="pt")
            self.index = open_quant_index(path, self._f)
            entries = self.index["tensors"]
            ranges = _read(path, self._f, self.index, "ranges", torch.float32)
            if tuple(ranges.shape) != (len(entries), 2):
                raise _fail(path, f"ranges has shape {list(ranges.shape)} for {len(entries)} tensors")
            self._payload = self._f.get_slice("payload")
            n = self._payload.get_shape()[0] if self._payload.get_shape() else 0
            if self._payload.get_dtype() != "U8" or n != self.index["offsets"][-1]:
                raise _fail(
                    path, f"payload has {n} {self._payload.get_dtype()} values, the index says {self.index['offsets'][-1]} bytes"
                )
            crc = 0
            for a in range(0, n, _CRC_CHUNK):
                crc = zlib.crc32(raw(self._payload[a : a + _CRC_CHUNK]), crc)
            if crc != self.index["crc32"].get("payload"):
                raise _fail(path, "tensor payload: checksum mismatch (corrupt file)")
        except MergeflowError:
            raise
        except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
            raise _fail(path, f"not a readable {FORMAT_NAME} file ({type(e).__name__}: {e})") from None
        self.kind = self.index["kind"]
        self.n_tasks = int(self.index.get("n_tasks", 1)) if self.kind == RESIDUAL else 1
        self._where = {(e["part"], e["name"]): (i, e, lo, hi) for i, (e, (lo, hi)) in enumerate(zip(entries, ranges.tolist()))}
        self.names = [e["name"] for e in entries if e["part"] in ("task", "base")]
        self._lock = threading.Lock()

    def _q(self, part: Any, name: str) -> QTensor:
        try:
            i, entry, lo, hi = self._where[(part, name)]
        except KeyError:
            raise _fail(self.path, f"no quantised tensor {name} ({part})") from None
        a, b = self.index["offsets"][i], self.index["offsets"][i + 1]
        with self._lock:  # one reader of the open file at a time
            packed = self._payload[a:b] if b > a else torch.zeros(0, dtype=torch.uint8)
        try:
            shape, bits = tuple(int(d) for d in entry["shape"]), entry["bits"]
            check_bits(bits)
            if not lo <= hi:
                raise ValueError(f"bad range {lo} .. {hi}")
            return QTensor(packed, shape, bits, lo, hi)
        except (KeyError, TypeError, ValueError, MergeflowError) as e:
            raise _fail(self.path, f"tensor {name}: cannot decode ({type(e).__name__}: {e})") from None

    def tensor(self, name: str, task: int = 0) -> torch.Tensor:
        """Task ``task``'s float32 task vector for ``name``: x^ (per_task), base^ + o_t^ (residual)."""
        if self.kind == PER_TASK:
            return dequantise(self._q("task", name))
        if not 0 <= task < self.n_tasks:
            raise _fail(self.path, f"task {task} is not one of its {self.n_tasks}")
        return dequantise(self._q("base", name)) + dequantise(self._q(task, name))

    def task(self, task: int = 0) -> "QuantView":
        return QuantView(self, task)


@dataclass(frozen=True)
class QuantView:
    """One task's dequantised task vector behind the read side of a checkpoint."""

    reader: QuantReader
    index: int

    @property
    def path(self) -> Path:
        return self.reader.path

    def __contains__(self, name: str) -> bool:
        return ("task" if self.reader.kind == PER_TASK else "base", name) in self.reader._where

    def names(self) -> list[str]:
        return list(self.reader.names)

    def get(self, name: str, alloc: Any = None) -> torch.Tensor:
        return self.reader.tensor(name, self.index)


def _floating(vectors: Sequence[Any]) -> list[str]:
    """The floating tensors every task-vector checkpoint in ``vectors`` has, in the first's order."""
    first = vectors[0]
    names = [n for n in first.names() if first.tensor_dtype(n).is_floating_point]
    for ckpt in vectors[1:]:
        missing = [n for n in names if n not in ckpt.names()]
        if missing:
            raise MergeflowError(f"{ckpt.path}: tensor {missing[0]} is in {first.path} but not here")
    return names


def save_tvq_from(
    vectors: Sequence[Any], bits: int, out_dir: str | os.PathLike, stems: Sequence[str], metadata: Mapping[str, str] | None = None
) -> list[QuantStats]:
    """Quantise each task-vector checkpoint (``mergeflow.io.Checkpoint``) tensor by tensor and
    write ``out_dir/<stem>.tvq``; holds one task's codes at a time. Returns each file's stats."""
    check_bits(bits)
    names = _floating(vectors)
    out = []
    for ckpt, stem in zip(vectors, stems, strict=True):
        codes = {name: quantise(ckpt.get(name).float(), bits) for name in names}
        out.append(save_tvq(Path(out_dir) / f"{stem}.tvq", codes, {**dict(metadata or {}), "task": stem}))
    return out


def save_rtvq_from(
    vectors: Sequence[Any], base_bits: int, offset_bits: int, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> QuantStats:
    """RTVQ of the task-vector checkpoints, one tensor at a time (the tasks of a tensor together),
    written to ``path``; holds the codes only (base_bits + n_tasks * offset_bits per entry)."""
    names = _floating(vectors)
    base: dict[str, QTensor] = {}
    offsets: list[dict[str, QTensor]] = [{} for _ in vectors]
    for name in names:
        r = rtvq_quantise([ckpt.get(name).float() for ckpt in vectors], base_bits, offset_bits)
        base[name] = r.base
        for off, q in zip(offsets, r.offsets):
            off[name] = q
    return save_rtvq(path, base, offsets, metadata)
