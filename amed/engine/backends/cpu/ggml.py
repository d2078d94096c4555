"""Numba kernels for llama.cpp's (ggml) block types, as GGUF files store them.

A GGUF matrix [N, K] is N rows of K/B blocks of `size` bytes each (B = 32 or 256 values per
block); a row is a contiguous byte range, so a matrix is a 2-D uint8 array [N, row_bytes] (a view
of the file's memory map) and a stacked expert tensor [E, N, row_bytes] hands out expert e as the
contiguous [N, row_bytes] slice. `matmul_ggml(x, raw, typ, h2f, out)` computes out[T, N] =
x[T, K] @ W.T, dequantizing each row once into a float32 buffer and reusing it for every token;
`rows_ggml` gathers rows as float32 (embeddings, norms). The dequantization follows ggml's
reference C code (`dequantize_row_*` in ggml-quants.c) value for value; tests/test_gguf.py checks
every type against the `gguf` package's NumPy dequantization.

`typ` is ggml's own type number (GGML_TYPES). `h2f` is the float16 -> float32 table (H2F):
scales are IEEE half floats, read as two bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from amed.formats.gguf import GGML_TYPES, SUPPORTED, TYPE_NAMES  # noqa: F401 - the block types

F32 = np.float32
JIT = dict(cache=True, nogil=True)

SUPPORTED_IDS = frozenset(GGML_TYPES[n][0] for n in SUPPORTED)

H2F = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def row_bytes(type_id: int, k: int) -> int:
    """Bytes of one row of k values (k a multiple of the type's block)."""
    _, blk, size = GGML_TYPES[TYPE_NAMES[type_id]]
    return k // blk * size


# ---- one row -> float32 ----------------------------------------------------------------------------

@njit(**JIT)
def _h(r, i, h2f):
    return h2f[np.int64(r[i]) | (np.int64(r[i + 1]) << 8)]


@njit(**JIT)
def _q4_0(r, nb, h2f, y):
    for b in range(nb):
        o = b * 18
        d = _h(r, o, h2f)
        for j in range(16):
            q = np.int64(r[o + 2 + j])
            y[b * 32 + j] = F32((q & 15) - 8) * d
            y[b * 32 + j + 16] = F32((q >> 4) - 8) * d


@njit(**JIT)
def _q4_1(r, nb, h2f, y):
    for b in range(nb):
        o = b * 20
        d, m = _h(r, o, h2f), _h(r, o + 2, h2f)
        for j in range(16):
            q = r[o + 4 + j]
            y[b * 32 + j] = F32(q & 15) * d + m
            y[b * 32 + j + 16] = F32(q >> 4) * d + m


@njit(**JIT)
def _q5(r, nb, h2f, y, with_min):
    size = 24 if with_min else 22
    for b in range(nb):
        o = b * size
        d = _h(r, o, h2f)
        m = _h(r, o + 2, h2f) if with_min else F32(0.0)
        p = o + (4 if with_min else 2)
        qh = np.int64(r[p]) | (np.int64(r[p + 1]) << 8) | (np.int64(r[p + 2]) << 16) | (np.int64(r[p + 3]) << 24)
        off = 0 if with_min else 16
        for j in range(16):
            q = np.int64(r[p + 4 + j])
            h0 = ((qh >> j) << 4) & 16
            h1 = (qh >> (j + 12)) & 16
            y[b * 32 + j] = F32(((q & 15) | h0) - off) * d + m
            y[b * 32 + j + 16] = F32(((q >> 4) | h1) - off) * d + m


@njit(**JIT)
def _q8_0(r, nb, h2f, y):
    for b in range(nb):
        o = b * 34
        d = _h(r, o, h2f)
        for j in range(32):
            y[b * 32 + j] = F32((np.int64(r[o + 2 + j]) ^ 128) - 128) * d


@njit(**JIT)
def _q2_k(r, nb, h2f, y):
    for b in range(nb):
        o = b * 84                 # scales[16], qs[64], d, dmin
        d, dmin = _h(r, o + 80, h2f), _h(r, o + 82, h2f)
        i = b * 256
        s = 0
        for half in range(2):
            q = o + 16 + half * 32
            shift = 0
            for _j in range(4):
                for part in range(2):
                    sc = r[o + s]
                    s += 1
                    dl, ml = d * F32(sc & 15), dmin * F32(sc >> 4)
                    for l in range(16):
                        y[i] = dl * F32((r[q + part * 16 + l] >> shift) & 3) - ml
                        i += 1
                shift += 2


@njit(**JIT)
def _q3_k(r, nb, h2f, y):
    for b in range(nb):
        o = b * 110                # hmask[32], qs[64], scales[12], d
        d = _h(r, o + 108, h2f)
        sp = o + 96
        i = b * 256
        s = 0
        m = 1
        for half in range(2):
            q = o + 32 + half * 32
            shift = 0
            for _j in range(4):
                for part in range(2):
                    lo = (r[sp + s] & 15) if s < 8 else (r[sp + s - 8] >> 4)
                    hi = (r[sp + 8 + (s & 3)] >> (2 * (s >> 2))) & 3
                    dl = d * F32((np.int64(lo) | (np.int64(hi) << 4)) - 32)
                    s += 1
                    for l in range(16):
                        qi = np.int64((r[q + part * 16 + l] >> shift) & 3)
                        if not (r[o + part * 16 + l] & m):
                            qi -= 4
                        y[i] = dl * F32(qi)
                        i += 1
                shift += 2
                m <<= 1


@njit(**JIT)
def _scale_min_k4(j, r, p):
    """(scale, min) number j of a K-quant's 12 packed 6-bit scale bytes at r[p:p+12]."""
    if j < 4:
        return r[p + j] & 63, r[p + j + 4] & 63
    return ((r[p + j + 4] & 15) | ((r[p + j - 4] >> 6) << 4),
            (r[p + j + 4] >> 4) | ((r[p + j] >> 6) << 4))


@njit(**JIT)
def _q45_k(r, nb, h2f, y, five):
    size = 176 if five else 144     # d, dmin, scales[12], (qh[32]), qs[128]
    for b in range(nb):
        o = b * size
        d, dmin = _h(r, o, h2f), _h(r, o + 2, h2f)
        qh = o + 16
        q = o + (48 if five else 16)
        i = b * 256
        u1, u2 = 1, 2
        for j in range(4):
            sc, mn = _scale_min_k4(2 * j, r, o + 4)
            d1, m1 = d * F32(sc), dmin * F32(mn)
            sc, mn = _scale_min_k4(2 * j + 1, r, o + 4)
            d2, m2 = d * F32(sc), dmin * F32(mn)
            for l in range(32):
                v = np.int64(r[q + l] & 15)
                if five and (r[qh + l] & u1):
                    v += 16
                y[i + l] = d1 * F32(v) - m1
            for l in range(32):
                v = np.int64(r[q + l] >> 4)
                if five and (r[qh + l] & u2):
                    v += 16
                y[i + 32 + l] = d2 * F32(v) - m2
            q += 32
            i += 64
            u1 <<= 2
            u2 <<= 2


@njit(**JIT)
def _q6_k(r, nb, h2f, y):
    for b in range(nb):
        o = b * 210                # ql[128], qh[64], scales[16] (int8), d
        d = _h(r, o + 208, h2f)
        for half in range(2):
            ql, qh, sc = o + half * 64, o + 128 + half * 32, o + 192 + half * 8
            i = b * 256 + half * 128
            for l in range(32):
                s = l // 16
                h = np.int64(r[qh + l])
                q1 = ((np.int64(r[ql + l]) & 15) | ((h & 3) << 4)) - 32
                q2 = ((np.int64(r[ql + l + 32]) & 15) | (((h >> 2) & 3) << 4)) - 32
                q3 = ((np.int64(r[ql + l]) >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = ((np.int64(r[ql + l + 32]) >> 4) | (((h >> 6) & 3) << 4)) - 32
                for k, qv in ((0, q1), (2, q2), (4, q3), (6, q4)):
                    c = np.int64(r[sc + s + k])
                    y[i + l + 16 * k] = d * F32(c - 256 if c > 127 else c) * F32(qv)


@njit(**JIT)
def dequant_row(r, typ, k, h2f, y):
    """y[:k] = row r (uint8 bytes) of ggml type `typ` as float32."""
    if typ == 0:
        f = r[:4 * k].view(np.float32)
        for i in range(k):
            y[i] = f[i]
    elif typ == 1:
        for i in range(k):
            y[i] = _h(r, 2 * i, h2f)
    elif typ == 30:
        u = y.view(np.uint32)
        for i in range(k):
            u[i] = (np.uint32(r[2 * i]) | (np.uint32(r[2 * i + 1]) << 8)) << 16
    elif typ == 2:
        _q4_0(r, k // 32, h2f, y)
    elif typ == 3:
        _q4_1(r, k // 32, h2f, y)
    elif typ == 6:
        _q5(r, k // 32, h2f, y, False)
    elif typ == 7:
        _q5(r, k // 32, h2f, y, True)
    elif typ == 8:
        _q8_0(r, k // 32, h2f, y)
    elif typ == 10:
        _q2_k(r, k // 256, h2f, y)
    elif typ == 11:
        _q3_k(r, k // 256, h2f, y)
    elif typ == 12:
        _q45_k(r, k // 256, h2f, y, False)
    elif typ == 13:
        _q45_k(r, k // 256, h2f, y, True)
    elif typ == 14:
        _q6_k(r, k // 256, h2f, y)
    else:
        raise ValueError("dequant_row: unsupported ggml type")


# ---- one row . x, without a buffer (decode: a few tokens) ---------------------------------------
# Each sub-block's integer levels are multiplied into x and its scale (and min) applied once; the
# loops over a block's bytes have no branches, so LLVM vectorizes them.

FM = {"reassoc", "contract"}


@njit(fastmath=FM, **JIT)
def _dot_q4_k(r, x, nb, h2f):
    acc = F32(0.0)
    for b in range(nb):
        o = b * 144
        d, dmin = _h(r, o, h2f), _h(r, o + 2, h2f)
        for j in range(4):
            q, i = o + 16 + 32 * j, b * 256 + 64 * j
            s1 = s2 = x1 = x2 = F32(0.0)
            for l in range(32):
                v = np.int32(r[q + l])
                s1 += x[i + l] * F32(v & 15)
                s2 += x[i + 32 + l] * F32(v >> 4)
                x1 += x[i + l]
                x2 += x[i + 32 + l]
            sc1, mn1 = _scale_min_k4(2 * j, r, o + 4)
            sc2, mn2 = _scale_min_k4(2 * j + 1, r, o + 4)
            acc += d * (F32(sc1) * s1 + F32(sc2) * s2) - dmin * (F32(mn1) * x1 + F32(mn2) * x2)
    return acc


@njit(fastmath=FM, **JIT)
def _dot_q6_k(r, x, nb, h2f):
    ri = r.view(np.int8)
    acc = F32(0.0)
    for b in range(nb):
        o = b * 210
        d = _h(r, o + 208, h2f)
        blk = F32(0.0)
        for half in range(2):
            ql, qh, sc = o + half * 64, o + 128 + half * 32, o + 192 + half * 8
            i = b * 256 + half * 128
            for g in range(2):
                s1 = s2 = s3 = s4 = F32(0.0)
                for l in range(16 * g, 16 * g + 16):
                    h = np.int32(r[qh + l])
                    a, c = np.int32(r[ql + l]), np.int32(r[ql + l + 32])
                    s1 += x[i + l] * F32(((a & 15) | ((h & 3) << 4)) - 32)
                    s2 += x[i + l + 32] * F32(((c & 15) | (((h >> 2) & 3) << 4)) - 32)
                    s3 += x[i + l + 64] * F32(((a >> 4) | (((h >> 4) & 3) << 4)) - 32)
                    s4 += x[i + l + 96] * F32(((c >> 4) | (((h >> 6) & 3) << 4)) - 32)
                blk += (F32(ri[sc + g]) * s1 + F32(ri[sc + g + 2]) * s2 + F32(ri[sc + g + 4]) * s3
                        + F32(ri[sc + g + 6]) * s4)
        acc += d * blk
    return acc


@njit(fastmath=FM, **JIT)
def _dot_q5_k(r, x, nb, h2f):
    acc = F32(0.0)
    for b in range(nb):
        o = b * 176                # d, dmin, scales[12], qh[32], qs[128]
        d, dmin = _h(r, o, h2f), _h(r, o + 2, h2f)
        for j in range(4):
            q, i = o + 48 + 32 * j, b * 256 + 64 * j
            s1 = s2 = x1 = x2 = F32(0.0)
            for l in range(32):
                v, hb = np.int32(r[q + l]), np.int32(r[o + 16 + l]) >> (2 * j)
                s1 += x[i + l] * F32((v & 15) | ((hb & 1) << 4))
                s2 += x[i + 32 + l] * F32((v >> 4) | ((hb & 2) << 3))
                x1 += x[i + l]
                x2 += x[i + 32 + l]
            sc1, mn1 = _scale_min_k4(2 * j, r, o + 4)
            sc2, mn2 = _scale_min_k4(2 * j + 1, r, o + 4)
            acc += d * (F32(sc1) * s1 + F32(sc2) * s2) - dmin * (F32(mn1) * x1 + F32(mn2) * x2)
    return acc


@njit(fastmath=FM, **JIT)
def _dot_q2_k(r, x, nb, h2f):
    acc = F32(0.0)
    for b in range(nb):
        o = b * 84                 # scales[16], qs[64], d, dmin
        d, dmin = _h(r, o + 80, h2f), _h(r, o + 82, h2f)
        for half in range(2):
            q = o + 16 + 32 * half
            for j in range(4):
                i = b * 256 + half * 128 + j * 32
                s1 = s2 = x1 = x2 = F32(0.0)
                for l in range(16):
                    s1 += x[i + l] * F32((np.int32(r[q + l]) >> (2 * j)) & 3)
                    s2 += x[i + 16 + l] * F32((np.int32(r[q + 16 + l]) >> (2 * j)) & 3)
                    x1 += x[i + l]
                    x2 += x[i + 16 + l]
                sa, sb = np.int32(r[o + half * 8 + 2 * j]), np.int32(r[o + half * 8 + 2 * j + 1])
                acc += d * (F32(sa & 15) * s1 + F32(sb & 15) * s2) - dmin * (F32(sa >> 4) * x1 + F32(sb >> 4) * x2)
    return acc


@njit(**JIT)
def _q3_scale(r, sp, s):
    lo = (np.int32(r[sp + s]) & 15) if s < 8 else (np.int32(r[sp + s - 8]) >> 4)
    hi = (np.int32(r[sp + 8 + (s & 3)]) >> (2 * (s >> 2))) & 3
    return F32((lo | (hi << 4)) - 32)


@njit(fastmath=FM, **JIT)
def _dot_q3_k(r, x, nb, h2f):
    acc = F32(0.0)
    for b in range(nb):
        o = b * 110                # hmask[32], qs[64], scales[12], d
        blk = F32(0.0)
        for half in range(2):
            q = o + 32 + 32 * half
            for j in range(4):
                i, bit, sh = b * 256 + half * 128 + j * 32, half * 4 + j, 2 * j
                s1 = s2 = F32(0.0)
                for l in range(16):
                    v1 = ((np.int32(r[q + l]) >> sh) & 3) + (((np.int32(r[o + l]) >> bit) & 1) << 2) - 4
                    v2 = ((np.int32(r[q + 16 + l]) >> sh) & 3) + (((np.int32(r[o + 16 + l]) >> bit) & 1) << 2) - 4
                    s1 += x[i + l] * F32(v1)
                    s2 += x[i + 16 + l] * F32(v2)
                s = half * 8 + 2 * j
                blk += _q3_scale(r, o + 96, s) * s1 + _q3_scale(r, o + 96, s + 1) * s2
        acc += _h(r, o + 108, h2f) * blk
    return acc


FUSED_T = 4                        # up to this many tokens the fused dots beat dequantize-then-dot


@njit(**JIT)
def _row_dot(r, typ, x, k, h2f):
    """Row r . x for the block types with a fused dot (`has_row_dot`)."""
    if typ == 10:
        return _dot_q2_k(r, x, k // 256, h2f)
    if typ == 11:
        return _dot_q3_k(r, x, k // 256, h2f)
    if typ == 12:
        return _dot_q4_k(r, x, k // 256, h2f)
    if typ == 13:
        return _dot_q5_k(r, x, k // 256, h2f)
    return _dot_q6_k(r, x, k // 256, h2f)


@njit(**JIT)
def has_row_dot(typ):
    """The K-quants (Q4_K_M's Q4_K + Q6_K, Q5_K_M's, Q2_K's Q2_K + Q3_K ...): their 32-value
    sub-blocks make loops LLVM vectorizes (2-3x the dequantize-then-dot path at one token). For
    the 32-value blocks of Q4_0, Q8_0, ... dequantize-then-dot measured as fast or faster."""
    return 10 <= typ <= 14


# ---- matrices ----------------------------------------------------------------------------------

@njit(fastmath={"reassoc", "contract"}, **JIT)
def _dot(a, b, k):
    acc = F32(0.0)
    for i in range(k):
        acc += a[i] * b[i]
    return acc


ROWS = 16                          # rows per task: one float32 buffer per task


@njit(parallel=True, **JIT)
def matmul_ggml(x, raw, typ, h2f, out):
    """out[T, N] = x[T, K] @ W.T for W [N, K] stored as ggml blocks raw [N, row bytes]."""
    T, K = x.shape
    N = raw.shape[0]
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError("matmul_ggml: shapes do not match (x [T, K], W [N, K], out [T, N])")
    if T <= FUSED_T and has_row_dot(typ):
        for n in prange(N):
            for t in range(T):
                out[t, n] = _row_dot(raw[n], typ, x[t], K, h2f)
        return
    for c in prange((N + ROWS - 1) // ROWS):
        buf = np.empty(K, np.float32)
        for n in range(c * ROWS, min(N, c * ROWS + ROWS)):
            dequant_row(raw[n], typ, K, h2f, buf)
            for t in range(T):
                out[t, n] = _dot(x[t], buf, K)


@njit(**JIT)
def rows_ggml(raw, typ, k, rows, h2f, out):
    """out[i] = row rows[i] of W (ggml blocks raw [N, row bytes]) as float32 [k]."""
    for i in range(len(rows)):
        dequant_row(raw[rows[i]], typ, k, h2f, out[i])
