"""Switch runtime: serve T-Switch / Auto-Switch from one base model, switching tasks in place.

A serving process holds the base weights once and, per request batch, applies the weighted sum
of binary task switches theta_0 + sum_t w_t * s_t * B_t to the live weights, runs the model and
removes the switches again. Nothing here copies the whole model:

- ``PackedSwitch`` keeps each binarised tensor as two bitmaps (keep and sign, one bit per
  parameter each, little-endian within bytes like the switch file's ``bitmap`` encoding) and
  its float32 scale: 2 bits per parameter in memory. Dense tensors are kept as they are and
  skipped names cost nothing.
- ``SwitchRuntime`` applies and removes a combination tensor by tensor and, inside a tensor,
  chunk by chunk: the ternary is unpacked on the fly on the tensor's device (one 64-bit table
  look-up per 8 parameters), so the temporaries are a few chunk-sized buffers.
- Removal is bitwise exact. Float addition is not invertible, so before a chunk is changed the
  runtime computes the new values y = fl(x + d) and what removal will compute, fl(y - d), and
  saves the original bits of exactly those entries where the two differ (typically entries much
  smaller than the step d, whose low bits the addition rounds away, plus signed zeros). Removal
  subtracts d again and writes the saved entries back. The backup therefore holds only entries
  that applying the switches changed and arithmetic cannot restore: a subset of the entries the
  applied switches touch (the mask union), never a copy of the weights. Tensors that a dense
  switch tensor touches (0-dim tensors, per-task heads: small) are saved whole.
- ``SwitchModel`` is the serving API: ``predict(inputs, weights)`` groups identical weight rows
  so that each distinct combination is applied once per batch.

The same code runs on CPU and CUDA. On CPU, finding the changed entries uses numpy views of the
same memory (several times faster than torch's kernels there), and chunks are spread over a few
worker threads that each run torch single-threaded (chunk-sized operations are slower when torch
splits them over its thread pool). The arithmetic matches
``mergeflow.methods.tswitch.apply_switch``: for a float32, float16 or bfloat16 base a one-hot
combination gives exactly its state dict (sum computed in float32, rounded once to the
parameter's dtype). float64 parameters are updated in float64; integer tensors are never changed.
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from mergeflow import kernels
from mergeflow.codecs.switch import Switch
from mergeflow.autoswitch import group_rows
from mergeflow.errors import MergeflowError

__all__ = [
    "PackedTensor",
    "PackedSwitch",
    "SwitchRuntime",
    "SwitchModel",
    "load_runtime",
    "pack_ternary",
    "unpack_ternary",
]

CPU_CHUNK = 1 << 18  # parameters per step on CPU: the step's buffers stay in cache
CUDA_CHUNK = 1 << 22  # parameters per step elsewhere: fewer kernel launches

_BITS_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_LUTS: dict[tuple[torch.device, bool], torch.Tensor] = {}


# --- packed bits -------------------------------------------------------------------------------

def _lut(device: torch.device, negate: bool = False) -> torch.Tensor:
    """int64[65536]: entry ``keep | sign << 8`` holds the 8 int8 ternaries of that byte pair.

    Byte j of an entry (in memory order, little-endian) is the ternary of bit j:
    0 where the keep bit is clear, else -1 where the sign bit is set and +1 where not
    (the opposite signs with ``negate``)."""
    lut = _LUTS.get((device, negate))
    if lut is None:
        u = torch.arange(1 << 16, dtype=torch.int64).unsqueeze(1)
        j = torch.arange(8, dtype=torch.int64)
        keep, sign = (u >> j) & 1, (u >> (j + 8)) & 1
        table = (keep * (1 - 2 * sign) * (-1 if negate else 1)).to(torch.int8).contiguous()
        if not np.little_endian:  # pragma: no cover - every supported host is little-endian
            raise MergeflowError("the switch runtime needs a little-endian host")
        lut = _LUTS[(device, negate)] = table.view(torch.int64).reshape(-1).to(device)
    return lut


def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """The bits of a ternary tensor (values -1, 0, +1): uint8 ``[ceil(n/8), 2]`` on its device.

    Column 0 is the keep bitmap (1 where the value is non-zero), column 1 the sign bitmap (1
    where the value is -1), both over all n entries in row-major order, bit j of byte i standing
    for entry 8*i + j; padding bits are zero."""
    if not isinstance(ternary, torch.Tensor) or ternary.is_floating_point() or ternary.is_complex():
        raise MergeflowError(f"ternary must be an integer tensor, got {getattr(ternary, 'dtype', type(ternary).__name__)}")
    flat = ternary.detach().reshape(-1).cpu().numpy()
    if flat.size and (int(flat.min()) < -1 or int(flat.max()) > 1):
        raise MergeflowError("ternary values must be -1, 0 or +1")
    keep = np.packbits(flat != 0, bitorder="little")
    sign = np.packbits(flat < 0, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(np.stack([keep, sign], axis=1))).to(ternary.device)


def _unpack_into(bits: torch.Tensor, start: int, length: int, idx: torch.Tensor, words: torch.Tensor,
                 negate: bool = False) -> torch.Tensor:
    """Entries [start, start + length) of the packed ternary as int8 (negated with ``negate``),
    written into ``words``.

    ``start`` is a multiple of 8; ``idx`` (int32) and ``words`` (int64) hold at least
    ceil(length / 8) elements and live on the bits' device."""
    lo, hi = start // 8, (start + length + 7) // 8
    pairs = bits.view(-1).view(torch.int16)[lo:hi]  # keep | sign << 8, as a signed 16-bit word
    index = idx[: hi - lo]
    index.copy_(pairs)
    index.bitwise_and_(0xFFFF)
    out = words[: hi - lo]
    torch.index_select(_lut(bits.device, negate), 0, index, out=out)
    return out.view(torch.int8)[:length]


