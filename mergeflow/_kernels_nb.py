"""The numba kernels behind ``mergeflow.kernels`` (imported lazily: numba costs ~0.2 s to import).

Top-level functions only: numba caches compiled code on disk per function, and a closure's
cache entry would never be found again. Over 400 lines on purpose, as one module: the merge
kernels and the switch runtime's LLVM intrinsics share the overloads and helpers at the top,
and numba resolves them only inside the module where they are defined.
"""
import numpy as np
import numba as nb
from numba import types
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic, overload

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
#
# Per 16 entries: one 32-bit load of their keep/sign byte pairs becomes two lane masks, the step
# is a masked select of +-c (several switches: summed into a tile buffer first), the update and
# the bitwise check "would removal restore it?" run in SIMD registers, and the entries to save
# are appended with a vector compress (vpcompressd on AVX-512, LLVM's generic expansion
# elsewhere) instead of a data-dependent branch per entry. Hot loops make no array views (each
# costs reference counting) and read the bits with unchecked loads.

SW_TILE = 2048  # entries per tile: the tile's buffers stay in L1
SW_SLACK = 16  # pos/vals need this many entries beyond the last one saved (whole-vector stores)

_I32 = ir.IntType(32)


@intrinsic
def _f2u(typingctx, v):
    """float32 -> its bits (uint32)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _I32)
    return types.uint32(types.float32), codegen


@intrinsic
def _u2f(typingctx, v):
    """uint32 bits -> float32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _declare(module, name, ret, args):
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _splat(builder, vty, value):
    first = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _step_vector(builder, w, c):
    """<16 x float>: the steps c * B of the 16 entries whose two byte pairs (keep | sign << 8)
    ``w`` holds: +c where kept and positive, -c where kept and negative, +0.0 elsewhere."""
    i16, v16, v1 = ir.IntType(16), ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(1), 16)
    low, high = ir.Constant(_I32, 0xFF), ir.Constant(_I32, 0xFF00)
    keep = builder.or_(builder.and_(w, low), builder.and_(builder.lshr(w, ir.Constant(_I32, 8)), high))
    sign = builder.or_(builder.and_(builder.lshr(w, ir.Constant(_I32, 8)), low),
                       builder.and_(builder.lshr(w, ir.Constant(_I32, 16)), high))
    km = builder.bitcast(builder.trunc(keep, i16), v1)
    sm = builder.bitcast(builder.trunc(sign, i16), v1)
    signed = builder.select(sm, _splat(builder, v16, builder.fneg(c)), _splat(builder, v16, c))
    return builder.select(km, signed, ir.Constant(v16, None))


def _step16_codegen(add):
    def codegen(context, builder, sig, args):
        w, c, dary, i = args
        v16 = ir.VectorType(ir.FloatType(), 16)
        val = _step_vector(builder, w, c)
        data = context.make_array(sig.args[2])(context, builder, dary).data
        ptr = builder.bitcast(builder.gep(data, [i]), v16.as_pointer())
        if add:
            val = builder.fadd(builder.load(ptr, align=4), val)
        builder.store(val, ptr, align=4)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _set16(typingctx, w, c, d, i):
    """d[i:i+16] = the 16 steps c * B of one uint32 holding two byte pairs (keep | sign << 8):
    +c where kept and positive, -c where kept and negative, +0.0 elsewhere (masked selects)."""
    return types.none(types.uint32, types.float32, d, types.intp), _step16_codegen(False)


@intrinsic
def _add16(typingctx, w, c, d, i):
    """d[i:i+16] += the 16 steps of ``_set16``."""
    return types.none(types.uint32, types.float32, d, types.intp), _step16_codegen(True)


@jit
def _steps(bits, coefs, b0, m, d):
    """d[i] = +0.0 + sum_t coefs[t] * B_t(8*b0 + i) for i < m (and up to the next multiple of
    16: d needs that slack). bits[t] holds switch t's byte pairs keep | sign << 8 (uint16).
    Summed in switch order from +0.0; where B_t = 0 the term is +0.0 (not c * 0 = -0.0 for
    c < 0: the sums agree bitwise, since d is never -0.0)."""
    full = m & ~15  # blocks whose two byte pairs both exist
    for t in range(bits.shape[0]):
        c = coefs[t]
        for i in range(0, m, 16):
            w = _pairs32(bits, t, b0 + (i >> 3)) if i < full else _word(bits, t, b0 + (i >> 3))
            if t == 0:
                _set16(w, c, d, i)
            else:
                _add16(w, c, d, i)


