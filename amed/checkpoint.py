"""Hugging Face safetensors checkpoints: the tensor table, and zero-copy views over memory maps.

Nothing here reads tensor data: a tensor is a NumPy view into an mmap of its shard, and pages
come in from disk only when a kernel touches them. Every header is treated as hostile.
"""

from __future__ import annotations

from .config import ModelConfig

# ---- the tensor table: every tensor a BailingMoeV2 checkpoint must hold ---------------------
# HF name -> (shape, dtype).  dtype is the safetensors name; expert_bias is stored F32.


def hf_tensor_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """All tensors (excluding MTP layers) with their shapes, in a stable order."""
    H, V = cfg.hidden_size, cfg.vocab_size
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    d = cfg.head_size
    specs: dict[str, tuple[tuple[int, ...], str]] = {
        "model.word_embeddings.weight": ((V, H), "BF16"),
    }
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        specs[p + "input_layernorm.weight"] = ((H,), "BF16")
        specs[p + "attention.query_key_value.weight"] = ((qkv, H), "BF16")
        if cfg.use_qk_norm:
            specs[p + "attention.query_layernorm.weight"] = ((d,), "BF16")
            specs[p + "attention.key_layernorm.weight"] = ((d,), "BF16")
        specs[p + "attention.dense.weight"] = ((H, cfg.q_dim), "BF16")
        specs[p + "post_attention_layernorm.weight"] = ((H,), "BF16")
        if not cfg.is_moe_layer(L):
            I = cfg.intermediate_size
            specs[p + "mlp.gate_proj.weight"] = ((I, H), "BF16")
            specs[p + "mlp.up_proj.weight"] = ((I, H), "BF16")
            specs[p + "mlp.down_proj.weight"] = ((H, I), "BF16")
            continue
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        specs[p + "mlp.gate.weight"] = ((E, H), "BF16")
        if cfg.moe_router_enable_expert_bias:
            specs[p + "mlp.gate.expert_bias"] = ((E,), "F32")
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            specs[q + "gate_proj.weight"] = ((I, H), "BF16")
            specs[q + "up_proj.weight"] = ((I, H), "BF16")
            specs[q + "down_proj.weight"] = ((H, I), "BF16")
        if cfg.num_shared_experts:
            S = cfg.shared_intermediate_size
            q = p + "mlp.shared_experts."
            specs[q + "gate_proj.weight"] = ((S, H), "BF16")
            specs[q + "up_proj.weight"] = ((S, H), "BF16")
            specs[q + "down_proj.weight"] = ((H, S), "BF16")
    specs["model.norm.weight"] = ((H,), "BF16")
    specs["lm_head.weight"] = ((V, H), "BF16")
    return specs
