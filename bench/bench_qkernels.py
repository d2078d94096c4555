"""Micro-benchmark of the quantized kernels and quantizers (runs in well under a minute).

    python bench/bench_qkernels.py [--threads 2] [--quick] [--formats q4,q6,q8] [--only gemv,gemm,expert,quant]
                                   [--layouts rows,r8]

q4 and q8 are measured in both row layouts (rows, and r8: 8 rows interleaved, quants.py) side by
side; q6 has only rows.

GEMV GB/s are "cold": the kernel cycles through ~256 MiB of distinct matrices, so weights come
from DRAM as they do when decoding with routed experts. GB/s = bytes of packed weights plus float16
scales (and zeros) read, divided by time; median of 5 passes after 2 warm-up passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import amed  # noqa: E402,F401  (sets NUMBA_CACHE_DIR / thread env before numba loads)
import numba  # noqa: E402

from amed.engine.backends.cpu import dispatch  # noqa: E402
from amed.quant import formats as Q  # noqa: E402


def _ro(a):
    a.flags.writeable = False
    return a


def random_qtensor(rng, fmt, N, K, G, layout="rows"):
    """A QTensor with random codes and sane scales (quantizing 256 MiB would take too long)."""
    ng = K // G
    if fmt in ("q4", "q6"):
        nb = G // 2 if fmt == "q4" else 3 * G // 4
        q = rng.integers(0, 256, (N, ng, nb), dtype=np.uint8)
        z = (rng.standard_normal((N, ng)) * 0.01).astype(np.float16)
    else:
        q = rng.integers(-127, 128, (N, ng, G), dtype=np.int8)
        z = None
    s = (rng.random((N, ng)) * 0.01 + 0.001).astype(np.float16)
    qt = Q.QTensor(fmt=fmt, shape=(N, K), group=G, q=q, scale=s, zero=z)
    return Q.interleave(qt) if layout == "r8" else qt


def layouts_for(fmt, layouts):
    return [lay for lay in layouts if lay == "rows" or Q.r8_ok(fmt, (8, 8))]


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_gemv(rng, fmt, N, K, G, T=1, pool_bytes=256 << 20, layout="rows"):
    nbytes = Q.layout_nbytes(fmt, (N, K), G)
    count = max(4, pool_bytes // nbytes)
    mats = [random_qtensor(rng, fmt, N, K, G, layout) for _ in range(count)]
    data = sum(m.q.nbytes + m.scale.nbytes + (m.zero.nbytes if m.zero is not None else 0) for m in mats[:1])
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.empty((T, N), dtype=np.float32)

    def run_all():
        for m in mats:
            dispatch.qmatmul(x, m, out)

    run_all()
    run_all()
    t = _time(run_all, 5) / count
    hot = _time(lambda: [dispatch.qmatmul(x, mats[0], out) for _ in range(20)], 5) / 20
    return t * 1e6, data / t / 1e9, data / hot / 1e9


def rel_rmse(w, d):
    return float(np.sqrt(((w - d) ** 2).mean() / (w ** 2).mean()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--formats", default="q4,q6,q8", help="comma-separated formats to measure (default: all)")
    ap.add_argument("--only", default="gemv,gemm,expert,quant",
                    help="comma-separated sections to run: gemv, gemm, expert, quant (default: all)")
    ap.add_argument("--layouts", default="rows,r8", help="row layouts for q4/q8: rows, r8 (default: both)")
    args = ap.parse_args(argv)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(0)
    fmts = [f for f in args.formats.split(",") if f]
    only = set(args.only.split(","))
    lays = [lay for lay in args.layouts.split(",") if lay]
    bad = [f for f in fmts if f not in Q.FORMATS] + sorted(only - {"gemv", "gemm", "expert", "quant"}) + \
        [lay for lay in lays if lay not in Q.LAYOUTS]
    if bad:
        ap.error(f"unknown format or section: {', '.join(bad)}")

    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads")
    if "gemv" in only:
        bench_gemv_table(rng, fmts, args.quick, lays)
    if "gemm" in only:
        bench_gemm_table(rng, fmts, lays)
    if "expert" in only:
        bench_expert_table(rng, fmts, lays)
    if "quant" in only:
        bench_quant_table(rng, fmts)


def bench_gemv_table(rng, fmts, quick, lays):
    print("\nGEMV (T=1), cold over ~256 MiB of matrices; weights/ns = N*K / time")
    print(f"{'fmt':4} {'layout':6} {'G':>4} {'shape':>10} {'bits/w':>6} {'us/call':>8} {'cold GB/s':>9} {'hot GB/s':>8} {'w/ns':>6}")
    shapes = [(1024, 4096), (4096, 1024), (4096, 4096)]
    cases = [(f, G) for f in fmts for G in (32, 64, 128)]
    if quick:
        shapes, cases = shapes[:1], [(f, 64) for f in fmts]
    for fmt, G in cases:
        for N, K in shapes:
            for lay in layouts_for(fmt, lays):
                us, cold, hot = bench_gemv(rng, fmt, N, K, G, layout=lay)
                bits = 8 * Q.layout_nbytes(fmt, (N, K), G) / (N * K)
                print(f"{fmt:4} {lay:6} {G:>4} {f'{N}x{K}':>10} {bits:6.2f} {us:8.1f} {cold:9.1f} {hot:8.1f} "
                      f"{N * K / (us * 1e3):6.1f}", flush=True)


def bench_gemm_table(rng, fmts, lays):
    print("\nSmall GEMM (prefill through one 1024x4096 matrix), us per token")
    for fmt, G, lay in ((f, 64, lay) for f in fmts for lay in layouts_for(f, lays)):
        row = []
        for T in (1, 4, 16, 64):
            m = random_qtensor(rng, fmt, 1024, 4096, G, lay)
            x = rng.standard_normal((T, 4096)).astype(np.float32)
            out = np.empty((T, 1024), dtype=np.float32)
            dispatch.qmatmul(x, m, out)
            t = _time(lambda: dispatch.qmatmul(x, m, out), 7)
            row.append(f"T={T}: {t * 1e6 / T:6.1f}")
        print(f"{fmt} {lay:4} G={G}: " + "  ".join(row), flush=True)


def bench_expert_table(rng, fmts, lays):
    print("\nOne routed expert (gate, up 1024x4096; down 4096x1024), cold over ~256 MiB of experts, us/expert")
    for fmt, G, lay in ((f, 64, lay) for f in fmts for lay in layouts_for(f, lays)):
        per = Q.layout_nbytes(fmt, (1024, 4096), G) * 3
        experts = [tuple(random_qtensor(rng, fmt, *s, G, lay) for s in ((1024, 4096), (1024, 4096), (4096, 1024)))
                   for _ in range(max(4, (256 << 20) // per))]
        for T in (1, 4):
            x = rng.standard_normal((T, 4096)).astype(np.float32)
            out = np.empty((T, 4096), dtype=np.float32)
            hg = np.empty((T, 1024), dtype=np.float32)
            hu = np.empty((T, 1024), dtype=np.float32)

            def fused():
                for e in experts:
                    dispatch.expert_q(x, *e, out)

            def separate():
                for g, u, d in experts:
                    dispatch.qmatmul(x, g, hg)
                    dispatch.qmatmul(x, u, hu)
                    with np.errstate(over="ignore"):
                        np.multiply(hg / (1.0 + np.exp(-hg)), hu, out=hg)
                    dispatch.qmatmul(hg, d, out)

            fused(), separate()
            tf = _time(fused, 5) / len(experts)
            ts = _time(separate, 5) / len(experts)
            print(f"{fmt} {lay:4} G={G} T={T}: fused expert_q {tf * 1e6:6.0f}   3 x qmatmul + numpy silu {ts * 1e6:6.0f}"
                  f"   ({per / tf / 1e9:.1f} vs {per / ts / 1e9:.1f} GB/s)", flush=True)


def bench_quant_table(rng, fmts):
    print("\nQuantization of a 1024x4096 matrix (one core): relative RMSE and M weights/s")
    dists = {"gauss": rng.standard_normal((1024, 4096)).astype(np.float32) * 0.02,
             "t(4)": (rng.standard_t(4, (1024, 4096)) * 0.02).astype(np.float32)}
    print(f"{'data':6} {'scheme':22} {'G':>4} {'bits/w':>6} {'naive':>7} {'search':>7} {'Mw/s':>6}")
    for dname, w in dists.items():
        for fmt, G in [(f, G) for f in fmts for G in ((32, 64, 128) if f != "q8" else (64,))]:
            qn = Q.quantize(w, fmt, G, method="naive")
            t0 = time.perf_counter()
            qs = Q.quantize(w, fmt, G, method="search")
            mws = w.size / (time.perf_counter() - t0) / 1e6
            name = {"q4": "q4 asym (scale+zero)", "q6": "q6 asym (scale+zero)", "q8": "q8 sym"}[fmt]
            print(f"{dname:6} {name:22} {G:>4} {qs.bits_per_weight:6.2f} {rel_rmse(w, Q.dequantize(qn)):7.4f} "
                  f"{rel_rmse(w, Q.dequantize(qs)):7.4f} {mws:6.0f}", flush=True)
        for G in (32, 64) if "q4" in fmts else ():
            en = rel_rmse(w, Q.quantize_q4_symmetric(w, G, "naive"))
            es = rel_rmse(w, Q.quantize_q4_symmetric(w, G, "search"))
            print(f"{dname:6} {'q4 sym (scale only)':22} {G:>4} {4 + 16 / G:6.2f} {en:7.4f} {es:7.4f} {'':>6}", flush=True)


if __name__ == "__main__":
    main()