@nb.njit(nogil=True, cache=True, inline="always")
def _rne_bf16(u):
    """float32 bits -> bfloat16 bits, round to nearest even (torch's rule, NaN -> 0x7FC0)."""
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))


def _x16(context, builder, sig, xa, i):
    """(pointer to x[i:i+16] as a vector, that vector as float32 lanes, its raw bits)."""
    half = sig.args[0].dtype.bitwidth == 16
    v16, vi32 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I32, 16)
    vx = ir.VectorType(ir.IntType(16 if half else 32), 16)
    data = context.make_array(sig.args[0])(context, builder, xa).data
    xp = builder.bitcast(builder.gep(data, [i]), vx.as_pointer())
    xbits = builder.load(xp, align=vx.element.width // 8)
    if half:
        return xp, builder.bitcast(builder.shl(builder.zext(xbits, vi32), ir.Constant(vi32, [16] * 16)), v16), xbits
    return xp, builder.bitcast(xbits, v16), xbits


def _rne16(builder, f, vx):
    """float32 lanes -> bfloat16 bits (vx), nearest even, NaN -> 0x7FC0 (as ``_rne_bf16``)."""
    vi32 = ir.VectorType(_I32, 16)

    def splat32(value):
        return ir.Constant(vi32, [value] * 16)

    u = builder.bitcast(f, vi32)
    lsb = builder.and_(builder.lshr(u, splat32(16)), splat32(1))
    r = builder.lshr(builder.add(builder.add(u, lsb), splat32(0x7FFF)), splat32(16))
    nan = builder.icmp_unsigned(">", builder.and_(u, splat32(0x7FFFFFFF)), splat32(0x7F800000))
    return builder.trunc(builder.select(nan, splat32(0x7FC0), r), vx)


def _sub16_codegen(context, builder, sig, args):
    """x[i:i+16] -= the steps of (w, c), as ``switch_remove`` computes it (bfloat16: rounded once)."""
    xa, w, c, i = args
    xp, x, xbits = _x16(context, builder, sig, xa, i)
    z = builder.fsub(x, _step_vector(builder, w, c))
    if sig.args[0].dtype.bitwidth == 16:
        builder.store(_rne16(builder, z, xbits.type), xp, align=2)
    else:
        builder.store(builder.bitcast(z, xbits.type), xp, align=4)
    return context.get_dummy_value()


@intrinsic
def _sub16w(typingctx, x, w, c, i):
    """x[i:i+16] -= the 16 steps of one switch (see ``_step_vector``)."""
    return types.none(x, types.uint32, types.float32, types.intp), _sub16_codegen


def _apply16w_codegen(context, builder, sig, args):
    xa, w, c, i, pa, va, base, saved = args
    return _apply16_body(context, builder, sig, (xa, i, pa, va, base, saved), (4, 5), lambda: _step_vector(builder, w, c))


def _apply16_codegen(context, builder, sig, args):
    xa, da, i, pa, va, base, saved = args
    v16 = ir.VectorType(ir.FloatType(), 16)

    def steps():
        data = context.make_array(sig.args[1])(context, builder, da).data
        return builder.load(builder.bitcast(builder.gep(data, [i]), v16.as_pointer()), align=4)
    return _apply16_body(context, builder, sig, (xa, i, pa, va, base, saved), (3, 4), steps)


def _apply16_body(context, builder, sig, args, out_types, step):
    """16 entries of ``switch_apply`` in SIMD registers: y = x - (0 - d) (bfloat16: widened, rounded
    once to nearest even), z = y - d likewise, y stored, and the lanes where z differs from x
    bitwise compressed onto pos/vals (positions base + i + lane, original bits). ``out_types``:
    the positions of pos and vals among the intrinsic's arguments; ``step()`` makes d."""
    xa, i, pa, va, base, saved = args
    xty = sig.args[0]
    half = xty.dtype.bitwidth == 16
    f32, v16 = ir.FloatType(), ir.VectorType(ir.FloatType(), 16)
    vi32, v1 = ir.VectorType(_I32, 16), ir.VectorType(ir.IntType(1), 16)
    vx = ir.VectorType(ir.IntType(16 if half else 32), 16)

    def ptr(k, ary, index, vty):
        data = context.make_array(sig.args[k])(context, builder, ary).data
        return builder.bitcast(builder.gep(data, [index]), vty.as_pointer())

    def widen(h):  # bfloat16 bits -> float32
        return builder.bitcast(builder.shl(builder.zext(h, vi32), ir.Constant(vi32, [16] * 16)), v16)

    xp, x, xbits = _x16(context, builder, sig, xa, i)
    d = step()
    y = builder.fsub(x, builder.fsub(ir.Constant(v16, None), d))
    ybits = _rne16(builder, y, vx) if half else builder.bitcast(y, vx)
    z = builder.fsub(widen(ybits) if half else y, d)
    zbits = _rne16(builder, z, vx) if half else builder.bitcast(z, vx)
    mask = builder.icmp_unsigned("!=", zbits, xbits)
    builder.store(ybits, xp, align=vx.element.width // 8)
    index = builder.add(_splat(builder, vi32, builder.trunc(builder.add(base, i), _I32)), ir.Constant(vi32, list(range(16))))
    pos_k, vals_k = out_types
    for k, ary, vec, vty in ((vals_k, va, xbits, vx), (pos_k, pa, index, vi32)):
        name = f"llvm.experimental.vector.compress.v16i{vty.element.width}"
        packed = builder.call(_declare(builder.module, name, vty, [vty, v1, vty]), [vec, mask, ir.Constant(vty, None)])
        builder.store(packed, ptr(k, ary, saved, vty), align=vty.element.width // 8)
    i16 = ir.IntType(16)
    count = builder.call(_declare(builder.module, "llvm.ctpop.i16", i16, [i16]), [builder.bitcast(mask, i16)])
    return builder.add(saved, builder.zext(count, ir.IntType(64)))


@intrinsic
def _apply16(typingctx, x, d, i, pos, vals, base, saved):
    """Entries i..i+15 of x (float32, or bfloat16 as uint16 bits) plus the steps d[i:i+16]; see
    ``_apply16_body``. Returns the new count of saved entries (pos/vals need SW_SLACK spare)."""
    return types.intp(x, d, types.intp, pos, vals, types.intp, types.intp), _apply16_codegen


@intrinsic
def _apply16w(typingctx, x, w, c, i, pos, vals, base, saved):
    """``_apply16`` with the steps of one switch made in registers from its bits ``w`` and ``c``."""
    return types.intp(x, types.uint32, types.float32, types.intp, pos, vals, types.intp, types.intp), _apply16w_codegen


@intrinsic
def _pairs32(typingctx, bits, t, b):
    """Switch t's byte pairs b and b + 1 as one uint32 (one unaligned load, no bounds or
    negative-index checks: the caller guarantees both exist)."""
    def codegen(context, builder, sig, args):
        ary, t, b = args
        arr = context.make_array(sig.args[0])(context, builder, ary)
        strides = cgutils.unpack_tuple(builder, arr.strides, 2)
        offset = builder.add(builder.mul(t, strides[0]), builder.mul(b, strides[1]))
        raw = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()), [offset])
        return builder.load(builder.bitcast(raw, _I32.as_pointer()), align=1)
    return types.uint32(bits, types.intp, types.intp), codegen


@nb.njit(nogil=True, cache=True, inline="always")
def _word(bits, t, b):
    """The uint32 of switch t's byte pairs b and b + 1 (the second 0 past the end). Scalar
    indexing only: hot loops must not make array views (each costs reference counting)."""
    w = np.uint32(bits[t, b])
    if b + 1 < bits.shape[1]:
        w |= np.uint32(bits[t, b + 1]) << np.uint32(16)
    return w


@jit
def _apply_tile(x, s, m, bits, coefs, d, pos, vals, saved, origin):
    """x[s:s+m] += the steps of bits/coefs (see ``switch_apply``), appending the entries to save
    (positions counted from ``origin``); returns the new count. One switch: the steps are made
    in registers; several: summed into d first (``_steps``)."""
    xs = x[s:s + m]
    base = s - origin
    zero = np.float32(0.0)
    m16 = m & ~15
    b0 = s >> 3
    if bits.shape[0] == 1:
        c = coefs[0]
        for i in range(0, m16, 16):  # both byte pairs of a full block exist
            saved = _apply16w(xs, _pairs32(bits, 0, b0 + (i >> 3)), c, i, pos, vals, base, saved)
        if m16 == m:
            return saved
        _set16(_word(bits, 0, b0 + (m16 >> 3)), c, d, m16)  # the steps of the last few entries
    else:
        _steps(bits, coefs, b0, m, d)
        for i in range(0, m16, 16):
            saved = _apply16(xs, d, i, pos, vals, base, saved)
    for i in range(m16, m):  # the last few entries of x, one by one
        xv = xs[i]
        if is_f32(x):
            y = xv - (zero - d[i])
            yb = _f2u(y)
            bad = _f2u(y - d[i]) != _f2u(xv)
            orig = _f2u(xv)
        else:
            yb = _rne_bf16(_f2u(_u2f(np.uint32(xv) << np.uint32(16)) - (zero - d[i])))
            bad = _rne_bf16(_f2u(_u2f(np.uint32(yb) << np.uint32(16)) - d[i])) != xv
            orig = np.uint32(xv)
        if bad:
            pos[saved] = base + i
            vals[saved] = orig
            saved += 1
        if is_f32(x):
            xs[i] = _u2f(yb)
        else:
            xs[i] = yb
    return saved


@jit
def _remove_tile(x, s, m, bits, coefs, d, pos, vals, j):
    """x[s:s+m] -= the steps of bits/coefs, then the saved entries pos[j:] below s + m written
    back; returns the index of the first saved entry not written."""
    xs = x[s:s + m]
    npos = pos.shape[0]
    b0 = s >> 3
    done = 0
    if bits.shape[0] == 1:
        c = coefs[0]
        done = m & ~15
        for i in range(0, done, 16):
            _sub16w(xs, _pairs32(bits, 0, b0 + (i >> 3)), c, i)
        if done < m:
            _set16(_word(bits, 0, b0 + (done >> 3)), c, d, done)
    else:
        _steps(bits, coefs, b0, m, d)
    if is_f32(x):
        for i in range(done, m):
            xs[i] = xs[i] - d[i]
        xw = x.view(np.uint32)  # vals hold bits
        while j < npos and pos[j] < s + m:
            xw[pos[j]] = vals[j]
            j += 1
    else:
        for i in range(done, m):
            xs[i] = _rne_bf16(_f2u(_u2f(np.uint32(xs[i]) << np.uint32(16)) - d[i]))
        while j < npos and pos[j] < s + m:
            x[pos[j]] = vals[j]
            j += 1
    return j


@jit
def switch_apply(x, bits, coefs, start, pos, vals):
    """Add the step d (see ``_steps``) to x[start:] in place, tile by tile, as y = x - (0 - d)
    in float32 (bfloat16, as its uint16 bits: widened, rounded once to nearest even), which
    leaves every entry with d = +0 bitwise as it was. Entries where removal's z = y - d would
    not give x back bitwise get their positions (counted from ``start``) and original values
    (bits) appended to pos/vals. Stops early when fewer than SW_TILE + SW_SLACK entries of pos are left; returns
    (where it stopped, entries saved). ``start`` is a multiple of 8."""
    n = x.shape[0]
    d = np.empty(SW_TILE + SW_SLACK, np.float32)
    saved = 0
    s = start
    while s < n and pos.shape[0] - saved >= SW_TILE + SW_SLACK:
        m = min(SW_TILE, n - s)
        saved = _apply_tile(x, s, m, bits, coefs, d, pos, vals, saved, start)
        s += m
    return s, saved


@jit
def switch_remove(x, bits, coefs, begin, end, pos, vals):
    """Undo ``switch_apply`` on x[begin:end] (``begin`` a multiple of 8): x -= d (same
    arithmetic), tile by tile, writing the saved entries (positions in x, ascending) inside
    [begin, end) back as each tile is done."""
    d = np.empty(SW_TILE + SW_SLACK, np.float32)
    j = np.searchsorted(pos, begin)
    for s in range(begin, end, SW_TILE):
        m = min(SW_TILE, end - s)
        j = _remove_tile(x, s, m, bits, coefs, d, pos, vals, j)


@jit
def switch_swap(x, bits_a, coefs_a, pos_a, vals_a, bits_b, coefs_b, start, pos, vals):
    """Go from combination A (applied by ``switch_apply`` with bits_a/coefs_a, its saved entries
    pos_a/vals_a) to combination B in one pass over x[start:]: per tile, A removed exactly as
    ``switch_remove`` does, then B applied exactly as ``switch_apply`` does (its saved entries
    appended to pos/vals, positions counted from ``start``) while the tile is in cache. Same
    results as the two calls; stops early like ``switch_apply``; returns (where it stopped,
    entries saved). pos_a holds positions in x."""
    n = x.shape[0]
    d = np.empty(SW_TILE + SW_SLACK, np.float32)
    j = np.searchsorted(pos_a, start)
    saved = 0
    s = start
    while s < n and pos.shape[0] - saved >= SW_TILE + SW_SLACK:
        m = min(SW_TILE, n - s)
        j = _remove_tile(x, s, m, bits_a, coefs_a, d, pos_a, vals_a, j)
        saved = _apply_tile(x, s, m, bits_b, coefs_b, d, pos, vals, saved, start)
        s += m
    return s, saved
