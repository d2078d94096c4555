"""Quantized kernels for the "r8" layout (q4/q8 with 8 rows interleaved, quant/formats.py)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from amed.engine.backends.cpu.qdot import (JIT, PREFETCH_Q4, TB, array, c64, f32, half_to_f32, i16, i32, i64, i8, intrinsic_fn, is_c, madd, prepare_x, splat, vfma, vload, vt)
from amed.engine.backends.cpu.qrows import silu_mul

# ---- rows interleaved by 8 (layout "r8", see quants.interleave) -------------------------------
#
# The "rows" kernels above reduce each (row, group) dot product across vector lanes and then do a
# float convert / scale / FMA per row and group. In the r8 layout, the weights of 8 consecutive
# rows are interleaved 4 inputs at a time, so one <32 x i16> vector holds inputs k..k+3 of all 8
# rows; the 4 matching activations are broadcast to every row (one 8-byte broadcast load), and
# after vpmaddwd lane 2r+p belongs to row r. Over a group the sums stay vertical: no horizontal
# reduction at all, one pair-add at the group's end, then one convert and one FMA for 8 rows
# with the 8 rows' scales as a vector (s and z are stored [N/8, ng, 8]). A row block's
# activations are read once for 8 rows instead of once per row.
# Against the rows kernels: prefill clearly faster, decode level or better (docs/performance.md,
# "The r8 layout"). The integer sums are exact as before, so the results equal the rows kernels' up to float32
# summation order (~1e-7 relative).

R8 = 8                  # rows per interleaved block


@intrinsic
def _levels_per_byte(typingctx, q):
    """2 for a q4 array (uint8, two nibbles per byte), 1 for q8 (int8): a compile-time constant."""
    n = 2 if q.dtype == types.uint8 else 1

    def codegen(context, builder, sig, args):
        return ir.Constant(i64, n)
    return types.intp(q), codegen


def _make_r8dot(G: int, TB: int, nacc: int):
    """An intrinsic `r8dot(w, s, z, xq, sx, xs, b, t) -> UniTuple(float32, 8*TB)`: rows 8b..8b+7
    of an r8 matrix with tokens t..t+TB-1 of prepared activations; element 8j+r is row 8b+r with
    token t+j (a token past the end is read as the last one; its result is to be ignored). q4 when w is uint8; q8 when w is int8 (z and xs are then not read: pass s and sx).
    Shapes are trusted (the calling kernel checks them): w [N/8, ng, 8 rows x bytes per group],
    s/z uint16 [N/8, ng, 8], xq int16 [T, ng*G], sx/xs float32 [T, ng]. `nacc` independent int32
    accumulators per token hide the vpdpwssd latency chain when TB is small."""
    nchunk = G // 4                       # 4 inputs x 8 rows per <32 x i16> chunk

    def typer(w, s, z, xq, sx, xs):
        if not ((is_c(w, types.uint8, 3) or is_c(w, types.int8, 3)) and is_c(s, types.uint16, 3)
                and is_c(z, types.uint16, 3) and is_c(xq, types.int16, 2)
                and is_c(sx, types.float32, 2) and is_c(xs, types.float32, 2)):
            return None
        return types.UniTuple(types.float32, R8 * TB)(w, s, z, xq, sx, xs, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        w, s, z, xq, sx, xs, b, t = args
        tw, ts, tz, txq, tsx, txs = sig.args[:6]
        q4 = tw.dtype == types.uint8
        bpb = (4 if q4 else 8) * G                    # bytes per (row block, group)
        prefetch = PREFETCH_Q4 if q4 else 0
        wa, (_, ng, _) = array(context, builder, tw, w)
        sa, _ = array(context, builder, ts, s)
        xa, (T, K) = array(context, builder, txq, xq)
        sxa, _ = array(context, builder, tsx, sx)
        wblk = builder.gep(wa.data, [builder.mul(b, builder.mul(ng, c64(bpb)))])
        sblk = builder.gep(sa.data, [builder.mul(b, builder.mul(ng, c64(R8)))])
        last = builder.sub(T, c64(1))      # a token past the end reads the last one (result unused)
        toks = [builder.select(builder.icmp_signed("<", builder.add(t, c64(j)), T), builder.add(t, c64(j)), last)
                if j else t for j in range(TB)]
        xrows = [builder.gep(xa.data, [builder.mul(tj, K)]) for tj in toks]
        sxrows = [builder.gep(sxa.data, [builder.mul(tj, ng)]) for tj in toks]
        if q4:
            za, _ = array(context, builder, tz, z)
            xsa, _ = array(context, builder, txs, xs)
            zblk = builder.gep(za.data, [builder.mul(b, builder.mul(ng, c64(R8)))])
            xsrows = [builder.gep(xsa.data, [builder.mul(tj, ng)]) for tj in toks]
        v8 = vt(f32, R8)
        vi16 = vt(i32, 16)
        faccs = [cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(TB)]
        zaccs = [cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(TB)] if q4 else None
        m15 = ir.Constant(vt(i16, 32), [15] * 32)
        sh4 = ir.Constant(vt(i16, 32), [4] * 32)
        bcast = ir.Constant(vt(i32, 32), [0, 1, 2, 3] * R8)          # 4 inputs -> all 8 rows
        even = ir.Constant(vt(i32, R8), list(range(0, 16, 2)))
        odd = ir.Constant(vt(i32, R8), list(range(1, 16, 2)))
        if prefetch:
            pf = intrinsic_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])

        with cgutils.for_range(builder, ng) as lg:
            g = lg.index
            wg = builder.gep(wblk, [builder.mul(g, c64(bpb))])
            if prefetch:
                for off in range(0, bpb, 64):
                    p = builder.bitcast(builder.gep(wg, [c64(prefetch + off)]), i8.as_pointer())
                    builder.call(pf, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            xgs = [builder.gep(xr, [builder.mul(g, c64(G))]) for xr in xrows]
            iaccs = [[ir.Constant(vi16, None)] * nacc for _ in range(TB)]

            def chunks():
                if q4:    # 32 bytes: low nibbles = chunk 2m, high nibbles = chunk 2m+1
                    for m in range(G // 8):
                        v = builder.zext(vload(builder, wg, c64(32 * m), vt(i8, 32), 1), vt(i16, 32))
                        yield 2 * m, builder.and_(v, m15)
                        yield 2 * m + 1, builder.lshr(v, sh4)
                else:     # 32 bytes = one chunk of int8 levels
                    for m in range(nchunk):
                        yield m, builder.sext(vload(builder, wg, c64(32 * m), vt(i8, 32), 1), vt(i16, 32))

            for c, wv in chunks():
                for j in range(TB):
                    xv = vload(builder, xgs[j], c64(4 * c), vt(i16, 4), 2)
                    xb = builder.shuffle_vector(xv, xv, bcast)
                    iaccs[j][c % nacc] = madd(builder, wv, xb, iaccs[j][c % nacc])

            sv = half_to_f32(builder, vload(builder, sblk, builder.mul(g, c64(R8)), vt(i16, R8), 2))
            if q4:
                zv = half_to_f32(builder, vload(builder, zblk, builder.mul(g, c64(R8)), vt(i16, R8), 2))
            for j in range(TB):
                a = iaccs[j][0]
                for o in iaccs[j][1:]:
                    a = builder.add(a, o)
                rows = builder.add(builder.shuffle_vector(a, a, even), builder.shuffle_vector(a, a, odd))
                sc = builder.fmul(sv, splat(builder, builder.load(builder.gep(sxrows[j], [g])), R8))
                builder.store(vfma(builder, builder.sitofp(rows, v8), sc, builder.load(faccs[j])), faccs[j])
                if q4:
                    xsg = splat(builder, builder.load(builder.gep(xsrows[j], [g])), R8)
                    builder.store(vfma(builder, zv, xsg, builder.load(zaccs[j])), zaccs[j])

        vals = []
        for j in range(TB):
            res = builder.load(faccs[j])
            if q4:
                res = builder.fadd(res, builder.load(zaccs[j]))
            vals += [builder.extract_element(res, ir.Constant(i32, r)) for r in range(R8)]
        return context.make_tuple(builder, sig.return_type, vals)

    def r8dot(typingctx, w, s, z, xq, sx, xs, b, t):
        return typer(w, s, z, xq, sx, xs), codegen
    r8dot.__name__ = f"_r8dot_g{G}_x{TB}"
    return intrinsic(r8dot)


# decode (one token): 4 accumulators break the 16-long vpdpwssd chain of a group; prefill (TB
# tokens): the tokens' chains are independent already
_r8_g32_x1, _r8_g64_x1, _r8_g128_x1 = (_make_r8dot(G, 1, 4) for G in (32, 64, 128))
_r8_g32_x4, _r8_g64_x4, _r8_g128_x4 = (_make_r8dot(G, TB, 1) for G in (32, 64, 128))


@njit(inline="always", **JIT)
def _r8dot1(q, s, z, xq, sx, xs, b, t):
    G = xq.shape[1] // q.shape[1]
    if G == 64:
        return _r8_g64_x1(q, s, z, xq, sx, xs, b, t)
    elif G == 128:
        return _r8_g128_x1(q, s, z, xq, sx, xs, b, t)
    return _r8_g32_x1(q, s, z, xq, sx, xs, b, t)


@njit(inline="always", **JIT)
def _r8dotx(q, s, z, xq, sx, xs, b, t):
    G = xq.shape[1] // q.shape[1]
    if G == 64:
        return _r8_g64_x4(q, s, z, xq, sx, xs, b, t)
    elif G == 128:
        return _r8_g128_x4(q, s, z, xq, sx, xs, b, t)
    return _r8_g32_x4(q, s, z, xq, sx, xs, b, t)


@njit(**JIT)
def _check_r8(q, s, z, xq, sx, xs, out):
    nb, ng, bpb = q.shape
    T, K = xq.shape
    G = K // ng if ng else 0
    if G not in (32, 64, 128) or K != ng * G:
        raise ValueError("quantized matmul: activations do not match the matrix width / group size")
    if bpb * _levels_per_byte(q) != R8 * G:
        raise ValueError("quantized matmul: the r8 weight array does not match the group size")
    if s.shape != (nb, ng, R8) or z.shape != (nb, ng, R8):
        raise ValueError("quantized matmul: scale / zero arrays do not match the matrix")
    if sx.shape != (T, ng) or xs.shape != (T, ng):
        raise ValueError("quantized matmul: activation scales do not match")
    if out.shape[0] != T or out.shape[1] != R8 * nb:
        raise ValueError("quantized matmul: out must be [T, N]")


@njit(parallel=True, **JIT)
def gemm_r8(xq, sx, xs, q, s, z, out):
    """out[T, N] = x @ W.T for an r8 matrix (q4: q uint8, q8: q int8 with z = s, xs = sx) and
    activations prepared by prepare_x with the same group size; any T."""
    _check_r8(q, s, z, xq, sx, xs, out)
    T = xq.shape[0]
    for b in prange(q.shape[0]):
        for t in range(T):
            r = _r8dot1(q, s, z, xq, sx, xs, b, t)
            for i in range(R8):
                out[t, R8 * b + i] = r[i]


@njit(parallel=True, **JIT)
def gemm_r8_x4(xq, sx, xs, q, s, z, out):
    """gemm_r8 with each unpack of the weights serving TB tokens; any T (a last partial block of
    tokens is padded: it costs less than running its tokens one by one)."""
    _check_r8(q, s, z, xq, sx, xs, out)
    T = xq.shape[0]
    for b in prange(q.shape[0]):
        for t in range(0, T, TB):
            r = _r8dotx(q, s, z, xq, sx, xs, b, t)
            for j in range(min(TB, T - t)):
                for i in range(R8):
                    out[t + j, R8 * b + i] = r[R8 * j + i]


# Blocks of TB tokens, the last one padded, except that one token left over runs alone: 1-token
# kernel vs padded TB-token kernel (1024x4096 q4, cold), 1 token 0.069 vs 0.115 ms, 2 tokens
# 0.115 vs 0.118, 3 tokens 0.172 vs 0.122, and 4 tokens 0.130.

@njit(**JIT)
def _gemm_r8_split(xq, sx, xs, q, s, z, out):
    T = xq.shape[0]
    tb = T - 1 if T % TB == 1 else T
    if tb:
        gemm_r8_x4(xq[:tb], sx[:tb], xs[:tb], q, s, z, out[:tb])
    if T > tb:
        gemm_r8(xq[tb:], sx[tb:], xs[tb:], q, s, z, out[tb:])


@njit(**JIT)
def matmul_r8(x, q, s, z, out):
    """out[T, N] = x[T, K] @ W.T, W an r8 matrix given by its arrays (see gemm_r8)."""
    xq, sx, xs = prepare_x(x, x.shape[1] // q.shape[1])
    _gemm_r8_split(xq, sx, xs, q, s, z, out)


@njit(parallel=True, **JIT)
def _gate_up_r8(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    _check_r8(gq, gs, gz, xq, sx, xs, h)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    T = xq.shape[0]
    for b in prange(gq.shape[0]):
        for t in range(T):
            a = _r8dot1(gq, gs, gz, xq, sx, xs, b, t)
            u = _r8dot1(uq, us, uz, xq, sx, xs, b, t)
            for i in range(R8):
                h[t, R8 * b + i] = silu_mul(a[i], u[i])


@njit(parallel=True, **JIT)
def _gate_up_r8_x4(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    _check_r8(gq, gs, gz, xq, sx, xs, h)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    T = xq.shape[0]
    for b in prange(gq.shape[0]):
        for t in range(0, T, TB):
            a = _r8dotx(gq, gs, gz, xq, sx, xs, b, t)
            u = _r8dotx(uq, us, uz, xq, sx, xs, b, t)
            for j in range(min(TB, T - t)):
                for i in range(R8):
                    h[t + j, R8 * b + i] = silu_mul(a[R8 * j + i], u[R8 * j + i])


@njit(**JIT)
def _gate_up_r8_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    T = xq.shape[0]
    tb = T - 1 if T % TB == 1 else T
    if tb:
        _gate_up_r8_x4(xq[:tb], sx[:tb], xs[:tb], gq, gs, gz, uq, us, uz, h[:tb])
    if T > tb:
        _gate_up_r8(xq[tb:], sx[tb:], xs[tb:], gq, gs, gz, uq, us, uz, h[tb:])


@njit(**JIT)
def expert_r8(x, gq, gs, gz, uq, us, uz, dq, ds, dz, out):
    """out[T, H] = down(silu(gate x) * up x) for r8 gate/up [I, H] and down [H, I] (q4, or q8
    with each z = its s)."""
    xq, sx, xs = prepare_x(x, x.shape[1] // gq.shape[1])
    h = np.empty((x.shape[0], R8 * gq.shape[0]), dtype=np.float32)
    _gate_up_r8_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h)
    hq, hsx, hxs = prepare_x(h, h.shape[1] // dq.shape[1])
    _gemm_r8_split(hq, hsx, hxs, dq, ds, dz, out)
