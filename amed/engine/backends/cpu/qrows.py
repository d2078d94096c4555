"""Quantized GEMV / small GEMM and the fused SwiGLU expert for the "rows" layout (one row after
another; q4, q6, q8): out[T, N] = x[T, K] @ W.T with the weights dequantized inside the kernel.
How a product is computed: qdot.py."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from amed.engine.backends.cpu.qdot import (F32, JIT, ROWS, TB, prepare_x, q4_g128, q4_g128_x4, q4_g32, q4_g32_x4, q4_g64, q4_g64_x4, q6_g128, q6_g128_x4, q6_g32, q6_g32_x4, q6_g64, q6_g64_x4, q8_g128, q8_g128_x4, q8_g32, q8_g32_x4, q8_g64, q8_g64_x4)

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
        return q4_g64_x4(q, s, z, xq, sx, xs, n, t)
    elif h == 64:
        return q4_g128_x4(q, s, z, xq, sx, xs, n, t)
    return q4_g32_x4(q, s, z, xq, sx, xs, n, t)


@njit(inline="always", **JIT)
def _q6_dotx(q, s, z, xq, sx, xs, n, t):
    b = q.shape[2]
    if b == 48:
        return q6_g64_x4(q, s, z, xq, sx, xs, n, t)
    elif b == 96:
        return q6_g128_x4(q, s, z, xq, sx, xs, n, t)
    return q6_g32_x4(q, s, z, xq, sx, xs, n, t)


@njit(inline="always", **JIT)
def _q8_dotx(q, s, xq, sx, n, t):
    G = q.shape[2]
    if G == 64:
        return q8_g64_x4(q, s, xq, sx, n, t)
    elif G == 128:
        return q8_g128_x4(q, s, xq, sx, n, t)
    return q8_g32_x4(q, s, xq, sx, n, t)


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
                    v = q4_g64(q, s, z, xq, sx, xs, n, t)
                elif h == 64:
                    v = q4_g128(q, s, z, xq, sx, xs, n, t)
                else:
                    v = q4_g32(q, s, z, xq, sx, xs, n, t)
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
                    v = q6_g64(q, s, z, xq, sx, xs, n, t)
                elif b == 96:
                    v = q6_g128(q, s, z, xq, sx, xs, n, t)
                else:
                    v = q6_g32(q, s, z, xq, sx, xs, n, t)
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
                    v = q8_g64(q, s, xq, sx, n, t)
                elif G == 128:
                    v = q8_g128(q, s, xq, sx, n, t)
                else:
                    v = q8_g32(q, s, xq, sx, n, t)
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


# ---- one routed expert: down(silu(gate x) * up x) --------------------------------------------

@njit(inline="always", **JIT)
def silu_mul(a, u):
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
                    a = q4_g64(gq, gs, gz, xq, sx, xs, n, t)
                    u = q4_g64(uq, us, uz, xq, sx, xs, n, t)
                elif hb == 64:
                    a = q4_g128(gq, gs, gz, xq, sx, xs, n, t)
                    u = q4_g128(uq, us, uz, xq, sx, xs, n, t)
                else:
                    a = q4_g32(gq, gs, gz, xq, sx, xs, n, t)
                    u = q4_g32(uq, us, uz, xq, sx, xs, n, t)
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
                    a = q6_g64(gq, gs, gz, xq, sx, xs, n, t)
                    u = q6_g64(uq, us, uz, xq, sx, xs, n, t)
                elif b == 96:
                    a = q6_g128(gq, gs, gz, xq, sx, xs, n, t)
                    u = q6_g128(uq, us, uz, xq, sx, xs, n, t)
                else:
                    a = q6_g32(gq, gs, gz, xq, sx, xs, n, t)
                    u = q6_g32(uq, us, uz, xq, sx, xs, n, t)
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
                    a = q8_g64(gq, gs, xq, sx, n, t)
                    u = q8_g64(uq, us, xq, sx, n, t)
                elif G == 128:
                    a = q8_g128(gq, gs, xq, sx, n, t)
                    u = q8_g128(uq, us, xq, sx, n, t)
                else:
                    a = q8_g32(gq, gs, xq, sx, n, t)
                    u = q8_g32(uq, us, xq, sx, n, t)
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
                    h[t + j, n] = silu_mul(a[j], u[j])


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
                    h[t + j, n] = silu_mul(a[j], u[j])


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
                    h[t + j, n] = silu_mul(a[j], u[j])

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
