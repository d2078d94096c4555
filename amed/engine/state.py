"""The state of one sequence (one conversation): its KV cache, its position, its RoPE tables.

A loaded Model is shared and read-only; every sequence that runs on it has a State of its own, so
several conversations can be interleaved over one model (as llama2.c's RunState beside its
Transformer weights)."""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def yarn_frequencies(rot: int, theta: float, yarn: dict) -> tuple[np.ndarray, float]:
    """inv_freq [rot/2] and the cos/sin scale of YaRN, as Hugging Face transformers'
    _compute_yarn_parameters with dim = rot (the rotary part only, 64 of 128 dims here): each
    frequency blends extrapolation (theta^(-2j/rot)) and interpolation (that / factor) by a linear
    ramp over pair index j between the correction dims of beta_fast and beta_slow rotations in
    original_max_position_embeddings; scale = 0.1 ln(factor) + 1 (or attention_factor, or the
    mscale / mscale_all_dim ratio). llama.cpp's rope_yarn is the same math with n_dims = the rotary
    dims (ramp width max(0.001, high - low) where HF adds 0.001 only when equal; fp32 throughout).
    Computed here in float64; HF computes in float32."""
    factor, orig = yarn["factor"], yarn["original_max_position_embeddings"]

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = yarn.get("attention_factor")
    if scale is None:
        m, m_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
        scale = mscale_of(factor, m) / mscale_of(factor, m_all) if m and m_all else mscale_of(factor)

    def corr_dim(n_rot):
        return rot * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(yarn["beta_fast"]), corr_dim(yarn["beta_slow"])
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rot // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrap = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    keep = 1.0 - ramp                                   # 1: extrapolate (high frequencies)
    return extrap / factor * (1.0 - keep) + extrap * keep, float(scale)


def rope_tables(n_pos: int, rot: int, theta: float, yarn: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n_pos, rot/2] for NeoX-style RoPE: pair j rotates at 1 / theta^(2j/rot); with YaRN
    (config.yarn) at yarn_frequencies' blended rate, both tables times its scale."""
    if yarn is None:
        inv_freq, scale = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)), None  # [rot/2]
    else:
        inv_freq, scale = yarn_frequencies(rot, theta, yarn)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]      # [S, rot/2]
    if scale is None:
        return np.cos(ang).astype(F32), np.sin(ang).astype(F32)
    return (np.cos(ang) * scale).astype(F32), (np.sin(ang) * scale).astype(F32)


class State:
    """KV cache [layer][nkv, S, d] for S positions (grown by doubling when a forward would run past
    it), the number of positions filled (`pos`), and the tokens ever run through it."""

    def __init__(self, config, ctx_size: int = 4096, backend=None):
        self.config = config
        self.backend = backend     # where the cache lives (None: NumPy arrays in host memory)
        self.pos = 0               # tokens in the KV cache
        self.tokens_forwarded = 0  # total tokens ever run through it: lets tests count prefill
        self._alloc(max(16, min(ctx_size, config.context_limit)))

    def _alloc(self, capacity: int) -> None:
        c = self.config
        B = self.backend
        zeros = (lambda shape: np.zeros(shape, F32)) if B is None else B.zeros
        shape = (c.num_key_value_heads, capacity, c.head_size)               # [nkv, S, d]
        self.k_cache = [zeros(shape) for _ in range(c.num_hidden_layers)]
        self.v_cache = [zeros(shape) for _ in range(c.num_hidden_layers)]
        self.capacity = capacity
        self.cos, self.sin = rope_tables(capacity, c.rot_dim, c.rope_theta, c.yarn)
        if B is not None:
            self.cos, self.sin = B.to_device(self.cos), B.to_device(self.sin)

    def ensure_capacity(self, needed: int) -> None:
        """Grow the cache (doubling) when a forward would run past its end; keeps the context."""
        if needed <= self.capacity:
            return
        old_k, old_v, n = self.k_cache, self.v_cache, self.pos
        self._alloc(max(needed, 2 * self.capacity))
        for L in range(self.config.num_hidden_layers):
            if self.backend is None:
                self.k_cache[L][:, :n] = old_k[L][:, :n]
                self.v_cache[L][:, :n] = old_v[L][:, :n]
            else:
                self.backend.copy_prefix(self.k_cache[L], old_k[L], n)
                self.backend.copy_prefix(self.v_cache[L], old_v[L], n)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k_cache) + sum(a.nbytes for a in self.v_cache)

    def reset(self) -> None:
        """Forget the context (the cache memory is kept for reuse)."""
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Keep only the first n cached positions (e.g. to re-run a changed suffix)."""
        self.pos = max(0, min(self.pos, n))
