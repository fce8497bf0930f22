"""Fused CPU kernels for the engine's hot loops (numba, compiled once and cached on disk).

Each kernel does a block-wise merge's whole per-element recipe in one pass over tiles that
stay in L1, reading the checkpoints' own dtype (bfloat16 bits as uint16, or float32) and
releasing the GIL; float32 arithmetic in the torch code's order (no fast-math). Kernels:
``linear_block`` (Task Arithmetic, weight averaging), ``ties_block`` (TIES with known
thresholds), ``kth_abs_tau`` (exact k-th largest |tau| of one tensor, tau never materialised).

``MERGEFLOW_KERNELS`` picks where the engine uses them: ``auto`` (default) wherever they
pay for numba's one-time start-up in the process (~0.6 s), ``numba`` everywhere they apply,
``torch`` nowhere. The engine falls back to torch ops where they do not apply (CUDA,
float16/float64 inputs, mixed task-vector sources).
Why, each kernel's formula and algorithm: docs/internals.md#kernels.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import numpy as np
import torch

_SAMPLE = 1 << 16
SAMPLE_MIN_N = 1 << 20
_KEY_MAX = 0x7FFFFFFF  # |float32| keys (sign cleared); finite inputs stay <= +inf's key


MODES = ("auto", "numba", "torch")


def mode() -> str:
    m = os.environ.get("MERGEFLOW_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        from mergeflow.errors import MergeflowError

        raise MergeflowError(f"MERGEFLOW_KERNELS: {m!r} is not one of {', '.join(MODES)}")
    return m


def wanted(elements: int, min_elements: int) -> bool:
    """Whether to use a kernel for work of ``elements`` (x tasks) that pays from ``min_elements``."""
    m = mode()
    return m != "torch" and (m == "numba" or elements >= min_elements) and available()


def available() -> bool:
    return mode() != "torch" and _numba() is not None


@functools.lru_cache(maxsize=1)
def _numba():
    try:
        from mergeflow import _kernels_nb
    except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
        return None
    return _kernels_nb


def supported(t: torch.Tensor) -> bool:
    """Whether a kernel reads this dtype directly (others are widened by torch first)."""
    return t.dtype in (torch.bfloat16, torch.float32)


def as_array(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the kernels' numpy view: bfloat16 as its uint16 bits, float32 as is."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype != torch.float32:
        t = t.float()
    return t.numpy()


def _bits_of(np_dtype) -> type[np.unsignedinteger[Any]]:
    """The unsigned integer type of a kernel array's element bits (uint16 for bfloat16's, uint32 for float32)."""
    return np.uint16 if np.dtype(np_dtype).itemsize == 2 else np.uint32


def _k(name: str):
    ks = _numba()
    if ks is None:
        raise RuntimeError("mergeflow kernels are not available (numba missing or MERGEFLOW_KERNELS=torch)")
    return getattr(ks, name)


def linear_block(
    base: np.ndarray, fts: np.ndarray, subtract: bool, weights: Sequence[float], out: np.ndarray, divisor: float = 1.0
) -> None:
    """out = base + (sum_t weights[t] * tau_t) / divisor, summed in task order."""
    _k("linear_block")(base, fts, subtract, np.asarray(weights, np.float32), np.float32(divisor), out)


def ties_block(
    base: np.ndarray, fts: np.ndarray, subtract: bool, thresholds: Sequence[float], scaling: float, out: np.ndarray
) -> None:
    """out = base + scaling * disjoint_mean(tau_t trimmed to |tau_t| >= thresholds[t])."""
    _k("ties_block")(base, fts, subtract, np.asarray(thresholds, np.float32), np.float32(scaling), out)


SWITCH_SLACK = 16  # switch_apply's pos/vals need this many entries beyond the last one saved
SWITCH_TILE = 2048  # switch_apply stops early when fewer than SWITCH_TILE + SWITCH_SLACK entries are left


def switch_pairs(bits: torch.Tensor) -> np.ndarray:
    """A packed switch tensor's bits (uint8 [ceil(n/8), 2]: keep, sign) as the kernels read
    them: uint16 [ceil(n/8)], each the byte pair keep | sign << 8 (a view, no copy)."""
    return bits.numpy().view(np.uint16).reshape(-1)


def switch_apply(x: np.ndarray, bits: np.ndarray, coefs: np.ndarray, pos: np.ndarray, vals: np.ndarray) -> tuple[int, int]:
    """Add sum_t coefs[t] * B_t to x in place from its start (see mergeflow.runtime), saving the
    positions (int32, in x) and original bits (``vals``: uint32 for float32, uint16 for bfloat16)
    of the entries subtraction cannot restore. ``bits``: uint16 [T, ceil(len(x)/8)] byte pairs
    (``switch_pairs``). Stops at a tile boundary when ``pos`` runs short (fewer than
    SWITCH_TILE + SWITCH_SLACK entries); returns (entries done, entries saved)."""
    done, saved = _k("switch_apply")(x, bits, coefs, 0, pos, vals)
    return int(done), int(saved)


def switch_remove(x: np.ndarray, bits: np.ndarray, coefs: np.ndarray, pos: np.ndarray, vals: np.ndarray, begin: int = 0) -> None:
    """Undo ``switch_apply`` on x[begin:] (``begin`` a multiple of 8): subtract again and write
    the saved entries (positions in x) back."""
    _k("switch_remove")(x, bits, coefs, begin, x.shape[0], pos, vals)


def switch_swap(
    x: np.ndarray,
    bits_a: np.ndarray,
    coefs_a: np.ndarray,
    pos_a: np.ndarray,
    vals_a: np.ndarray,
    bits_b: np.ndarray,
    coefs_b: np.ndarray,
    start: int,
    pos: np.ndarray,
    vals: np.ndarray,
) -> tuple[int, int]:
    """From combination A (applied to x by ``switch_apply``, saved entries pos_a/vals_a) to B on
    x[start:] in one pass, bitwise as ``switch_remove`` then ``switch_apply`` would leave it; B's
    saved positions count from ``start``. Stops like ``switch_apply``; returns (where it stopped
    in x, entries saved)."""
    done, saved = _k("switch_swap")(x, bits_a, coefs_a, pos_a, vals_a, bits_b, coefs_b, start, pos, vals)
    return int(done), int(saved)


def warm() -> float:
    """Compile every kernel for bfloat16 and float32 inputs (or load it from numba's disk
    cache, ~0.6 s a process): the first use after an install otherwise pays the compile
    (a few seconds). Returns the seconds it took; a no-op where the kernels are off."""
    import time

    t0 = time.perf_counter()
    if not available():
        return 0.0
    for np_dtype in (np.uint16, np.float32):  # bfloat16 bits, float32
        base, fts, out = np.zeros(16, np_dtype), np.zeros((2, 16), np_dtype), np.zeros(16, np.float32)
        linear_block(base, fts, True, [1.0, 1.0], out)
        ties_block(base, fts, True, [0.0, 0.0], 1.0, out)
        kth_abs_tau(base, fts[0], True, 3)
        _k("sample_keys")(base, fts[0], True, 2, np.zeros(8, np.uint32))
        bits, coefs = np.zeros((1, 2), np.uint16), np.ones(1, np.float32)
        x = np.zeros(16, np_dtype)
        (pos, vals), (pos2, vals2) = (
            (np.zeros(SWITCH_TILE + SWITCH_SLACK, np.int32), np.zeros(SWITCH_TILE + SWITCH_SLACK, _bits_of(np_dtype)))
            for _ in range(2)
        )
        _, n = switch_apply(x, bits, coefs, pos, vals)
        _, n = switch_swap(x, bits, coefs, pos[:n], vals[:n], bits, coefs, 0, pos2, vals2)
        switch_remove(x, bits, coefs, pos2[:n], vals2[:n])
    return time.perf_counter() - t0


def kth_abs_tau(base: np.ndarray, ft: np.ndarray, subtract: bool, k: int) -> float:
    """Exact k-th largest |ft - base| (|ft| if not ``subtract``) in float32, 1 <= k <= n.

    A strided sample brackets the answer's key; one pass counts the keys above the bracket
    and histograms (and, while they fit, gathers) those inside it. The answer is then
    selected among the gathered keys, or is the only key of its histogram bin (bf16
    fine-tunes give few distinct |tau| values, so this is the usual case), or the next pass
    scans just that bin's key range. If the bracket missed, the same runs from the whole
    key range. Inputs are finite (the engine checked them); ties are ordinary keys and -0.0
    counts as 0.
    """
    n = ft.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} values (1 <= k <= numel)")
    from mergeflow.select import _pick  # the radix digit pick, shared (select imports this module)

    scan, select = _k("scan_keys"), _k("select_keys")
    lo, hi, r, bracketed = 0, _KEY_MAX, k, False
    if n >= SAMPLE_MIN_N:
        stride = n // _SAMPLE
        sample = np.empty((n + stride - 1) // stride, np.uint32)
        _k("sample_keys")(base, ft, subtract, stride, sample)
        lo, hi = _bracket(sample, k / n)
        bracketed = True
    band = np.empty(_band_size(n), np.uint32)
    while True:
        shift = max(0, (hi - lo).bit_length() - 16)
        bins = ((hi - lo) >> shift) + 1
        hist, bmin, bmax = np.zeros(bins, np.int64), np.full(bins, _KEY_MAX, np.uint32), np.zeros(bins, np.uint32)
        ge, inside = scan(base, ft, subtract, lo, hi, shift, hist, bmin, bmax, band)
        if bracketed:
            bracketed = False
            above = ge - inside
            if not above < k <= above + inside:  # the sample misled us: start over from every key
                lo, hi, r = 0, _KEY_MAX, k
                continue
            r = k - above
        if lo == hi:  # a one-key band (counted, not gathered) holding the answer
            return _float(lo)
        if inside <= band.size:  # all gathered (no histogram was made)
            return _float(int(select(band[:inside], lo, hi, r)))
        j, r = _pick(hist, r)
        if bmin[j] == bmax[j]:
            return _float(int(bmin[j]))
        lo, hi = int(bmin[j]), int(bmax[j])


def _band_size(n: int) -> int:
    """Keys a counting pass may gather (beyond that it histograms): ~1.5 bracket widths."""
    return max(1 << 16, n >> 5)


def _bracket(sample: np.ndarray, q: float) -> tuple[int, int]:
    """Keys [lo, hi] that hold the q-quantile from the top with ~6 sigma of the sample rank."""
    m = sample.size
    margin = 6 * math.sqrt(m * q * (1 - q)) + 16
    r_hi, r_lo = math.floor(q * m - margin), math.ceil(q * m + margin)
    ranks = [r for r in (r_hi, r_lo) if 1 <= r <= m]
    part = np.partition(sample, sorted({m - r for r in ranks})) if ranks else sample
    hi = int(part[m - r_hi]) if r_hi >= 1 else _KEY_MAX
    lo = int(part[m - r_lo]) if r_lo <= m else 0
    return lo, hi


def _float(key: int) -> float:
    return float(np.array([key], np.uint32).view(np.float32)[0])
