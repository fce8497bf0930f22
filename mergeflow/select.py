"""Exact magnitude thresholds without sorting: radix select on the float bit patterns.

For non-negative IEEE floats the bit pattern, read as a signed integer, is ordered like the
value, so the k-th largest value is found exactly, digit by digit (16 bits at a time), from
histograms (ties, zeros, denormals and +inf are ordinary keys; float64 is selected exactly).
A large float32/float64 tensor first tries a sampled bracket; if it misses, the streaming
radix select runs instead, so the sample changes the speed, never the answer.

On the CPU, float32 and bfloat16 go to the fused numba kernel of ``mergeflow.kernels``; this
module is the portable path (CUDA, float16/float64, and MERGEFLOW_KERNELS=torch): one
algorithm on torch tensors (CUDA) or zero-copy numpy views (CPU), using only operators the
two share plus the helpers ``_count``, ``_cat`` and ``_bincount``.

-0.0 counts as zero (its sign bit is cleared). NaN and negative values raise ValueError,
found by one ``aminmax`` reduction. The algorithm and back ends: docs/internals.md#select.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence, Union, cast

import numpy as np
import torch

from mergeflow import kernels

_DIGIT = 16
_NUMPY_DEVICES = ("cpu",)  # devices whose keys go through numpy (tests empty it to run torch's path)
_CPU_CHUNK = 1 << 18  # elements per streamed chunk on CPU: temporaries stay in cache
_GPU_CHUNK = 1 << 26  # on accelerators: few, large kernels
_SAMPLE = 1 << 16  # sample size for the bracket shortcut
SAMPLE_MIN_N = 1 << 20  # below this the plain radix select is already cheap
_MAX_BAND = 1 << 22  # most keys the shortcut may gather before giving up

_F32_INF = 0x7F800000  # float32 +inf as a key; NaN keys are larger

Keys = Union[np.ndarray, torch.Tensor]  # integer keys: numpy on CPU, torch elsewhere
Chunks = Callable[[], Iterator[Keys]]  # re-iterable stream of non-negative keys

_KEY_DTYPES = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _key_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype whose values order the floats of ``dtype`` (same width)."""
    if dtype not in _KEY_DTYPES:
        raise TypeError(f"expected a floating-point tensor (float16/bfloat16/float32/float64), got {dtype}")
    return _KEY_DTYPES[dtype]


def _keys(flat: torch.Tensor, clear_sign: bool) -> Chunks:
    """Stream a 1-D float tensor as integer keys, chunk by chunk (sign bit cleared if asked,
    which maps -0.0 to 0 and changes nothing else in validated, non-negative input)."""
    key = _key_dtype(flat.dtype)
    sign_off = torch.iinfo(key).max
    cpu = flat.device.type in _NUMPY_DEVICES

    def gen() -> Iterator[Keys]:
        for chunk in flat.split(_CPU_CHUNK if cpu else _GPU_CHUNK):
            k = chunk.view(key).numpy() if cpu else chunk.view(key)
            yield k & sign_off if clear_sign else k

    return gen


def _count(mask: Keys) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(torch.count_nonzero(mask))


def _cat(parts: list[Keys]) -> Keys:
    # the chunks of one stream are all numpy or all torch
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(cast("list[torch.Tensor]", parts))


def _bincount(digits: Keys) -> np.ndarray:
    """Histogram of 16-bit digits (int64, 64Ki bins)."""
    if isinstance(digits, np.ndarray):
        return np.bincount(digits, minlength=1 << _DIGIT)
    return torch.bincount(digits.int(), minlength=1 << _DIGIT).cpu().numpy()


def _check(values: torch.Tensor) -> bool:
    """Refuse NaN and negatives; return whether the tensor holds a zero (which may be -0.0)."""
    if values.numel() == 0:
        return False
    lo, hi = (float(v) for v in torch.aminmax(values.detach().reshape(-1)))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("values contain NaN: no magnitude threshold is defined")
    if lo < 0:
        raise ValueError(f"values must be non-negative (got {lo}); pass magnitudes, e.g. x.abs()")
    return lo == 0


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(digit holding the k-th largest key, its rank among the keys of that digit)."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))
    return hist.size - 1 - i, k - (int(from_top[i - 1]) if i else 0)


