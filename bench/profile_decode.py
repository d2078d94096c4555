#!/usr/bin/env python3
"""Where a decoded token's time goes, per part of the forward pass, on any store or checkpoint.

    python bench/profile_decode.py STORE [-n 16] [-t 1] [--prompt 64]

Runs a prompt, then times -n decode steps with a timer around every bound weight the forward
pass calls (QKV and output projections, router, shared expert, dense MLP, lm_head, each routed
expert) and around the attention / norm / routing kernels. What is left of the wall time is
Python between the kernels (the forward pass, the expert provider, allocations). The timers
cost ~0.2 us a call, ~0.1 ms per token at 32 layers: they are in the Python share.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


class Timed:
    """A bound matrix (matmul) or SwiGLU block (call) whose calls add to SPENT[part]."""

    def __init__(self, inner, part: str):
        self.inner, self.part = inner, part
        self.shape = getattr(inner, "shape", None)

    def matmul(self, x, out):
        t0 = time.perf_counter()
        r = self.inner.matmul(x, out)
        SPENT[self.part] += time.perf_counter() - t0
        CALLS[self.part] += 1
        return r

    def __call__(self, x, out=None):
        t0 = time.perf_counter()
        r = self.inner(x, out)
        SPENT[self.part] += time.perf_counter() - t0
        CALLS[self.part] += 1
        return r

    def rows_f32(self, rows):
        return self.inner.rows_f32(rows)


def timed_fn(fn, part: str):
    def run(*args):
        t0 = time.perf_counter()
        r = fn(*args)
        SPENT[part] += time.perf_counter() - t0
        CALLS[part] += 1
        return r
    return run


def instrument(m) -> None:
    for lw in m.weights.layers:
        lw.qkv, lw.attn_out = Timed(lw.qkv, "attention: QKV + output projections"), \
            Timed(lw.attn_out, "attention: QKV + output projections")
        if lw.mlp is not None:
            lw.mlp = Timed(lw.mlp, "dense MLP (first layer)")
        if lw.router is not None:
            lw.router = Timed(lw.router, "router matmul")
        if lw.shared is not None:
            lw.shared = Timed(lw.shared, "shared expert")
    m.weights.lm_head = Timed(m.weights.lm_head, "lm_head")
    get = m.experts.get
    m.experts.get = lambda L, e: Timed(get(L, e), "routed experts (8 per layer)")
    B = m.backend
    for name, part in (("qk_norm_rope_store", "attention: QK-norm, RoPE, KV store"),
                       ("attention", "attention: over the KV cache"), ("rmsnorm", "norms"),
                       ("route", "routing (top-k)"), ("moe_combine", "routed experts (8 per layer)")):
        setattr(B, name, timed_fn(getattr(B, name), part))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("-n", type=int, default=16, help="decode steps timed")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    a = ap.parse_args()

    import numba

    import amed

    numba.set_num_threads(a.threads)
    m = amed.load(a.store)
    from amed.engine.backends.cpu import CPUBackend

    m.backend = type("TimedBackend", (CPUBackend,), {})()     # timers on an instance of our own
    rng = np.random.default_rng(0)
    m.forward(rng.integers(0, 1000, a.prompt).tolist())
    for t in rng.integers(0, 1000, 4).tolist():          # warm: compile, page in
        m.forward([t])
    instrument(m)
    SPENT.clear()
    CALLS.clear()
    ids = rng.integers(0, 1000, a.n).tolist()
    t0 = time.perf_counter()
    for t in ids:
        m.forward([t])
    wall = time.perf_counter() - t0
    total = sum(SPENT.values())
    print(f"{a.store}: {a.threads} thread(s), {a.n} decode steps after {a.prompt} tokens: "
          f"{wall / a.n * 1e3:.1f} ms/token ({a.n / wall:.2f} t/s)")
    for k, v in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<40} {v / a.n * 1e3:8.2f} ms/token {100 * v / wall:5.1f}%  "
              f"({CALLS[k] // a.n} calls/token)")
    print(f"  {'Python between the kernels':<40} {(wall - total) / a.n * 1e3:8.2f} ms/token "
          f"{100 * (wall - total) / wall:5.1f}%")


if __name__ == "__main__":
    main()
