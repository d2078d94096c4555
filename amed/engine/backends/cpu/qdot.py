"""Numba kernels over quantized matrices (formats in amed/quant/formats.py): out[T, N] = x[T, K] @ W.T.

Weights are dequantized inside the kernels, never into a float copy of the matrix.

How a product is computed (measured on the 2-core Zen 5 VM, see bench/bench_qkernels.py):
  * Activations are rounded to int16 once per call: for each token t and group g of G inputs,
    xq[t, k] = round(x[t, k] / sx[t, g]) with sx[t, g] = max|x[t, group g]| / 32767, and
    xs[t, g] = sx[t, g] * sum(xq[t, group g]) for the q4/q6 zero term. The row dot products then
    run on integers: `vpmaddwd`/`vpdpwssd` multiply 32 pairs of int16 per instruction and sum into
    int32, exactly. Per group:  q4, q6  out += (s*sx) * sum(u * xq) + zero * xs
                                q8      out += (s*sx) * sum(q * xq)
    (q6 levels u <= 63: a group's int32 sum stays below 128 * 63 * 32767 < 2^31.)
    This doubles the per-core throughput of the int4 GEMV against a float32 dot (measured 39-45
    against 20-25 weights/ns on one core), which matters because on a small machine the int4
    float GEMV is compute-bound, not memory-bound. The cost is the int16 rounding of x: a relative
    error of about 2^-16 of each group's largest |x|, i.e. ~1e-5..5e-5 relative error of an output,
    a thousand times below the int4 weight error. The arithmetic itself is exact up to the final
    float32 scaling, so the kernels match `prepare_x`-rounded inputs to ~1e-6 (tests check both).
  * The inner loops are written as LLVM vector IR in @intrinsic helpers (`_make_rowdot`, below), not left
    to Numba's auto-vectorizer: the vectorizer picked 64-element loops that never ran for G<=64
    and widened integer ops to 64 bits (docs/kernels-and-tooling.md section 2). Only generic LLVM IR is
    used (no target-specific intrinsics), so the code also builds for AVX2 or NEON machines; LLVM
    turns the "sext, mul, add even/odd lanes" pattern into vpmaddwd (or vpdpwssd with VNNI).
  * Scales are float16 (Numba cannot load float16 arrays on the CPU); the helpers widen the raw
    uint16 bits with integer ops, 16 groups at a time (`half_to_f32`).
  * Small T (prefill of the tokens routed to one expert): each thread takes output rows and runs
    all T tokens over a row while it sits in L1 (the "loop of GEMVs" shape), so weights are read
    from memory once.

Two row layouts (quant/formats.py): "rows" (one row after another; `gemm_q4/q6/q8`, `expert_q*`) and "r8"
(q4/q8 with 8 rows interleaved; `gemm_r8`, `expert_r8` in qr8.py), which needs no horizontal sums
and runs prefill faster (docs/performance.md). dispatch.py picks by format and layout.

This file holds the LLVM helpers and activation rounding; qrows.py and qr8.py the kernels built
on them. Numba's on-disk cache checks a kernel against its own file only, so an edit here would
leave stale machine code for the kernels elsewhere: amed/__init__.py keys the cache directory by a
hash of every file of this package instead.

Array conventions: x, out float32 C-contiguous and writable; weights are the read-only C-contiguous
arrays of a QTensor (`qt.kargs`: q, scale bits as uint16, zero bits as uint16), which is the one
signature that gets compiled and cached.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = np.float32
JIT = dict(fastmath={"reassoc", "contract"}, cache=True, nogil=True)
X_LEVELS = 32767.0          # int16 activations: |xq| <= 32767
ROWS = 8                    # output rows a thread runs all T tokens over (they stay in L1)

# Start Numba's thread pool now, before any kernel runs. Numba bug (numba#8578, #4807): when a
# serial cached kernel (matmul_q*, expert_q*) is compiled in a process that loaded its parallel
# callee (gemm_q*, _gate_up_q*) from the disk cache, it is saved without the hook that starts the
# pool on load; run from the cache in a fresh process, it then calls into a pool that was never
# started and segfaults (reproduced here: run gemm_q4 alone, then qmatmul twice, each in a new
# process). get_num_threads() starts the pool.
numba.get_num_threads()

# ---- LLVM IR helpers -------------------------------------------------------------------------

_i1, i8, i16, i32, i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
f32 = ir.FloatType()


def vt(elem, n):
    return ir.VectorType(elem, n)


def c64(v):
    return ir.Constant(i64, v)


def _ptr_at(builder, base, index, elem):
    """Pointer to element `index` (i64) of a typed pointer `base`, viewed as a pointer to `elem`."""
    p = builder.gep(base, [index])
    return builder.bitcast(p, elem.as_pointer())


def vload(builder, base, index, vty, align):
    return builder.load(_ptr_at(builder, base, index, vty), align=align, typ=vty)


def intrinsic_fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def vfma(builder, a, b, c):
    n = a.type.count
    fn = intrinsic_fn(builder, f"llvm.fma.v{n}f32", a.type, [a.type] * 3)
    return builder.call(fn, [a, b, c])


def _masked_load(builder, base, index, vty, mask, align):
    """Load a vector whose lanes with mask=0 are not read (zero there)."""
    ety = vty.element
    tname = "f32" if ety == f32 else f"i{ety.width}"
    fn = intrinsic_fn(builder, f"llvm.masked.load.v{vty.count}{tname}.p0", vty,
                       [vty.as_pointer(), i32, vt(_i1, vty.count), vty])
    ptr = _ptr_at(builder, base, index, vty)
    return builder.call(fn, [ptr, ir.Constant(i32, align), mask, ir.Constant(vty, None)])


def splat(builder, scalar, n):
    v = builder.insert_element(ir.Constant(vt(scalar.type, n), ir.Undefined), scalar, ir.Constant(i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(vt(i32, n), [0] * n))


def half_to_f32(builder, h):
    """Widen a vector of float16 bit patterns (<n x i16>) to float32, exactly for every finite
    half (scales are never inf/NaN).

    Not `fpext half`: without F16C (or with NUMBA_CPU_NAME=generic) LLVM lowers that to a call of
    __extendhfsf2, which Numba's JIT cannot link ("LLVM ERROR: Symbol not found", a hard abort).
    Integer ops instead: a normal half's exponent is rebiased (+112) in place; a subnormal one is
    its mantissa times 2^-24. No float denormals are involved, so a DAZ/FTZ mode set by some other
    library cannot flush small scales. Measured as fast as vcvtph2ps here (it runs once per 16
    groups)."""
    n = h.type.count
    vi = vt(i32, n)
    vf = vt(f32, n)

    def c(v):
        return ir.Constant(vi, [v] * n)

    u = builder.zext(h, vi)
    normal = builder.bitcast(builder.add(builder.shl(builder.and_(u, c(0x7FFF)), c(13)), c(112 << 23)), vf)
    sub = builder.fmul(builder.uitofp(builder.and_(u, c(0x3FF)), vf), ir.Constant(vf, [2.0 ** -24] * n))
    is_sub = builder.icmp_unsigned("==", builder.and_(u, c(0x7C00)), c(0))
    mag = builder.bitcast(builder.select(is_sub, sub, normal), vi)
    return builder.bitcast(builder.or_(mag, builder.shl(builder.and_(u, c(0x8000)), c(16))), vf)


def _hsum(builder, v):
    """Sum of the lanes of a float vector (tree order)."""
    n = v.type.count
    while n > 1:
        n //= 2
        a = builder.shuffle_vector(v, v, ir.Constant(vt(i32, n), list(range(n))))
        b = builder.shuffle_vector(v, v, ir.Constant(vt(i32, n), list(range(n, 2 * n))))
        v = builder.fadd(a, b)
    return builder.extract_element(v, ir.Constant(i32, 0))


def madd(builder, a16, b16, acc):
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] on int16 inputs (the vpmaddwd pattern)."""
    n = a16.type.count
    w = vt(i32, n)
    p = builder.mul(builder.sext(a16, w), builder.sext(b16, w))
    even = builder.shuffle_vector(p, p, ir.Constant(vt(i32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(vt(i32, n // 2), list(range(1, n, 2))))
    return builder.add(acc, builder.add(even, odd))


def array(context, builder, ty, val):
    a = context.make_array(ty)(context, builder, val)
    return a, cgutils.unpack_tuple(builder, a.shape, ty.ndim)


def is_c(ty, dtype, ndim):
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


_BLOCK = 16     # groups whose scales are widened together
_UNROLL = 4     # groups in flight (independent float accumulators)


def _nibble_plane_chunks(builder, wg, G, ety):
    """q4 / q6: the nibble plane of a group (G/2 bytes at wg), in chunks of nb bytes:
    (c, lo, hi) with lo the <nb x ety> low nibbles = levels of elements c..c+nb and hi the high
    nibbles = levels of elements G/2+c..G/2+c+nb (split-nibble order). ety: i16 (bytes widened
    first) or i8 (the caller widens after combining)."""
    nb = 16 if G == 32 else 32
    m15 = ir.Constant(vt(ety, nb), [15] * nb)
    sh4 = ir.Constant(vt(ety, nb), [4] * nb)
    for c in range(0, G // 2, nb):
        v = vload(builder, wg, c64(c), vt(i8, nb), 1)
        if ety != i8:
            v = builder.zext(v, vt(ety, nb))
        yield c, builder.and_(v, m15), builder.lshr(v, sh4)


def _q6_high_bits(builder, wg, G, ety):
    """q6: the 2-bit plane of a group (G/4 bytes at wg + G/2) as a function hi(e0, nb) -> the
    <nb x ety> high bits of elements e0..e0+nb, already shifted into place (<< 4, values 0..48).
    Byte i holds elements i, i+G/4, i+G/2, i+3G/4 in bits 0-1, 2-3, 4-5, 6-7, so quarter k of
    the group is (plane >> 2k) & 3: one uniform shift and mask per quarter, and a chunk that spans
    two quarters (G = 32, 64) is the concatenation of two such vectors (one shuffle)."""
    Q = G // 4
    p = vload(builder, wg, c64(G // 2), vt(i8, Q), 1)
    if ety != i8:
        p = builder.zext(p, vt(ety, Q))
    m = ir.Constant(vt(ety, Q), [0x30] * Q)

    def quarter(k):                       # ((p >> 2k) & 3) << 4 == (p shifted by 4 - 2k) & 0x30
        d = 4 - 2 * k
        if d > 0:
            v = builder.shl(p, ir.Constant(vt(ety, Q), [d] * Q))
        elif d < 0:
            v = builder.lshr(p, ir.Constant(vt(ety, Q), [-d] * Q))
        else:
            v = p
        return builder.and_(v, m)

    if ety == i8 and G == 64:
        # 32-byte chunks span two 16-byte quarters. Shift [p, p] as 16-bit lanes by a different
        # count in each half (vpsllvw / vpsrlvw): bits 4-5 of every byte then come from that same
        # byte, so one mask with 0x30 finishes both quarters: 5 instructions where two quarters
        # and a concatenation took 6 each.
        pp = builder.shuffle_vector(p, p, ir.Constant(vt(i32, 32), list(range(16)) * 2))
        w16 = builder.bitcast(pp, vt(i16, 16))
        m32 = ir.Constant(vt(i8, 32), [0x30] * 32)

        def both(op, first, second):   # quarters (0, 1): p << 4, p << 2; (2, 3): p, p >> 2
            v = op(w16, ir.Constant(vt(i16, 16), [first] * 8 + [second] * 8))
            return builder.and_(builder.bitcast(v, vt(i8, 32)), m32)

        low, high = both(builder.shl, 4, 2), both(builder.lshr, 0, 2)
        return lambda e0, nb: low if e0 == 0 else high

    def hi(e0, nb):
        parts = [quarter(k) for k in range(e0 // Q, (e0 + nb) // Q)]
        if len(parts) == 1:
            return parts[0]
        a, b = parts
        return builder.shuffle_vector(a, b, ir.Constant(vt(i32, 2 * Q), list(range(2 * Q))))

    return hi


def _make_rowdot(fmt: str, G: int, prefetch: int = 0, tokens: int = 1):
    """An intrinsic `rowdot(w, s, [z,] xq, sx, [xs,] n, t) -> float32`: the dot product of row n
    of a quantized matrix with token t of prepared activations (see module docstring).
    `prefetch` > 0: prefetch the weight bytes that far ahead of each group (never faults).
    `tokens` = TB > 1: returns a tuple of TB dot products, of row n with tokens t .. t+TB-1 (a
    token index past the end is read as the last token; its result is to be ignored). The weights
    are unpacked once per group for all TB tokens, and each token's float operations are exactly
    those of the one-token version, so the results are bit-identical to TB separate calls.
    Shapes are trusted (the calling kernel checks them): w [N, ng, G/2 (q4), 3G/4 (q6) or G (q8)],
    s/z uint16 [N, ng], xq int16 [T, ng*G], sx/xs float32 [T, ng]."""
    asym = fmt in ("q4", "q6")            # has a zero array: rowdot(w, s, z, xq, sx, xs, n, t)
    bpg = {"q4": G // 2, "q6": 3 * G // 4, "q8": G}[fmt]     # weight bytes per group
    half = asym and G == 32               # a chunk is 16 levels -> 8 int32 lanes
    lanes = 8 if half else 16             # int32 accumulator lanes per group
    TB = tokens

    def unpack(builder, wrow, g):
        """Group g's weights as int16 vectors, each with the offset of its inputs in the group."""
        wg = builder.gep(wrow, [builder.mul(g, c64(bpg))])
        if prefetch:
            fn = intrinsic_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
            pp = builder.bitcast(builder.gep(wg, [c64(prefetch)]), i8.as_pointer())
            builder.call(fn, [pp, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        parts = []
        if asym:
            # q6, G >= 64: unpack in bytes and widen the combined levels (the shifts and masks
            # then run on half-width vectors): +13% hot at G=64, +3% at G=128, but -10% at G=32
            # (8-byte planes), which widens first like q4
            ety = i8 if fmt == "q6" and G >= 64 else i16
            hi2 = _q6_high_bits(builder, wg, G, ety) if fmt == "q6" else None
            for c, lo, hi in _nibble_plane_chunks(builder, wg, G, ety):
                nb = lo.type.count
                if hi2 is not None:       # levels 0..63 = low nibble | high 2 bits << 4
                    lo = builder.or_(lo, hi2(c, nb))
                    hi = builder.or_(hi, hi2(G // 2 + c, nb))
                if ety == i8:
                    lo, hi = builder.zext(lo, vt(i16, nb)), builder.zext(hi, vt(i16, nb))
                parts += [(lo, c), (hi, c + G // 2)]
        else:
            for c in range(0, bpg, 32):
                parts.append((builder.sext(vload(builder, wg, c64(c), vt(i8, 32), 1), vt(i16, 32)), c))
        return parts

    def group_dot(builder, parts, xrow, g):
        """<lanes x i32> partial sums of group g for one token (integers, exact)."""
        xg = builder.gep(xrow, [builder.mul(g, c64(G))])
        acc = ir.Constant(vt(i32, lanes), None)
        for wv, c in parts:
            acc = madd(builder, wv, vload(builder, xg, c64(c), vt(i16, wv.type.count), 2), acc)
        return acc

    def typer(w, s, *rest):
        want_w = types.uint8 if asym else types.int8
        arrs = rest[:-2]
        specs = [(types.uint16, 2), (types.int16, 2), (types.float32, 2), (types.float32, 2)] if asym else \
                [(types.int16, 2), (types.float32, 2)]
        if not (is_c(w, want_w, 3) and is_c(s, types.uint16, 2) and len(arrs) == len(specs)
                and all(is_c(a, d, nd) for a, (d, nd) in zip(arrs, specs))):
            return None
        ret = types.float32 if TB == 1 else types.UniTuple(types.float32, TB)
        return ret(w, s, *arrs, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        if asym:
            w, s, z, xq, sx, xs, n, t = args
            tw, ts, tz, txq, tsx, txs = sig.args[:6]
        else:
            w, s, xq, sx, n, t = args
            tw, ts, txq, tsx = sig.args[:4]
        wa, (_, ng, _) = array(context, builder, tw, w)
        sa, _ = array(context, builder, ts, s)
        xa, (T, K) = array(context, builder, txq, xq)
        sxa, _ = array(context, builder, tsx, sx)
        wrow = builder.gep(wa.data, [builder.mul(n, builder.mul(ng, c64(bpg)))])
        srow = builder.gep(sa.data, [builder.mul(n, ng)])
        if asym:
            za, _ = array(context, builder, tz, z)
            xsa, _ = array(context, builder, txs, xs)
            zrow = builder.gep(za.data, [builder.mul(n, ng)])
        last = builder.sub(T, c64(1))
        toks = []
        for j in range(TB):
            tj = builder.add(t, c64(j)) if j else t
            toks.append(builder.select(builder.icmp_signed("<", tj, T), tj, last) if j else tj)
        xrows = [builder.gep(xa.data, [builder.mul(tj, K)]) for tj in toks]
        sxrows = [builder.gep(sxa.data, [builder.mul(tj, ng)]) for tj in toks]
        xsrows = [builder.gep(xsa.data, [builder.mul(tj, ng)]) for tj in toks] if asym else None

        B = _BLOCK
        vB = vt(f32, B)
        vacc = vt(f32, lanes)
        fzero = ir.Constant(vacc, None)
        faccs = [[cgutils.alloca_once_value(builder, fzero) for _ in range(_UNROLL)] for _ in range(TB)]
        zaccs = [cgutils.alloca_once_value(builder, ir.Constant(vB, None)) for _ in range(TB)]
        sbufs = [cgutils.alloca_once(builder, vB) for _ in range(TB)]   # 16 combined scales s*sx
        sbufs_f = [builder.bitcast(b, f32.as_pointer()) for b in sbufs]
        iota = ir.Constant(vt(i64, B), list(range(B)))

        nblocks = builder.udiv(builder.add(ng, c64(B - 1)), c64(B))
        with cgutils.for_range(builder, nblocks) as lb:
            gb = builder.mul(lb.index, c64(B))
            left = builder.sub(ng, gb)
            cnt = builder.select(builder.icmp_unsigned("<", left, c64(B)), left, c64(B))
            mask = builder.icmp_unsigned("<", iota, splat(builder, cnt, B))
            sw = half_to_f32(builder, _masked_load(builder, srow, gb, vt(i16, B), mask, 2))
            zw = half_to_f32(builder, _masked_load(builder, zrow, gb, vt(i16, B), mask, 2)) if asym else None
            for j in range(TB):
                builder.store(builder.fmul(sw, _masked_load(builder, sxrows[j], gb, vB, mask, 4)), sbufs[j])
                if asym:
                    builder.store(vfma(builder, zw, _masked_load(builder, xsrows[j], gb, vB, mask, 4),
                                        builder.load(zaccs[j])), zaccs[j])

            def one(i, u):
                g = builder.add(gb, i)
                parts = unpack(builder, wrow, g)
                for j in range(TB):
                    ia = group_dot(builder, parts, xrows[j], g)
                    sc = splat(builder, builder.load(builder.gep(sbufs_f[j], [i])), lanes)
                    acc = faccs[j][u]
                    builder.store(vfma(builder, builder.sitofp(ia, vacc), sc, builder.load(acc)), acc)

            nun = builder.udiv(cnt, c64(_UNROLL))
            with cgutils.for_range(builder, nun) as lu:
                i0 = builder.mul(lu.index, c64(_UNROLL))
                for u in range(_UNROLL):
                    one(builder.add(i0, c64(u)), u)
            done = builder.mul(nun, c64(_UNROLL))
            with cgutils.for_range(builder, builder.sub(cnt, done)) as lr:
                one(builder.add(done, lr.index), 0)

        totals = []
        for j in range(TB):
            v = builder.load(faccs[j][0])
            for a in faccs[j][1:]:
                v = builder.fadd(v, builder.load(a))
            total = _hsum(builder, v)
            if asym:
                total = builder.fadd(total, _hsum(builder, builder.load(zaccs[j])))
            totals.append(total)
        if TB == 1:
            return totals[0]
        return context.make_tuple(builder, sig.return_type, totals)

    if asym:
        def rowdot(typingctx, w, s, z, xq, sx, xs, n, t):
            return typer(w, s, z, xq, sx, xs, n, t), codegen
    else:
        def rowdot(typingctx, w, s, xq, sx, n, t):
            return typer(w, s, xq, sx, n, t), codegen
    rowdot.__name__ = f"_rowdot_{fmt}_g{G}" + (f"_x{TB}" if TB > 1 else "")
    return intrinsic(rowdot)


# q4 rows prefetch the weights 2 KiB ahead: +5-10% cold GB/s measured (the int4 kernel is close to
# compute-bound on 2 cores, so it lets memory stalls overlap); for q8 it measured slightly slower.
PREFETCH_Q4 = 2048
q4_g32 = _make_rowdot("q4", 32, PREFETCH_Q4)
q4_g64 = _make_rowdot("q4", 64, PREFETCH_Q4)
q4_g128 = _make_rowdot("q4", 128, PREFETCH_Q4)
# q6 rows are not prefetched (no distance measured better). The q6 unpack is slower than q4/q8's
# (the 2-bit plane costs about as much as the rest), so a cold q6 GEMV runs at DRAM speed only on
# a machine with modest bandwidth, and q6 prefill is compute-bound (docs/performance.md, "Kernel
# notes").
q6_g32 = _make_rowdot("q6", 32)
q6_g64 = _make_rowdot("q6", 64)
q6_g128 = _make_rowdot("q6", 128)
q8_g32 = _make_rowdot("q8", 32)
q8_g64 = _make_rowdot("q8", 64)
q8_g128 = _make_rowdot("q8", 128)
# 4 tokens per unpack of the weights (prefill): +15-25% on q4/q8, more on q6, whose unpack costs
# most; bit-identical to the one-token versions (see _make_rowdot)
TB = 4
q4_g32_x4 = _make_rowdot("q4", 32, PREFETCH_Q4, TB)
q4_g64_x4 = _make_rowdot("q4", 64, PREFETCH_Q4, TB)
q4_g128_x4 = _make_rowdot("q4", 128, PREFETCH_Q4, TB)
q6_g32_x4 = _make_rowdot("q6", 32, 0, TB)
q6_g64_x4 = _make_rowdot("q6", 64, 0, TB)
q6_g128_x4 = _make_rowdot("q6", 128, 0, TB)
q8_g32_x4 = _make_rowdot("q8", 32, 0, TB)
q8_g64_x4 = _make_rowdot("q8", 64, 0, TB)
q8_g128_x4 = _make_rowdot("q8", 128, 0, TB)


# ---- activations -> int16 --------------------------------------------------------------------

@njit(**JIT)
def prepare_x_into(x, group, xq, sx, xs):
    """Round x [T, K] to int16 per group of `group` inputs: xq [T, K] int16 and scales sx [T, ng]
    with x ~= xd = xq * sx; xs [T, ng] = sum of xd over each group (for the q4 zero term, so a
    kernel computes exactly xd @ W.T up to float32 rounding)."""
    T, K = x.shape
    ng = K // group
    x3 = x.reshape(T, ng, group)
    q3 = xq.reshape(T, ng, group)
    for t in range(T):
        for g in range(ng):
            amax = F32(0.0)
            bad = F32(0.0)                 # becomes NaN if the group holds a NaN or an inf
            for j in range(group):
                v = x3[t, g, j]
                amax = max(amax, abs(v))
                bad += v - v
            if bad != F32(0.0):            # poison the group so the outputs become NaN too
                scale = F32(np.nan)
                inv = F32(0.0)
            elif amax > F32(0.0):
                scale = amax / F32(X_LEVELS)
                inv = F32(X_LEVELS) / amax
            else:
                scale = F32(0.0)
                inv = F32(0.0)
            isum = 0
            for j in range(group):
                r = min(max(x3[t, g, j] * inv, F32(-X_LEVELS)), F32(X_LEVELS))
                v = np.int16(np.floor(r + F32(0.5)))
                q3[t, g, j] = v
                isum += np.int32(v)
            sx[t, g] = scale
            xs[t, g] = F32(isum) * scale


@njit(**JIT)
def prepare_x(x, group):
    """(xq, sx, xs) for x [T, K]; see prepare_x_into."""
    T, K = x.shape
    if K % group:
        raise ValueError("prepare_x: the row length is not a multiple of the group size")
    xq = np.empty((T, K), dtype=np.int16)
    sx = np.empty((T, K // group), dtype=np.float32)
    xs = np.empty((T, K // group), dtype=np.float32)
    prepare_x_into(x, group, xq, sx, xs)
    return xq, sx, xs
