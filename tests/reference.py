"""A plain NumPy (float64) BailingMoeV2 forward pass, written from docs/architecture.md §2 alone.

It shares no code with amed.engine.model and serves as the independent reference in tests.
`tensors` maps Hugging Face names to float arrays; `cfg` is the config.json dict.
"""

import numpy as np


def rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def silu(z):
    return z / (1.0 + np.exp(-z))


def swiglu(t, prefix, h):
    g = h @ t[prefix + "gate_proj.weight"].T
    u = h @ t[prefix + "up_proj.weight"].T
    return (silu(g) * u) @ t[prefix + "down_proj.weight"].T


def select_experts(logits, bias, n_group, topk_group, k, scale):
    s = 1.0 / (1.0 + np.exp(-logits))
    b = s + bias
    E = b.shape[-1]
    groups = b.reshape(n_group, E // n_group)
    gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)
    keep = np.argsort(-gscore, kind="stable")[:topk_group]
    mask = np.full(E, -np.inf)
    for g in keep:
        mask[g * (E // n_group):(g + 1) * (E // n_group)] = 0.0
    idx = np.argsort(-(b + mask), kind="stable")[:k]
    w = s[idx] / (s[idx].sum() + 1e-20) * scale
    return idx, w


def yarn_inv_freq(cfg, rot):
    """(inv_freq [rot/2], cos/sin scale) for cfg["rope_scaling"] of type yarn, written from Hugging
    Face transformers' _compute_yarn_parameters (modeling_rope_utils.py) with dim = rot."""
    import math
    rs = cfg["rope_scaling"]
    base, dim = cfg["rope_theta"], rot
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings", cfg["max_position_embeddings"])

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def find_correction_dim(num_rotations):
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = find_correction_dim(beta_fast), find_correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, attention_factor


def forward(t, cfg, ids):
    t = {k: np.asarray(v, dtype=np.float64) for k, v in t.items()}
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or H // nh
    rot = cfg.get("rotary_dim") or int(d * cfg.get("partial_rotary_factor", 1.0))
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)
    x = t["model.word_embeddings.weight"][ids]
    pos = np.arange(T)
    inv, scale = 1.0 / theta ** (np.arange(0, rot, 2) / rot), 1.0
    if (cfg.get("rope_scaling") or {}).get("type", (cfg.get("rope_scaling") or {}).get("rope_type")) == "yarn":
        inv, scale = yarn_inv_freq(cfg, rot)
    ang = np.concatenate([pos[:, None] * inv[None]] * 2, axis=1)          # [T, rot]
    cos, sin = scale * np.cos(ang)[:, None, :], scale * np.sin(ang)[:, None, :]

    def rope(v):                                                           # v [T, heads, d]
        r = v[..., :rot]
        rh = np.concatenate([-r[..., rot // 2:], r[..., :rot // 2]], axis=-1)
        return np.concatenate([r * cos + rh * sin, v[..., rot:]], axis=-1)

    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = rmsnorm(x, t[p + "input_layernorm.weight"], eps)
        qkv = (h @ t[p + "attention.query_key_value.weight"].T).reshape(T, nh + 2 * nkv, d)
        q, k, v = qkv[:, :nh], qkv[:, nh:nh + nkv], qkv[:, nh + nkv:]
        if cfg.get("use_qk_norm", True):
            q = rmsnorm(q, t[p + "attention.query_layernorm.weight"], eps)
            k = rmsnorm(k, t[p + "attention.key_layernorm.weight"], eps)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
        att = att + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, nh * d)
        x = x + o @ t[p + "attention.dense.weight"].T
        h = rmsnorm(x, t[p + "post_attention_layernorm.weight"], eps)
        if L < cfg.get("first_k_dense_replace", 1):
            x = x + swiglu(t, p + "mlp.", h)
            continue
        logits = h @ t[p + "mlp.gate.weight"].T
        bias = t.get(p + "mlp.gate.expert_bias", np.zeros(cfg["num_experts"]))
        y = np.zeros_like(h)
        for i in range(T):
            idx, w = select_experts(logits[i], bias, cfg["n_group"], cfg["topk_group"],
                                    cfg["num_experts_per_tok"], cfg["routed_scaling_factor"])
            for e, we in zip(idx, w):
                y[i] += we * swiglu(t, p + f"mlp.experts.{e}.", h[i:i + 1])[0]
        if cfg.get("num_shared_experts", 1):
            y += swiglu(t, p + "mlp.shared_experts.", h)
        x = x + y
    x = rmsnorm(x, t["model.norm.weight"], eps)
    return x @ t["lm_head.weight"].T
