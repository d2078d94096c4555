"""A model's weights as the forward pass sees them: bound to the backend's kernels, shared and
read-only. Routed experts are not here: they come from an ExpertProvider (engine/experts)."""

from __future__ import annotations

import numpy as np


class Layer:
    """One decoder layer's weights. Dense-MLP layers set mlp (a SwiGLU); MoE layers set router,
    expert_bias and shared (a SwiGLU or None)."""

    def __init__(self, **kw):
        self.attn_norm = self.qkv = self.q_norm = self.k_norm = self.attn_out = self.ffn_norm = None
        self.mlp = None                                 # dense SwiGLU (first_k_dense_replace layers)
        self.router = self.expert_bias = self.shared = None  # MoE layers
        for k, v in kw.items():
            setattr(self, k, v)


class Weights:
    """Every weight but the routed experts: embeddings, layers, final norm, lm_head."""

    def __init__(self, embed, layers: list[Layer], norm: np.ndarray, lm_head):
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head


def build_weights(cfg, source, backend) -> Weights:
    """Bind the weights of `source` (a Checkpoint or Store: `matrix(name)` hands out a matrix as
    arrays, `vector(name)` a float32 array, by amed tensor name, see formats/checkpoint.py) to the
    backend's kernels."""
    matrix = lambda name: backend.linear(source.matrix(name))         # noqa: E731
    swiglu = lambda b, suffix: backend.swiglu(*(source.matrix(f"{b}ffn_{m}{suffix}")   # noqa: E731
                                             for m in ("gate", "up", "down")))
    vector = lambda name: backend.vector(source.vector(name))           # noqa: E731 - norms
    layers = []
    for L in range(cfg.num_hidden_layers):
        b = f"blk.{L}."
        lw = Layer(attn_norm=vector(b + "attn_norm"), qkv=matrix(b + "attn_qkv"),
                   attn_out=matrix(b + "attn_output"), ffn_norm=vector(b + "ffn_norm"))
        if cfg.use_qk_norm:
            lw.q_norm, lw.k_norm = vector(b + "attn_q_norm"), vector(b + "attn_k_norm")
        if not cfg.is_moe_layer(L):
            lw.mlp = swiglu(b, "")
        else:
            lw.router = matrix(b + "ffn_gate_inp")   # bf16/f32 only: the router runs in fp32 (§2d)
            # routing runs on the host (it decides which experts run where): a host array
            lw.expert_bias = (source.vector(b + "exp_probs_b") if cfg.moe_router_enable_expert_bias
                              else np.zeros(cfg.num_experts, np.float32))
            if cfg.num_shared_experts:
                lw.shared = swiglu(b, "_shexp")
        layers.append(lw)
    return Weights(backend.embedding(source.matrix("token_embd")), layers, vector("output_norm"), matrix("output"))
