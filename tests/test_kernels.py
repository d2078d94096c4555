"""Every float kernel against a plain NumPy (float64) reference."""

import ml_dtypes
import numpy as np
import pytest

from amed.engine.backends.cpu import kernels as K
import reference

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def readonly(a):
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("T", [1, 3, 17])
def test_matmul_bf16_and_f32(T):
    w = f32(37, 64)
    wb = readonly(w.astype(ml_dtypes.bfloat16).view(np.uint16))
    wbf = w.astype(ml_dtypes.bfloat16).astype(np.float64)
    x = f32(T, 64)
    out = np.empty((T, 37), np.float32)
    K.matmul_bf16(x, wb, out)
    np.testing.assert_allclose(out, x @ wbf.T, rtol=1e-5, atol=1e-5)
    K.matmul_f32(x, readonly(w), out)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)


def test_matmul_shape_mismatch_is_an_error_not_a_stray_write():
    w = readonly(f32(37, 64))
    wb = readonly(w.astype(ml_dtypes.bfloat16).view(np.uint16))
    for x, out in [(f32(4, 64), np.empty((1, 37), np.float32)),      # out has too few rows
                   (f32(1, 32), np.empty((1, 37), np.float32)),      # x too narrow
                   (f32(1, 64), np.empty((1, 36), np.float32))]:     # out too narrow
        with pytest.raises(ValueError, match="shapes do not match"):
            K.matmul_f32(x, w, out)
        with pytest.raises(ValueError, match="shapes do not match"):
            K.matmul_bf16(x, wb, out)


def test_bf16_rows():
    w = f32(10, 8).astype(ml_dtypes.bfloat16)
    out = np.empty((3, 8), np.float32)
    K.bf16_rows_to_f32(readonly(w.view(np.uint16)), np.array([7, 0, 7]), out)
    assert np.array_equal(out, w.astype(np.float32)[[7, 0, 7]])


def test_rmsnorm():
    x, w = f32(5, 33), f32(33)
    out = np.empty_like(x)
    K.rmsnorm(x, w, 1e-6, out)
    np.testing.assert_allclose(out, reference.rmsnorm(x.astype(np.float64), w, 1e-6), rtol=1e-5, atol=1e-6)


def test_silu_mul():
    g, u = f32(4, 9), f32(4, 9)
    out = np.empty_like(g)
    K.silu_mul(g, u, out)
    np.testing.assert_allclose(out, reference.silu(g.astype(np.float64)) * u, rtol=1e-5, atol=1e-6)


def rope_ref(v, pos, rot, theta):                         # v [heads, d] at one position
    inv = 1.0 / theta ** (np.arange(0, rot, 2) / rot)
    ang = np.concatenate([pos * inv] * 2)
    r = v[:, :rot]
    rh = np.concatenate([-r[:, rot // 2:], r[:, :rot // 2]], axis=1)
    return np.concatenate([r * np.cos(ang) + rh * np.sin(ang), v[:, rot:]], axis=1)


def test_qk_norm_rope_store_and_attention():
    from amed.engine.state import rope_tables
    nh, nkv, d, rot, T, pos, S = 6, 2, 16, 8, 5, 3, 12
    cos, sin = rope_tables(S, rot, 10000.0)
    qkv = f32(T, (nh + 2 * nkv) * d)
    qn, kn = f32(d), f32(d)
    q = np.empty((T, nh, d), np.float32)
    kc = np.zeros((nkv, S, d), np.float32)
    vc = np.zeros((nkv, S, d), np.float32)
    kc[:, :pos], vc[:, :pos] = f32(nkv, pos, d), f32(nkv, pos, d)
    K.qk_norm_rope_store(qkv, nh, nkv, d, rot, qn, kn, True, 1e-6, cos, sin, pos, q, kc, vc)
    x = qkv.astype(np.float64).reshape(T, nh + 2 * nkv, d)
    for t in range(T):
        qr = rope_ref(reference.rmsnorm(x[t, :nh], qn, 1e-6), pos + t, rot, 10000.0)
        kr = rope_ref(reference.rmsnorm(x[t, nh:nh + nkv], kn, 1e-6), pos + t, rot, 10000.0)
        np.testing.assert_allclose(q[t], qr, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(kc[:, pos + t], kr, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(vc[:, pos + t], x[t, nh + nkv:], rtol=1e-6)

    out = np.empty((T, nh * d), np.float32)
    K.attention(q, kc, vc, pos, out)
    for t in range(T):
        for h in range(nh):
            kh = h // (nh // nkv)
            s = kc[kh, :pos + t + 1].astype(np.float64) @ q[t, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h * d:(h + 1) * d], p @ vc[kh, :pos + t + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("E,G,kg,k", [(16, 4, 2, 4), (256, 8, 4, 8), (8, 1, 1, 2)])
def test_route(E, G, kg, k):
    T = 50
    logits, bias = f32(T, E), (0.3 * f32(E)).astype(np.float32)
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    K.route(logits, bias, G, kg, k, 2.5, idx, w)
    for t in range(T):
        ri, rw = reference.select_experts(logits[t].astype(np.float64), bias, G, kg, k, 2.5)
        order = np.argsort(idx[t])
        assert np.array_equal(idx[t][order], np.sort(ri))
        np.testing.assert_allclose(w[t][order], rw[np.argsort(ri)], rtol=1e-5)
        assert abs(w[t].sum() - 2.5) < 1e-5


def test_route_group_limit_matters():
    # the single best expert sits alone in a weak group: group-limited top-k must skip it
    E, G = 16, 4
    logits = np.full((1, E), -3.0, np.float32)
    logits[0, 0] = 5.0                      # group 0: one strong expert, rest weak
    logits[0, 4:12] = 1.0                   # groups 1 and 2: uniformly decent
    idx = np.empty((1, 2), np.int64)
    w = np.empty((1, 2), np.float32)
    K.route(logits, np.zeros(E, np.float32), G, 2, 2, 1.0, idx, w)
    # group 0 scores 5+(-3)=2 via sigmoid sums: s(5)+s(-3)=1.04 < s(1)*2=1.46 -> excluded
    assert 0 not in idx[0] and all(4 <= i < 12 for i in idx[0])


def test_numba_cache_dir_is_keyed_by_every_kernel_source(tmp_path):
    """Numba checks a cached kernel against its own file only; helpers live in other files
    (cpu/qdot.py), so the cache directory changes when any kernel source changes."""
    import os
    import shutil
    from pathlib import Path

    import amed

    pkg = tmp_path / "amed"
    shutil.copytree(Path(amed.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = amed._kernel_sources_hash(str(pkg))
    assert before == amed._kernel_sources_hash() and len(before) == 12
    if "amed" in os.environ["NUMBA_CACHE_DIR"]:      # ours, not one the user set
        assert os.environ["NUMBA_CACHE_DIR"].endswith(before)
    with open(pkg / "engine" / "backends" / "cpu" / "qdot.py", "a") as f:
        f.write("\n# an edit to a helper file\n")
    assert amed._kernel_sources_hash(str(pkg)) != before


def test_openmp_workers_spin_briefly_unless_the_user_says_otherwise():
    """libgomp reads GOMP_SPINCOUNT when Numba loads it: amed sets a short spin first (a long one
    starves a worker when another program holds a core); a user's own value wins."""
    import os
    import subprocess
    import sys

    code = "import os, amed; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "10000"
    env["GOMP_SPINCOUNT"] = "300000"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "300000"
