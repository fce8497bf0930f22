"""The numba kernels behind ``mergeflow.kernels`` (imported lazily: numba costs ~0.2 s to import).

Top-level functions only: numba caches compiled code on disk per function, and a closure's
cache entry would never be found again. The switch runtime's kernels (LLVM intrinsics) are in
``mergeflow._kernels_switch_nb``, re-exported here so ``mergeflow.kernels`` finds every kernel
in one module.
"""

from typing import Any

import numpy as np
import numba as nb
from numba import types
from numba.extending import overload


def widen(src, start, n, dst):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(widen, inline="always")
def _widen(src, start, n, dst):
    if isinstance(src, types.Array) and src.dtype == types.uint16:

        def impl(src, start, n, dst):  # bfloat16 bits -> float32: exact, a 16-bit shift
            bits = dst.view(np.uint32)
            part = src[start : start + n]  # indexing by the loop variable alone lets LLVM vectorise
            for i in range(n):
                bits[i] = np.uint32(part[i]) << np.uint32(16)

        return impl
    if isinstance(src, types.Array) and src.dtype == types.float32:

        def impl(src, start, n, dst):
            part = src[start : start + n]
            for i in range(n):
                dst[i] = part[i]

        return impl
    return None


def is_f32(x):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(is_f32, inline="always")
def _is_f32(x):
    flag = isinstance(x, types.Array) and x.dtype == types.float32
    return lambda x: flag


TILE = 1024  # elements per tile: a tile of every input stays in L1

# numba's decorators are Any to mypy (numba is not followed); annotated so the import cycle with
# _kernels_switch_nb does not leave their type undetermined there
jit: Any = nb.njit(nogil=True, cache=True, error_model="numpy")
# a*b + c contracted into one fused multiply-add where the CPU has one, as torch's
# vectorised add(x, alpha=w) computes it: the linear kernel then matches torch bit for bit
jit_fma: Any = nb.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})


@jit
def load_taus(base, fts, subtract, s, m, b, taus):
    """Tile [s, s+m): base into b, task vectors into taus[t*TILE:]."""
    widen(base, s, m, b)
    for t in range(fts.shape[0]):
        row = taus[t * TILE : (t + 1) * TILE]
        widen(fts[t], s, m, row)
        if subtract:
            for i in range(m):
                row[i] -= b[i]


@jit_fma
def linear_block(base, fts, subtract, weights, divisor, out):
    n, T = base.shape[0], fts.shape[0]
    b = np.empty(TILE, np.float32)
    acc = np.empty(TILE, np.float32)
    taus = np.empty(T * TILE, np.float32)
    for s in range(0, n, TILE):
        m = min(TILE, n - s)
        load_taus(base, fts, subtract, s, m, b, taus)
        w = weights[0]
        for i in range(m):
            acc[i] = taus[i] * w
        for t in range(1, T):
            w = weights[t]
            row = taus[t * TILE : t * TILE + m]
            for i in range(m):
                acc[i] += row[i] * w
        o = out[s : s + m]
        for i in range(m):
            o[i] = acc[i] / divisor + b[i]


@jit
def ties_block(base, fts, subtract, thresholds, scaling, out):
    # loops run over the tile's entries innermost (branch-free selects, vectorised);
    # same float32 operations in the same order as ties.disjoint_mean.
    n, T = base.shape[0], fts.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    b = np.empty(TILE, np.float32)
    total = np.empty(TILE, np.float32)
    num = np.empty(TILE, np.float32)
    count = np.empty(TILE, np.float32)
    taus = np.empty(T * TILE, np.float32)
    for s in range(0, n, TILE):
        m = min(TILE, n - s)
        load_taus(base, fts, subtract, s, m, b, taus)
        for i in range(m):
            total[i] = zero
            num[i] = zero
            count[i] = zero
        for t in range(T):  # trim; gamma's sum
            thr = thresholds[t]
            row = taus[t * TILE : t * TILE + m]
            for i in range(m):
                v = row[i] if abs(row[i]) >= thr else zero
                row[i] = v
                total[i] += v
        for i in range(m):  # gamma = sign(sum)
            g = total[i]
            total[i] = one if g > zero else (-one if g < zero else zero)
        for t in range(T):  # disjoint mean over entries agreeing with gamma
            row = taus[t * TILE : t * TILE + m]
            for i in range(m):
                agree = row[i] * total[i] > zero
                num[i] += row[i] if agree else zero
                count[i] += one if agree else zero
        o = out[s : s + m]
        for i in range(m):
            o[i] = (num[i] / max(count[i], one)) * scaling + b[i]


