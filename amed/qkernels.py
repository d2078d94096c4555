"""Numba kernels over quantized matrices (formats in quants.py): out[T, N] = x[T, K] @ W.T.

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
  * The inner loops are written as LLVM vector IR in @intrinsic helpers (`_make_rowdot`), not left
    to Numba's auto-vectorizer: the vectorizer picked 64-element loops that never ran for G<=64
    and widened integer ops to 64 bits (kernels-and-tooling.md section 2). Only generic LLVM IR is
    used (no target-specific intrinsics), so the code also builds for AVX2 or NEON machines; LLVM
    turns the "sext, mul, add even/odd lanes" pattern into vpmaddwd (or vpdpwssd with VNNI).
  * Scales are float16 (Numba cannot load float16 arrays on the CPU); the helpers widen the raw
    uint16 bits with integer ops, 16 groups at a time (`_half_to_f32`).
  * Small T (prefill of the tokens routed to one expert): each thread takes output rows and runs
    all T tokens over a row while it sits in L1 (the "loop of GEMVs" shape), so weights are read
    from memory once.

Two row layouts (quants.py): "rows" (one row after another; `gemm_q4/q6/q8`, `expert_q*`) and "r8"
(q4/q8 with 8 rows interleaved; `gemm_r8`, `expert_r8`, at the end of this file), which needs no
horizontal sums and runs prefill 1.4-2x faster. `matmul_call` / `expert_runner` pick by layout.

All kernels and their @intrinsic helpers live in this one file on purpose: Numba's on-disk cache is
keyed on the source file of a kernel (mtime and size), so an edit to a helper in another module
would leave stale machine code in the cache; here any edit invalidates everything.

Array conventions: x, out float32 C-contiguous and writable; weights are the read-only C-contiguous
arrays of a QTensor (`qt.kargs`: q, scale bits as uint16, zero bits as uint16), which is the one
signature that gets compiled and cached.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
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

_i1, _i8, _i16, _i32, _i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
_f32 = ir.FloatType()


def _vt(elem, n):
    return ir.VectorType(elem, n)


def _c64(v):
    return ir.Constant(_i64, v)


def _ptr_at(builder, base, index, elem):
    """Pointer to element `index` (i64) of a typed pointer `base`, viewed as a pointer to `elem`."""
    p = builder.gep(base, [index])
    return builder.bitcast(p, elem.as_pointer())


def _vload(builder, base, index, vty, align):
    return builder.load(_ptr_at(builder, base, index, vty), align=align, typ=vty)


def _intrinsic_fn(builder, name, ret, argtys):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def _vfma(builder, a, b, c):
    n = a.type.count
    fn = _intrinsic_fn(builder, f"llvm.fma.v{n}f32", a.type, [a.type] * 3)
    return builder.call(fn, [a, b, c])


def _masked_load(builder, base, index, vty, mask, align):
    """Load a vector whose lanes with mask=0 are not read (zero there)."""
    ety = vty.element
    tname = "f32" if ety == _f32 else f"i{ety.width}"
    fn = _intrinsic_fn(builder, f"llvm.masked.load.v{vty.count}{tname}.p0", vty,
                       [vty.as_pointer(), _i32, _vt(_i1, vty.count), vty])
    ptr = _ptr_at(builder, base, index, vty)
    return builder.call(fn, [ptr, ir.Constant(_i32, align), mask, ir.Constant(vty, None)])


def _splat(builder, scalar, n):
    v = builder.insert_element(ir.Constant(_vt(scalar.type, n), ir.Undefined), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_vt(_i32, n), [0] * n))


def _half_to_f32(builder, h):
    """Widen a vector of float16 bit patterns (<n x i16>) to float32, exactly for every finite
    half (scales are never inf/NaN).

    Not `fpext half`: without F16C (or with NUMBA_CPU_NAME=generic) LLVM lowers that to a call of
    __extendhfsf2, which Numba's JIT cannot link ("LLVM ERROR: Symbol not found", a hard abort).
    Integer ops instead: a normal half's exponent is rebiased (+112) in place; a subnormal one is
    its mantissa times 2^-24. No float denormals are involved, so a DAZ/FTZ mode set by some other
    library cannot flush small scales. Measured as fast as vcvtph2ps here (it runs once per 16
    groups)."""
    n = h.type.count
    vi = _vt(_i32, n)
    vf = _vt(_f32, n)

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
        a = builder.shuffle_vector(v, v, ir.Constant(_vt(_i32, n), list(range(n))))
        b = builder.shuffle_vector(v, v, ir.Constant(_vt(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(a, b)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _madd(builder, a16, b16, acc):
    """acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] on int16 inputs (the vpmaddwd pattern)."""
    n = a16.type.count
    w = _vt(_i32, n)
    p = builder.mul(builder.sext(a16, w), builder.sext(b16, w))
    even = builder.shuffle_vector(p, p, ir.Constant(_vt(_i32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(p, p, ir.Constant(_vt(_i32, n // 2), list(range(1, n, 2))))
    return builder.add(acc, builder.add(even, odd))


def _array(context, builder, ty, val):
    a = context.make_array(ty)(context, builder, val)
    return a, cgutils.unpack_tuple(builder, a.shape, ty.ndim)


def _is_c(ty, dtype, ndim):
    return isinstance(ty, types.Array) and ty.dtype == dtype and ty.ndim == ndim and ty.layout == "C"


_BLOCK = 16     # groups whose scales are widened together
_UNROLL = 4     # groups in flight (independent float accumulators)


def _nibble_plane_chunks(builder, wg, G, ety):
    """q4 / q6: the nibble plane of a group (G/2 bytes at wg), in chunks of nb bytes:
    (c, lo, hi) with lo the <nb x ety> low nibbles = levels of elements c..c+nb and hi the high
    nibbles = levels of elements G/2+c..G/2+c+nb (split-nibble order). ety: i16 (bytes widened
    first) or i8 (the caller widens after combining)."""
    nb = 16 if G == 32 else 32
    m15 = ir.Constant(_vt(ety, nb), [15] * nb)
    sh4 = ir.Constant(_vt(ety, nb), [4] * nb)
    for c in range(0, G // 2, nb):
        v = _vload(builder, wg, _c64(c), _vt(_i8, nb), 1)
        if ety != _i8:
            v = builder.zext(v, _vt(ety, nb))
        yield c, builder.and_(v, m15), builder.lshr(v, sh4)


def _q6_high_bits(builder, wg, G, ety):
    """q6: the 2-bit plane of a group (G/4 bytes at wg + G/2) as a function hi(e0, nb) -> the
    <nb x ety> high bits of elements e0..e0+nb, already shifted into place (<< 4, values 0..48).
    Byte i holds elements i, i+G/4, i+G/2, i+3G/4 in bits 0-1, 2-3, 4-5, 6-7, so quarter k of
    the group is (plane >> 2k) & 3: one uniform shift and mask per quarter, and a chunk that spans
    two quarters (G = 32, 64) is the concatenation of two such vectors (one shuffle)."""
    Q = G // 4
    p = _vload(builder, wg, _c64(G // 2), _vt(_i8, Q), 1)
    if ety != _i8:
        p = builder.zext(p, _vt(ety, Q))
    m = ir.Constant(_vt(ety, Q), [0x30] * Q)

    def quarter(k):                       # ((p >> 2k) & 3) << 4 == (p shifted by 4 - 2k) & 0x30
        d = 4 - 2 * k
        if d > 0:
            v = builder.shl(p, ir.Constant(_vt(ety, Q), [d] * Q))
        elif d < 0:
            v = builder.lshr(p, ir.Constant(_vt(ety, Q), [-d] * Q))
        else:
            v = p
        return builder.and_(v, m)

    if ety == _i8 and G == 64:
        # 32-byte chunks span two 16-byte quarters. Shift [p, p] as 16-bit lanes by a different
        # count in each half (vpsllvw / vpsrlvw): bits 4-5 of every byte then come from that same
        # byte, so one mask with 0x30 finishes both quarters: 5 instructions where two quarters
        # and a concatenation took 6 each.
        pp = builder.shuffle_vector(p, p, ir.Constant(_vt(_i32, 32), list(range(16)) * 2))
        w16 = builder.bitcast(pp, _vt(_i16, 16))
        m32 = ir.Constant(_vt(_i8, 32), [0x30] * 32)

        def both(op, first, second):   # quarters (0, 1): p << 4, p << 2; (2, 3): p, p >> 2
            v = op(w16, ir.Constant(_vt(_i16, 16), [first] * 8 + [second] * 8))
            return builder.and_(builder.bitcast(v, _vt(_i8, 32)), m32)

        low, high = both(builder.shl, 4, 2), both(builder.lshr, 0, 2)
        return lambda e0, nb: low if e0 == 0 else high

    def hi(e0, nb):
        parts = [quarter(k) for k in range(e0 // Q, (e0 + nb) // Q)]
        if len(parts) == 1:
            return parts[0]
        a, b = parts
        return builder.shuffle_vector(a, b, ir.Constant(_vt(_i32, 2 * Q), list(range(2 * Q))))

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
        wg = builder.gep(wrow, [builder.mul(g, _c64(bpg))])
        if prefetch:
            fn = _intrinsic_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
            pp = builder.bitcast(builder.gep(wg, [_c64(prefetch)]), _i8.as_pointer())
            builder.call(fn, [pp, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        parts = []
        if asym:
            # q6, G >= 64: unpack in bytes and widen the combined levels (the shifts and masks
            # then run on half-width vectors): +13% hot at G=64, +3% at G=128, but -10% at G=32
            # (8-byte planes), which widens first like q4
            ety = _i8 if fmt == "q6" and G >= 64 else _i16
            hi2 = _q6_high_bits(builder, wg, G, ety) if fmt == "q6" else None
            for c, lo, hi in _nibble_plane_chunks(builder, wg, G, ety):
                nb = lo.type.count
                if hi2 is not None:       # levels 0..63 = low nibble | high 2 bits << 4
                    lo = builder.or_(lo, hi2(c, nb))
                    hi = builder.or_(hi, hi2(G // 2 + c, nb))
                if ety == _i8:
                    lo, hi = builder.zext(lo, _vt(_i16, nb)), builder.zext(hi, _vt(_i16, nb))
                parts += [(lo, c), (hi, c + G // 2)]
        else:
            for c in range(0, bpg, 32):
                parts.append((builder.sext(_vload(builder, wg, _c64(c), _vt(_i8, 32), 1), _vt(_i16, 32)), c))
        return parts

    def group_dot(builder, parts, xrow, g):
        """<lanes x i32> partial sums of group g for one token (integers, exact)."""
        xg = builder.gep(xrow, [builder.mul(g, _c64(G))])
        acc = ir.Constant(_vt(_i32, lanes), None)
        for wv, c in parts:
            acc = _madd(builder, wv, _vload(builder, xg, _c64(c), _vt(_i16, wv.type.count), 2), acc)
        return acc

    def typer(w, s, *rest):
        want_w = types.uint8 if asym else types.int8
        arrs = rest[:-2]
        specs = [(types.uint16, 2), (types.int16, 2), (types.float32, 2), (types.float32, 2)] if asym else \
                [(types.int16, 2), (types.float32, 2)]
        if not (_is_c(w, want_w, 3) and _is_c(s, types.uint16, 2) and len(arrs) == len(specs)
                and all(_is_c(a, d, nd) for a, (d, nd) in zip(arrs, specs))):
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
        wa, (_, ng, _) = _array(context, builder, tw, w)
        sa, _ = _array(context, builder, ts, s)
        xa, (T, K) = _array(context, builder, txq, xq)
        sxa, _ = _array(context, builder, tsx, sx)
        wrow = builder.gep(wa.data, [builder.mul(n, builder.mul(ng, _c64(bpg)))])
        srow = builder.gep(sa.data, [builder.mul(n, ng)])
        if asym:
            za, _ = _array(context, builder, tz, z)
            xsa, _ = _array(context, builder, txs, xs)
            zrow = builder.gep(za.data, [builder.mul(n, ng)])
        last = builder.sub(T, _c64(1))
        toks = []
        for j in range(TB):
            tj = builder.add(t, _c64(j)) if j else t
            toks.append(builder.select(builder.icmp_signed("<", tj, T), tj, last) if j else tj)
        xrows = [builder.gep(xa.data, [builder.mul(tj, K)]) for tj in toks]
        sxrows = [builder.gep(sxa.data, [builder.mul(tj, ng)]) for tj in toks]
        xsrows = [builder.gep(xsa.data, [builder.mul(tj, ng)]) for tj in toks] if asym else None

        B = _BLOCK
        vB = _vt(_f32, B)
        vacc = _vt(_f32, lanes)
        fzero = ir.Constant(vacc, None)
        faccs = [[cgutils.alloca_once_value(builder, fzero) for _ in range(_UNROLL)] for _ in range(TB)]
        zaccs = [cgutils.alloca_once_value(builder, ir.Constant(vB, None)) for _ in range(TB)]
        sbufs = [cgutils.alloca_once(builder, vB) for _ in range(TB)]   # 16 combined scales s*sx
        sbufs_f = [builder.bitcast(b, _f32.as_pointer()) for b in sbufs]
        iota = ir.Constant(_vt(_i64, B), list(range(B)))

        nblocks = builder.udiv(builder.add(ng, _c64(B - 1)), _c64(B))
        with cgutils.for_range(builder, nblocks) as lb:
            gb = builder.mul(lb.index, _c64(B))
            left = builder.sub(ng, gb)
            cnt = builder.select(builder.icmp_unsigned("<", left, _c64(B)), left, _c64(B))
            mask = builder.icmp_unsigned("<", iota, _splat(builder, cnt, B))
            sw = _half_to_f32(builder, _masked_load(builder, srow, gb, _vt(_i16, B), mask, 2))
            zw = _half_to_f32(builder, _masked_load(builder, zrow, gb, _vt(_i16, B), mask, 2)) if asym else None
            for j in range(TB):
                builder.store(builder.fmul(sw, _masked_load(builder, sxrows[j], gb, vB, mask, 4)), sbufs[j])
                if asym:
                    builder.store(_vfma(builder, zw, _masked_load(builder, xsrows[j], gb, vB, mask, 4),
                                        builder.load(zaccs[j])), zaccs[j])

            def one(i, u):
                g = builder.add(gb, i)
                parts = unpack(builder, wrow, g)
                for j in range(TB):
                    ia = group_dot(builder, parts, xrows[j], g)
                    sc = _splat(builder, builder.load(builder.gep(sbufs_f[j], [i])), lanes)
                    acc = faccs[j][u]
                    builder.store(_vfma(builder, builder.sitofp(ia, vacc), sc, builder.load(acc)), acc)

            nun = builder.udiv(cnt, _c64(_UNROLL))
            with cgutils.for_range(builder, nun) as lu:
                i0 = builder.mul(lu.index, _c64(_UNROLL))
                for u in range(_UNROLL):
                    one(builder.add(i0, _c64(u)), u)
            done = builder.mul(nun, _c64(_UNROLL))
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
_q4_g32 = _make_rowdot("q4", 32, PREFETCH_Q4)
_q4_g64 = _make_rowdot("q4", 64, PREFETCH_Q4)
_q4_g128 = _make_rowdot("q4", 128, PREFETCH_Q4)
# q6 rows are not prefetched: cold 4096x4096 GEMV, 2 threads, 0 / 1024 / 2048 / 3072 / 4096 bytes
# ahead measured within 1% of each other at G=64 (2048: +3% at G=32, -4% at G=128).
# Speed (bench/bench_qkernels.py, 2 threads, G=64): in cache ~57 weights/ns against ~75 for q4
# and q8 (the 2-bit plane costs about as much as the rest of the unpack; ~52 before the two-quarter
# shifts in _q6_high_bits: hot 4096x4096 GEMV 39.5-41.7 -> 44.8-47.0 GB/s, A/B in one session), so
# a cold q6 GEMV runs at DRAM speed only while DRAM gives <= ~46 GB/s (this VM: 30-55 GB/s,
# varying), and q6 prefill (T > 1) is compute-bound.
_q6_g32 = _make_rowdot("q6", 32)
_q6_g64 = _make_rowdot("q6", 64)
_q6_g128 = _make_rowdot("q6", 128)
_q8_g32 = _make_rowdot("q8", 32)
_q8_g64 = _make_rowdot("q8", 64)
_q8_g128 = _make_rowdot("q8", 128)
# 4 tokens per unpack of the weights (prefill): +15-25% on q4/q8, more on q6, whose unpack costs
# most; bit-identical to the one-token versions (see _make_rowdot)
TB = 4
_q4_g32_x4 = _make_rowdot("q4", 32, PREFETCH_Q4, TB)
_q4_g64_x4 = _make_rowdot("q4", 64, PREFETCH_Q4, TB)
_q4_g128_x4 = _make_rowdot("q4", 128, PREFETCH_Q4, TB)
_q6_g32_x4 = _make_rowdot("q6", 32, 0, TB)
_q6_g64_x4 = _make_rowdot("q6", 64, 0, TB)
_q6_g128_x4 = _make_rowdot("q6", 128, 0, TB)
_q8_g32_x4 = _make_rowdot("q8", 32, 0, TB)
_q8_g64_x4 = _make_rowdot("q8", 64, 0, TB)
_q8_g128_x4 = _make_rowdot("q8", 128, 0, TB)


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


# ---- GEMV / small GEMM on prepared activations -----------------------------------------------

@njit(**JIT)
def _check(N, ng, G, xq, sx, out, s):
    T = xq.shape[0]
    if G not in (32, 64, 128):
        raise ValueError("quantized matmul: group size must be 32, 64 or 128")
    if xq.shape[1] != ng * G or sx.shape[0] != T or sx.shape[1] != ng:
        raise ValueError("quantized matmul: activations do not match the matrix width / group size")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("quantized matmul: out must be [T, N]")
    if s.shape[0] != N or s.shape[1] != ng:
        raise ValueError("quantized matmul: scale array does not match the matrix")


# TB-token row dots dispatched on the group size, read from the packed array's last dimension
# (q4: G/2 bytes, q6: 3G/4, q8: G).

@njit(inline="always", **JIT)
def _q4_dotx(q, s, z, xq, sx, xs, n, t):
    h = q.shape[2]
    if h == 32:
        return _q4_g64_x4(q, s, z, xq, sx, xs, n, t)
    elif h == 64:
        return _q4_g128_x4(q, s, z, xq, sx, xs, n, t)
    return _q4_g32_x4(q, s, z, xq, sx, xs, n, t)


@njit(inline="always", **JIT)
def _q6_dotx(q, s, z, xq, sx, xs, n, t):
    b = q.shape[2]
    if b == 48:
        return _q6_g64_x4(q, s, z, xq, sx, xs, n, t)
    elif b == 96:
        return _q6_g128_x4(q, s, z, xq, sx, xs, n, t)
    return _q6_g32_x4(q, s, z, xq, sx, xs, n, t)


@njit(inline="always", **JIT)
def _q8_dotx(q, s, xq, sx, n, t):
    G = q.shape[2]
    if G == 64:
        return _q8_g64_x4(q, s, xq, sx, n, t)
    elif G == 128:
        return _q8_g128_x4(q, s, xq, sx, n, t)
    return _q8_g32_x4(q, s, xq, sx, n, t)


# Each thread takes ROWS output rows and runs every token over them while they sit in L1.

@njit(parallel=True, **JIT)
def gemm_q4(xq, sx, xs, q, s, z, out):
    """out[T, N] = x @ W.T for a q4 matrix (q uint8 [N, ng, G/2], s/z uint16 bits [N, ng])
    and activations prepared by prepare_x with the same group size."""
    N, ng, h = q.shape
    T = xq.shape[0]
    _check(N, ng, 2 * h, xq, sx, out, s)
    if z.shape[0] != N or z.shape[1] != ng or xs.shape[0] != T or xs.shape[1] != ng:
        raise ValueError("quantized matmul: zero / group-sum arrays do not match")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(T):
            for n in range(b * ROWS, n1):
                if h == 32:
                    v = _q4_g64(q, s, z, xq, sx, xs, n, t)
                elif h == 64:
                    v = _q4_g128(q, s, z, xq, sx, xs, n, t)
                else:
                    v = _q4_g32(q, s, z, xq, sx, xs, n, t)
                out[t, n] = v


@njit(parallel=True, **JIT)
def gemm_q6(xq, sx, xs, q, s, z, out):
    """out[T, N] = x @ W.T for a q6 matrix (q uint8 [N, ng, 3G/4], s/z uint16 bits [N, ng])
    and activations prepared by prepare_x with the same group size."""
    N, ng, b = q.shape
    T = xq.shape[0]
    _check(N, ng, 4 * b // 3, xq, sx, out, s)        # b = 3G/4 bytes per group
    if z.shape[0] != N or z.shape[1] != ng or xs.shape[0] != T or xs.shape[1] != ng:
        raise ValueError("quantized matmul: zero / group-sum arrays do not match")
    for blk in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (blk + 1) * ROWS)
        for t in range(T):
            for n in range(blk * ROWS, n1):
                if b == 48:
                    v = _q6_g64(q, s, z, xq, sx, xs, n, t)
                elif b == 96:
                    v = _q6_g128(q, s, z, xq, sx, xs, n, t)
                else:
                    v = _q6_g32(q, s, z, xq, sx, xs, n, t)
                out[t, n] = v


@njit(parallel=True, **JIT)
def gemm_q8(xq, sx, q, s, out):
    """out[T, N] = x @ W.T for a q8 matrix (q int8 [N, ng, G], s uint16 bits [N, ng])."""
    N, ng, G = q.shape
    _check(N, ng, G, xq, sx, out, s)
    T = xq.shape[0]
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(T):
            for n in range(b * ROWS, n1):
                if G == 64:
                    v = _q8_g64(q, s, xq, sx, n, t)
                elif G == 128:
                    v = _q8_g128(q, s, xq, sx, n, t)
                else:
                    v = _q8_g32(q, s, xq, sx, n, t)
                out[t, n] = v


# TB tokens at a time (one unpack of a row's weights for all of them): for T a multiple of TB.
# Separate kernels from the one-token ones on purpose: with both loops in one kernel, LLVM
# compiled the one-token loop ~40% slower (measured), and decode is all one-token calls.

@njit(parallel=True, **JIT)
def gemm_q4_x4(xq, sx, xs, q, s, z, out):
    """out[T, N] = x @ W.T for a q4 matrix (q uint8 [N, ng, G/2], s/z uint16 bits [N, ng])
    and activations prepared by prepare_x with the same group size."""
    N, ng, h = q.shape
    T = xq.shape[0]
    _check(N, ng, 2 * h, xq, sx, out, s)
    if z.shape[0] != N or z.shape[1] != ng or xs.shape[0] != T or xs.shape[1] != ng:
        raise ValueError("quantized matmul: zero / group-sum arrays do not match")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(b * ROWS, n1):
                r = _q4_dotx(q, s, z, xq, sx, xs, n, t)
                for j in range(TB):
                    out[t + j, n] = r[j]


@njit(parallel=True, **JIT)
def gemm_q6_x4(xq, sx, xs, q, s, z, out):
    """out[T, N] = x @ W.T for a q6 matrix (q uint8 [N, ng, 3G/4], s/z uint16 bits [N, ng])
    and activations prepared by prepare_x with the same group size."""
    N, ng, b = q.shape
    T = xq.shape[0]
    _check(N, ng, 4 * b // 3, xq, sx, out, s)        # b = 3G/4 bytes per group
    if z.shape[0] != N or z.shape[1] != ng or xs.shape[0] != T or xs.shape[1] != ng:
        raise ValueError("quantized matmul: zero / group-sum arrays do not match")
    for blk in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (blk + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(blk * ROWS, n1):
                r = _q6_dotx(q, s, z, xq, sx, xs, n, t)
                for j in range(TB):
                    out[t + j, n] = r[j]


@njit(parallel=True, **JIT)
def gemm_q8_x4(xq, sx, q, s, out):
    """out[T, N] = x @ W.T for a q8 matrix (q int8 [N, ng, G], s uint16 bits [N, ng])."""
    N, ng, G = q.shape
    _check(N, ng, G, xq, sx, out, s)
    T = xq.shape[0]
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(b * ROWS, n1):
                r = _q8_dotx(q, s, xq, sx, n, t)
                for j in range(TB):
                    out[t + j, n] = r[j]

@njit(**JIT)
def _gemm_q4_split(xq, sx, xs, q, s, z, out):
    """gemm_q4 over any T: blocks of TB tokens, then the remaining tokens one by one."""
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        gemm_q4_x4(xq[:tb], sx[:tb], xs[:tb], q, s, z, out[:tb])
    if T > tb:
        gemm_q4(xq[tb:], sx[tb:], xs[tb:], q, s, z, out[tb:])


@njit(**JIT)
def _gemm_q6_split(xq, sx, xs, q, s, z, out):
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        gemm_q6_x4(xq[:tb], sx[:tb], xs[:tb], q, s, z, out[:tb])
    if T > tb:
        gemm_q6(xq[tb:], sx[tb:], xs[tb:], q, s, z, out[tb:])


@njit(**JIT)
def _gemm_q8_split(xq, sx, q, s, out):
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        gemm_q8_x4(xq[:tb], sx[:tb], q, s, out[:tb])
    if T > tb:
        gemm_q8(xq[tb:], sx[tb:], q, s, out[tb:])


@njit(**JIT)
def matmul_q4(x, q, s, z, out):
    """out[T, N] = x[T, K] @ W.T, W a q4 matrix given by its arrays (s, z as uint16 bits)."""
    xq, sx, xs = prepare_x(x, 2 * q.shape[2])
    _gemm_q4_split(xq, sx, xs, q, s, z, out)


@njit(**JIT)
def matmul_q6(x, q, s, z, out):
    """out[T, N] = x[T, K] @ W.T, W a q6 matrix given by its arrays (s, z as uint16 bits)."""
    xq, sx, xs = prepare_x(x, 4 * q.shape[2] // 3)
    _gemm_q6_split(xq, sx, xs, q, s, z, out)


@njit(**JIT)
def matmul_q8(x, q, s, out):
    """out[T, N] = x[T, K] @ W.T, W a q8 matrix given by its arrays (s as uint16 bits)."""
    xq, sx, xs = prepare_x(x, q.shape[2])
    _gemm_q8_split(xq, sx, q, s, out)


def qmatmul(x: np.ndarray, qt, out: np.ndarray | None = None) -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T for a QTensor (x float32 C-contiguous, 1-D x is one token)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise TypeError("qmatmul: x must be a C-contiguous float32 array")
    if out is None:
        out = np.empty(x.shape[:-1] + (qt.shape[0],), dtype=np.float32)
    elif out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TypeError("qmatmul: out must be a C-contiguous float32 array")
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    o2 = out if out.ndim == 2 else out.reshape(-1, out.shape[-1])
    kernel, args = matmul_call(qt)
    kernel(x2, *args, o2)
    return out


def _r8_args(qt) -> tuple:
    """(q, s, z) for the r8 kernels: one signature for q4 and q8 (q8 passes its scales as the
    zero array, which the q8 code never reads)."""
    q, s, z = qt.kargs
    return q, s, s if z is None else z


def matmul_call(qt):
    """(kernel, weight arguments) for `kernel(x, *args, out)`: out[T, N] = x[T, K] @ W.T, x and out
    2-D C-contiguous float32 (what qmatmul checks). For callers that bind a matrix once."""
    q, s, z = qt.kargs
    if qt.layout == "r8":
        return matmul_r8, _r8_args(qt)
    if qt.fmt == "q4":
        return matmul_q4, (q, s, z)
    if qt.fmt == "q6":
        return matmul_q6, (q, s, z)
    if qt.fmt == "q8":
        return matmul_q8, (q, s)
    raise ValueError(f"qmatmul: unknown quantized format {qt.fmt!r}")


# ---- one routed expert: down(silu(gate x) * up x) --------------------------------------------

@njit(inline="always", **JIT)
def _silu_mul(a, u):
    return a / (F32(1.0) + np.exp(-a)) * u


@njit(parallel=True, **JIT)
def _gate_up_q4(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    N, ng, hb = gq.shape
    T = xq.shape[0]
    _check(N, ng, 2 * hb, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape or gz.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(T):
            for n in range(b * ROWS, n1):
                if hb == 32:
                    a = _q4_g64(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q4_g64(uq, us, uz, xq, sx, xs, n, t)
                elif hb == 64:
                    a = _q4_g128(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q4_g128(uq, us, uz, xq, sx, xs, n, t)
                else:
                    a = _q4_g32(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q4_g32(uq, us, uz, xq, sx, xs, n, t)
                h[t, n] = a / (F32(1.0) + np.exp(-a)) * u


@njit(parallel=True, **JIT)
def _gate_up_q6(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    N, ng, b = gq.shape
    T = xq.shape[0]
    _check(N, ng, 4 * b // 3, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape or gz.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for blk in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (blk + 1) * ROWS)
        for t in range(T):
            for n in range(blk * ROWS, n1):
                if b == 48:
                    a = _q6_g64(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q6_g64(uq, us, uz, xq, sx, xs, n, t)
                elif b == 96:
                    a = _q6_g128(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q6_g128(uq, us, uz, xq, sx, xs, n, t)
                else:
                    a = _q6_g32(gq, gs, gz, xq, sx, xs, n, t)
                    u = _q6_g32(uq, us, uz, xq, sx, xs, n, t)
                h[t, n] = a / (F32(1.0) + np.exp(-a)) * u


@njit(parallel=True, **JIT)
def _gate_up_q8(xq, sx, gq, gs, uq, us, h):
    N, ng, G = gq.shape
    T = xq.shape[0]
    _check(N, ng, G, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(T):
            for n in range(b * ROWS, n1):
                if G == 64:
                    a = _q8_g64(gq, gs, xq, sx, n, t)
                    u = _q8_g64(uq, us, xq, sx, n, t)
                elif G == 128:
                    a = _q8_g128(gq, gs, xq, sx, n, t)
                    u = _q8_g128(uq, us, xq, sx, n, t)
                else:
                    a = _q8_g32(gq, gs, xq, sx, n, t)
                    u = _q8_g32(uq, us, xq, sx, n, t)
                h[t, n] = a / (F32(1.0) + np.exp(-a)) * u


@njit(parallel=True, **JIT)
def _gate_up_q4_x4(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    N, ng, hb = gq.shape
    T = xq.shape[0]
    _check(N, ng, 2 * hb, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape or gz.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(b * ROWS, n1):
                a = _q4_dotx(gq, gs, gz, xq, sx, xs, n, t)
                u = _q4_dotx(uq, us, uz, xq, sx, xs, n, t)
                for j in range(TB):
                    h[t + j, n] = _silu_mul(a[j], u[j])


@njit(parallel=True, **JIT)
def _gate_up_q6_x4(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    N, ng, b = gq.shape
    T = xq.shape[0]
    _check(N, ng, 4 * b // 3, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape or uz.shape != gz.shape or gz.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for blk in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (blk + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(blk * ROWS, n1):
                a = _q6_dotx(gq, gs, gz, xq, sx, xs, n, t)
                u = _q6_dotx(uq, us, uz, xq, sx, xs, n, t)
                for j in range(TB):
                    h[t + j, n] = _silu_mul(a[j], u[j])


@njit(parallel=True, **JIT)
def _gate_up_q8_x4(xq, sx, gq, gs, uq, us, h):
    N, ng, G = gq.shape
    T = xq.shape[0]
    _check(N, ng, G, xq, sx, h, gs)
    if uq.shape != gq.shape or us.shape != gs.shape:
        raise ValueError("expert: gate and up matrices differ in shape")
    for b in prange((N + ROWS - 1) // ROWS):
        n1 = min(N, (b + 1) * ROWS)
        for t in range(0, T, TB):
            for n in range(b * ROWS, n1):
                a = _q8_dotx(gq, gs, xq, sx, n, t)
                u = _q8_dotx(uq, us, xq, sx, n, t)
                for j in range(TB):
                    h[t + j, n] = _silu_mul(a[j], u[j])

@njit(**JIT)
def _gate_up_q4_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        _gate_up_q4_x4(xq[:tb], sx[:tb], xs[:tb], gq, gs, gz, uq, us, uz, h[:tb])
    if T > tb:
        _gate_up_q4(xq[tb:], sx[tb:], xs[tb:], gq, gs, gz, uq, us, uz, h[tb:])


@njit(**JIT)
def _gate_up_q6_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h):
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        _gate_up_q6_x4(xq[:tb], sx[:tb], xs[:tb], gq, gs, gz, uq, us, uz, h[:tb])
    if T > tb:
        _gate_up_q6(xq[tb:], sx[tb:], xs[tb:], gq, gs, gz, uq, us, uz, h[tb:])


@njit(**JIT)
def _gate_up_q8_split(xq, sx, gq, gs, uq, us, h):
    T = xq.shape[0]
    tb = T - T % TB
    if tb:
        _gate_up_q8_x4(xq[:tb], sx[:tb], gq, gs, uq, us, h[:tb])
    if T > tb:
        _gate_up_q8(xq[tb:], sx[tb:], gq, gs, uq, us, h[tb:])


@njit(**JIT)
def expert_q4(x, gq, gs, gz, uq, us, uz, dq, ds, dz, out):
    """out[T, H] = down(silu(gate x) * up x) for q4 gate/up [I, H] and down [H, I]."""
    xq, sx, xs = prepare_x(x, 2 * gq.shape[2])
    h = np.empty((x.shape[0], gq.shape[0]), dtype=np.float32)
    _gate_up_q4_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h)
    hq, hsx, hxs = prepare_x(h, 2 * dq.shape[2])
    _gemm_q4_split(hq, hsx, hxs, dq, ds, dz, out)


@njit(**JIT)
def expert_q6(x, gq, gs, gz, uq, us, uz, dq, ds, dz, out):
    """out[T, H] = down(silu(gate x) * up x) for q6 gate/up [I, H] and down [H, I]."""
    xq, sx, xs = prepare_x(x, 4 * gq.shape[2] // 3)
    h = np.empty((x.shape[0], gq.shape[0]), dtype=np.float32)
    _gate_up_q6_split(xq, sx, xs, gq, gs, gz, uq, us, uz, h)
    hq, hsx, hxs = prepare_x(h, 4 * dq.shape[2] // 3)
    _gemm_q6_split(hq, hsx, hxs, dq, ds, dz, out)


@njit(**JIT)
def expert_q8(x, gq, gs, uq, us, dq, ds, out):
    """out[T, H] = down(silu(gate x) * up x) for q8 gate/up [I, H] and down [H, I]."""
    xq, sx, _ = prepare_x(x, gq.shape[2])
    h = np.empty((x.shape[0], gq.shape[0]), dtype=np.float32)
    _gate_up_q8_split(xq, sx, gq, gs, uq, us, h)
    hq, hsx, _ = prepare_x(h, dq.shape[2])
    _gemm_q8_split(hq, hsx, dq, ds, out)


def _expert_call(gate, up, down):
    """(kernel, weight arguments) of the fused expert kernel for three QTensors, checked."""
    if not (gate.fmt == up.fmt == down.fmt and gate.layout == up.layout == down.layout
            and gate.group == up.group and gate.shape == up.shape):
        raise ValueError("expert_q: gate, up and down must share a format and layout, and gate/up a group size and shape")
    g, u, d = gate.kargs, up.kargs, down.kargs
    if gate.layout == "r8":
        return expert_r8, _r8_args(gate) + _r8_args(up) + _r8_args(down)
    if gate.fmt == "q4":
        return expert_q4, (g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2])
    if gate.fmt == "q6":
        return expert_q6, (g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2])
    if gate.fmt == "q8":
        return expert_q8, (g[0], g[1], u[0], u[1], d[0], d[1])
    raise ValueError(f"expert_q: unknown quantized format {gate.fmt!r}")


def expert_q(x: np.ndarray, gate, up, down, out: np.ndarray | None = None) -> np.ndarray:
    """out[T, H] = down @ (silu(gate @ x) * (up @ x)) for one expert given as three QTensors
    (gate, up [I, H]; down [H, I]); x float32 [T, H] C-contiguous. One call from Python: gate and
    up share one rounding of x and run in the same pass over rows."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2:
        raise TypeError("expert_q: x must be a 2-D C-contiguous float32 array")
    if out is None:
        out = np.empty((x.shape[0], down.shape[0]), dtype=np.float32)
    elif out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TypeError("expert_q: out must be a C-contiguous float32 array")
    kernel, args = _expert_call(gate, up, down)
    kernel(x, *args, out)
    return out


