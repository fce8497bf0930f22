"""Task vector quantisation (Kim et al., ICCV 2025): TVQ and RTVQ, and their file format.

TVQ quantises each tensor ("layer") of a task vector on its own, asymmetric min-max to
``b`` bits (2..8): with ``lo = min(x)``, ``hi = max(x)``, ``L = 2^b - 1`` and
``step = (hi - lo) / L``,

    code   q = round((x - lo) / step)              clamped to 0..L, round half to even
    value  x^ = lo + (q * (hi - lo)) / L           computed in float64, stored as float32

so code 0 is ``lo`` and code L is ``hi`` exactly, and |x - x^| <= step / 2 (plus float32
rounding of x^). A constant tensor has step 0: every code is 0 and x^ = lo, exact.

RTVQ (the paper's residual form) quantises the tasks of one tensor together: the base is
the mean of the task vectors (theta_avg - theta_0, theta_avg the average fine-tuned
weights), quantised at ``base_bits``; each task's offset is taken against the *dequantised*
base, ``o_t = tau_t - base^`` (the paper's error correction: the offsets absorb the base's
quantisation error), and quantised at ``offset_bits``. Task t is rebuilt as
``base^ + o_t^`` (a float32 sum), so |tau_t - rebuilt| <= step(o_t) / 2 (plus rounding).

Codes are bit-packed into uint8, ``b`` bits each, little-endian: code i's bit j (j = 0 the
least significant) is bit ``i * b + j`` of the stream, and stream bit k is
``(byte[k // 8] >> (k % 8)) & 1``; unused bits of the last byte are 0. Packing runs with
torch on the tensor's own device (CPU or CUDA) in chunks; the file writer moves the packed
bytes to the CPU. ``qdq`` is the merge's fast path: the same codes and values without
packing, equal bit for bit to ``dequantise(quantise(x))``.

docs/quant-format.md specifies the file (``mergeflow.tvq``); in short: safetensors with
header metadata ``format``, ``format_version`` and ``index_crc32``; tensors ``payload``
(uint8: every tensor's packed codes, concatenated in index order), ``ranges`` (float32
[k, 2]: lo and hi of each tensor in index order) and ``index`` (uint8: zlib-compressed JSON
naming each tensor's part, shape, bits and byte count). Stored per tensor:
``ceil(numel * b / 8)`` code bytes plus 8 bytes for lo and hi (``tvq_bytes``).
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
from mergeflow.errors import MergeflowError

FORMAT_NAME = "mergeflow.tvq"
FORMAT_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
RANGE_BYTES = 8  # lo and hi of each tensor, float32
_CHUNK = 1 << 22  # elements per packing/arithmetic step (a multiple of 8): bounds temporaries


# --- quantisation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QTensor:
    """One quantised tensor: ``packed`` codes (uint8, ``ceil(numel * bits / 8)`` bytes) of a
    tensor of ``shape``, and its range ``min`` .. ``max`` (float32 values)."""

    packed: torch.Tensor
    shape: tuple[int, ...]
    bits: int
    min: float
    max: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def step(self) -> float:
        """(max - min) / (2^bits - 1): the quantisation step (0 for a constant tensor)."""
        return (self.max - self.min) / ((1 << self.bits) - 1)

    @property
    def nbytes(self) -> int:
        """What the tensor costs stored: its code bytes plus 8 for min and max."""
        return self.packed.numel() + RANGE_BYTES


def check_bits(bits: Any, where: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise MergeflowError(f"{where}: {bits!r} is not an integer from {MIN_BITS} to {MAX_BITS}")
    return bits


def _range(flat: torch.Tensor) -> tuple[float, float]:
    """(lo, hi) of a flat float tensor as float32 values (Python floats); 0, 0 when empty."""
    if flat.numel() == 0:
        return 0.0, 0.0
    lo, hi = torch.aminmax(flat.float())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MergeflowError(f"cannot quantise a tensor with non-finite values (range {lo} .. {hi})")
    return lo, hi


def _codes(flat: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """uint8 codes of a flat tensor, on its device."""
    levels = (1 << bits) - 1
    out = torch.zeros(flat.numel(), dtype=torch.uint8, device=flat.device)
    if hi == lo:
        return out
    scale = levels / (hi - lo)
    for s in range(0, flat.numel(), _CHUNK):
        t = torch.sub(flat[s:s + _CHUNK].double(), lo).mul_(scale).round_().clamp_(0, levels)  # never in place on the input
        out[s:s + _CHUNK] = t.to(torch.uint8)
    return out


def _values(codes: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """float32 values of flat uint8 codes: lo + (q * (hi - lo)) / L in float64."""
    levels = (1 << bits) - 1
    span = hi - lo  # exact in float64 for float32 ends of similar exponent
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    for s in range(0, codes.numel(), _CHUNK):
        out[s:s + _CHUNK] = codes[s:s + _CHUNK].double().mul_(span).div_(levels).add_(lo)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat codes (each < 2^bits) packed ``bits`` bits each, little-endian, into uint8."""
    check_bits(bits)
    codes = codes.reshape(-1)
    n = codes.numel()
    if n and (int(codes.min()) < 0 or int(codes.max()) >> bits):
        raise ValueError(f"codes must lie in 0 .. {(1 << bits) - 1} to be packed at {bits} bits")
    codes = codes.to(torch.uint8)
    out = torch.zeros((n * bits + 7) // 8, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    for s in range(0, n, _CHUNK):  # chunks of a multiple of 8 codes start on a byte boundary
        c = codes[s:s + _CHUNK]
        stream = ((c.unsqueeze(1) >> shifts[:bits]) & 1).reshape(-1)
        stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
        byte_bits = stream.reshape(-1, 8) << shifts
        start = s * bits // 8
        out[start:start + byte_bits.shape[0]] = byte_bits.sum(1, dtype=torch.int32).to(torch.uint8)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The ``n`` codes of ``pack``'s output (a ValueError if its size or padding is wrong)."""
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
        raise ValueError(f"packed codes are {packed.numel()} {packed.dtype} values, expected {(n * bits + 7) // 8} uint8")
    if (n * bits) % 8 and int(packed[-1]) >> ((n * bits) % 8):
        raise ValueError("padding bits of the packed codes are not zero")
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    for s in range(0, n, _CHUNK):
        m = min(_CHUNK, n - s)
        start = s * bits // 8
        chunk = packed[start:start + (m * bits + 7) // 8]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)[:m * bits].reshape(m, bits)
        out[s:s + m] = (stream << shifts[:bits]).sum(1, dtype=torch.int32).to(torch.uint8)
    return out


def quantise(t: torch.Tensor, bits: int) -> QTensor:
    """``t`` quantised per tensor to ``bits`` bits, packed on its device."""
    check_bits(bits)
    flat = t.detach().reshape(-1)
    lo, hi = _range(flat)
    return QTensor(pack(_codes(flat, bits, lo, hi), bits), tuple(t.shape), bits, lo, hi)


def dequantise(q: QTensor) -> torch.Tensor:
    """The float32 tensor of ``q``, on the device of ``q.packed``."""
    check_bits(q.bits)
    return _values(unpack(q.packed, q.bits, q.numel), q.bits, q.min, q.max).reshape(q.shape)


def qdq(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantise(quantise(t, bits))`` without packing: float32, ``t``'s shape and device."""
    check_bits(bits)
    flat = t.detach().reshape(-1)
    lo, hi = _range(flat)
    return _values(_codes(flat, bits, lo, hi), bits, lo, hi).reshape(t.shape)


def _mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    if not taus:
        raise MergeflowError("RTVQ needs at least one task vector")
    total = taus[0].float().clone()
    for tau in taus[1:]:
        total += tau
    return total.div_(len(taus))


@dataclass(frozen=True)
class RTVQ:
    """One tensor's residual quantisation: the shared ``base`` and one offset per task."""

    base: QTensor
    offsets: list[QTensor]


def rtvq_quantise(taus: Sequence[torch.Tensor], base_bits: int = 3, offset_bits: int = 2) -> RTVQ:
    """Base = mean of ``taus`` at ``base_bits``; offsets tau_t - base^ at ``offset_bits``."""
    check_bits(base_bits, "base_bits")
    check_bits(offset_bits, "offset_bits")
    base = quantise(_mean(taus), base_bits)
    base_hat = dequantise(base)
    return RTVQ(base, [quantise(tau.float() - base_hat, offset_bits) for tau in taus])


def rtvq_dequantise(r: RTVQ) -> list[torch.Tensor]:
    """Each task's rebuilt float32 task vector, base^ + o_t^."""
    base_hat = dequantise(r.base)
    return [base_hat + dequantise(o) for o in r.offsets]


def rtvq_qdq(taus: Sequence[torch.Tensor], base_bits: int = 3, offset_bits: int = 2) -> list[torch.Tensor]:
    """``rtvq_dequantise(rtvq_quantise(taus, ...))`` without packing (the merge's fast path)."""
    check_bits(base_bits, "base_bits")
    check_bits(offset_bits, "offset_bits")
    base_hat = qdq(_mean(taus), base_bits)
    return [base_hat + qdq(tau.float() - base_hat, offset_bits) for tau in taus]


# --- storage -----------------------------------------------------------------------------------

def tvq_bytes(numel: int, bits: int) -> int:
    """Stored bytes of one quantised tensor: ceil(numel * bits / 8) + 8 (min and max)."""
    return (numel * bits + 7) // 8 + RANGE_BYTES


def rtvq_bytes(numel: int, n_tasks: int, base_bits: int = 3, offset_bits: int = 2) -> int:
    """Stored bytes of one tensor's RTVQ: its base plus ``n_tasks`` offsets."""
    return tvq_bytes(numel, base_bits) + n_tasks * tvq_bytes(numel, offset_bits)


@dataclass
class QuantStats:
    """Storage figures of a quantised file. ``payload_bytes`` = sum over tensors of code bytes
    + 8 (the ``tvq_bytes`` of each); ``n_params`` counts each stored tensor's elements (an
    RTVQ file: the base's and every offset's); ``bits_per_param`` = 8 * payload / n_params."""

    n_params: int
    payload_bytes: int
    file_bytes: int
    bits_per_param: float


# --- the file ------------------------------------------------------------------------------------

@dataclass
class TVQFile:
    """A ``kind: tvq`` file: one task's quantised tensors and string metadata."""

    tensors: dict[str, QTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def dequantise(self) -> dict[str, torch.Tensor]:
        return {name: dequantise(q) for name, q in self.tensors.items()}


@dataclass
class RTVQFile:
    """A ``kind: rtvq`` file: the shared base and one offset set per task (in task order)."""

    base: dict[str, QTensor] = field(default_factory=dict)
    offsets: list[dict[str, QTensor]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def dequantise(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s rebuilt task vector, base^ + o_t^ per tensor."""
        return {name: dequantise(b) + dequantise(self.offsets[task][name]) for name, b in self.base.items()}


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
            raise MergeflowError(f"quantised tensor {name}: {q.packed.numel()} packed {q.packed.dtype} values, "
                                 f"expected {(q.numel * q.bits + 7) // 8} uint8")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MergeflowError(f"quantised file metadata {key!r}: keys and values must be strings")


def _save(path: str | os.PathLike, kind: str, entries: list[tuple[Any, str, QTensor]], extra: dict,
          metadata: Mapping[str, str] | None) -> QuantStats:
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
        "tensors": [{"part": part, "name": name, "shape": list(q.shape), "bits": q.bits, "bytes": q.packed.numel()}
                    for part, name, q in entries],
        "metadata": metadata,
        "writer": f"mergeflow {__version__}",
    }
    write(path, stored, index, FORMAT_NAME, FORMAT_VERSION)
    return _stats(index["tensors"], os.path.getsize(path))


def save_tvq(path: str | os.PathLike, tensors: Mapping[str, QTensor], metadata: Mapping[str, str] | None = None) -> QuantStats:
    """Write one task's quantised tensors to ``path`` atomically (temporary file, fsync,
    rename); returns the file's stats. Bad input raises MergeflowError before any write."""
    return _save(path, "tvq", [("task", name, q) for name, q in tensors.items()], {}, metadata)


def save_rtvq(path: str | os.PathLike, base: Mapping[str, QTensor], offsets: Sequence[Mapping[str, QTensor]],
              metadata: Mapping[str, str] | None = None) -> QuantStats:
    """Write an RTVQ set (the base and every task's offsets, one file) to ``path`` atomically.
    Every task must have an offset for exactly the base's tensors, of the same shapes."""
    for t, off in enumerate(offsets):
        if set(off) != set(base):
            missing = sorted(set(base) ^ set(off))[0]
            raise MergeflowError(f"rtvq offsets of task {t}: tensor {missing} is not in both the base and the offsets")
        for name, q in off.items():
            if tuple(q.shape) != tuple(base[name].shape):
                raise MergeflowError(f"rtvq offsets of task {t}: tensor {name} has shape {list(q.shape)}, "
                                     f"the base {list(base[name].shape)}")
    entries = [("base", name, q) for name, q in base.items()]
    entries += [(t, name, off[name]) for t, off in enumerate(offsets) for name in base]
    return _save(path, "rtvq", entries, {"n_tasks": len(offsets)}, metadata)


def _open_index(path: str | os.PathLike, f: Any) -> dict:
    index = open_index(path, f, FORMAT_NAME, FORMAT_VERSION, "tvq", ("kind", "tensors", "metadata", "crc32"))
    if index["kind"] not in ("tvq", "rtvq"):
        raise _fail(path, f"corrupt tvq index (ValueError: unknown kind {index['kind']!r})")
    return index


def _load(path: str | os.PathLike) -> tuple[dict, list[tuple[Any, str, QTensor]]]:
    try:
        with safe_open(path, framework="pt") as f:
            index = _open_index(path, f)
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
                    q = QTensor(payload[index["offsets"][i]:index["offsets"][i + 1]].clone(), shape, bits, lo, hi)
                    unpack(q.packed, bits, q.numel)  # sizes and padding
                except (KeyError, TypeError, ValueError, MergeflowError) as e:
                    raise _fail(path, f"tensor {name}: cannot decode ({type(e).__name__}: {e})") from None
                out.append((entry["part"], name, q))
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
        raise _fail(path, f"not a readable tvq file ({type(e).__name__}: {e})") from None
    return index, out


def load_tvq(path: str | os.PathLike) -> TVQFile:
    """Read a ``kind: tvq`` file (tensors on the CPU); a bad, corrupt or too-new file raises
    MergeflowError naming the file."""
    index, entries = _load(path)
    if index["kind"] != "tvq":
        raise _fail(path, f"a {index['kind']} file, not tvq (read it with load_{index['kind']})")
    return TVQFile({name: q for _, name, q in entries}, dict(index["metadata"]))


def load_rtvq(path: str | os.PathLike) -> RTVQFile:
    """Read a ``kind: rtvq`` file (tensors on the CPU)."""
    index, entries = _load(path)
    if index["kind"] != "rtvq":
        raise _fail(path, f"a {index['kind']} file, not rtvq (read it with load_{index['kind']})")
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
    return QuantStats(n_params=n, payload_bytes=payload, file_bytes=file_bytes,
                      bits_per_param=8 * payload / n if n else 0.0)


def quant_stats(path: str | os.PathLike) -> QuantStats:
    """The storage figures of a tvq or rtvq file, read from its index (nothing is decoded)."""
    try:
        with safe_open(path, framework="pt") as f:
            return _stats(_open_index(path, f)["tensors"], Path(path).stat().st_size)
    except MergeflowError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(path, f"not a readable tvq file ({type(e).__name__}: {e})") from None


# --- reading one tensor at a time, and writing from task-vector files --------------------------

_CRC_CHUNK = 1 << 26  # payload bytes per step of the streamed checksum


class QuantReader:
    """A tvq or rtvq file read one tensor at a time, for a merge over a model too big to decode
    whole (``load_tvq`` / ``load_rtvq`` decode everything). Every checksum is verified on open,
    the payload's in a stream; then ``tensor`` reads and decodes only the bytes of its tensor.
    ``task(t)`` is task t's view with the read side of a checkpoint (``in``, ``get``, ``path``)."""

    def __init__(self, path: str | os.PathLike):
        import threading
        import zlib

        from mergeflow.codecs._container import raw

        self.path = Path(path)
        try:
            self._f = safe_open(str(path), framework="pt")
            self.index = _open_index(path, self._f)
            entries = self.index["tensors"]
            ranges = _read(path, self._f, self.index, "ranges", torch.float32)
            if tuple(ranges.shape) != (len(entries), 2):
                raise _fail(path, f"ranges has shape {list(ranges.shape)} for {len(entries)} tensors")
            self._payload = self._f.get_slice("payload")
            n = self._payload.get_shape()[0] if self._payload.get_shape() else 0
            if self._payload.get_dtype() != "U8" or n != self.index["offsets"][-1]:
                raise _fail(path, f"payload has {n} {self._payload.get_dtype()} values, the index says "
                                  f"{self.index['offsets'][-1]} bytes")
            crc = 0
            for a in range(0, n, _CRC_CHUNK):
                crc = zlib.crc32(raw(self._payload[a:a + _CRC_CHUNK]), crc)
            if crc != self.index["crc32"].get("payload"):
                raise _fail(path, "tensor payload: checksum mismatch (corrupt file)")
        except MergeflowError:
            raise
        except Exception as e:  # noqa: BLE001 - missing file, truncated or garbled header
            raise _fail(path, f"not a readable tvq file ({type(e).__name__}: {e})") from None
        self.kind = self.index["kind"]
        self.n_tasks = int(self.index.get("n_tasks", 1)) if self.kind == "rtvq" else 1
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
        """Task ``task``'s float32 task vector for ``name``: x^ (tvq), base^ + o_t^ (rtvq)."""
        if self.kind == "tvq":
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
        return ("task" if self.reader.kind == "tvq" else "base", name) in self.reader._where

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


def save_tvq_from(vectors: Sequence[Any], bits: int, out_dir: str | os.PathLike, stems: Sequence[str],
                  metadata: Mapping[str, str] | None = None) -> list[QuantStats]:
    """Quantise each task-vector checkpoint (``mergeflow.io.Checkpoint``) tensor by tensor and
    write ``out_dir/<stem>.tvq``; holds one task's codes at a time. Returns each file's stats."""
    check_bits(bits)
    names = _floating(vectors)
    out = []
    for ckpt, stem in zip(vectors, stems, strict=True):
        codes = {name: quantise(ckpt.get(name).float(), bits) for name in names}
        out.append(save_tvq(Path(out_dir) / f"{stem}.tvq", codes, {**dict(metadata or {}), "task": stem}))
    return out


def save_rtvq_from(vectors: Sequence[Any], base_bits: int, offset_bits: int, path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None) -> QuantStats:
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
