"""Task vector quantisation arithmetic (Kim et al., ICCV 2025): TVQ and RTVQ on tensors.

``quantise`` / ``dequantise``: per tensor, asymmetric min-max to ``b`` bits (2..8), codes
bit-packed little-endian into uint8 on the tensor's own device; ``qdq`` is the merge's fast
path, equal bit for bit to ``dequantise(quantise(x))`` without packing. ``rtvq_*``: the
residual form, a shared base (the mean task vector) plus per-task offsets taken against the
dequantised base. ``tvq_bytes`` / ``rtvq_bytes``: what a tensor costs stored.

The formulas, rounding, bit order and storage figures: docs/quant-format.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from mergeflow.errors import MergeflowError

MIN_BITS, MAX_BITS = 2, 8
RANGE_BYTES = 8  # lo and hi of each tensor, float32
_CHUNK = 1 << 22  # elements per packing/arithmetic step (a multiple of 8): bounds temporaries


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
    lo_t, hi_t = torch.aminmax(flat.float())
    lo, hi = float(lo_t), float(hi_t)
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
        t = torch.sub(flat[s : s + _CHUNK].double(), lo).mul_(scale).round_().clamp_(0, levels)  # never in place on the input
        out[s : s + _CHUNK] = t.to(torch.uint8)
    return out


def _values(codes: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """float32 values of flat uint8 codes: lo + (q * (hi - lo)) / L in float64."""
    levels = (1 << bits) - 1
    span = hi - lo  # exact in float64 for float32 ends of similar exponent
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    for s in range(0, codes.numel(), _CHUNK):
        out[s : s + _CHUNK] = codes[s : s + _CHUNK].double().mul_(span).div_(levels).add_(lo)
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
        c = codes[s : s + _CHUNK]
        stream = ((c.unsqueeze(1) >> shifts[:bits]) & 1).reshape(-1)
        stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
        byte_bits = stream.reshape(-1, 8) << shifts
        start = s * bits // 8
        out[start : start + byte_bits.shape[0]] = byte_bits.sum(1, dtype=torch.int32).to(torch.uint8)
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
        chunk = packed[start : start + (m * bits + 7) // 8]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)[: m * bits].reshape(m, bits)
        out[s : s + m] = (stream << shifts[:bits]).sum(1, dtype=torch.int32).to(torch.uint8)
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


# --- stored size -------------------------------------------------------------------------------


def tvq_bytes(numel: int, bits: int) -> int:
    """Stored bytes of one quantised tensor: ceil(numel * bits / 8) + 8 (min and max)."""
    return (numel * bits + 7) // 8 + RANGE_BYTES


def rtvq_bytes(numel: int, n_tasks: int, base_bits: int = 3, offset_bits: int = 2) -> int:
    """Stored bytes of one tensor's RTVQ: its base plus ``n_tasks`` offsets."""
    return tvq_bytes(numel, base_bits) + n_tasks * tvq_bytes(numel, offset_bits)
