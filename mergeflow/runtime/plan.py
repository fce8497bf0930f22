"""What one switch combination does to one tensor (``_Plan``) and what removal needs to undo
it bitwise (``_Piece``, ``_Backup``); see docs/runtime.md."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mergeflow.runtime.packing import PackedTensor


@dataclass
class _Plan:
    """What one combination does to one tensor."""

    binary: list[tuple[float, PackedTensor]]  # (w_t * s_t, bits)
    dense: list[tuple[float, torch.Tensor]]  # (w_t, dense tensor)
    _kernel: tuple[list[np.ndarray], np.ndarray] | None = None

    def kernel_bits(self) -> tuple[list[np.ndarray], np.ndarray]:
        """(each switch's byte pairs as the fused kernel reads them, the coefficients as float32)."""
        if self._kernel is None:
            self._kernel = ([pt.pairs for _, pt in self.binary], np.array([c for c, _ in self.binary], dtype=np.float32))
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


def _tail(piece: _Piece, k: int) -> _Piece:
    """What of a fused piece is left after its first k entries (a multiple of 8): positions
    counted from the new start."""
    if k == 0:
        return piece
    keep = piece.pos >= k
    return _Piece(piece.start + k, piece.length - k, piece.pos[keep] - k, piece.vals[keep], fused=True)