@jit
def _bin(key, lo32, shift, hist, bmin, bmax):
    j = np.uint32(key - lo32) >> shift
    hist[j] += 1
    bmin[j] = min(bmin[j], key)
    bmax[j] = max(bmax[j], key)


@jit
def scan_keys(base, ft, subtract, lo, hi, shift, hist, bmin, bmax, band):
    """One pass over the |tau| keys: returns (keys >= lo, keys in [lo, hi]). Keys in the band
    are gathered into ``band``; if more come than it holds, all of them are counted in
    ``hist`` by (key - lo) >> shift instead, with each bin's smallest and largest key in
    ``bmin``/``bmax`` (``band`` must hold at least one key)."""
    n = ft.shape[0]
    b = np.empty(TILE, np.float32)
    x = np.empty(TILE, np.float32)
    bits = x.view(np.uint32)
    width = np.uint32(hi - lo)
    lo32 = np.uint32(lo)
    cap = band.shape[0]
    ge = 0
    inside = 0
    for s in range(0, n, TILE):
        m = min(TILE, n - s)
        widen(ft, s, m, x)
        if subtract:
            widen(base, s, m, b)
            for i in range(m):
                x[i] -= b[i]
        for i in range(m):  # counting: a vectorised reduction
            key = bits[i] & np.uint32(0x7FFFFFFF)
            bits[i] = key
            ge += key >= lo32
        if width == 0:  # a one-key band (bf16 fine-tunes: often ~8% of all keys): count it
            for i in range(m):
                inside += bits[i] == lo32
            continue
        for i in range(m):  # the band: few keys, a well-predicted branch
            d = np.uint32(bits[i] - lo32)  # wraps for key < lo
            if d <= width:
                if inside < cap:  # gathering (cheap) until the band buffer is full ...
                    band[inside] = bits[i]
                    inside += 1
                    if inside == cap:  # ... then histogram what was gathered, and go on counting
                        for g in range(cap):
                            _bin(band[g], lo32, shift, hist, bmin, bmax)
                else:
                    _bin(bits[i], lo32, shift, hist, bmin, bmax)
                    inside += 1
    if width == 0 and inside:
        hist[0], bmin[0], bmax[0] = inside, lo32, lo32
    return ge, inside


@jit
def sample_keys(base, ft, subtract, stride, out):
    x = np.empty(1, np.float32)
    y = np.empty(1, np.float32)
    bits = x.view(np.uint32)
    for j in range(out.shape[0]):
        widen(ft, j * stride, 1, x)
        if subtract:
            widen(base, j * stride, 1, y)
            x[0] -= y[0]
        out[j] = bits[0] & np.uint32(0x7FFFFFFF)


@jit
def select_keys(keys, lo, hi, r):
    """The r-th largest of ``keys`` restricted to [lo, hi] (r counted from the top of that
    range): radix histograms over the range, narrowed 2^16-fold per pass."""
    while True:
        width = hi - lo
        shift = 0
        while (width >> shift) >= (1 << 16):
            shift += 1
        hist = np.zeros((width >> shift) + 1, np.int64)
        lo32, w32 = np.uint32(lo), np.uint32(width)
        for i in range(keys.shape[0]):
            d = np.uint32(keys[i] - lo32)
            if d <= w32:
                hist[d >> shift] += 1
        j = hist.shape[0] - 1
        while hist[j] < r:
            r -= hist[j]
            j -= 1
        if shift == 0:
            return lo + j
        lo, hi = lo + (j << shift), min(hi, lo + ((j + 1) << shift) - 1)


# --- the switch runtime: apply / remove weighted switches in place ------------------------------
#
# Per 16 entries: one 32-bit load of their keep/sign byte pairs becomes two lane masks, the step
# is a masked select of +-c (several switches: summed into a tile buffer first), the update and
# the bitwise check "would removal restore it?" run in SIMD registers, and the entries to save
# are appended with a vector compress (vpcompressd on AVX-512, LLVM's generic expansion
# elsewhere) instead of a data-dependent branch per entry. Hot loops make no array views (each
# costs reference counting) and read the bits with unchecked loads.


from mergeflow._kernels_switch_nb import switch_apply, switch_remove, switch_swap  # noqa: E402,F401  (re-exported)
