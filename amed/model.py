"""The BailingMoeV2 forward pass (AntAngelMed / Ling-flash-2.0), following architecture.md §2.

Shapes: T new tokens, H hidden, nh / nkv query / kv heads, d head dim, rot rotary dims,
E experts, k experts per token, S cache capacity (positions).

    x = embed[ids]                                         # [T, H]
    for each layer:
        x += attention(rmsnorm(x))                         # fused QKV, QK-norm, partial RoPE, GQA
        x += (dense_mlp | moe)(rmsnorm(x))                 # SwiGLU; MoE = routed top-k + shared
    logits = lm_head(rmsnorm(x))                           # [T, V]

Positions continue across calls: `forward(ids)` appends to the KV cache, `reset()` empties it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import kernels as K
from .config import ModelConfig
from .errors import AmedError

F32 = np.float32
# prefill tokens whose routed experts run together: bounds the gathered copies of their hidden
# states and outputs (2 x 8 x 256 x H floats, 64 MiB at H = 4096) whatever the prompt length
MOE_CHUNK = 256


def rope_tables(n_pos: int, rot: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [n_pos, rot/2] for NeoX-style RoPE: pair j rotates at 1 / theta^(2j/rot)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))  # [rot/2]
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]      # [S, rot/2]
    return np.cos(ang).astype(F32), np.sin(ang).astype(F32)


class Model:
    """An open model: weights (lazy views) plus a KV cache. Not thread-safe."""

    def __init__(self, config: ModelConfig, weights, ctx_size: int = 4096, source=None):
        self.config = config
        self.weights = weights
        self.source = source  # the Checkpoint / Store that owns the memory maps
        self.pos = 0          # tokens in the KV cache
        self.tokens_forwarded = 0  # total tokens ever run through forward(): lets tests count prefill
        self._alloc_cache(max(16, min(ctx_size, config.max_position_embeddings)))

    # ---- KV cache -------------------------------------------------------------------------
    def _alloc_cache(self, capacity: int) -> None:
        c = self.config
        shape = (c.num_key_value_heads, capacity, c.head_size)               # [nkv, S, d]
        self.k_cache = [np.zeros(shape, F32) for _ in range(c.num_hidden_layers)]
        self.v_cache = [np.zeros(shape, F32) for _ in range(c.num_hidden_layers)]
        self.capacity = capacity
        self.cos, self.sin = rope_tables(capacity, c.rot_dim, c.rope_theta)

    def _ensure_capacity(self, needed: int) -> None:
        """Grow the cache (doubling) when a forward would run past its end; keeps the context."""
        if needed <= self.capacity:
            return
        old_k, old_v, n = self.k_cache, self.v_cache, self.pos
        self._alloc_cache(max(needed, 2 * self.capacity))
        for L in range(self.config.num_hidden_layers):
            self.k_cache[L][:, :n] = old_k[L][:, :n]
            self.v_cache[L][:, :n] = old_v[L][:, :n]

    def reset(self) -> None:
        """Forget the context (the cache memory is kept for reuse)."""
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Keep only the first n cached positions (e.g. to re-run a changed suffix)."""
        self.pos = max(0, min(self.pos, n))

    # ---- forward --------------------------------------------------------------------------
    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run new tokens after the cached context. Returns logits of the last token [V]
        (or of every new token [T, V] with all_logits)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        c, w = self.config, self.weights
        T = len(ids)
        if T == 0:
            raise AmedError("forward() needs at least one token.")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise AmedError(f"token id out of range [0, {c.vocab_size}).")
        self._ensure_capacity(self.pos + T)

        x = w.embed.rows_f32(ids)                                          # [T, H]
        h = np.empty_like(x)
        for L, lw in enumerate(w.layers):
            K.rmsnorm(x, lw.attn_norm, c.rms_norm_eps, h)
            x += self._attention(L, lw, h)
            K.rmsnorm(x, lw.ffn_norm, c.rms_norm_eps, h)
            if lw.router is None:
                x += lw.mlp(h)                                             # SwiGLU
            else:
                x += self._moe(L, lw, h)
        self.pos += T
        self.tokens_forwarded += T

        if not all_logits:
            x = x[-1:]
        K.rmsnorm(x, w.norm, c.rms_norm_eps, x)
        logits = np.empty((x.shape[0], c.vocab_size), F32)
        w.lm_head.matmul(x, logits)                                        # [T or 1, V]
        return logits if all_logits else logits[0]

    def logits(self, ids) -> np.ndarray:
        """Logits for every position of `ids` in a fresh context: float32 [len, V]."""
        self.reset()
        return self.forward(ids, all_logits=True)

    # ---- blocks ---------------------------------------------------------------------------
    def _attention(self, L: int, lw, h: np.ndarray) -> np.ndarray:
        c = self.config
        T = h.shape[0]
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_size
        qkv = lw.qkv.matmul(h, np.empty((T, (nh + 2 * nkv) * d), F32))    # [T, (nh+2nkv) d]
        q = np.empty((T, nh, d), F32)
        no_norm = np.ones(d, F32)
        K.qk_norm_rope_store(qkv, nh, nkv, d, c.rot_dim,
                             lw.q_norm if lw.q_norm is not None else no_norm,
                             lw.k_norm if lw.k_norm is not None else no_norm,
                             c.use_qk_norm, c.rms_norm_eps, self.cos, self.sin, self.pos,
                             q, self.k_cache[L], self.v_cache[L])
        att = np.empty((T, nh * d), F32)
        K.attention(q, self.k_cache[L], self.v_cache[L], self.pos, att)    # [T, nh d]
        return lw.attn_out.matmul(att, np.empty((T, c.hidden_size), F32))  # [T, H]

    def _moe(self, L: int, lw, h: np.ndarray) -> np.ndarray:
        c = self.config
        T, k = h.shape[0], c.num_experts_per_tok
        logits = lw.router.matmul(h, np.empty((T, c.num_experts), F32))   # [T, E] fp32
        idx = np.empty((T, k), np.int64)
        wts = np.empty((T, k), F32)
        K.route(logits, lw.expert_bias, c.n_group, c.topk_group, k, c.routed_scaling_factor, idx, wts)

        if T == 1:
            return self._moe_one_token(L, lw, h, idx[0], wts[0])
        out = np.zeros_like(h)
        for t0 in range(0, T, MOE_CHUNK):
            t1 = min(T, t0 + MOE_CHUNK)
            self._moe_tokens(L, lw, h[t0:t1], idx[t0:t1], wts[t0:t1], out[t0:t1])
        return out

    def _moe_tokens(self, L: int, lw, h: np.ndarray, idx: np.ndarray, wts: np.ndarray, out: np.ndarray) -> None:
        """out (zeros) = the MoE output for tokens h [T, H] (T <= MOE_CHUNK): the routed experts'
        weighted outputs summed in expert-id order, then the shared expert's."""
        k = idx.shape[1]
        # Group tokens by expert so each chosen expert's weights are read once for the batch;
        # experts nobody chose are never touched (their pages never leave the disk). Gathered
        # once, each expert's tokens are a contiguous slice of hs and its outputs one of ys.
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], len(flat))
        span = dict(zip(experts.tolist(), zip(starts.tolist(), ends.tolist())))
        tok = order // k
        hs = h[tok]                                                        # [T k, H]
        ys = np.empty_like(hs)
        run = self._start_experts(L, list(span), h)
        shared = lw.shared(h) if lw.shared is not None else None
        for e in run:
            a, b = span[e]
            self.weights.expert(L, e)(hs[a:b], ys[a:b])
        K.moe_combine(out, ys, tok, wts.reshape(-1)[order])               # in expert-id order
        if shared is not None:
            out += shared                                                  # shared expert, weight 1

    def _moe_one_token(self, L: int, lw, h: np.ndarray, idx: np.ndarray, wts: np.ndarray) -> np.ndarray:
        """_moe for one token (decode), without the grouping: the same sums in the same order
        (expert-id order, then the shared expert), so the logits are bit-identical. Python work per
        layer matters here: it is paid 32 times per decoded token."""
        order = np.argsort(idx)
        experts = idx[order].tolist()                                      # ascending ids
        wsel = wts[order]
        run = self._start_experts(L, experts, h)
        shared = lw.shared(h) if lw.shared is not None else None
        out = np.zeros_like(h)
        ys = {}
        nxt = 0                                     # next expert (in id order) to add to the sum
        for e in run:
            ys[e] = self.weights.expert(L, e)(h)
            while nxt < len(experts) and experts[nxt] in ys:
                out += wsel[nxt] * ys.pop(experts[nxt])
                nxt += 1
        if shared is not None:
            out += shared
        return out

    def _start_experts(self, L: int, experts: list[int], h: np.ndarray) -> list[int]:
        """Layer L's router chose `experts` (ascending ids): start reading the ones not resident,
        and layer L+1's likely ones (amed/cache.py). Returns the order to compute them in:
        resident ones first, while the others load. The callers then compute the shared expert
        before any routed one: it needs no read, so the readers get a head start."""
        w = self.weights
        if w.prefetch is not None:
            w.prefetch(L, experts)
        if w.lookahead is not None:
            w.lookahead(L, h)
        return experts if w.cache is None else w.cache.ready_first(L, experts)


def load(path, ctx_size: int = 4096, max_ram=None, prefetch: bool = True, lookahead: str = "auto",
         log=None) -> Model:
    """Open a Hugging Face checkpoint directory or an amed store directory.

    For a store, `max_ram` (bytes or "16G"; default: from available memory) bounds what stays
    resident: dense weights always, routed experts in a cache within the rest, the least used
    evicted first (amed/cache.py).
    `prefetch` reads chosen experts ahead; `lookahead` ("auto", "on", "off") also guesses the next
    layer's. `log(message)` receives warnings."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AmedError(f"{path} does not exist.")
    if (path / "amed-manifest.json").exists():
        from .cache import attach
        from .store import open_store

        store = open_store(path)
        model = Model(store.config, store.weights(), ctx_size=ctx_size, source=store)
        attach(model, max_ram, prefetch=prefetch, lookahead=lookahead, log=log)
        return model
    from .checkpoint import Checkpoint, load_weights

    ckpt = Checkpoint(path)
    return Model(ckpt.config, load_weights(ckpt), ctx_size=ctx_size, source=ckpt)
