"""The numba kernels behind ``mergeflow.kernels`` (imported lazily: numba costs ~0.2 s to import).

Top-level functions only: numba caches compiled code on disk per function, and a closure's
cache entry would never be found again.
"""
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
            part = src[start:start + n]  # indexing by the loop variable alone lets LLVM vectorise
            for i in range(n):
                bits[i] = np.uint32(part[i]) << np.uint32(16)
        return impl
    if isinstance(src, types.Array) and src.dtype == types.float32:
        def impl(src, start, n, dst):
            part = src[start:start + n]
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

jit = nb.njit(nogil=True, cache=True, error_model="numpy")
# a*b + c contracted into one fused multiply-add where the CPU has one, as torch's
# vectorised add(x, alpha=w) computes it: the linear kernel then matches torch bit for bit
jit_fma = nb.njit(nogil=True, cache=True, error_model="numpy", fastmath={"contract"})


@jit
def load_taus(base, fts, subtract, s, m, b, taus):
    """Tile [s, s+m): base into b, task vectors into taus[t*TILE:]."""
    widen(base, s, m, b)
    for t in range(fts.shape[0]):
        row = taus[t * TILE:(t + 1) * TILE]
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
            row = taus[t * TILE:t * TILE + m]
            for i in range(m):
                acc[i] += row[i] * w
        o = out[s:s + m]
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
            row = taus[t * TILE:t * TILE + m]
            for i in range(m):
                v = row[i] if abs(row[i]) >= thr else zero
                row[i] = v
                total[i] += v
        for i in range(m):  # gamma = sign(sum)
            g = total[i]
            total[i] = one if g > zero else (-one if g < zero else zero)
        for t in range(T):  # disjoint mean over entries agreeing with gamma
            row = taus[t * TILE:t * TILE + m]
            for i in range(m):
                agree = row[i] * total[i] > zero
                num[i] += row[i] if agree else zero
                count[i] += one if agree else zero
        o = out[s:s + m]
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

def _luts():
    j = np.arange(8)
    keep = ((np.arange(256)[:, None] >> j) & 1).astype(np.float32)  # byte -> its 8 keep bits as 0/1
    sign = (1 - 2 * ((np.arange(256)[:, None] >> j) & 1)).astype(np.float32)  # byte -> +1 / -1
    return keep, sign


KEEP_LUT, SIGN_LUT = _luts()


@jit
def _switch_steps(bits, coefs, start, m, d):
    """d[i] = +0.0 + sum_t coefs[t] * B_t(start + i) for i < m (rounded up to a multiple of 8),
    B_t from keep/sign bitmaps bits[t, byte, 0/1] (bit j of byte b is entry 8b + j of the
    chunk); ``start`` is a multiple of 8. Each byte pair expands through two 256-entry tables
    into 8 lanes at once."""
    keep_lut, sign_lut = KEEP_LUT, SIGN_LUT
    m8 = (m + 7) >> 3
    b0 = start >> 3
    for i in range(m8 * 8):
        d[i] = np.float32(0.0)
    for t in range(bits.shape[0]):
        c = coefs[t]
        for b in range(m8):
            kr = keep_lut[bits[t, b0 + b, 0]]
            sr = sign_lut[bits[t, b0 + b, 1]]
            o = d[8 * b:8 * b + 8]
            for j in range(8):
                o[j] += c * (kr[j] * sr[j])


@nb.njit(nogil=True, cache=True, inline="always")
def _rne_bf16(u):
    """float32 bits -> bfloat16 bits, round to nearest even (torch's rule, NaN -> 0x7FC0)."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))


@jit
def switch_apply(x, bits, coefs, pos, vals):
    """x (float32, or bfloat16 as uint16 bits) += the step d, as y = x - (0 - d) computed in
    float32 (bfloat16: rounded once to nearest even), which leaves every entry with d = +0
    bitwise as it was. Entries where removal's z = y - d would not give x back bitwise have
    their chunk positions and original values saved in pos/vals; returns how many."""
    n = x.shape[0]
    d = np.empty(TILE, np.float32)
    f = np.empty(TILE, np.float32)
    fb = f.view(np.uint32)
    g = np.empty(TILE, np.float32)
    gb = g.view(np.uint32)
    h = np.empty(TILE, np.float32)
    hb = h.view(np.uint32)
    yh = np.empty(TILE, np.uint16)
    saved = 0
    zero = np.float32(0.0)
    for s in range(0, n, TILE):
        m = min(TILE, n - s)
        _switch_steps(bits, coefs, s, m, d)
        widen(x, s, m, f)
        xs = x[s:s + m]
        for i in range(m):
            g[i] = f[i] - (zero - d[i])  # y, in float32
        if is_f32(x):
            for i in range(m):
                h[i] = g[i] - d[i]  # z
            for i in range(m):
                if hb[i] != fb[i]:
                    pos[saved] = s + i
                    vals[saved] = xs[i]
                    saved += 1
            for i in range(m):
                xs[i] = g[i]
        else:
            for i in range(m):
                yh[i] = _rne_bf16(gb[i])
            for i in range(m):
                hb[i] = np.uint32(yh[i]) << np.uint32(16)
            for i in range(m):
                h[i] -= d[i]  # z before rounding
            for i in range(m):
                if _rne_bf16(hb[i]) != xs[i]:
                    pos[saved] = s + i
                    vals[saved] = xs[i]
                    saved += 1
            for i in range(m):
                xs[i] = yh[i]
    return saved


@jit
def switch_remove(x, bits, coefs, pos, vals):
    """Undo ``switch_apply``: x -= d (same arithmetic), then the saved entries written back."""
    n = x.shape[0]
    d = np.empty(TILE, np.float32)
    f = np.empty(TILE, np.float32)
    fb = f.view(np.uint32)
    for s in range(0, n, TILE):
        m = min(TILE, n - s)
        _switch_steps(bits, coefs, s, m, d)
        widen(x, s, m, f)
        xs = x[s:s + m]
        if is_f32(x):
            for i in range(m):
                xs[i] = f[i] - d[i]
        else:
            for i in range(m):
                f[i] -= d[i]
            for i in range(m):
                xs[i] = _rne_bf16(fb[i])
    for j in range(pos.shape[0]):
        x[pos[j]] = vals[j]