def _radix(chunks: Chunks, k: int, bits: int) -> int:
    """The k-th largest non-negative key: one streaming histogram pass per 16-bit digit."""
    prefix = 0
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        top = shift + _DIGIT == bits
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        for c in chunks():
            if not top:  # only the keys under the prefix found so far
                c = c[(c >> (shift + _DIGIT)) == prefix]
            hist += _bincount(c >> shift if top else (c >> shift) & 0xFFFF)
        if k > int(hist.sum()):  # only possible at the top digit, for a streamed source
            raise ValueError(f"k={k} is out of range for {int(hist.sum())} values (1 <= k <= numel)")
        digit, k = _pick(hist, k)
        prefix = (prefix << _DIGIT) | digit
    return prefix


def _bracket(flat: torch.Tensor, k: int, bits: int) -> tuple[int, int]:
    """Key bounds [lo, hi] that a strided sample says hold the k-th largest, with margin."""
    n = flat.numel()
    strided = flat[:: max(1, n // _SAMPLE)]
    sample, m = _keys(strided, clear_sign=True), strided.numel()
    q = k / n
    margin = 6 * math.sqrt(m * q * (1 - q)) + 16  # ~6 standard deviations of the sample rank
    r_hi, r_lo = math.floor(q * m - margin), math.ceil(q * m + margin)
    ranks = [r for r in (r_hi, r_lo) if 1 <= r <= m]
    found = dict(zip(ranks, _sample_ranks(_cat(list(sample())), ranks)))
    hi = found[r_hi] if r_hi >= 1 else (1 << (bits - 1)) - 1
    lo = found[r_lo] if r_lo <= m else 0
    return lo, hi


def _sample_ranks(keys: Keys, ranks: list[int]) -> list[int]:
    """The r-th largest keys of a small sample (a fixed 64Ki keys: partitioning it is cheaper
    than two radix passes with their 64Ki-bin histograms)."""
    m = keys.shape[0]
    if isinstance(keys, np.ndarray):
        part = np.partition(keys, sorted({m - r for r in ranks}))
        return [int(part[m - r]) for r in ranks]
    ordered = torch.sort(keys).values
    return [int(ordered[m - r]) for r in ranks]


def _gather_band(keys: Chunks, lo: int, hi: int) -> tuple[int, int, Keys | None] | None:
    """One pass: (keys > hi, keys in [lo, hi], those keys), or None once more than
    _MAX_BAND keys fall inside. If lo == hi the keys are only counted (band None)."""
    at_least_lo, size, band = 0, 0, []
    for c in keys():
        inside = c >= lo
        at_least_lo += _count(inside)
        inside &= c <= hi
        if lo == hi:
            size += _count(inside)
            continue
        band.append(c[inside])
        size += band[-1].shape[0]
        if size > _MAX_BAND:
            return None
    return at_least_lo - size, size, _cat(band) if band else None


def _shortcut(flat: torch.Tensor, keys: Chunks, k: int, bits: int) -> int | None:
    """The k-th largest key via a sampled bracket, or None if the bracket missed."""
    lo, hi = _bracket(flat, k, bits)
    gathered = _gather_band(keys, lo, hi)
    if gathered is None:
        return None
    above, size, band = gathered
    if not above < k <= above + size:
        return None
    if lo == hi:
        return lo
    assert band is not None  # lo < hi: the keys inside were gathered
    return _radix(lambda: iter((band,)), k - above, bits)


def _kth(values: torch.Tensor, k: int, has_zero: bool) -> torch.Tensor:
    """kth_largest after validation. 16-bit floats need one histogram pass, so no shortcut."""
    flat = values.detach().reshape(-1)
    key = _key_dtype(flat.dtype)
    if flat.device.type in _NUMPY_DEVICES and kernels.supported(flat) and flat.is_contiguous() and kernels.available():
        a = kernels.as_array(flat)  # the fused kernel: sampled bracket + one counting pass, no temporaries
        value = kernels.kth_abs_tau(a, a, False, k)
        return torch.tensor(value, dtype=torch.float32).to(values.dtype).to(values.device)
    bits = torch.iinfo(key).bits
    keys = _keys(flat, clear_sign=has_zero)
    found = _shortcut(flat, keys, k, bits) if bits > _DIGIT and flat.numel() >= SAMPLE_MIN_N else None
    if found is None:
        found = _radix(keys, k, bits)
    return torch.tensor(found, dtype=key).view(values.dtype).to(values.device)


def kth_largest(values: torch.Tensor, k: int, checked: bool = False) -> torch.Tensor:
    """Exact k-th largest (1-indexed) of a float tensor of non-negative values (e.g. magnitudes).

    Returns a 0-dim tensor of the input's dtype and device. Raises ValueError if k < 1 or
    k > numel, or if the values hold NaN or negatives; TypeError for a non-float tensor.
    ``checked=True`` promises the values are finite and >= 0 (e.g. ``x.abs()`` of a
    checked tensor) and saves the validating pass.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} values (1 <= k <= numel)")
    return _kth(values, k, True if checked else _check(values))


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the entries >= kth_largest(values, k): ties at the threshold are kept, so
    the count may exceed k. k == 0 gives all False, k >= numel all True. Values non-negative."""
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    has_zero = _check(values)
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    return values >= _kth(values, k, has_zero)


def magnitude_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    """topk_mask(|x|, keep): the ``keep`` entries of largest magnitude, ties kept."""
    return topk_mask(x.abs(), keep)


def global_threshold(tensors: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]], k: int) -> torch.Tensor:
    """Exact k-th largest of |values| across many tensors (a whole model), never concatenated.

    The two histogram passes accumulate over the tensors one at a time: a callable is called
    once per pass and may stream tensors from disk; a plain iterable is held in a list. Work is
    in float32: float64 tensors are rounded to float32 (monotonic, so the result is the
    float32 rounding of the exact float64 threshold). Returns a 0-dim float32 CPU tensor.
    Raises ValueError if k is out of range or a tensor holds NaN.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    source = tensors if callable(tensors) else (lambda held=list(tensors): held)
    return global_thresholds(lambda: ((t,) for t in source()), [k])[0]


def global_thresholds(groups: Callable[[], Iterable[Sequence[torch.Tensor]]], ks: Sequence[int]) -> list[torch.Tensor]:
    """``global_threshold`` for several tensor streams at once (e.g. one per task), sharing passes.

    ``groups()`` yields, per step, one tensor per stream (a model's tensor for every task);
    it is called once per histogram pass (two: float32 keys have two 16-bit digits). Returns
    the exact ``ks[i]``-th largest |value| of stream i (float32, 0-dim); ``ks[i] == 0``
    gives +inf (keep nothing). Raises ValueError for k out of range or NaN.
    """
    ks = [int(k) for k in ks]
    if any(k < 0 for k in ks):
        raise ValueError(f"k must be >= 0 (got {min(ks)})")
    prefixes, ranks, totals = [0] * len(ks), list(ks), [0] * len(ks)
    for shift in (_DIGIT, 0):
        hists = [np.zeros(1 << _DIGIT, dtype=np.int64) for _ in ks]
        for group in groups():
            for i, t in enumerate(group):
                if ks[i] == 0:
                    continue
                flat = t.detach().reshape(-1)
                flat = flat if flat.dtype == torch.float32 else flat.float()
                for c in _keys(flat, clear_sign=True)():
                    if shift:
                        if _count(c > _F32_INF):
                            raise ValueError("tensors contain NaN: no magnitude threshold is defined")
                        hists[i] += _bincount(c >> shift)
                    else:
                        hists[i] += _bincount(c[(c >> _DIGIT) == prefixes[i]] & 0xFFFF)
        for i, k in enumerate(ks):
            if k == 0:
                continue
            if shift:
                totals[i] = int(hists[i].sum())
                if k > totals[i]:
                    raise ValueError(f"k={k} is out of range for {totals[i]} values (1 <= k <= numel)")
            digit, ranks[i] = _pick(hists[i], ranks[i])
            prefixes[i] = (prefixes[i] << _DIGIT) | digit
    return [
        torch.tensor(float("inf")) if k == 0 else torch.tensor(p, dtype=torch.int32).view(torch.float32)
        for k, p in zip(ks, prefixes)
    ]
