"""Quantized matmul kernels (amed/engine/backends/cpu: qdot, qrows, qr8, dispatch) against NumPy on the dequantized weights.

Two references per case, to keep kernel error apart from rounding error:
  * exact: x rounded by `prepare_x` exactly as the kernel sees it (xq * sx), float64 product with
    the dequantized weights; the kernel must match to ~1e-5 (it is exact up to float32 scaling);
  * true x: the float64 product with the unrounded x; off by the int16 rounding of x (~2e-5).
Weights are always read-only views (as from the store's mmap), so the compiled signature is the
one used in production.
"""

import numpy as np
import pytest

from amed.engine.backends.cpu import dispatch, qdot, qr8, qrows
from amed.quant import formats as Q


EXACT_TOL = 1e-5
TRUE_X_TOL = 2e-4


def make(fmt, N, K, G, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    qt = Q.quantize(w, fmt, G)
    # go through the canonical bytes: read-only zero-copy views, as a store loader produces them
    qt = Q.QTensor.from_buffer(qt.tobytes(), 0, fmt, (N, K), G)
    assert not qt.q.flags.writeable
    return qt


def rounded_x(x, G):
    xq, sx, xs = qdot.prepare_x(x, G)
    T, K = x.shape
    return (xq.reshape(T, K // G, G).astype(np.float64) * sx[..., None].astype(np.float64)).reshape(T, K)


def rel_err(out, ref):
    return float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


CASES = [(fmt, G, N, mult) for fmt in ("q4", "q6", "q8") for G in (32, 64, 128)
         for N, mult in ((5, 3), (37, 17))]


@pytest.mark.parametrize("fmt,G,N,mult", CASES)
def test_qmatmul_matches_numpy(fmt, G, N, mult):
    K = G * mult
    qt = make(fmt, N, K, G, seed=G + N)
    W = Q.dequantize(qt).astype(np.float64)
    rng = np.random.default_rng(N * G)
    for T in (1, 3, 5, 17):
        x = rng.standard_normal((T, K)).astype(np.float32)
        out = dispatch.qmatmul(x, qt)
        assert out.shape == (T, N) and out.dtype == np.float32
        assert rel_err(out, rounded_x(x, G) @ W.T) < EXACT_TOL
        assert rel_err(out, x.astype(np.float64) @ W.T) < TRUE_X_TOL


@pytest.mark.parametrize("G", [32, 64, 128])
def test_q6_every_level_and_byte_pattern(G):
    """Random bytes (every level 0..63 in every lane, unlike quantized data) against the NumPy
    dequantization: catches a wrong 2-bit plane order that quantized Gaussians might hide."""
    rng = np.random.default_rng(G)
    N, ng = 13, 5
    qt = Q.QTensor(fmt="q6", shape=(N, ng * G), group=G, q=rng.integers(0, 256, (N, ng, 3 * G // 4), dtype=np.uint8),
                   scale=(rng.random((N, ng)) * 0.01 + 1e-3).astype(np.float16),
                   zero=(rng.standard_normal((N, ng)) * 0.05).astype(np.float16))
    W = Q.dequantize(qt).astype(np.float64)
    assert set(np.unique(Q._unpack_q6(qt.q))) == set(range(64))
    x = rng.standard_normal((5, ng * G)).astype(np.float32)
    x[1] = 1.0                               # xq = 32767 everywhere: the largest integer sums
    out = dispatch.qmatmul(x, qt)
    assert rel_err(out, rounded_x(x, G) @ W.T) < EXACT_TOL
    assert rel_err(out, x.astype(np.float64) @ W.T) < TRUE_X_TOL


@pytest.mark.parametrize("fmt", ["q4", "q6", "q8"])
def test_model_sized_rows_and_out_argument(fmt):
    qt = make(fmt, 24, 4096, 64, seed=11)
    W = Q.dequantize(qt).astype(np.float64)
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)   # 1-D: one token
    out = np.full(24, np.nan, dtype=np.float32)
    assert dispatch.qmatmul(x, qt, out) is out
    assert rel_err(out, (rounded_x(x[None], 64) @ W.T)[0]) < EXACT_TOL


def test_low_level_kernels_and_prepared_x():
    qt = make("q4", 16, 256, 64, seed=3)
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    xq, sx, xs = qdot.prepare_x(x, 64)
    assert xq.dtype == np.int16 and np.abs(xq.astype(np.int32)).max() == 32767
    np.testing.assert_allclose(rounded_x(x, 64), x, atol=float(sx.max()) / 2 * 1.0001)
    out1 = np.empty((2, 16), np.float32)
    out2 = np.empty((2, 16), np.float32)
    qrows.gemm_q4(xq, sx, xs, *qt.kargs, out1)
    qrows.matmul_q4(x, *qt.kargs, out2)
    np.testing.assert_array_equal(out1, out2)
    q8 = make("q8", 16, 256, 64, seed=4)
    qrows.gemm_q8(xq, sx, q8.kargs[0], q8.kargs[1], out1)
    qrows.matmul_q8(x, q8.kargs[0], q8.kargs[1], out2)
    np.testing.assert_array_equal(out1, out2)
    q6 = make("q6", 16, 256, 64, seed=5)
    qrows.gemm_q6(xq, sx, xs, *q6.kargs, out1)
    qrows.matmul_q6(x, *q6.kargs, out2)
    np.testing.assert_array_equal(out1, out2)
    with pytest.raises(ValueError):          # q6 bytes handed to the q4 kernel: wrong group width
        qrows.gemm_q4(xq, sx, xs, *q6.kargs, out1)


def test_zero_and_nan_activations():
    for fmt in ("q4", "q6", "q8"):
        qt = make(fmt, 8, 128, 32, seed=5)
        x = np.zeros((3, 128), np.float32)
        x[1, 40] = np.nan
        x[2, :] = 1.0
        x[2, 100] = np.inf
        out = dispatch.qmatmul(x, qt)
        assert np.all(out[0] == 0.0) or fmt != "q8" and np.allclose(out[0], 0.0)
        assert np.isnan(out[1]).all() and np.isnan(out[2]).all()


def test_bad_arguments_raise():
    qt = make("q4", 8, 128, 64, seed=6)
    with pytest.raises(TypeError):
        dispatch.qmatmul(np.zeros((1, 128), np.float64), qt)
    with pytest.raises(TypeError):
        dispatch.qmatmul(np.zeros((128, 2), np.float32).T, qt)
    with pytest.raises(ValueError):
        dispatch.qmatmul(np.zeros((1, 64), np.float32), qt)             # K mismatch
    with pytest.raises(ValueError):
        dispatch.qmatmul(np.zeros((1, 128), np.float32), qt, np.zeros((1, 7), np.float32))


@pytest.mark.parametrize("fmt,G", [("q4", 64), ("q4", 32), ("q8", 128), ("q6", 32), ("q6", 64), ("q6", 128)])
def test_expert_matches_numpy(fmt, G):
    H, I = 256, 128
    gate, up, down = make(fmt, I, H, G, 1), make(fmt, I, H, G, 2), make(fmt, H, I, G, 3)
    x = np.random.default_rng(9).standard_normal((3, H)).astype(np.float32)
    out = dispatch.expert_q(x, gate, up, down)
    Wg, Wu, Wd = (Q.dequantize(m).astype(np.float64) for m in (gate, up, down))
    xg, xu = x.astype(np.float64) @ Wg.T, x.astype(np.float64) @ Wu.T
    ref = (xg / (1.0 + np.exp(-xg)) * xu) @ Wd.T
    assert rel_err(out, ref) < TRUE_X_TOL
    # same as three separate products
    hg, hu = dispatch.qmatmul(x, gate), dispatch.qmatmul(x, up)
    sep = dispatch.qmatmul((hg / (1.0 + np.exp(-hg)) * hu).astype(np.float32), down)
    assert rel_err(out, sep.astype(np.float64)) < 1e-4


def test_one_compiled_signature_with_read_only_weights():
    make_and_run = make("q8", 4, 64, 32, seed=8)
    dispatch.qmatmul(np.ones((1, 64), np.float32), make_and_run)
    dispatch.qmatmul(np.ones((1, 64), np.float32), make("q6", 4, 64, 32, seed=8))
    for kernel, wpos in ((qrows.gemm_q4, 3), (qrows.gemm_q6, 3), (qrows.gemm_q8, 2), (qrows.matmul_q4, 1), (qrows.matmul_q6, 1),
                         (qrows.matmul_q8, 1)):
        for sig in kernel.signatures:
            assert not sig[wpos].mutable, f"{kernel.__name__} compiled for writable weights: {sig}"


def test_every_finite_float16_scale_and_zero_is_widened_exactly():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    bits, ref = bits[np.isfinite(ref)], ref[np.isfinite(ref)]        # normals, subnormals, +-0
    N = bits.size
    ones = np.ones((1, 32), np.float32)      # xq = 32767, sx = 1/32767: out = 32 * scale
    q8 = Q.QTensor(fmt="q8", shape=(N, 32), group=32, q=np.ones((N, 1, 32), np.int8), scale=bits[:, None])
    np.testing.assert_allclose(dispatch.qmatmul(ones, q8)[0] / 32, ref, rtol=1e-6, atol=0)
    q4 = Q.QTensor(fmt="q4", shape=(N, 32), group=32, q=np.zeros((N, 1, 16), np.uint8),
                   scale=np.zeros((N, 1), np.uint16), zero=bits[:, None])   # out = 32 * zero
    np.testing.assert_allclose(dispatch.qmatmul(ones, q4)[0] / 32, ref, rtol=1e-6, atol=0)
    q6 = Q.QTensor(fmt="q6", shape=(N, 32), group=32, q=np.zeros((N, 1, 24), np.uint8),
                   scale=np.zeros((N, 1), np.uint16), zero=bits[:, None])
    np.testing.assert_allclose(dispatch.qmatmul(ones, q6)[0] / 32, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["q4", "q6", "q8"])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_batched_tokens_are_bit_identical_to_one_at_a_time(fmt, G):
    """Prefill runs TB tokens per unpack of the weights; each token's result must be exactly the
    one-token result, so prefill-then-decode equals one full forward bit for bit."""
    N, K, T = 19, 2 * 128, 11                       # 2 blocks of TB=4 tokens and a tail of 3
    qt = make(fmt, N, K, G, seed=7)
    x = np.random.default_rng(8).standard_normal((T, K)).astype(np.float32)
    batched = dispatch.qmatmul(x, qt)
    single = np.concatenate([dispatch.qmatmul(np.ascontiguousarray(x[t:t + 1]), qt) for t in range(T)])
    np.testing.assert_array_equal(batched, single)
    gate, up, down = make(fmt, 32, K, G, 9), make(fmt, 32, K, G, 10), make(fmt, K, 32, 32, 11)
    eb = dispatch.expert_q(x, gate, up, down)
    es = np.concatenate([dispatch.expert_q(np.ascontiguousarray(x[t:t + 1]), gate, up, down) for t in range(T)])
    np.testing.assert_array_equal(eb, es)


# ---- the r8 layout (rows interleaved by 8) ---------------------------------------------------

def make_r8(fmt, N, K, G, seed):
    """An r8 matrix through its canonical bytes (read-only views), and the same matrix in rows."""
    rows = make(fmt, N, K, G, seed)
    r8 = Q.interleave(rows)
    r8 = Q.QTensor.from_buffer(r8.tobytes(), 0, fmt, (N, K), G, layout="r8")
    assert not r8.q.flags.writeable and r8.layout == "r8"
    return r8, rows


R8_CASES = [(fmt, G, N) for fmt in ("q4", "q8") for G in (32, 64, 128) for N in (8, 40)]


@pytest.mark.parametrize("fmt,G,N", R8_CASES)
def test_r8_qmatmul_matches_numpy_and_the_rows_kernel(fmt, G, N):
    K = 3 * G
    r8, rows = make_r8(fmt, N, K, G, seed=G + N)
    W = Q.dequantize(r8).astype(np.float64)
    np.testing.assert_array_equal(W, Q.dequantize(rows))
    rng = np.random.default_rng(N + G)
    for T in (1, 2, 3, 4, 6, 9):             # one token, padded blocks, TB blocks plus one token
        x = rng.standard_normal((T, K)).astype(np.float32)
        out = dispatch.qmatmul(x, r8)
        assert out.shape == (T, N)
        assert rel_err(out, rounded_x(x, G) @ W.T) < EXACT_TOL
        assert rel_err(out, x.astype(np.float64) @ W.T) < TRUE_X_TOL
        # the same integer sums as the rows kernels; only the float32 summation order differs
        assert rel_err(out, dispatch.qmatmul(x, rows).astype(np.float64)) < 1e-6


@pytest.mark.parametrize("G", [32, 64])
def test_r8_every_level_in_every_lane(G):
    """Random bytes (every level in every lane and nibble, unlike quantized data): a wrong
    interleave order in the kernel or in quants.interleave cannot hide."""
    rng = np.random.default_rng(G)
    N, ng = 16, 3
    for fmt in ("q4", "q8"):
        q = rng.integers(0, 256, (N, ng, G // 2), dtype=np.uint8) if fmt == "q4" else \
            rng.integers(-127, 128, (N, ng, G), dtype=np.int8)
        z = (rng.standard_normal((N, ng)) * 0.05).astype(np.float16) if fmt == "q4" else None
        rows = Q.QTensor(fmt=fmt, shape=(N, ng * G), group=G, q=q, zero=z,
                         scale=(rng.random((N, ng)) * 0.01 + 1e-3).astype(np.float16))
        r8 = Q.interleave(rows)
        W = Q.dequantize(rows).astype(np.float64)
        x = rng.standard_normal((5, ng * G)).astype(np.float32)
        x[1] = 1.0                           # the largest integer sums
        for T in (1, 4, 5):
            assert rel_err(dispatch.qmatmul(x[:T], r8), rounded_x(x[:T], G) @ W.T) < EXACT_TOL


@pytest.mark.parametrize("fmt,G", [("q4", 64), ("q4", 32), ("q8", 64), ("q8", 128)])
def test_r8_expert_matches_numpy(fmt, G):
    H, I = 256, 128
    mats = [make_r8(fmt, n, k, G, seed) for n, k, seed in ((I, H, 1), (I, H, 2), (H, I, 3))]
    (gate, g0), (up, u0), (down, d0) = mats
    for T in (1, 3, 8):
        x = np.random.default_rng(T).standard_normal((T, H)).astype(np.float32)
        out = dispatch.expert_q(x, gate, up, down)
        Wg, Wu, Wd = (Q.dequantize(m).astype(np.float64) for m in (gate, up, down))
        xg, xu = x.astype(np.float64) @ Wg.T, x.astype(np.float64) @ Wu.T
        assert rel_err(out, (xg / (1.0 + np.exp(-xg)) * xu) @ Wd.T) < TRUE_X_TOL
        assert rel_err(out, dispatch.expert_q(x, g0, u0, d0).astype(np.float64)) < 1e-5
    with pytest.raises(ValueError):          # layouts cannot be mixed in one fused call
        dispatch.expert_q(x, gate, u0, down)


def test_r8_bad_arguments_raise():
    r8, _ = make_r8("q4", 16, 128, 64, seed=6)
    with pytest.raises(ValueError):
        dispatch.qmatmul(np.zeros((1, 64), np.float32), r8)             # K mismatch
    with pytest.raises(ValueError):
        dispatch.qmatmul(np.zeros((1, 128), np.float32), r8, np.zeros((1, 8), np.float32))
    q8, _ = make_r8("q8", 16, 128, 64, seed=6)
    out = np.empty((1, 16), np.float32)
    xq, sx, xs = qdot.prepare_x(np.ones((1, 128), np.float32), 64)
    with pytest.raises(ValueError):          # q8 bytes (8 per weight-row) read as q4: wrong width
        qr8.gemm_r8(xq, sx, xs, q8.q.view(np.uint8), *r8.kargs[1:], out)
    with pytest.raises(ValueError):
        Q.interleave(make("q6", 16, 128, 64, seed=1))              # q6 has no r8 layout
    with pytest.raises(ValueError):
        Q.interleave(make("q4", 12, 128, 64, seed=1))              # rows not a multiple of 8
