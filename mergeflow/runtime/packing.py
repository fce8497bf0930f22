"""Bit-packed task switches: each binarised tensor as keep and sign bitmaps plus its scale.

Two bits per parameter in memory (see docs/runtime.md); ``unpack_ternary`` unpacks any range
on the bits' device with one 64-bit table look-up per 8 parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeflow import kernels
from mergeflow.codecs.switch import Switch
from mergeflow.errors import MergeflowError

_LUTS: dict[tuple[torch.device, bool], torch.Tensor] = {}


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


def _unpack_into(
    bits: torch.Tensor, start: int, length: int, idx: torch.Tensor, words: torch.Tensor, negate: bool = False
) -> torch.Tensor:
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
    def from_switch(cls, switch: Switch | PackedSwitch) -> "PackedSwitch":
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
        return PackedSwitch(
            {k: t.to(device) for k, t in self.tensors.items()},
            {k: d.to(device) for k, d in self.dense.items()},
            list(self.skipped),
            dict(self.metadata),
        )
