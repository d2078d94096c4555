"""Weight matrices as the forward pass sees them: one `matmul(x, out)` verb, whatever the format.

`Dense` wraps a bf16 (uint16 bits) or float32 matrix [N, K]; quantized matrices (`QTensor` from
quants.py) are wrapped by `Quant`. The model never branches on the format.
"""

from __future__ import annotations

import numpy as np

from . import kernels


class Dense:
    __slots__ = ("w", "shape", "_kernel")

    def __init__(self, w: np.ndarray):
        if w.dtype not in (np.uint16, np.float32) or w.ndim != 2:
            raise TypeError(f"Dense needs a 2-D bf16 (uint16) or float32 matrix, got {w.dtype} {w.shape}")
        self.w = w
        self.shape = w.shape
        self._kernel = kernels.matmul_bf16 if w.dtype == np.uint16 else kernels.matmul_f32

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[T, N] = x[T, K] @ W.T"""
        self._kernel(x, self.w, out)
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (embedding lookup)."""
        if self.w.dtype == np.float32:
            return np.ascontiguousarray(self.w[rows])
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        kernels.bf16_rows_to_f32(self.w, rows, out)
        return out

    def to_f32(self) -> np.ndarray:
        return self.rows_f32(np.arange(self.shape[0]))


class SwiGLU(tuple):
    """(gate, up, down) of a SwiGLU block (a routed or shared expert, a dense MLP); calling it
    computes down(silu(gate x) * up x). Three quantized matrices of one format run as one fused
    kernel call (qkernels.expert_runner), prepared once here, not per token."""

    def __new__(cls, gate, up, down):
        self = super().__new__(cls, (gate, up, down))
        self._run = None
        if type(gate) is Quant and type(up) is Quant and type(down) is Quant \
                and gate.qt.fmt == up.qt.fmt == down.qt.fmt and gate.qt.group == up.qt.group \
                and gate.qt.layout == up.qt.layout == down.qt.layout:
            from .qkernels import expert_runner

            self._run = expert_runner(gate.qt, up.qt, down.qt)
        return self

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 [T, H] C-contiguous -> [T, H] (into `out`, C-contiguous, when given)."""
        if self._run is not None:
            return self._run(x, out)
        gate, up, down = self
        T, I = x.shape[0], gate.shape[0]
        g = gate.matmul(x, np.empty((T, I), np.float32))
        u = up.matmul(x, np.empty((T, I), np.float32))
        kernels.silu_mul(g, u, g)
        return down.matmul(g, np.empty((T, down.shape[0]), np.float32) if out is None else out)


class Layer:
    """One decoder layer's weights. Dense-MLP layers set mlp (a SwiGLU); MoE layers set router,
    expert_bias and shared (a SwiGLU or None); routed experts are fetched lazily through
    `Weights.expert`."""

    def __init__(self, **kw):
        self.attn_norm = self.qkv = self.q_norm = self.k_norm = self.attn_out = self.ffn_norm = None
        self.mlp = None                                 # dense SwiGLU (first_k_dense_replace layers)
        self.router = self.expert_bias = self.shared = None  # MoE layers
        for k, v in kw.items():
            setattr(self, k, v)


class Weights:
    """All weights of a model. Routed experts are not materialized: `expert(layer, e)` asks the
    source for that expert's (gate, up, down) matrices on first use and remembers the views.
    `touched` records every (layer, expert) ever fetched, so tests can prove laziness."""

    def __init__(self, embed, layers, norm, lm_head, fetch_expert):
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self._fetch_expert = fetch_expert
        self._experts: dict[tuple[int, int], tuple] = {}
        self.touched: set[tuple[int, int]] = set()
        self.prefetch = None   # optional prefetch(layer, experts): start reading routed experts early
        self.lookahead = None  # optional lookahead(layer, h): read the next layer's likely experts early
        self.cache = None      # optional cache.ExpertCache: residency under a budget, hit counting

    def expert(self, layer: int, e: int):
        key = (layer, e)
        if self.cache is not None:
            w = self.cache.use(layer, e)
            if w is not None:              # a slot cache serves its own copy (amed/cache.py)
                self.touched.add(key)
                return w
        w = self._experts.get(key)
        if w is None:
            w = self._fetch_expert(layer, e)
            self._experts[key] = w
            self.touched.add(key)
        return w


def build_weights(cfg, matrix, vector) -> Weights:
    """Assemble `Weights` from two lookups by amed tensor name (see checkpoint.tensor_table):
    `matrix(name)` gives a matmul-able weight, `vector(name)` a float32 array. Routed experts
    are looked up only when the router first picks them."""
    layers = []
    for L in range(cfg.num_hidden_layers):
        b = f"blk.{L}."
        lw = Layer(attn_norm=vector(b + "attn_norm"), qkv=matrix(b + "attn_qkv"),
                   attn_out=matrix(b + "attn_output"), ffn_norm=vector(b + "ffn_norm"))
        if cfg.use_qk_norm:
            lw.q_norm, lw.k_norm = vector(b + "attn_q_norm"), vector(b + "attn_k_norm")
        if not cfg.is_moe_layer(L):
            lw.mlp = SwiGLU(*(matrix(b + f"ffn_{m}") for m in ("gate", "up", "down")))
        else:
            lw.router = matrix(b + "ffn_gate_inp")   # bf16/f32 only: the router runs in fp32 (§2d)
            lw.expert_bias = (vector(b + "exp_probs_b") if cfg.moe_router_enable_expert_bias
                              else np.zeros(cfg.num_experts, np.float32))
            if cfg.num_shared_experts:
                lw.shared = SwiGLU(*(matrix(b + f"ffn_{m}_shexp") for m in ("gate", "up", "down")))
        layers.append(lw)

    def fetch_expert(L, e):
        return SwiGLU(*(matrix(f"blk.{L}.ffn_{m}_exps.{e}") for m in ("gate", "up", "down")))

    return Weights(matrix("token_embd"), layers, vector("output_norm"), matrix("output"), fetch_expert)


class Quant:
    """A quantized matrix (see quants.py for the formats); matmul dequantizes inside the kernel."""
    __slots__ = ("qt", "shape", "_kernel", "_args")

    def __init__(self, qt):
        from .qkernels import matmul_call

        self.qt = qt
        self.shape = tuple(qt.shape)
        self._kernel, self._args = matmul_call(qt)     # bound once: matmul runs ~100x per token

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[T, N] = x[T, K] @ W.T; x and out 2-D C-contiguous float32 (qkernels.qmatmul checks
        for other callers)."""
        self._kernel(x, *self._args, out)
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        from .quants import dequantize_rows

        return dequantize_rows(self.qt, rows)


def as_matrix(fmt: str, parts: dict, shape: tuple, group: int | None, layout: str = "rows"):
    """A store weight (its component arrays) as a matmul-able object."""
    if fmt in ("f32", "bf16"):
        return Dense(parts["w"])
    from .quants import QTensor

    return Quant(QTensor(fmt=fmt, shape=shape, group=group, q=parts["q"], scale=parts["s"],
                         zero=parts.get("m"), layout=layout))
