"""CUDA kernels of the forward pass, in Numba (`numba-cuda`): quantized and float matmuls, RMSNorm,
QK-norm + partial RoPE, GQA attention over the KV cache, SwiGLU's silu * up, and in-place adds.

Imported only by the CUDA backend (backends/cuda/__init__.py), never by `amed --help`.

Conventions (the CPU kernels' twins: backends/cpu/kernels.py, qrows.py, qr8.py):
  * activations float32, C-contiguous, on the device; results equal the CPU's to float32 rounding
    (the CPU rounds activations to int16 per group before its integer dot products; these compute
    in float32, so they are if anything closer to the float64 reference);
  * quantized levels are read as uint32 words (4 packed bytes per load), scales and zeros as
    float16 arrays exactly as the store holds them (quant/formats.py has the byte layouts);
  * reductions go through shared memory, not warp shuffles, so the same code runs in Numba's CUDA
    simulator (NUMBA_ENABLE_CUDASIM=1), where the tests run it on a machine without a GPU;
  * every kernel works for any power-of-two block size up to MAXT (the backend launches 128 threads
    on a GPU, 8 in the simulator, where every thread is a Python thread; the tests use 32).

Matmuls: out[T, N] = x[T, K] @ W.T. A block computes RB = 8 output rows for TT tokens. In the
"rows" layout each row gets nt / 8 consecutive threads striding over its words; in "r8" the block
is one row block and its threads stride over the block's words, so thread i always meets row
i % 8. Either way consecutive threads read consecutive words (coalesced), and each word's weights
are dequantized once and used for all TT tokens (the prefill batching).
SIGNATURES lists each kernel's argument types, for compiling to PTX (tests/cuda_ptx_check.py).
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32, int64, uint32

MAXT = 256          # the most threads per block any kernel is launched with (shared arrays' size)
TT = 8              # tokens per block in the matmuls: each dequantized weight is used TT times
TT2 = 2 * TT        # gate and up rows for TT tokens (a shared array's shape must be a constant)
RB = 8              # rows per block in the matmuls (the r8 layout's row block; as many for "rows")
MAXD = 256          # the largest head dimension attention and RoPE handle


# ---- shared-memory reductions (no warp shuffles: the simulator has none) --------------------------

@cuda.jit(device=True)
def _reduce_rows(sh, ntok, tid, nt, R):
    """sh[j, i] for j < ntok, i < nt: sums the entries with equal i % R into sh[j, i % R]
    (R divides nt, both powers of two). Every thread of the block must call it."""
    stride = nt // 2
    while stride >= R:
        if tid < stride:
            for j in range(ntok):
                sh[j, tid] += sh[j, tid + stride]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def _block_sum(sh, v, tid, nt):
    """The sum of v over the block's threads (sh: a shared [MAXT] scratch), returned to every
    thread."""
    sh[tid] = v
    cuda.syncthreads()
    stride = nt // 2
    while stride >= 1:
        if tid < stride:
            sh[tid] += sh[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = sh[0]
    cuda.syncthreads()
    return total


@cuda.jit(device=True)
def _block_max(sh, v, tid, nt):
    sh[tid] = v
    cuda.syncthreads()
    stride = nt // 2
    while stride >= 1:
        if tid < stride:
            sh[tid] = max(sh[tid], sh[tid + stride])
        cuda.syncthreads()
        stride //= 2
    m = sh[0]
    cuda.syncthreads()
    return m


@cuda.jit(device=True)
def _store_rows(sh, acc, out, t0, ntok, n0, R, tid, nt):
    """Reduce each thread's per-token sums and write out[t0 + j, n0 + r] for r < R."""
    for j in range(ntok):
        sh[j, tid] = acc[j]
    cuda.syncthreads()
    _reduce_rows(sh, ntok, tid, nt, R)
    if tid < R:
        for j in range(ntok):
            out[t0 + j, n0 + tid] = sh[j, tid]


