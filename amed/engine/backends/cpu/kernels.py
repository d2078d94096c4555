"""Float kernels of the forward pass, in Numba: norms, RoPE, attention, routing, bf16/f32 matmul.

Kernels know nothing about the model: they take arrays and ints. Quantized matmuls live in
qdot.py / qrows.py / qr8.py. Conventions (see docs/kernels-and-tooling.md):
  * activations are float32, C-contiguous; weights are read-only views of a memory map;
  * bf16 weights stay bf16 (uint16) and are widened in the inner loop by a bit shift;
  * `fastmath={"reassoc", "contract"}` lets LLVM vectorize reductions and keeps NaN/Inf semantics;
  * `cache=True`: the second start loads machine code from NUMBA_CACHE_DIR instead of compiling.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

F32 = np.float32
FM = {"reassoc", "contract"}
JIT = dict(fastmath=FM, cache=True, nogil=True)


@intrinsic
def bf16_to_f32(typingctx, u):
    """float32 whose upper 16 bits are the bf16 pattern `u` (exact widening)."""
    if u == types.uint16:
        def codegen(context, builder, sig, args):
            v = builder.zext(args[0], ir.IntType(32))
            v = builder.shl(v, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(u), codegen


# ---- matrix products: out[T, N] = x[T, K] @ W[N, K].T ------------------------------------------
# One thread per block of output rows; each weight row is read once from memory and reused for
# every token while it sits in L1 (the "loop of GEMVs" shape that measured best for small T).

@njit(**JIT)
def _check_matmul(x, w, out):
    """Numba does not bounds-check: a shape mismatch would read or write past an array."""
    if w.shape[1] != x.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != w.shape[0]:
        raise ValueError("matmul: shapes do not match (x [T, K], W [N, K], out [T, N])")


@njit(parallel=True, **JIT)
def matmul_bf16(x, w, out):
    _check_matmul(x, w, out)
    T, K = x.shape
    N = w.shape[0]
    for n in prange(N):
        for t in range(T):
            acc = F32(0.0)
            for k in range(K):
                acc += x[t, k] * bf16_to_f32(w[n, k])
            out[t, n] = acc


@njit(parallel=True, **JIT)
def matmul_f32(x, w, out):
    _check_matmul(x, w, out)
    T, K = x.shape
    N = w.shape[0]
    for n in prange(N):
        for t in range(T):
            acc = F32(0.0)
            for k in range(K):
                acc += x[t, k] * w[n, k]
            out[t, n] = acc


@njit(**JIT)
def bf16_rows_to_f32(w, rows, out):
    """Gather rows of a bf16 matrix as float32 (embedding lookup)."""
    K = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for k in range(K):
            out[i, k] = bf16_to_f32(w[r, k])


# ---- normalization ---------------------------------------------------------------------------

@njit(parallel=True, **JIT)
def rmsnorm(x, w, eps, out):
    """out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), reduction in float32 (architecture §2a)."""
    T, H = x.shape
    for t in prange(T):
        ss = F32(0.0)
        for i in range(H):
            ss += x[t, i] * x[t, i]
        r = F32(1.0) / np.sqrt(ss / F32(H) + F32(eps))
        for i in range(H):
            out[t, i] = w[i] * (x[t, i] * r)


# ---- attention -------------------------------------------------------------------------------

@njit(parallel=True, **JIT)
def qk_norm_rope_store(qkv, nh, nkv, d, rot, qn, kn, use_qk_norm, eps, cos, sin, pos,
                       q_out, k_cache, v_cache):
    """Split fused QKV, per-head RMSNorm on q and k, partial NeoX RoPE, append k/v to the cache.

    qkv [T, (nh + 2 nkv) d] holds [q heads | k heads | v heads] (architecture §2b.2).
    QK-norm comes BEFORE RoPE (§2b.3); RoPE rotates pairs (j, j + rot/2) for j < rot/2 on the
    first `rot` dims only, with cos/sin rows indexed by absolute position (§2b.4).
    q_out [T, nh, d]; k_cache / v_cache [nkv, S, d], written at positions pos..pos+T-1.
    """
    T = qkv.shape[0]
    half = rot // 2
    for job in prange(T * (nh + nkv)):
        t = job // (nh + nkv)
        h = job % (nh + nkv)
        p = pos + t
        base = h * d
        buf = np.empty(d, dtype=np.float32)
        for i in range(d):
            buf[i] = qkv[t, base + i]
        if use_qk_norm:
            wn = qn if h < nh else kn
            ss = F32(0.0)
            for i in range(d):
                ss += buf[i] * buf[i]
            r = F32(1.0) / np.sqrt(ss / F32(d) + F32(eps))
            for i in range(d):
                buf[i] = wn[i] * (buf[i] * r)
        for j in range(half):
            a = buf[j]
            b = buf[j + half]
            c = cos[p, j]
            s = sin[p, j]
            buf[j] = a * c - b * s
            buf[j + half] = b * c + a * s
        if h < nh:
            for i in range(d):
                q_out[t, h, i] = buf[i]
        else:
            kh = h - nh
            for i in range(d):
                k_cache[kh, p, i] = buf[i]
                v_cache[kh, p, i] = qkv[t, (nh + nkv + kh) * d + i]


@njit(parallel=True, **JIT)
def attention(q, k_cache, v_cache, pos, out):
    """Causal GQA attention for T new queries at positions pos..pos+T-1 over the cache.

    q [T, nh, d]; caches [nkv, S, d]; out [T, nh * d]. Query head h reads kv head h // (nh/nkv).
    Softmax in float32 with the max subtracted.

    One job per (query, kv head) handles all the query heads that share that kv head, so each
    cached key/value row is read once for the group instead of once per query head (8x less
    memory traffic at Ling's 32/4 heads; measured 6-7x faster over a 512..4096-token cache).
    """
    T, nh, d = q.shape
    nkv = k_cache.shape[0]
    group = nh // nkv
    scale = F32(1.0 / np.sqrt(d))
    for job in prange(T * nkv):
        t = job // nkv
        kh = job - t * nkv
        n = pos + t + 1                      # keys visible to this query
        h0 = kh * group
        qs = np.empty((group, d), dtype=np.float32)
        for g in range(group):
            for i in range(d):
                qs[g, i] = q[t, h0 + g, i] * scale
        scores = np.empty((group, n), dtype=np.float32)
        for s in range(n):
            for g in range(group):
                acc = F32(0.0)
                for i in range(d):
                    acc += qs[g, i] * k_cache[kh, s, i]
                scores[g, s] = acc
        for g in range(group):
            m = F32(-np.inf)
            for s in range(n):
                m = max(m, scores[g, s])
            total = F32(0.0)
            for s in range(n):
                e = np.exp(scores[g, s] - m)
                scores[g, s] = e
                total += e
            inv = F32(1.0) / total
            for s in range(n):
                scores[g, s] *= inv
        o = np.zeros((group, d), dtype=np.float32)
        for s in range(n):
            for g in range(group):
                p = scores[g, s]
                for i in range(d):
                    o[g, i] += p * v_cache[kh, s, i]
        for g in range(group):
            for i in range(d):
                out[t, (h0 + g) * d + i] = o[g, i]


# ---- feed-forward ----------------------------------------------------------------------------

@njit(parallel=True, **JIT)
def silu_mul(gate, up, out):
    """out = silu(gate) * up, silu(z) = z * sigmoid(z)."""
    T, N = gate.shape
    for t in prange(T):
        for i in range(N):
            g = gate[t, i]
            out[t, i] = g / (F32(1.0) + np.exp(-g)) * up[t, i]


# ---- MoE routing (architecture §2d) ------------------------------------------------------------

@njit(**JIT)
def route(logits, bias, n_group, topk_group, k, scaling, idx_out, w_out):
    """Sigmoid router with expert bias and group-limited top-k.

    logits [T, E] float32 (router matmul in fp32); bias [E] float32 (selection only).
    Groups are contiguous blocks of E / n_group experts; a group's score is the sum of its two
    largest biased scores; the `topk_group` best groups stay eligible; the `k` best eligible
    experts by biased score are chosen; their UNBIASED sigmoid scores are renormalized to sum 1
    and multiplied by `scaling`. Writes idx_out [T, k] (int64) and w_out [T, k] (float32).
    """
    T, E = logits.shape
    per = E // n_group
    s = np.empty(E, dtype=np.float32)
    b = np.empty(E, dtype=np.float32)
    gscore = np.empty(n_group, dtype=np.float32)
    keep = np.empty(n_group, dtype=np.bool_)
    for t in range(T):
        for e in range(E):
            s[e] = F32(1.0) / (F32(1.0) + np.exp(-logits[t, e]))
            b[e] = s[e] + bias[e]
        # group score: top-2 sum of biased scores
        for g in range(n_group):
            m1 = F32(-np.inf)
            m2 = F32(-np.inf)
            for e in range(g * per, (g + 1) * per):
                v = b[e]
                if v > m1:
                    m2 = m1
                    m1 = v
                elif v > m2:
                    m2 = v
            gscore[g] = m1 + m2 if per > 1 else m1
            keep[g] = False
        for _ in range(topk_group):
            best = -1
            for g in range(n_group):
                if not keep[g] and (best < 0 or gscore[g] > gscore[best]):
                    best = g
            keep[best] = True
        # top-k experts among kept groups by biased score (ties -> lower index)
        total = F32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if keep[e // per] and (best < 0 or b[e] > b[best]):
                    best = e
            idx_out[t, j] = best
            w_out[t, j] = s[best]
            total += s[best]
            b[best] = -np.inf  # taken
        inv = F32(scaling) / (total + F32(1e-20))
        for j in range(k):
            w_out[t, j] *= inv


@njit(parallel=True, **JIT)
def sum_f32(a):
    """Parallel sum (the memory-bandwidth probe of `amed bench`)."""
    acc = F32(0.0)
    for i in prange(a.shape[0]):
        acc += a[i]
    return acc


@njit(cache=True, nogil=True)        # no fastmath: w * y and the add stay two roundings, as in NumPy
def moe_combine(out, y, tok, w):
    """out[tok[p]] += w[p] * y[p] for p in order: the routed experts' outputs y [P, H] (rows
    grouped by expert, ascending ids) summed into out [T, H] in that order, so each token adds its
    experts in ascending id order, exactly as `out[rows] += w[:, None] * y_e` expert by expert."""
    H = out.shape[1]
    for p in range(y.shape[0]):
        t = tok[p]
        wp = w[p]
        for j in range(H):
            out[t, j] += wp * y[p, j]