def unpack_ternary(bits: torch.Tensor, n: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Entries [start, stop) (flat, row-major) of the ternary that ``pack_ternary`` packed, as int8.

    ``n`` is the number of entries packed; ``start`` must be a multiple of 8. Runs on the bits'
    device with torch operations only."""
    stop = n if stop is None else stop
    if start % 8 or not 0 <= start <= stop <= n:
        raise MergeflowError(f"cannot unpack entries [{start}, {stop}) of {n} (start must be a multiple of 8)")
    m = (stop - start + 7) // 8
    idx = torch.empty(m, dtype=torch.int32, device=bits.device)
    words = torch.empty(m, dtype=torch.int64, device=bits.device)
    return _unpack_into(bits, start, stop - start, idx, words).clone()


@dataclass
class PackedTensor:
    """One binarised tensor in memory: keep and sign bitmaps (``bits``), shape and float32 scale."""

    bits: torch.Tensor
    shape: tuple[int, ...]
    scale: float
    n_kept: int
    _pairs: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def pairs(self) -> np.ndarray:
        """CPU bits as the fused kernel reads them (``kernels.switch_pairs``: a view, made once)."""
        if self._pairs is None:
            self._pairs = kernels.switch_pairs(self.bits)
        return self._pairs

    @classmethod
    def from_ternary(cls, ternary: torch.Tensor, scale: float) -> "PackedTensor":
        n_kept = int(torch.count_nonzero(ternary))
        return cls(pack_ternary(ternary), tuple(ternary.shape), float(np.float32(scale)), n_kept)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def keep(self) -> torch.Tensor:
        """uint8[ceil(n/8)]: the activation switch, one bit per entry."""
        return self.bits[:, 0]

    @property
    def sign(self) -> torch.Tensor:
        """uint8[ceil(n/8)]: the polarity switch, 1 = negative, one bit per entry (0 where not kept)."""
        return self.bits[:, 1]

    @property
    def nbytes(self) -> int:
        return self.bits.numel() + 4  # both bitmaps and the float32 scale

    def ternary(self) -> torch.Tensor:
        """B unpacked: int8 in the tensor's shape, on the bits' device."""
        return unpack_ternary(self.bits, self.numel).reshape(self.shape)

    def to(self, device: torch.device | str) -> "PackedTensor":
        return PackedTensor(self.bits.to(device), self.shape, self.scale, self.n_kept)


@dataclass
class PackedSwitch:
    """A task switch with its binarised tensors bit-packed (2 bits per parameter plus a scale)."""

    tensors: dict[str, PackedTensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_switch(cls, switch: Switch) -> "PackedSwitch":
        if isinstance(switch, PackedSwitch):
            return switch
        if not isinstance(switch, Switch):
            raise MergeflowError(f"expected a Switch, got {type(switch).__name__}")
        tensors = {name: PackedTensor.from_ternary(t.ternary, t.scale) for name, t in switch.tensors.items()}
        dense = {name: d.detach() for name, d in switch.dense.items()}
        return cls(tensors, dense, list(switch.skipped), dict(switch.metadata))

    @property
    def names(self) -> list[str]:
        return [*self.tensors, *self.dense, *self.skipped]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: bitmaps and scales, plus the dense tensors."""
        return sum(t.nbytes for t in self.tensors.values()) + sum(d.numel() * d.element_size() for d in self.dense.values())

    def to(self, device: torch.device | str) -> "PackedSwitch":
        return PackedSwitch({k: t.to(device) for k, t in self.tensors.items()},
                            {k: d.to(device) for k, d in self.dense.items()}, list(self.skipped), dict(self.metadata))


# --- the runtime ---------------------------------------------------------------------------------

@dataclass
class _Plan:
    """What one combination does to one tensor."""

    binary: list[tuple[float, PackedTensor]]  # (w_t * s_t, bits)
    dense: list[tuple[float, torch.Tensor]]  # (w_t, dense tensor)
    _kernel: tuple[list[np.ndarray], np.ndarray] | None = None

    def kernel_bits(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(each switch's byte pairs as the fused kernel reads them, the coefficients as float32)."""
        if self._kernel is None:
            self._kernel = ([pt.pairs for _, pt in self.binary],
                            np.array([c for c, _ in self.binary], dtype=np.float32))
        return self._kernel


@dataclass
class _Piece:
    """One changed chunk: entries [start, start + length), the chunk-relative positions (int32)
    whose original values subtraction cannot restore, and those values."""

    start: int
    length: int
    pos: torch.Tensor
    vals: torch.Tensor
    fused: bool = False  # made by the fused CPU kernel: vals hold the entries' bits (uint32 / uint16)


@dataclass
class _Backup:
    """What removal needs for one tensor: the plan that changed it and the whole tensor (``full``,
    a dense-touched tensor) or one piece per changed chunk (appended as each chunk is changed,
    so a failed apply can be undone)."""

    plan: _Plan
    full: torch.Tensor | None = None
    pieces: list[_Piece] = field(default_factory=list)
    in_place: bool = True

    @property
    def nbytes(self) -> int:
        tensors = [self.full] if self.full is not None else [t for p in self.pieces for t in (p.pos, p.vals)]
        return sum(t.numel() * t.element_size() for t in tensors)


class _Arena:
    """Backup storage of one worker thread for the fused kernel: blocks of int32 positions and
    original bits handed out in order and reused by the next apply (steady-state applies
    allocate and page-fault nothing)."""

    BLOCK = 1 << 20  # entries per block

    def __init__(self, bits: type):
        self.bits = bits
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = []
        self.block = self.used = 0

    def reset(self) -> None:
        self.block = self.used = 0

    def take(self, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Free (pos, vals) space of at least ``want`` entries; ``commit`` what was filled."""
        while True:
            if self.block == len(self.blocks):
                size = max(self.BLOCK, want)
                self.blocks.append((np.empty(size, np.int32), np.empty(size, self.bits)))
            pos, vals = self.blocks[self.block]
            if len(pos) - self.used >= want:
                return pos[self.used:], vals[self.used:]
            self.block, self.used = self.block + 1, 0

    def commit(self, n: int) -> None:
        self.used += n


class _Workspace:
    """Chunk-sized scratch buffers of one device (and worker thread), allocated on first use."""

    def __init__(self, device: torch.device, chunk: int):
        self.device, self.chunk = device, chunk
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.last: torch.Tensor | None = None  # the last unpacked chunk (int8)
        self.arenas: dict[tuple[int, int], _Arena] = {}  # by (element size, generation): the fused kernel's backups
        self.gen = 0  # the generation new backups go to (the runtime alternates two: see SwitchRuntime.switch)

    def arena(self, itemsize: int) -> _Arena:
        arena = self.arenas.get((itemsize, self.gen))
        if arena is None:
            arena = self.arenas[(itemsize, self.gen)] = _Arena(np.uint16 if itemsize == 2 else np.uint32)
        return arena

    def get(self, key: str, dtype: torch.dtype, size: int | None = None) -> torch.Tensor:
        buf = self._bufs.get((key, dtype))
        if buf is None:
            buf = self._bufs[(key, dtype)] = torch.empty(self.chunk if size is None else size, dtype=dtype, device=self.device)
        return buf

    def unpack(self, bits: torch.Tensor, start: int, length: int, negate: bool = False) -> torch.Tensor:
        words = self.get("t", torch.int64, self.chunk // 8)
        return _unpack_into(bits, start, length, self.get("idx", torch.int32, self.chunk // 8), words, negate)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels of this thread on ``n`` threads inside the block: chunk-sized
    operations are faster on one thread than split across a woken-up pool."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_weight(key: str, value: Any) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise MergeflowError(f"switch weight {key}: expected a number, got {value!r}") from None
    if not math.isfinite(w):
        raise MergeflowError(f"switch weight {key}: {w} is not finite")
    return w


def _step(ws: _Workspace, plan: _Plan, start: int, length: int, wdt: torch.dtype,
          forward: bool, reuse: bool = False) -> tuple[torch.Tensor, float]:
    """(e, a) such that v + a * e is the chunk's step: v + d (``forward``) or v - d.

    a < 0 and the zeros of e are +0.0, so a * e is -0.0 wherever d is zero and entries no
    switch touches keep their bits (x + -0.0 == x, signed zeros and NaNs included). One switch:
    e = -+B (from int8, exact) and a = -|w*s|, so a * e = +-w*s*B exactly. Several: d = sum_t
    w_t s_t B_t summed from +0.0, a = -1, e = d backwards and 0 - d forwards (exact negation, +0.0
    kept). ``reuse`` (after a forward step): the backward step from what the forward step left."""
    if len(plan.binary) == 1:
        e = ws.get("d", wdt)[:length]
        c, pt = plan.binary[0]
        if reuse:
            b8 = ws.last.neg_()
        else:
            b8 = ws.unpack(pt.bits, start, length, negate=(c > 0) == forward)
        ws.last = b8
        e.copy_(b8)
        return e, -abs(c)
    d = ws.get("d", wdt)[:length]
    if not reuse:
        d.zero_()
        for c, pt in plan.binary:
            d.add_(ws.unpack(pt.bits, start, length), alpha=c)
    if not forward:
        return d, -1.0
    return torch.sub(ws.get("zero", wdt, 1).zero_(), d, out=ws.get("e", wdt)[:length]), -1.0


def _apply_chunks(flat: torch.Tensor, plan: _Plan, begin: int, end: int, ws: _Workspace, sink: list[_Piece]) -> None:
    """Add the plan's step to entries [begin, end) of ``flat`` in place, one chunk at a time,
    appending each chunk's piece (entries to restore by value) to ``sink`` once it is changed.

    Per chunk: y = x + d is what apply writes and z = y - d what removal will compute from y
    (with the same operations); the entries where z and x differ bitwise are saved."""
    dtype, wdt = flat.dtype, _work_dtype(flat.dtype)
    ibits = _BITS_VIEW.get(dtype)
    on_cpu = flat.device.type == "cpu"
    if _fused(flat):
        return _apply_chunks_fused(kernels.as_array(flat), plan, begin, end, ws, sink)
    for start in range(begin, end, ws.chunk):
        length = min(ws.chunk, end - start)
        x = flat[start:start + length]
        e, a = _step(ws, plan, start, length, wdt, forward=True)
        if dtype == wdt:
            y = torch.add(x, e, alpha=a, out=ws.get("y", wdt)[:length])
            e, a = _step(ws, plan, start, length, wdt, forward=False, reuse=True)
            z = torch.add(y, e, alpha=a, out=ws.get("z", wdt)[:length])
        else:  # half types: the sum in float32, rounded once (as apply_switch does)
            f = ws.get("y", wdt)[:length]
            f.copy_(x).add_(e, alpha=a)
            y = ws.get("yh", dtype)[:length].copy_(f)
            e, a = _step(ws, plan, start, length, wdt, forward=False, reuse=True)
            f.copy_(y).add_(e, alpha=a)
            z = ws.get("zh", dtype)[:length].copy_(f)
        if ibits is None:  # pragma: no cover - float8 and friends: compare the raw bytes
            size = x.element_size()
            changed = torch.nonzero((z.view(torch.uint8).view(-1, size) != x.view(torch.uint8).view(-1, size)).any(1)).squeeze(1)
            saved = x[changed]
        elif on_cpu:  # numpy views of the same memory: several times faster than torch here
            xi = x.view(ibits).numpy()
            mask = ws.get("ne", torch.bool)[:length].numpy()
            np.not_equal(z.view(ibits).numpy(), xi, out=mask)
            where = np.flatnonzero(mask)
            changed = torch.from_numpy(where)
            saved = torch.from_numpy(np.take(xi, where)).view(dtype)
        else:
            changed = torch.nonzero(z.view(ibits) != x.view(ibits)).squeeze(1)
            saved = x[changed]
        x.copy_(y)
        sink.append(_Piece(start, length, changed.to(torch.int32), saved))


def _fused(flat: torch.Tensor) -> bool:
    """Whether the fused CPU kernels (mergeflow.kernels) do this tensor's chunks."""
    return flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16) and kernels.available()


def _kernel_view(x: np.ndarray, plan: _Plan, start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries [start, end) of a tensor's kernel array ``x``, their switches' byte pairs
    [T, bytes] and the coefficients; ``start`` is a multiple of 8."""
    pairs, coefs = plan.kernel_bits()
    lo, hi = start >> 3, (end + 7) >> 3
    bits = pairs[0][None, lo:hi] if len(pairs) == 1 else np.stack([p[lo:hi] for p in pairs])
    return x[start:end], bits, coefs


def _apply_chunks_fused(x: np.ndarray, plan: _Plan, begin: int, end: int, ws: _Workspace, sink: list[_Piece]) -> None:
    """``_apply_chunks`` by the fused kernel on a tensor's kernel array ``x``: the whole range in
    as few calls as the worker's backup arena allows, one piece per call (same arithmetic, same
    saved entries)."""
    arena = ws.arena(x.itemsize)
    want = kernels.SWITCH_TILE + kernels.SWITCH_SLACK
    while begin < end:
        xs, bits, coefs = _kernel_view(x, plan, begin, end)
        pos, vals = arena.take(want)
        done, n = kernels.switch_apply(xs, bits, coefs, pos, vals)
        sink.append(_Piece(begin, done, torch.from_numpy(pos[:n]), torch.from_numpy(vals[:n]), fused=True))
        arena.commit(n)
        begin += done


def _remove_chunks(flat: torch.Tensor, plan: _Plan, pieces: list[_Piece], ws: _Workspace,
                   array: np.ndarray | None = None) -> None:
    """Undo ``pieces`` of ``flat``: subtract the step again, then write the saved entries back.
    ``array``: flat's kernel array, where the caller has it."""
    dtype, wdt = flat.dtype, _work_dtype(flat.dtype)
    ibits = _BITS_VIEW.get(dtype)
    for piece in pieces:
        if piece.fused:
            if array is None:
                array = kernels.as_array(flat)
            x, bits, coefs = _kernel_view(array, plan, piece.start, piece.start + piece.length)
            kernels.switch_remove(x, bits, coefs, piece.pos.numpy(), piece.vals.numpy())
            continue
        x = flat[piece.start:piece.start + piece.length]
        e, a = _step(ws, plan, piece.start, piece.length, wdt, forward=False)
        if dtype == wdt:
            x.add_(e, alpha=a)
        else:
            f = ws.get("y", wdt)[:piece.length]
            f.copy_(x).add_(e, alpha=a)
            x.copy_(f)
        if not piece.pos.numel():
            continue
        if x.device.type == "cpu" and ibits is not None:
            x.view(ibits).numpy()[piece.pos.numpy()] = piece.vals.view(ibits).numpy()
        else:
            x[piece.pos.long()] = piece.vals


class SwitchRuntime:
    """Apply and remove weighted sums of task switches in place on live model weights.

    ``params`` maps names to the tensors a model computes with (``dict(model.named_parameters())``
    or a state dict whose tensors the model uses); they are modified in place. ``switches`` maps
    task names to ``Switch`` (or ``PackedSwitch``); each switch's bits are packed and moved once
    to its tensors' devices. Every tensor a switch names must be in ``params`` with its shape.

    ``apply(weights)`` adds sum_t w_t * s_t * B_t (and w_t * dense_t for dense tensors) to each
    tensor; ``remove()`` restores every tensor bitwise. One combination is active at a time.
    Memory beyond the weights: the packed switches (``packed_nbytes``), a few chunk-sized
    buffers per worker, and while a combination is active ``backup_nbytes``: the original values
    (and int32 positions) of only those touched entries that subtraction cannot restore, a subset
    of the entries the applied switches touch, plus the whole of any tensor a dense switch tensor
    touches. Entries no applied switch touches are never written. Removal assumes the weights
    were not changed while the combination was active.

    ``chunk``: entries per step (default 2**18 on CPU, 2**22 elsewhere). ``workers``: CPU threads
    that process chunks in parallel, each running torch single-threaded (default: torch's thread
    count, at most 8); other devices use one.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], switches: Mapping[str, Switch | PackedSwitch], *,
                 chunk: int | None = None, workers: int | None = None):
        if chunk is not None and (chunk < 8 or chunk % 8):
            raise MergeflowError(f"chunk must be a positive multiple of 8, got {chunk}")
        if workers is not None and workers < 1:
            raise MergeflowError(f"workers must be at least 1, got {workers}")
        self.params = dict(params)
        self._chunk = chunk
        self._workers = workers if workers is not None else max(1, min(8, torch.get_num_threads()))
        self.switches: dict[str, PackedSwitch] = {}
        touched: dict[int, str] = {}
        for key, switch in switches.items():
            packed = PackedSwitch.from_switch(switch)
            for name in packed.names:
                if name not in self.params:
                    raise MergeflowError(f"switch {key}: tensor {name} is not among the model's parameters")
            tensors, dense = {}, {}
            for name, pt in packed.tensors.items():
                p = self.params[name]
                if tuple(pt.shape) != tuple(p.shape):
                    raise MergeflowError(f"switch {key}: tensor {name} has shape {list(pt.shape)}, the model has {list(p.shape)}")
                if p.is_floating_point():  # like apply_switch: integer tensors are never changed
                    tensors[name] = pt.to(p.device)
            for name, d in packed.dense.items():
                p = self.params[name]
                if tuple(d.shape) != tuple(p.shape):
                    raise MergeflowError(f"switch {key}: dense tensor {name} has shape {list(d.shape)}, the model has {list(p.shape)}")
                if p.is_floating_point():
                    dense[name] = d.to(p.device)
            for name in [*tensors, *dense]:
                if not self.params[name].numel():
                    continue
                ptr = self.params[name].data_ptr()
                if touched.setdefault(ptr, name) != name:
                    raise MergeflowError(f"tensors {touched[ptr]} and {name} share memory (tied weights): give the runtime one of them")
            self.switches[key] = PackedSwitch(tensors, dense, list(packed.skipped), dict(packed.metadata))
        self._workspaces: dict[tuple[torch.device, int], _Workspace] = {}
        self._arrays: dict[tuple[int, int, torch.dtype], np.ndarray] = {}
        self._gen = 0
        self._pool: Any = None
        self._active: dict[str, float] | None = None
        self._plans: dict[str, _Plan] = {}
        self._backup: dict[str, _Backup] = {}

    # --- state -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The switches' names, in the order weight columns follow."""
        return list(self.switches)

    @property
    def active(self) -> dict[str, float] | None:
        """The applied combination (name -> weight), or None."""
        return None if self._active is None else dict(self._active)

    @property
    def backup_nbytes(self) -> int:
        """Bytes the active combination's backup holds (0 when none is active)."""
        return sum(b.nbytes for b in self._backup.values())

    @property
    def packed_nbytes(self) -> int:
        """Bytes the packed switches hold."""
        return sum(s.nbytes for s in self.switches.values())

    def __repr__(self) -> str:
        return f"SwitchRuntime({len(self.switches)} switches, {len(self.params)} tensors, active={self._active})"

    # --- apply / remove ------------------------------------------------------------------------

    def weights_dict(self, weights: Mapping[str, Any] | torch.Tensor | Any) -> dict[str, float]:
        """A combination as name -> weight: a mapping, or one weight per switch in ``names`` order."""
        if isinstance(weights, Mapping):
            out = {}
            for key, value in weights.items():
                if key not in self.switches:
                    raise MergeflowError(f"switch weight {key}: no such switch (have {', '.join(self.switches) or 'none'})")
                out[key] = _as_weight(key, value)
            return out
        values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).tolist()
        if len(values) != len(self.switches):
            raise MergeflowError(f"{len(values)} switch weights for {len(self.switches)} switches")
        return {key: _as_weight(key, v) for key, v in zip(self.switches, values)}

    def _plan(self, weights: dict[str, float]) -> dict[str, _Plan]:
        plans: dict[str, _Plan] = {}
        for key, w in weights.items():
            if w == 0.0:
                continue
            switch = self.switches[key]
            for name, pt in switch.tensors.items():
                if pt.n_kept and pt.scale != 0.0:
                    plans.setdefault(name, _Plan([], [])).binary.append((w * pt.scale, pt))
            for name, d in switch.dense.items():
                plans.setdefault(name, _Plan([], [])).dense.append((w, d))
        order = {name: i for i, name in enumerate(self.params)}
        return dict(sorted(plans.items(), key=lambda item: order[item[0]]))

    @torch.no_grad()
    def apply(self, weights: Mapping[str, Any] | torch.Tensor) -> None:
        """Add sum_t w_t * s_t * B_t to the weights in place (``weights``: name -> w_t, or one
        weight per switch in ``names`` order; switches left out or weighted 0 do nothing).
        On failure whatever was changed is restored before the error propagates."""
        if self._active is not None:
            raise MergeflowError(f"a switch combination is already applied ({self._active}): remove() it first, or switch()")
        combo = self.weights_dict(weights)
        plans = self._plan(combo)
        self._active, self._plans, self._backup = combo, plans, {}
        self._next_generation()
        try:
            tasks = []
            for name, plan in plans.items():
                tasks.extend(self._apply_tasks(name, plan))
            self._run(tasks)
        except BaseException:
            self.remove()
            raise

    @torch.no_grad()
    def switch(self, weights: Mapping[str, Any] | torch.Tensor) -> None:
        """Go from the applied combination to ``weights`` (``apply`` when none is applied): the
        weights end bitwise as ``remove()`` then ``apply(weights)`` would leave them, with one
        pass over each tensor both combinations touch (fused CPU kernels: the old step is taken
        off and the new one put on tile by tile, while the tile is in cache) instead of two.
        On failure the weights are restored to the base before the error propagates."""
        if self._active is None:
            return self.apply(weights)
        combo = self.weights_dict(weights)
        if combo == self._active:
            return
        plans = self._plan(combo)
        old = self._backup
        swap = {name for name, plan in plans.items() if self._swappable(name, plan, old.get(name))}
        self._run(self._remove_tasks({name: b for name, b in old.items() if name not in swap}))
        self._active, self._plans, self._backup = combo, plans, {}
        self._next_generation()
        swapped: dict[int, int] = {}  # id(old piece) -> its entries swapped so far
        try:
            tasks = []
            for name, plan in plans.items():
                if name not in swap:
                    tasks.extend(self._apply_tasks(name, plan))
                    continue
                flat, backup = self.params[name].detach().view(-1), _Backup(plan)
                self._backup[name] = backup
                tasks.extend((piece.length, self._swap_task, flat, old[name].plan, plan, piece, backup.pieces, swapped)
                             for piece in old[name].pieces)
            self._run(tasks)
        except BaseException:
            left = {}  # the old combination where it was not swapped yet
            for name in swap:
                pieces = [_tail(piece, swapped.get(id(piece), 0)) for piece in old[name].pieces]
                left[name] = _Backup(old[name].plan, pieces=[p for p in pieces if p.length])
            try:
                self._run(self._remove_tasks(left))
            finally:
                self.remove()
            raise

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the weights bitwise to what they were before ``apply`` (no-op when nothing is applied)."""
        if self._active is None:
            return
        self._run(self._remove_tasks(self._backup))
        self._active, self._plans, self._backup = None, {}, {}

    def _next_generation(self) -> None:
        """New backups go to the other generation of every worker's arenas (the current one may
        still hold the backups a switch reads), emptied first."""
        self._gen ^= 1
        for ws in self._workspaces.values():
            ws.gen = self._gen
            for (_, gen), arena in ws.arenas.items():
                if gen == self._gen:
                    arena.reset()

    def _apply_tasks(self, name: str, plan: _Plan) -> list[tuple]:
        """Apply ``plan`` to tensor ``name``: dense-touched and strided tensors now, contiguous
        ones as tasks (one per range) recording their backup in ``_backup``."""
        p = self.params[name].detach()
        if plan.dense:
            self._apply_full(name, plan)
            return []
        if not p.is_contiguous():  # changed through a contiguous copy of it (one tensor at a time)
            self._apply_strided(name, plan)
            return []
        backup = self._backup[name] = _Backup(plan)
        return [(end - begin, self._apply_task, p.view(-1), plan, begin, end, backup.pieces) for begin, end in self._ranges(p)]

    def _remove_tasks(self, backups: Mapping[str, _Backup]) -> list[tuple]:
        """Undo ``backups``: whole-tensor and strided ones now, the rest as tasks of about one
        range's entries each."""
        tasks = []
        for name, backup in backups.items():
            p = self.params[name].detach()
            if backup.full is not None:
                p.copy_(backup.full)
            elif not backup.in_place:
                flat = p.contiguous().view(-1)
                with _torch_threads(1) if p.device.type == "cpu" else _null():
                    _remove_chunks(flat, backup.plan, backup.pieces, self._workspace(p.device))
                p.copy_(flat.view(p.shape))
            else:
                span, group, size = self._span(p.device), [], 0
                for piece in backup.pieces:
                    group.append(piece)
                    size += piece.length
                    if size >= span:
                        tasks.append((size, self._remove_task, p.view(-1), backup.plan, group))
                        group, size = [], 0
                if group:
                    tasks.append((size, self._remove_task, p.view(-1), backup.plan, group))
        return tasks

    def _swappable(self, name: str, plan: _Plan, backup: _Backup | None) -> bool:
        """Whether ``switch`` can take tensor ``name`` from ``backup``'s combination to ``plan``'s
        in one fused pass (both binary-only, the tensor contiguous, every piece the kernel's)."""
        if backup is None or plan.dense or backup.plan.dense or backup.full is not None or not backup.in_place:
            return False
        flat = self.params[name].detach()
        return flat.is_contiguous() and _fused(flat.view(-1)) and all(piece.fused for piece in backup.pieces)

    @contextmanager
    def use(self, weights: Mapping[str, Any] | torch.Tensor) -> Iterator["SwitchRuntime"]:
        """``with runtime.use({"task": 1.0}): ...``: applied inside the block, removed after it."""
        self.apply(weights)
        try:
            yield self
        finally:
            self.remove()

    def close(self) -> None:
        """Stop the worker threads (they are started again when needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- execution -------------------------------------------------------------------------------

    def _workspace(self, device: torch.device) -> _Workspace:
        key = (device, threading.get_ident())
        ws = self._workspaces.get(key)
        if ws is None:
            chunk = self._chunk or (CPU_CHUNK if device.type == "cpu" else CUDA_CHUNK)
            ws = self._workspaces[key] = _Workspace(device, chunk)
            ws.gen = self._gen
        return ws

    def _span(self, device: torch.device) -> int:
        """Entries per task: several chunks, so that workers share big tensors."""
        return 8 * self._workspace(device).chunk

    def _ranges(self, p: torch.Tensor) -> list[tuple[int, int]]:
        n, span = p.numel(), self._span(p.device)
        return [(begin, min(begin + span, n)) for begin in range(0, n, span)]

    def _array(self, flat: torch.Tensor) -> np.ndarray:
        """A contiguous CPU tensor's kernel array (``kernels.as_array``), made once per tensor."""
        key = (flat.data_ptr(), flat.numel(), flat.dtype)
        array = self._arrays.get(key)
        if array is None:
            array = self._arrays[key] = kernels.as_array(flat)
        return array

    def _apply_task(self, flat, plan, begin, end, sink) -> None:
        ws = self._workspace(flat.device)
        if _fused(flat):
            _apply_chunks_fused(self._array(flat), plan, begin, end, ws, sink)
        else:
            _apply_chunks(flat, plan, begin, end, ws, sink)

    def _swap_task(self, flat, old_plan, plan, piece, sink, swapped) -> None:
        """Take ``piece`` of ``flat`` from ``old_plan``'s combination to ``plan``'s (fused kernel),
        appending the new pieces to ``sink`` and the progress to ``swapped``."""
        x = self._array(flat)
        arena = self._workspace(flat.device).arena(x.itemsize)
        end = piece.start + piece.length
        xs, bits_a, coefs_a = _kernel_view(x, old_plan, piece.start, end)
        _, bits_b, coefs_b = _kernel_view(x, plan, piece.start, end)
        pos_a, vals_a = piece.pos.numpy(), piece.vals.numpy()
        done, want = 0, kernels.SWITCH_TILE + kernels.SWITCH_SLACK
        while done < piece.length:
            pos, vals = arena.take(want)
            stop, n = kernels.switch_swap(xs, bits_a, coefs_a, pos_a, vals_a, bits_b, coefs_b, done, pos, vals)
            sink.append(_Piece(piece.start + done, stop - done, torch.from_numpy(pos[:n]), torch.from_numpy(vals[:n]), fused=True))
            arena.commit(n)
            swapped[id(piece)] = done = stop

    def _remove_task(self, flat, plan, pieces) -> None:
        _remove_chunks(flat, plan, pieces, self._workspace(flat.device), self._array(flat) if _fused(flat) else None)

    def _run(self, tasks: list[tuple]) -> None:
        """Run (entries, function, tensor, *args) tasks: other devices' here, in order; CPU ones
        on the worker threads, in as many runs of consecutive tasks as there are workers, of
        about equal entries each (one pool call per worker, not one per task)."""
        cpu = [t for t in tasks if t[2].device.type == "cpu"]
        for task in tasks:
            if task[2].device.type != "cpu":
                task[1](*task[2:])
        if not cpu:
            return
        if self._workers == 1 or len(cpu) == 1:
            with _torch_threads(1):
                _run_all(cpu)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="switch-runtime",
                                            initializer=torch.set_num_threads, initargs=(1,))
        total, runs, run, size = sum(t[0] for t in cpu), [], [], 0
        share = total / min(self._workers, len(cpu))
        for task in cpu:
            run.append(task)
            size += task[0]
            if size >= share * (len(runs) + 1) and len(runs) < self._workers - 1:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        futures = [self._pool.submit(_run_all, run) for run in runs]
        errors = [f.exception() for f in futures]  # waits for every run
        for error in errors:
            if error is not None:
                raise error

    def _apply_full(self, name: str, plan: _Plan) -> None:
        """A tensor some dense switch tensor touches: saved whole, then updated in one step."""
        p = self.params[name].detach()
        self._backup[name] = _Backup(plan, full=p.clone())
        wdt = _work_dtype(p.dtype)
        d: torch.Tensor | None = None
        for w, dense in plan.dense:
            term = dense.to(wdt) * w
            d = term if d is None else d.add_(term)
        for c, pt in plan.binary:
            d.add_(unpack_ternary(pt.bits, pt.numel).reshape(pt.shape), alpha=c)
        p.copy_((p.to(wdt) + d).to(p.dtype))

    def _apply_strided(self, name: str, plan: _Plan) -> None:
        p = self.params[name].detach()
        flat = p.contiguous().view(-1)
        pieces: list[_Piece] = []
        with _torch_threads(1) if p.device.type == "cpu" else _null():
            _apply_chunks(flat, plan, 0, flat.numel(), self._workspace(p.device), pieces)
        p.copy_(flat.view(p.shape))
        self._backup[name] = _Backup(plan, pieces=pieces, in_place=False)  # recorded once p holds the result


