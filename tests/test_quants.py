"""Quantized formats (amed/quant/formats.py): bit layout, error bounds, scale search, byte layout."""

import numpy as np
import pytest

from amed.quant import formats as Q


RNG = np.random.default_rng(1234)


def gaussian(N, K, seed=0, scale=0.02):
    return (np.random.default_rng(seed).standard_normal((N, K)) * scale).astype(np.float32)


def rel_rmse(w, d):
    return float(np.sqrt(((w - d) ** 2).mean() / (w ** 2).mean()))


# ---- bit layout ---------------------------------------------------------------------------------

def test_q4_split_nibble_layout_hand_made_block():
    # one group of 32: element j < 16 has level j, element 16 + j has level 15 - j
    levels = np.concatenate([np.arange(16), 15 - np.arange(16)]).astype(np.float32)
    for method in ("naive", "search"):
        qt = Q.quantize(levels[None, :], "q4", 32, method=method)
        assert qt.q.shape == (1, 1, 16)
        assert float(qt.scale[0, 0]) == 1.0 and float(qt.zero[0, 0]) == 0.0
        expect = np.array([j | ((15 - j) << 4) for j in range(16)], dtype=np.uint8)
        np.testing.assert_array_equal(qt.q[0, 0], expect)
        np.testing.assert_array_equal(Q.dequantize(qt)[0], levels)


