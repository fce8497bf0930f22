"""Chunk kernels of the switch runtime: add a combination's step to a range of a tensor in place,
saving the entries subtraction cannot restore, and undo it (torch, or the fused CPU kernels of
``mergeflow.kernels``); with the per-thread scratch they use (``_Workspace``, ``_Arena``).
See docs/runtime.md for why removal is bitwise exact."""

from __future__ import annotations

import numpy as np
import torch

from mergeflow import kernels
from mergeflow.runtime.packing import _unpack_into
from mergeflow.runtime.plan import _Piece, _Plan

CPU_CHUNK = 1 << 18  # parameters per step on CPU: the step's buffers stay in cache
CUDA_CHUNK = 1 << 22  # parameters per step elsewhere: fewer kernel launches

_BITS_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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
                return pos[self.used :], vals[self.used :]
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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _step(
    ws: _Workspace, plan: _Plan, start: int, length: int, wdt: torch.dtype, forward: bool, reuse: bool = False
) -> tuple[torch.Tensor, float]:
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
            assert ws.last is not None  # the forward step just unpacked this chunk
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
        x = flat[start : start + length]
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


def _remove_chunks(
    flat: torch.Tensor, plan: _Plan, pieces: list[_Piece], ws: _Workspace, array: np.ndarray | None = None
) -> None:
    """Undo ``pieces`` of ``flat``: subtract the step again, then write the saved entries back.
    ``array``: flat's kernel array, where the caller has it."""
    dtype, wdt = flat.dtype, _work_dtype(flat.dtype)
    ibits = _BITS_VIEW.get(dtype)
    for piece in pieces:
        if piece.fused:
            if array is None:
                array = kernels.as_array(flat)
            xa, bits, coefs = _kernel_view(array, plan, piece.start, piece.start + piece.length)
            kernels.switch_remove(xa, bits, coefs, piece.pos.numpy(), piece.vals.numpy())
            continue
        x = flat[piece.start : piece.start + piece.length]
        e, a = _step(ws, plan, piece.start, piece.length, wdt, forward=False)
        if dtype == wdt:
            x.add_(e, alpha=a)
        else:
            f = ws.get("y", wdt)[: piece.length]
            f.copy_(x).add_(e, alpha=a)
            x.copy_(f)
        if not piece.pos.numel():
            continue
        if x.device.type == "cpu" and ibits is not None:
            x.view(ibits).numpy()[piece.pos.numpy()] = piece.vals.view(ibits).numpy()
        else:
            x[piece.pos.long()] = piece.vals