@contextmanager
def _null() -> Iterator[None]:
    yield


def _tail(piece: _Piece, k: int) -> _Piece:
    """What of a fused piece is left after its first k entries (a multiple of 8): positions
    counted from the new start."""
    if k == 0:
        return piece
    keep = piece.pos >= k
    return _Piece(piece.start + k, piece.length - k, piece.pos[keep] - k, piece.vals[keep], fused=True)


def _run_all(tasks: list[tuple]) -> None:
    for task in tasks:
        task[1](*task[2:])


# --- serving ---------------------------------------------------------------------------------------

def _take(inputs: Any, rows: torch.Tensor) -> Any:
    """The rows of a batch: a tensor, a mapping of tensors (e.g. tokenizer output) or a sequence."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows.to(inputs.device)]
    if isinstance(inputs, Mapping):
        return {k: _take(v, rows) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [inputs[i] for i in rows.tolist()]
    raise MergeflowError(f"cannot split inputs of type {type(inputs).__name__} into rows")


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        sizes = {_batch_size(v) for v in inputs.values()}
        if len(sizes) != 1:
            raise MergeflowError(f"inputs have differing batch sizes {sorted(sizes)}")
        return sizes.pop()
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise MergeflowError(f"cannot split inputs of type {type(inputs).__name__} into rows")


def _default_forward(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class SwitchModel:
    """A model served with task switches: the base held once, switches applied per batch.

    ``switches`` maps task names to switches; weight columns follow their order (``names``).
    ``router`` (optional) maps inputs to weights [B, T] (e.g. Auto-Switch's kNN routing).
    The model's parameters and buffers are switched in place (``runtime``).
    """

    def __init__(self, model: torch.nn.Module, switches: Mapping[str, Switch | PackedSwitch],
                 router: Callable[[Any], torch.Tensor] | None = None, *, chunk: int | None = None,
                 workers: int | None = None):
        self.model = model
        params = dict(model.named_buffers())
        params.update(dict(model.named_parameters()))
        self.runtime = SwitchRuntime(params, switches, chunk=chunk, workers=workers)
        self.router = router

    @property
    def names(self) -> list[str]:
        return self.runtime.names

    @torch.no_grad()
    def predict(self, inputs: Any, weights: torch.Tensor | Mapping[str, float] | None = None,
                forward: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None) -> torch.Tensor:
        """Outputs of the model for ``inputs`` (a batch), each row under its switch combination.

        ``weights``: [B, T] (one row per input, columns in ``names`` order), a mapping (one
        combination for the whole batch), or None to ask the router. Rows with identical
        weights form one group: each group's combination is applied once, the group runs
        through ``forward(model, rows_of_inputs)`` (default ``model(rows)``) and the combination
        is removed. Outputs (a tensor whose first dimension is the rows) come back in input order.
        """
        forward = forward or _default_forward
        if weights is None:
            if self.router is None:
                raise MergeflowError("predict needs weights, or a router to compute them")
            weights = self.router(inputs)
        if isinstance(weights, Mapping):
            with self.runtime.use(weights):
                return forward(self.model, inputs)
        weights = torch.as_tensor(weights)
        n = _batch_size(inputs)
        if weights.dim() != 2 or weights.shape[0] != n or weights.shape[1] != len(self.names):
            raise MergeflowError(f"weights must be [{n}, {len(self.names)}] (inputs x switches), got {list(weights.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise MergeflowError("weights hold non-finite values")
        if self.runtime.active is not None:
            raise MergeflowError(f"a switch combination is already applied ({self.runtime.active}): remove() it first")
        out: torch.Tensor | None = None
        try:
            for row, rows in group_rows(weights):
                self.runtime.switch(row)  # from the previous group's combination in one pass
                result = forward(self.model, _take(inputs, rows))
                if not isinstance(result, torch.Tensor) or result.dim() < 1 or result.shape[0] != rows.numel():
                    raise MergeflowError(f"forward must return a tensor with one row per input, got "
                                         f"{list(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__}")
                if out is None:
                    out = result.new_empty((n, *result.shape[1:]))
                out[rows.to(out.device)] = result
        finally:
            self.runtime.remove()
        if out is None:
            raise MergeflowError("predict got an empty batch")
        return out


def load_runtime(base_dir: str | os.PathLike, switch_paths: Mapping[str, str | os.PathLike],
                 device: str | torch.device | None = None, *, chunk: int | None = None,
                 workers: int | None = None) -> tuple[dict[str, torch.Tensor], SwitchRuntime]:
    """(state dict of the base, runtime switching it in place) from a checkpoint and switch files.

    Tensors keep their stored dtypes; ``device`` moves the state dict there first (the
    switches' bits follow their tensors)."""
    from mergeflow.codecs.switch import load_switch
    from mergeflow.io.checkpoint import Checkpoint

    with Checkpoint(base_dir) as ckpt:
        state = ckpt.state_dict()
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    switches = {key: load_switch(path) for key, path in switch_paths.items()}
    return state, SwitchRuntime(state, switches, chunk=chunk, workers=workers)