def test_q4_dequantize_reads_low_then_high_nibbles_per_group():
    G, ng = 64, 2
    q = np.zeros((1, ng, G // 2), dtype=np.uint8)
    q[0, 1, 3] = 0x5A                        # group 1, byte 3: low nibble 10, high nibble 5
    s = np.array([[1.0, 2.0]], dtype=np.float16)
    z = np.array([[0.0, -1.0]], dtype=np.float16)
    qt = Q.QTensor(fmt="q4", shape=(1, G * ng), group=G, q=q, scale=s, zero=z)
    w = Q.dequantize(qt)[0]
    assert w[G + 3] == 10 * 2.0 - 1.0            # element g*G + j
    assert w[G + G // 2 + 3] == 5 * 2.0 - 1.0    # element g*G + G/2 + j
    assert np.all(w[:G] == 0.0)
    assert np.sum(w[G:] != -1.0) == 2


def test_q6_layout_hand_made_block():
    # the documented example: G = 32, u0 = 45, u16 = 7; 0 and 63 present so scale = 1, zero = 0
    u = np.random.default_rng(0).integers(0, 64, 32)
    u[0], u[16], u[1], u[2] = 45, 7, 0, 63
    nib = [(u[j] & 15) | (u[j + 16] & 15) << 4 for j in range(16)]
    plane = [(u[i] >> 4) | (u[i + 8] >> 4) << 2 | (u[i + 16] >> 4) << 4 | (u[i + 24] >> 4) << 6 for i in range(8)]
    expect = np.array(nib + plane, dtype=np.uint8)
    assert expect[0] == 0x7D and expect[16] & 0b110011 == 0b10
    for method in ("naive", "search"):
        qt = Q.quantize(u[None, :].astype(np.float32), "q6", 32, method=method)
        assert qt.q.shape == (1, 1, 24) and qt.q.dtype == np.uint8
        assert float(qt.scale[0, 0]) == 1.0 and float(qt.zero[0, 0]) == 0.0
        np.testing.assert_array_equal(qt.q[0, 0], expect)
        np.testing.assert_array_equal(Q.dequantize(qt)[0], u)


def test_q6_dequantize_reads_both_planes_per_group():
    G, ng = 64, 2
    q = np.zeros((1, ng, 48), dtype=np.uint8)
    q[0, 1, 3] = 0x5A                        # group 1, nibble byte 3: elements 3 (10) and 35 (5)
    q[0, 1, 32 + 3] = 0b11_10_01_00          # group 1, plane byte 3: high bits of 3, 19, 35, 51
    s = np.array([[1.0, 2.0]], dtype=np.float16)
    z = np.array([[0.0, -1.0]], dtype=np.float16)
    w = Q.dequantize(Q.QTensor(fmt="q6", shape=(1, G * ng), group=G, q=q, scale=s, zero=z))[0]
    assert np.all(w[:G] == 0.0)
    got = {j: (w[G + j] + 1.0) / 2.0 for j in np.flatnonzero(w[G:] != -1.0)}
    assert got == {3: 10, 19: 1 << 4, 35: 5 | 2 << 4, 51: 3 << 4}


@pytest.mark.parametrize("G", [32, 64, 128])
def test_q6_pack_unpack_round_trip_and_documented_decoder(G):
    rng = np.random.default_rng(G)
    u = rng.integers(0, 64, (3, 5, G)).astype(np.uint8)
    b = Q._pack_q6(u)
    assert b.shape == (3, 5, 3 * G // 4) and b.dtype == np.uint8
    np.testing.assert_array_equal(Q._unpack_q6(b), u)
    # every byte pattern decodes the way docs/store-format.md says
    b = rng.integers(0, 256, (7, 3 * G // 4), dtype=np.uint8)
    nib, pl = b[:, :G // 2], b[:, G // 2:]
    lo = np.concatenate([nib & 15, nib >> 4], axis=1)
    hi = np.concatenate([pl & 3, (pl >> 2) & 3, (pl >> 4) & 3, pl >> 6], axis=1)
    np.testing.assert_array_equal(Q._unpack_q6(b), lo | hi << 4)
    np.testing.assert_array_equal(Q._pack_q6(lo | hi << 4), b)


def test_q8_layout_and_exact_levels():
    G = 32
    w = (np.arange(-64, 64, dtype=np.float32) * 0.5).reshape(1, 128)
    qt = Q.quantize(w, "q8", G, method="naive")
    assert qt.q.shape == (1, 4, G) and qt.q.dtype == np.int8
    d = Q.dequantize(qt)
    for g in range(4):
        s = float(qt.scale[0, g])
        np.testing.assert_allclose(qt.q[0, g].astype(np.float32) * s, d[0, g * G:(g + 1) * G])
    np.testing.assert_allclose(d, w, atol=np.abs(w).max() / 127)


# ---- error bounds and the scale search ----------------------------------------------------------

@pytest.mark.parametrize("fmt,G,bound", [("q4", 32, 0.080), ("q4", 64, 0.090), ("q4", 128, 0.100),
                                         ("q6", 32, 0.019), ("q6", 64, 0.022), ("q6", 128, 0.025),
                                         ("q8", 32, 0.0060), ("q8", 64, 0.0065), ("q8", 128, 0.0070)])
def test_round_trip_error(fmt, G, bound):
    w = gaussian(64, 1024, seed=G)
    qt = Q.quantize(w, fmt, G)
    d = Q.dequantize(qt)
    assert d.dtype == np.float32 and d.shape == w.shape
    assert rel_rmse(w, d) < bound
    # every weight lies within the group's representable range, up to one step
    step = qt.scale.astype(np.float32)[..., None]
    err = np.abs(d - w).reshape(64, -1, G)
    assert np.all(err <= np.abs(w).reshape(64, -1, G).max(-1, keepdims=True) * 0.25 + step)


@pytest.mark.parametrize("fmt,G", [("q4", 32), ("q4", 64), ("q4", 128), ("q6", 32), ("q6", 64), ("q6", 128),
                                   ("q8", 64)])
def test_search_beats_naive(fmt, G):
    w = gaussian(64, 1024, seed=7)
    naive = rel_rmse(w, Q.dequantize(Q.quantize(w, fmt, G, method="naive")))
    search = rel_rmse(w, Q.dequantize(Q.quantize(w, fmt, G, method="search")))
    if fmt == "q4":
        assert search < naive * 0.96          # measured ~6% lower
    elif fmt == "q6":
        assert search < naive * 0.985         # measured ~3-6% lower
    else:
        assert search <= naive


@pytest.mark.parametrize("G", [32, 64, 128])
def test_q6_error_is_about_4x_below_q4(G):
    w = gaussian(64, 1024, seed=11)
    e4, e6, e8 = (rel_rmse(w, Q.dequantize(Q.quantize(w, f, G))) for f in ("q4", "q6", "q8"))
    assert e6 < e4 / 3.6 and e6 > e8          # measured 4.1-4.2x


def test_search_never_worse_per_group():
    w = (np.random.default_rng(3).standard_t(3, (16, 512)) * 0.02).astype(np.float32)
    for fmt in ("q4", "q6", "q8"):
        en = ((Q.dequantize(Q.quantize(w, fmt, 64, method="naive")) - w) ** 2).reshape(-1, 64).sum(1)
        es = ((Q.dequantize(Q.quantize(w, fmt, 64, method="search")) - w) ** 2).reshape(-1, 64).sum(1)
        assert np.all(es <= en * (1 + 1e-3) + 1e-12)


def test_degenerate_groups():
    w = np.zeros((3, 128), dtype=np.float32)
    w[1] = 0.25                               # constant row
    w[2, :64] = np.linspace(-1, 1, 64)
    for fmt in ("q4", "q6", "q8"):
        for method in ("naive", "search"):
            d = Q.dequantize(Q.quantize(w, fmt, 64, method=method))
            assert np.isfinite(d).all()
            np.testing.assert_array_equal(d[0], 0.0)
            np.testing.assert_allclose(d[1], 0.25, rtol=1e-3)
            np.testing.assert_array_equal(d[2, 64:], 0.0)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        Q.quantize(np.zeros((2, 96), np.float32), "q4", 64)     # 96 is not a multiple of 64
    with pytest.raises(ValueError):
        Q.quantize(np.zeros((2, 64), np.float32), "q4", 48)
    with pytest.raises(ValueError):
        Q.quantize(np.zeros((2, 64), np.float32), "q5", 64)
    with pytest.raises(ValueError):
        Q.quantize(np.full((2, 64), np.nan, np.float32), "q8", 64)


def test_dequantize_rows_and_odd_shapes():
    w = gaussian(7, 96, seed=5)
    for fmt in ("q4", "q6", "q8"):
        qt = Q.quantize(w, fmt, 32)
        full = Q.dequantize(qt)
        np.testing.assert_array_equal(Q.dequantize_rows(qt, [6, 0, 3]), full[[6, 0, 3]])


def test_bits_per_weight():
    assert Q.quantize(gaussian(4, 256), "q4", 64).bits_per_weight == 4.5
    assert Q.quantize(gaussian(4, 256), "q4", 128).bits_per_weight == 4.25
    assert Q.quantize(gaussian(4, 256), "q8", 64).bits_per_weight == 8.25
    assert Q.quantize(gaussian(4, 256), "q6", 64).bits_per_weight == 6.5
    assert Q.quantize(gaussian(4, 256), "q6", 128).bits_per_weight == 6.25


# ---- QTensor and the byte layout -----------------------------------------------------------------

def test_qtensor_arrays_are_read_only_and_checked():
    qt = Q.quantize(gaussian(4, 128), "q4", 64)
    for a in (qt.q, qt.scale, qt.zero, *qt.kargs):
        assert not a.flags.writeable
    assert qt.kargs[1].dtype == np.uint16 and qt.kargs[2].dtype == np.uint16
    with pytest.raises(ValueError):
        Q.QTensor(fmt="q4", shape=(4, 128), group=64, q=qt.q, scale=qt.scale)          # no zero
    with pytest.raises(ValueError):
        Q.QTensor(fmt="q4", shape=(4, 192), group=64, q=qt.q, scale=qt.scale, zero=qt.zero)
    # uint16 scale bits are accepted (how a loader may hand them over)
    qt2 = Q.QTensor(fmt="q4", shape=(4, 128), group=64, q=qt.q, scale=qt.scale.view(np.uint16),
                    zero=qt.zero.view(np.uint16))
    np.testing.assert_array_equal(Q.dequantize(qt2), Q.dequantize(qt))
    q6 = Q.quantize(gaussian(4, 128), "q6", 64)
    assert q6.q.shape == (4, 2, 48) and not q6.zero.flags.writeable and q6.kargs[2].dtype == np.uint16
    with pytest.raises(ValueError):
        Q.QTensor(fmt="q6", shape=(4, 128), group=64, q=q6.q, scale=q6.scale)           # no zero
    with pytest.raises(ValueError):                                                   # q4-sized bytes
        Q.QTensor(fmt="q6", shape=(4, 128), group=64, q=qt.q, scale=q6.scale, zero=q6.zero)


@pytest.mark.parametrize("fmt,shape,G", [("q4", (5, 96), 32), ("q4", (3, 256), 128), ("q8", (7, 192), 64),
                                         ("q6", (5, 96), 32), ("q6", (3, 256), 128), ("q6", (7, 192), 64)])
def test_layout_is_a_pure_function_of_fmt_shape_group(fmt, shape, G):
    N, K = shape
    ng = K // G
    q_len = {"q4": N * K // 2, "q6": 3 * N * K // 4, "q8": N * K}[fmt]
    a64 = lambda n: -(-n // 64) * 64  # noqa: E731
    secs = Q.section_offsets(fmt, shape, G)
    assert secs["q"] == (0, q_len)
    assert secs["scale"] == (a64(q_len), 2 * N * ng)
    end = a64(q_len) + 2 * N * ng
    if fmt in ("q4", "q6"):
        assert secs["zero"] == (a64(end), 2 * N * ng)
        end = a64(end) + 2 * N * ng
    assert Q.layout_nbytes(fmt, shape, G) == a64(end)
    qt = Q.quantize(gaussian(N, K), fmt, G)
    assert qt.nbytes == a64(end) and len(qt.tobytes()) == a64(end)
    shapes = Q.array_shapes(fmt, shape, G)
    assert shapes["q"][0] == (N, ng, {"q4": G // 2, "q6": 3 * G // 4, "q8": G}[fmt])
    assert ("zero" in shapes) == (fmt != "q8")


@pytest.mark.parametrize("fmt", ["q4", "q6", "q8"])
def test_write_into_and_from_buffer_zero_copy(fmt):
    qt = Q.quantize(gaussian(6, 256, seed=2), fmt, 64)
    buf = np.full(64 + qt.nbytes + 64, 0xEE, dtype=np.uint8)
    end = qt.write_into(buf, 64)
    assert end == 64 + qt.nbytes
    assert buf[0] == 0xEE and buf[end] == 0xEE                 # nothing written outside
    back = Q.QTensor.from_buffer(buf, 64, fmt, (6, 256), 64)
    for name in ("q", "scale", "zero"):
        a, b = getattr(qt, name), getattr(back, name)
        if a is None:
            assert b is None
            continue
        assert np.shares_memory(b, buf)
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(Q.dequantize(back), Q.dequantize(qt))
    # padding between sections is zero
    secs = Q.section_offsets(fmt, (6, 256), 64)
    q_end = secs["q"][1]
    assert not buf[64 + q_end:64 + secs["scale"][0]].any()
    # from read-only bytes: still zero-copy views, read-only
    raw = qt.tobytes()
    ro = Q.QTensor.from_buffer(raw, 0, fmt, (6, 256), 64)
    assert not ro.q.flags.writeable
    assert np.shares_memory(ro.q, np.frombuffer(raw, np.uint8))
    np.testing.assert_array_equal(Q.dequantize(ro), Q.dequantize(qt))


def test_from_buffer_checks_offset_and_size():
    qt = Q.quantize(gaussian(2, 128), "q4", 64)
    raw = qt.tobytes()
    with pytest.raises(ValueError):
        Q.QTensor.from_buffer(raw, 8, "q4", (2, 128), 64)        # misaligned
    with pytest.raises(ValueError):
        Q.QTensor.from_buffer(raw[:-64], 0, "q4", (2, 128), 64)  # too short
    with pytest.raises(ValueError):
        qt.write_into(bytearray(qt.nbytes - 1))


def test_r8_layout_hand_made_block():
    """The documented r8 byte order, on levels that name their own (row, element)."""
    N, G = 8, 32
    u8 = np.array([[(r * 5 + k) % 16 for k in range(G)] for r in range(N)], np.uint8)[:, None, :]
    rows = Q.QTensor(fmt="q4", shape=(N, G), group=G, q=Q._pack_q4(u8),
                     scale=np.ones((N, 1), np.float16), zero=np.zeros((N, 1), np.float16))
    r8 = Q.interleave(rows)
    assert r8.q.shape == (1, 1, 8 * G // 2) and r8.scale.shape == (1, 1, 8)
    for m in range(G // 8):
        for r in range(8):
            for j in range(4):
                byte = int(r8.q[0, 0, 32 * m + 4 * r + j])
                assert byte & 15 == u8[r, 0, 8 * m + j] and byte >> 4 == u8[r, 0, 8 * m + 4 + j]
    lv = np.arange(-64, 64, dtype=np.int8).reshape(4, 1, G).repeat(2, axis=0)      # 8 rows
    q8 = Q.interleave(Q.QTensor(fmt="q8", shape=(8, G), group=G, q=lv, scale=np.ones((8, 1), np.float16)))
    for c in range(G // 4):
        for r in range(8):
            assert list(q8.q[0, 0, 32 * c + 4 * r:32 * c + 4 * r + 4]) == list(lv[r, 0, 4 * c:4 * c + 4])


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_r8_round_trip_bytes_and_rows(fmt):
    rng = np.random.default_rng(3)
    qt = Q.quantize(rng.standard_normal((24, 192)).astype(np.float32), fmt, 64)
    r8 = Q.interleave(qt)
    assert r8.nbytes == qt.nbytes and r8.layout == "r8"
    back = Q.to_rows(Q.QTensor.from_buffer(r8.tobytes(), 0, fmt, (24, 192), 64, layout="r8"))
    for name in ("q", "scale", "zero"):
        a, b = getattr(back, name), getattr(qt, name)
        assert (a is None and b is None) or np.array_equal(a, b)
    np.testing.assert_array_equal(Q.dequantize(r8), Q.dequantize(qt))
    np.testing.assert_array_equal(Q.dequantize_rows(r8, [23, 0, 9, 9]), Q.dequantize_rows(qt, [23, 0, 9, 9]))
    with pytest.raises(ValueError):
        Q.QTensor(fmt=fmt, shape=(24, 192), group=64, layout="r8", q=qt.q, scale=qt.scale, zero=qt.zero)
    with pytest.raises(ValueError):
        Q.array_shapes(fmt, (24, 192), 64, layout="cols")


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_quantize_straight_into_r8_equals_interleave(fmt):
    w = np.random.default_rng(5).standard_normal((40, 256)).astype(np.float32)
    a, b = Q.quantize(w, fmt, 64, layout="r8"), Q.interleave(Q.quantize(w, fmt, 64))
    for name in ("q", "scale", "zero"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or np.array_equal(x, y)