@cuda.jit(device=True)
def _store_segments(sh, acc, out, t0, ntok, n0, N, tid, nt):
    """The rows-layout variant: thread tid works on row n0 + tid // S (S = nt / RB threads per
    row, consecutive threads on consecutive words of one row); reduce each segment of S threads
    and write out[t0 + j, row] for the rows < N."""
    for j in range(ntok):
        sh[j, tid] = acc[j]
    cuda.syncthreads()
    S = nt // RB
    stride = S // 2
    while stride >= 1:
        if tid % S < stride:
            for j in range(ntok):
                sh[j, tid] += sh[j, tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid < RB and n0 + tid < N:
        for j in range(ntok):
            out[t0 + j, n0 + tid] = sh[j, tid * S]


@cuda.jit(device=True)
def _byte(w, i):
    """Byte i (0..3) of a uint32 word, as an int32."""
    return int32((w >> uint32(8 * i)) & uint32(0xFF))


# ---- quantized matmuls -------------------------------------------------------------------------

@cuda.jit(cache=True)
def mm_q4_rows(x, q, s, z, out):
    """q uint32 [N, ng * G/8] (a row's packed bytes as words), s/z float16 [N, ng]. Word p of a row
    is bytes 4p..4p+3: group g = p // (G/8); byte j of a group holds elements j (low nibble) and
    j + G/2 (high nibble)."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    n0 = cuda.blockIdx.x * RB
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    S = nt // RB                       # threads per row
    n = min(n0 + tid // S, out.shape[1] - 1)      # rows past the end compute row N-1, unused
    ntok = min(TT, x.shape[0] - t0)
    ng = s.shape[1]
    G = x.shape[1] // ng
    wpg = G // 8
    for j in range(TT):
        acc[j] = float32(0.0)
    for p in range(tid % S, q.shape[1], S):
        w = q[n, p]
        g = p // wpg
        base = g * G + 4 * (p - g * wpg)
        sc = float32(s[n, g])
        zz = float32(z[n, g])
        for j in range(ntok):
            du = float32(0.0)
            sx = float32(0.0)
            for i in range(4):
                b = _byte(w, i)
                xl = x[t0 + j, base + i]
                xh = x[t0 + j, base + G // 2 + i]
                du += float32(b & 15) * xl + float32(b >> 4) * xh
                sx += xl + xh
            acc[j] += sc * du + zz * sx
    _store_segments(sh, acc, out, t0, ntok, n0, out.shape[1], tid, nt)


@cuda.jit(cache=True)
def mm_q8_rows(x, q, s, out):
    """q uint32 [N, ng * G/4] (int8 levels, 4 per word), s float16 [N, ng]."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    n0 = cuda.blockIdx.x * RB
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    S = nt // RB                       # threads per row
    n = min(n0 + tid // S, out.shape[1] - 1)      # rows past the end compute row N-1, unused
    ntok = min(TT, x.shape[0] - t0)
    ng = s.shape[1]
    G = x.shape[1] // ng
    wpg = G // 4
    for j in range(TT):
        acc[j] = float32(0.0)
    for p in range(tid % S, q.shape[1], S):
        w = q[n, p]
        g = p // wpg
        base = 4 * p
        sc = float32(s[n, g])
        for j in range(ntok):
            du = float32(0.0)
            for i in range(4):
                v = (_byte(w, i) ^ 0x80) - 128                    # the signed int8 level
                du += float32(v) * x[t0 + j, base + i]
            acc[j] += sc * du
    _store_segments(sh, acc, out, t0, ntok, n0, out.shape[1], tid, nt)


@cuda.jit(cache=True)
def mm_q6_rows(x, q, s, z, out):
    """q uint32 [N, ng * 3G/16]: per group G/8 words of q4-style nibbles, then G/16 words of high
    bit pairs (byte i of the plane: elements i, i + G/4, i + G/2, i + 3G/4 in bits 0-1 .. 6-7).
    A thread takes one nibble word (8 elements) and the plane word holding their high bits."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    n0 = cuda.blockIdx.x * RB
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    S = nt // RB                       # threads per row
    n = min(n0 + tid // S, out.shape[1] - 1)      # rows past the end compute row N-1, unused
    ntok = min(TT, x.shape[0] - t0)
    ng = s.shape[1]
    G = x.shape[1] // ng
    nw = G // 8                        # nibble words per group
    gw = 3 * G // 16                   # words per group
    for j in range(TT):
        acc[j] = float32(0.0)
    for u in range(tid % S, ng * nw, S):
        g = u // nw
        j0 = 4 * (u - g * nw)          # first element (low nibbles), < G/2
        w = q[n, g * gw + u - g * nw]
        pw = q[n, g * gw + nw + (j0 % (G // 4)) // 4]
        qt = j0 // (G // 4)            # quarter of the low elements (0 or 1); high ones: qt + 2
        base = g * G + j0
        sc = float32(s[n, g])
        zz = float32(z[n, g])
        for j in range(ntok):
            du = float32(0.0)
            sx = float32(0.0)
            for i in range(4):
                b = _byte(w, i)
                pb = _byte(pw, i)
                lo = (b & 15) | (((pb >> (2 * qt)) & 3) << 4)
                hi = (b >> 4) | (((pb >> (2 * qt + 4)) & 3) << 4)
                xl = x[t0 + j, base + i]
                xh = x[t0 + j, base + G // 2 + i]
                du += float32(lo) * xl + float32(hi) * xh
                sx += xl + xh
            acc[j] += sc * du + zz * sx
    _store_segments(sh, acc, out, t0, ntok, n0, out.shape[1], tid, nt)


@cuda.jit(cache=True)
def mm_q4_r8(x, q, s, z, out):
    """r8 layout: q uint32 [N/8, ng * G] (per row block and group 4G bytes = G words), s/z float16
    [N/8, ng, 8]. Word w of a group holds row w % 8, elements 8m..8m+3 in its low nibbles and
    8m+4..8m+7 in its high nibbles, m = w // 8."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    b = cuda.blockIdx.x
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    ntok = min(TT, x.shape[0] - t0)
    ng = s.shape[1]
    G = x.shape[1] // ng
    for j in range(TT):
        acc[j] = float32(0.0)
    for p in range(tid, q.shape[1], nt):
        w = q[b, p]
        g = p // G
        c = p - g * G
        r = c % 8
        base = g * G + 8 * (c // 8)
        sc = float32(s[b, g, r])
        zz = float32(z[b, g, r])
        for j in range(ntok):
            du = float32(0.0)
            sx = float32(0.0)
            for i in range(4):
                v = _byte(w, i)
                xl = x[t0 + j, base + i]
                xh = x[t0 + j, base + 4 + i]
                du += float32(v & 15) * xl + float32(v >> 4) * xh
                sx += xl + xh
            acc[j] += sc * du + zz * sx
    _store_rows(sh, acc, out, t0, ntok, 8 * b, 8, tid, nt)


@cuda.jit(cache=True)
def mm_q8_r8(x, q, s, out):
    """r8 layout: q uint32 [N/8, ng * 2G] (per row block and group 8G bytes = 2G words), s float16
    [N/8, ng, 8]. Word w of a group holds row w % 8, elements 4c..4c+3, c = w // 8."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    b = cuda.blockIdx.x
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    ntok = min(TT, x.shape[0] - t0)
    ng = s.shape[1]
    G = x.shape[1] // ng
    for j in range(TT):
        acc[j] = float32(0.0)
    for p in range(tid, q.shape[1], nt):
        w = q[b, p]
        g = p // (2 * G)
        c = p - g * 2 * G
        r = c % 8
        base = g * G + 4 * (c // 8)
        sc = float32(s[b, g, r])
        for j in range(ntok):
            du = float32(0.0)
            for i in range(4):
                v = (_byte(w, i) ^ 0x80) - 128
                du += float32(v) * x[t0 + j, base + i]
            acc[j] += sc * du
    _store_rows(sh, acc, out, t0, ntok, 8 * b, 8, tid, nt)


@cuda.jit(cache=True)
def mm_f32(x, w, out):
    """w float32 [N, K] (bf16 matrices are widened to float32 when uploaded)."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    n0 = cuda.blockIdx.x * RB
    t0 = cuda.blockIdx.y * TT
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    S = nt // RB                       # threads per row
    n = min(n0 + tid // S, out.shape[1] - 1)      # rows past the end compute row N-1, unused
    ntok = min(TT, x.shape[0] - t0)
    for j in range(TT):
        acc[j] = float32(0.0)
    for k in range(tid % S, w.shape[1], S):
        wk = w[n, k]
        for j in range(ntok):
            acc[j] += wk * x[t0 + j, k]
    _store_segments(sh, acc, out, t0, ntok, n0, out.shape[1], tid, nt)


# ---- routed experts in VRAM (grouped over a layer's experts) -----------------------------------

@cuda.jit(device=True)
def _r8_partial_tt(x, rows, indirect, p0, ntok, q, s, z, b, q8, tid, nt, acc):
    """This thread's share of row 8b + tid % 8 of W @ x for up to TT tokens at once (each
    dequantized word serves all of them), W an r8 matrix (q [N/8, words], s/z [N/8, ng, 8]; q8: z
    is not read): acc[j] for token rows[p0 + j] of x (indirect) or x[p0 + j] (rows unused), j <
    ntok. mm_q4_r8's / mm_q8_r8's loops; a thread meets only row tid % 8: nt and the words per
    group are multiples of 8."""
    ng = s.shape[1]
    G = x.shape[1] // ng
    for j in range(TT):
        acc[j] = float32(0.0)
    if q8:
        for p in range(tid, q.shape[1], nt):
            w = q[b, p]
            g = p // (2 * G)
            c = p - g * 2 * G
            base = g * G + 4 * (c // 8)
            sc = float32(s[b, g, c % 8])
            for j in range(ntok):
                t = rows[p0 + j] if indirect else p0 + j
                du = float32(0.0)
                for i in range(4):
                    du += float32((_byte(w, i) ^ 0x80) - 128) * x[t, base + i]
                acc[j] += sc * du
    else:
        for p in range(tid, q.shape[1], nt):
            w = q[b, p]
            g = p // G
            c = p - g * G
            base = g * G + 8 * (c // 8)
            sc = float32(s[b, g, c % 8])
            zz = float32(z[b, g, c % 8])
            for j in range(ntok):
                t = rows[p0 + j] if indirect else p0 + j
                du = float32(0.0)
                sx = float32(0.0)
                for i in range(4):
                    v = _byte(w, i)
                    xl = x[t, base + i]
                    xh = x[t, base + 4 + i]
                    du += float32(v & 15) * xl + float32(v >> 4) * xh
                    sx += xl + xh
                acc[j] += sc * du + zz * sx


# decode: a step's chosen experts in two launches

@cuda.jit(cache=True)
def moe_gate_up_r8(x, slots, gq, gs, gz, uq, us, uz, q8, h):
    """h[j] = silu(gate_e @ x[0]) * (up_e @ x[0]) for e = slots[j]: experts stacked in VRAM slots
    (gq/uq uint32 [P, I/8, words], scales/zeros float16 [P, I/8, ng, 8]). One block per (row
    block b, chosen expert j)."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((2, MAXT), float32)
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    e = slots[j]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    _r8_partial_tt(x, slots, False, 0, 1, gq[e], gs[e], gz[e], b, q8, tid, nt, acc)
    sh[0, tid] = acc[0]
    _r8_partial_tt(x, slots, False, 0, 1, uq[e], us[e], uz[e], b, q8, tid, nt, acc)
    sh[1, tid] = acc[0]
    cuda.syncthreads()
    _reduce_rows(sh, 2, tid, nt, 8)
    if tid < 8:
        g = sh[0, tid]
        h[j, 8 * b + tid] = g / (float32(1.0) + math.exp(min(-g, float32(80.0)))) * sh[1, tid]


@cuda.jit(cache=True)
def moe_down_r8(h, slots, w, dq, ds, dz, q8, add, out):
    """out[0] (+)= sum over j (in order) of w[j] * (down_e @ h[j]), e = slots[j]: the weighted sum
    of the chosen experts in VRAM added (add) where the shared expert's output already is, or
    written (a lone SwiGLU: the shared expert, the dense MLP). One block per row block of out."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((1, MAXT), float32)
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    total = float32(0.0)
    for j in range(slots.shape[0]):
        e = slots[j]
        _r8_partial_tt(h, slots, False, j, 1, dq[e], ds[e], dz[e], b, q8, tid, nt, acc)
        sh[0, tid] = acc[0]
        cuda.syncthreads()
        _reduce_rows(sh, 1, tid, nt, 8)
        if tid < 8:
            total += w[j] * sh[0, tid]
        cuda.syncthreads()
    if tid < 8:
        if add:
            out[0, 8 * b + tid] += total
        else:
            out[0, 8 * b + tid] = total


# prefill: a batch's (token, expert) pairs, grouped by expert

@cuda.jit(cache=True)
def moe_gate_up_pairs_r8(x, rows, seg, slots, gq, gs, gz, uq, us, uz, q8, h):
    """h[p] = silu(gate_e @ x[rows[p]]) * (up_e @ x[rows[p]]) for the pairs p of segment j
    (seg[j] <= p < seg[j + 1]), e = slots[j]. One block per (row block, segment, TT pairs)."""
    ag = cuda.local.array(TT, float32)
    au = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT2, MAXT), float32)
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    p0 = seg[j] + cuda.blockIdx.z * TT
    ntok = min(TT, seg[j + 1] - p0)
    if ntok <= 0:                          # the whole block: its segment is shorter
        return
    e = slots[j]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    _r8_partial_tt(x, rows, True, p0, ntok, gq[e], gs[e], gz[e], b, q8, tid, nt, ag)
    _r8_partial_tt(x, rows, True, p0, ntok, uq[e], us[e], uz[e], b, q8, tid, nt, au)
    for i in range(TT):
        sh[i, tid] = ag[i]
        sh[TT + i, tid] = au[i]
    cuda.syncthreads()
    _reduce_rows(sh, TT2, tid, nt, 8)
    if tid < 8:
        for i in range(ntok):
            g = sh[i, tid]
            h[p0 + i, 8 * b + tid] = g / (float32(1.0) + math.exp(min(-g, float32(80.0)))) * sh[TT + i, tid]


@cuda.jit(cache=True)
def moe_down_pairs_r8(h, seg, slots, dq, ds, dz, q8, y):
    """y[p] = down_e @ h[p] for the pairs of segment j, e = slots[j] (grid as moe_gate_up_pairs_r8)."""
    acc = cuda.local.array(TT, float32)
    sh = cuda.shared.array((TT, MAXT), float32)
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    p0 = seg[j] + cuda.blockIdx.z * TT
    ntok = min(TT, seg[j + 1] - p0)
    if ntok <= 0:
        return
    e = slots[j]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    _r8_partial_tt(h, seg, False, p0, ntok, dq[e], ds[e], dz[e], b, q8, tid, nt, acc)
    _store_rows(sh, acc, y, p0, ntok, 8 * b, 8, tid, nt)


@cuda.jit(cache=True)
def moe_combine_pairs(y, tok_seg, tok_pairs, w, out):
    """out[t] += sum of w[p] * y[p] over token t's pairs p = tok_pairs[tok_seg[t]:tok_seg[t + 1]]
    (in that order). One block per (token, nt columns)."""
    t = cuda.blockIdx.x
    i = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if i < out.shape[1]:
        acc = out[t, i]
        for q in range(tok_seg[t], tok_seg[t + 1]):
            p = tok_pairs[q]
            acc += w[p] * y[p, i]
        out[t, i] = acc


# ---- norms, RoPE, attention ------------------------------------------------------------------------

@cuda.jit(cache=True)
def rmsnorm(x, w, eps, out):
    """out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps); one block per token (out may be x)."""
    sh = cuda.shared.array(MAXT, float32)
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    H = x.shape[1]
    ss = float32(0.0)
    for i in range(tid, H, nt):
        ss += x[t, i] * x[t, i]
    ss = _block_sum(sh, ss, tid, nt)
    r = float32(1.0) / math.sqrt(ss / float32(H) + float32(eps))
    for i in range(tid, H, nt):
        out[t, i] = w[i] * (x[t, i] * r)


@cuda.jit(cache=True)
def qk_norm_rope_store(qkv, nh, nkv, d, rot, qn, kn, use_qk_norm, eps, cos, sin, pos,
                       q_out, k_cache, v_cache):
    """One block per (token, q or k head): split fused QKV, per-head RMSNorm (before RoPE), partial
    NeoX RoPE on the first `rot` dims, q to q_out [T, nh, d], k and v into the caches [nkv, S, d]
    at position pos + t (the CPU kernel's twin)."""
    sh = cuda.shared.array(MAXT, float32)
    buf = cuda.shared.array(MAXD, float32)
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    p = pos + t
    base = h * d
    half = rot // 2
    ss = float32(0.0)
    for i in range(tid, d, nt):
        v = qkv[t, base + i]
        buf[i] = v
        ss += v * v
    ss = _block_sum(sh, ss, tid, nt)                 # also orders the buf writes before the reads
    if use_qk_norm:
        r = float32(1.0) / math.sqrt(ss / float32(d) + float32(eps))
        for i in range(tid, d, nt):
            wn = qn[i] if h < nh else kn[i]
            buf[i] = wn * (buf[i] * r)
        cuda.syncthreads()
    for i in range(tid, d, nt):
        v = buf[i]
        if i < half:
            v = buf[i] * cos[p, i] - buf[i + half] * sin[p, i]
        elif i < rot:
            v = buf[i] * cos[p, i - half] + buf[i - half] * sin[p, i - half]
        if h < nh:
            q_out[t, h, i] = v
        else:
            k_cache[h - nh, p, i] = v
            v_cache[h - nh, p, i] = qkv[t, (nh + nkv + h - nh) * d + i]


@cuda.jit(cache=True)
def attention(q, k_cache, v_cache, pos, scores, out):
    """Causal GQA attention, one block per (query t, head h) over keys 0..pos+t: scores into
    scores[t, h, :] (global scratch), softmax in float32 with the max subtracted, then the
    weighted sum of values, threads over the head dimension. q [T, nh, d], caches [nkv, S, d],
    out [T, nh * d]."""
    sh = cuda.shared.array(MAXT, float32)
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    nh = q.shape[1]
    d = q.shape[2]
    kh = h // (nh // k_cache.shape[0])
    n = pos + t + 1
    scale = float32(1.0) / math.sqrt(float32(d))
    m = float32(-math.inf)
    for s in range(tid, n, nt):
        acc = float32(0.0)
        for i in range(d):
            acc += q[t, h, i] * scale * k_cache[kh, s, i]
        scores[t, h, s] = acc
        m = max(m, acc)
    m = _block_max(sh, m, tid, nt)
    total = float32(0.0)
    for s in range(tid, n, nt):
        e = math.exp(scores[t, h, s] - m)
        scores[t, h, s] = e
        total += e
    total = _block_sum(sh, total, tid, nt)           # also orders the score writes before the reads
    inv = float32(1.0) / total
    for i in range(tid, d, nt):
        o = float32(0.0)
        for s in range(n):
            o += scores[t, h, s] * v_cache[kh, s, i]
        out[t, h * d + i] = o * inv


# ---- element-wise ----------------------------------------------------------------------------------

@cuda.jit(cache=True)
def silu_mul(gate, up, out):
    """out = silu(gate) * up over [T, N]."""
    i = cuda.grid(1)
    N = gate.shape[1]
    if i < gate.shape[0] * N:
        t = i // N
        c = i - t * N
        g = gate[t, c]
        # exp's argument capped: for g < -80 silu(g) is below 1e-33 either way, and the simulator's
        # math.exp raises OverflowError where a GPU returns inf
        out[t, c] = g / (float32(1.0) + math.exp(min(-g, float32(80.0)))) * up[t, c]


@cuda.jit(cache=True)
def axpy_inplace(x, a, y):
    """x += a * y over [T, H]: the residual adds (a = 1, exact) and an expert in VRAM adding its
    weighted output."""
    i = cuda.grid(1)
    H = x.shape[1]
    if i < x.shape[0] * H:
        t = i // H
        x[t, i - t * H] += a * y[t, i - t * H]


# ---- argument types of every kernel, for compiling to PTX ---------------------------------------------

def signatures():
    """{kernel name: argument types}: the types the backend launches each kernel with."""
    f2 = float32[:, ::1]
    f3 = float32[:, :, ::1]
    u2 = uint32[:, ::1]
    from numba.core import types as nt

    h2 = nt.float16[:, ::1]
    h3 = nt.float16[:, :, ::1]
    u3 = uint32[:, :, ::1]
    h4 = nt.float16[:, :, :, ::1]
    return {
        "mm_q4_rows": (f2, u2, h2, h2, f2),
        "mm_q8_rows": (f2, u2, h2, f2),
        "mm_q6_rows": (f2, u2, h2, h2, f2),
        "mm_q4_r8": (f2, u2, h3, h3, f2),
        "mm_q8_r8": (f2, u2, h3, f2),
        "mm_f32": (f2, f2, f2),
        "rmsnorm": (f2, float32[::1], float32, f2),
        "qk_norm_rope_store": (f2, int64, int64, int64, int64, float32[::1], float32[::1], nt.boolean,
                               float32, f2, f2, int64, f3, f3, f3),
        "attention": (f3, f3, f3, int64, f3, f2),
        "silu_mul": (f2, f2, f2),
        "axpy_inplace": (f2, float32, f2),
        "moe_gate_up_r8": (f2, int32[::1], u3, h4, h4, u3, h4, h4, nt.boolean, f2),
        "moe_down_r8": (f2, int32[::1], float32[::1], u3, h4, h4, nt.boolean, nt.boolean, f2),
        "moe_gate_up_pairs_r8": (f2, int32[::1], int32[::1], int32[::1], u3, h4, h4, u3, h4, h4, nt.boolean, f2),
        "moe_down_pairs_r8": (f2, int32[::1], int32[::1], u3, h4, h4, nt.boolean, f2),
        "moe_combine_pairs": (f2, int32[::1], int32[::1], float32[::1], f2),
    }