def expert_runner(gate, up, down):
    """`run(x) -> out` for one expert (three QTensors), with expert_q's checks on the weights
    done once here rather than on every call: decode runs ~300 experts per token, and Python
    work per call adds up. x must be a 2-D C-contiguous float32 array (the model's own)."""
    kernel, args = _expert_call(gate, up, down)
    H = down.shape[0]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((x.shape[0], H), dtype=np.float32)
        kernel(x, *args, out)
        return out
    return run


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
# Measured against the rows kernels (q4, G=64, 2 threads, same bytes, /tmp prototype, 2 runs):
# T=4 tokens per unpack (prefill) 1.37-1.69x cold and 1.47-2.05x hot; T=1 (decode) 0.97-1.21x.
# The integer sums are exact as before, so the results equal the rows kernels' up to float32
# summation order (~1e-7 relative).

R8 = 8                  # rows per interleaved block


@intrinsic
def _levels_per_byte(typingctx, q):
    """2 for a q4 array (uint8, two nibbles per byte), 1 for q8 (int8): a compile-time constant."""
    n = 2 if q.dtype == types.uint8 else 1

    def codegen(context, builder, sig, args):
        return ir.Constant(_i64, n)
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
        if not ((_is_c(w, types.uint8, 3) or _is_c(w, types.int8, 3)) and _is_c(s, types.uint16, 3)
                and _is_c(z, types.uint16, 3) and _is_c(xq, types.int16, 2)
                and _is_c(sx, types.float32, 2) and _is_c(xs, types.float32, 2)):
            return None
        return types.UniTuple(types.float32, R8 * TB)(w, s, z, xq, sx, xs, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        w, s, z, xq, sx, xs, b, t = args
        tw, ts, tz, txq, tsx, txs = sig.args[:6]
        q4 = tw.dtype == types.uint8
        bpb = (4 if q4 else 8) * G                    # bytes per (row block, group)
        prefetch = PREFETCH_Q4 if q4 else 0
        wa, (_, ng, _) = _array(context, builder, tw, w)
        sa, _ = _array(context, builder, ts, s)
        xa, (T, K) = _array(context, builder, txq, xq)
        sxa, _ = _array(context, builder, tsx, sx)
        wblk = builder.gep(wa.data, [builder.mul(b, builder.mul(ng, _c64(bpb)))])
        sblk = builder.gep(sa.data, [builder.mul(b, builder.mul(ng, _c64(R8)))])
        last = builder.sub(T, _c64(1))      # a token past the end reads the last one (result unused)
        toks = [builder.select(builder.icmp_signed("<", builder.add(t, _c64(j)), T), builder.add(t, _c64(j)), last)
                if j else t for j in range(TB)]
        xrows = [builder.gep(xa.data, [builder.mul(tj, K)]) for tj in toks]
        sxrows = [builder.gep(sxa.data, [builder.mul(tj, ng)]) for tj in toks]
        if q4:
            za, _ = _array(context, builder, tz, z)
            xsa, _ = _array(context, builder, txs, xs)
            zblk = builder.gep(za.data, [builder.mul(b, builder.mul(ng, _c64(R8)))])
            xsrows = [builder.gep(xsa.data, [builder.mul(tj, ng)]) for tj in toks]
        v8 = _vt(_f32, R8)
        vi16 = _vt(_i32, 16)
        faccs = [cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(TB)]
        zaccs = [cgutils.alloca_once_value(builder, ir.Constant(v8, None)) for _ in range(TB)] if q4 else None
        m15 = ir.Constant(_vt(_i16, 32), [15] * 32)
        sh4 = ir.Constant(_vt(_i16, 32), [4] * 32)
        bcast = ir.Constant(_vt(_i32, 32), [0, 1, 2, 3] * R8)          # 4 inputs -> all 8 rows
        even = ir.Constant(_vt(_i32, R8), list(range(0, 16, 2)))
        odd = ir.Constant(_vt(_i32, R8), list(range(1, 16, 2)))
        if prefetch:
            pf = _intrinsic_fn(builder, "llvm.prefetch.p0", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])

        with cgutils.for_range(builder, ng) as lg:
            g = lg.index
            wg = builder.gep(wblk, [builder.mul(g, _c64(bpb))])
            if prefetch:
                for off in range(0, bpb, 64):
                    p = builder.bitcast(builder.gep(wg, [_c64(prefetch + off)]), _i8.as_pointer())
                    builder.call(pf, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
            xgs = [builder.gep(xr, [builder.mul(g, _c64(G))]) for xr in xrows]
            iaccs = [[ir.Constant(vi16, None)] * nacc for _ in range(TB)]

            def chunks():
                if q4:    # 32 bytes: low nibbles = chunk 2m, high nibbles = chunk 2m+1
                    for m in range(G // 8):
                        v = builder.zext(_vload(builder, wg, _c64(32 * m), _vt(_i8, 32), 1), _vt(_i16, 32))
                        yield 2 * m, builder.and_(v, m15)
                        yield 2 * m + 1, builder.lshr(v, sh4)
                else:     # 32 bytes = one chunk of int8 levels
                    for m in range(nchunk):
                        yield m, builder.sext(_vload(builder, wg, _c64(32 * m), _vt(_i8, 32), 1), _vt(_i16, 32))

            for c, wv in chunks():
                for j in range(TB):
                    xv = _vload(builder, xgs[j], _c64(4 * c), _vt(_i16, 4), 2)
                    xb = builder.shuffle_vector(xv, xv, bcast)
                    iaccs[j][c % nacc] = _madd(builder, wv, xb, iaccs[j][c % nacc])

            sv = _half_to_f32(builder, _vload(builder, sblk, builder.mul(g, _c64(R8)), _vt(_i16, R8), 2))
            if q4:
                zv = _half_to_f32(builder, _vload(builder, zblk, builder.mul(g, _c64(R8)), _vt(_i16, R8), 2))
            for j in range(TB):
                a = iaccs[j][0]
                for o in iaccs[j][1:]:
                    a = builder.add(a, o)
                rows = builder.add(builder.shuffle_vector(a, a, even), builder.shuffle_vector(a, a, odd))
                sc = builder.fmul(sv, _splat(builder, builder.load(builder.gep(sxrows[j], [g])), R8))
                builder.store(_vfma(builder, builder.sitofp(rows, v8), sc, builder.load(faccs[j])), faccs[j])
                if q4:
                    xsg = _splat(builder, builder.load(builder.gep(xsrows[j], [g])), R8)
                    builder.store(_vfma(builder, zv, xsg, builder.load(zaccs[j])), zaccs[j])

        vals = []
        for j in range(TB):
            res = builder.load(faccs[j])
            if q4:
                res = builder.fadd(res, builder.load(zaccs[j]))
            vals += [builder.extract_element(res, ir.Constant(_i32, r)) for r in range(R8)]
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
                h[t, R8 * b + i] = _silu_mul(a[i], u[i])


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
                    h[t + j, R8 * b + i] = _silu_mul(a[R8 * j + i], u[R8 * j + i])


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
