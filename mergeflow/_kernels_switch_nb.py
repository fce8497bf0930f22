"""The switch runtime's numba kernels (``mergeflow.kernels.switch_*``): apply, remove and swap a
combination of binary switches in place, 16 entries at a time in SIMD registers (LLVM intrinsics).

Imported by ``mergeflow._kernels_nb`` (which re-exports them); the shared overloads come from there.
"""

import numpy as np
import numba as nb
from numba import types
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

from mergeflow._kernels_nb import is_f32, jit

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
    return builder.shuffle_vector(
        first, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    )


def _step_vector(builder, w, c):
    """<16 x float>: the steps c * B of the 16 entries whose two byte pairs (keep | sign << 8)
    ``w`` holds: +c where kept and positive, -c where kept and negative, +0.0 elsewhere."""
    i16, v16, v1 = ir.IntType(16), ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(1), 16)
    low, high = ir.Constant(_I32, 0xFF), ir.Constant(_I32, 0xFF00)
    keep = builder.or_(builder.and_(w, low), builder.and_(builder.lshr(w, ir.Constant(_I32, 8)), high))
    sign = builder.or_(
        builder.and_(builder.lshr(w, ir.Constant(_I32, 8)), low), builder.and_(builder.lshr(w, ir.Constant(_I32, 16)), high)
    )
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
    xs = x[s : s + m]
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
    xs = x[s : s + m]
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
