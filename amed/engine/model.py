"""The BailingMoeV2 forward pass (AntAngelMed / Ling-flash-2.0), following docs/architecture.md §2.

Shapes: T new tokens, H hidden, nh / nkv query / kv heads, d head dim, rot rotary dims,
E experts, k experts per token, S cache capacity (positions).

    x = embed[ids]                                         # [T, H]
    for each layer:
        x += attention(rmsnorm(x))                         # fused QKV, QK-norm, partial RoPE, GQA
        x += (dense_mlp | moe)(rmsnorm(x))                 # SwiGLU; MoE = routed top-k + shared
    logits = lm_head(rmsnorm(x))                           # [T, V]

A Model is the shared, read-only part (weights bound to a backend's kernels, and an
ExpertProvider for the routed experts); each sequence has a State (KV cache, position). Kernels
are called through the backend (engine/backends), so the pass never branches on weight formats.
For simple use the model keeps one default state: `forward(ids)` appends to it, `reset()`
empties it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from amed.config import ModelConfig
from amed.engine.state import State
from amed.errors import AmedError

F32 = np.float32
# prefill tokens whose routed experts run together: bounds the gathered copies of their hidden
# states and outputs (2 x 8 x 256 x H floats, 64 MiB at H = 4096) whatever the prompt length
MOE_CHUNK = 256


class Model:
    """An open model. One forward at a time (not thread-safe); any number of States."""

    def __init__(self, config: ModelConfig, weights, experts, backend, ctx_size: int = 4096, source=None):
        self.config = config
        self.weights = weights      # engine/weights.py: bound dense weights
        self.experts = experts      # engine/experts: where routed experts come from
        self.backend = backend
        self.source = source        # the Checkpoint / Store that owns the memory maps
        # an fstat per mapped file before each forward pass: a file truncated under us is an
        # AmedError here rather than SIGBUS in a kernel (formats/files.Watched)
        self._check_files = getattr(source, "check_files", None)
        self.ctx_size = ctx_size
        self.state = self.new_state()

    # ---- sequences ------------------------------------------------------------------------
    def new_state(self, ctx_size: int | None = None) -> State:
        """A fresh sequence over this model (its own KV cache)."""
        return State(self.config, ctx_size or self.ctx_size, self.backend)

    @property
    def pos(self) -> int:
        return self.state.pos

    @property
    def tokens_forwarded(self) -> int:
        return self.state.tokens_forwarded

    def reset(self) -> None:
        """Forget the default sequence's context."""
        self.state.reset()

    def truncate(self, n: int) -> None:
        """Keep only the first n positions of the default sequence."""
        self.state.truncate(n)

    def use_experts(self, options=None, log=None):
        """Replace how routed experts are served (engine/experts.ExpertOptions); returns the
        new provider. The old one is closed (its cache emptied, its reader threads stopped)."""
        from amed.engine.experts import open_experts

        old, self.experts = self.experts, None
        if old is not None:
            old.close()
        self.experts = open_experts(self, options, log=log)
        return self.experts

    # ---- forward --------------------------------------------------------------------------
    def forward(self, ids, all_logits: bool = False, state: State | None = None) -> np.ndarray:
        """Run new tokens after the cached context of `state` (default: the model's own).
        Returns logits of the last token [V] (or of every new token [T, V] with all_logits)."""
        s = self.state if state is None else state
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        c, w, B = self.config, self.weights, self.backend
        T = len(ids)
        if T == 0:
            raise AmedError("forward() needs at least one token.")
        if self._check_files is not None:
            self._check_files()
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise AmedError(f"token id out of range [0, {c.vocab_size}).")
        s.ensure_capacity(s.pos + T)

        x = B.to_device(w.embed.rows_f32(ids))                             # [T, H]
        h = B.empty(x.shape)
        for L, lw in enumerate(w.layers):
            B.rmsnorm(x, lw.attn_norm, c.rms_norm_eps, h)
            B.add(x, self._attention(s, L, lw, h))                         # x += ...
            B.rmsnorm(x, lw.ffn_norm, c.rms_norm_eps, h)
            if lw.router is None:
                B.add(x, lw.mlp(h))                                        # SwiGLU
            else:
                B.add(x, self._moe(L, lw, h))
        s.pos += T
        s.tokens_forwarded += T

        if not all_logits:
            x = x[-1:]
        B.rmsnorm(x, w.norm, c.rms_norm_eps, x)
        logits = B.to_host(w.lm_head.matmul(x, B.empty((x.shape[0], c.vocab_size))))   # [T or 1, V]
        return logits if all_logits else logits[0]

    def forward_batch(self, ids, states: list[State]) -> np.ndarray:
        """One decode step for several sequences at once: token ids[i] appended to states[i].
        Returns the logits [N, V]. The dense matmuls (QKV, attention output, dense MLP, shared
        expert, router, lm_head) run once over the N tokens and each routed expert once for the
        tokens that chose it, so their weights are read once per step, not N times; attention
        runs per sequence on its own cache. Row i equals `forward([ids[i]], state=states[i])` up
        to float32 summation order (one sequence: exactly, it is that call)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        c, w, B = self.config, self.weights, self.backend
        N = len(ids)
        if N != len(states) or N == 0:
            raise AmedError("forward_batch() needs one token per state, and at least one.")
        if len({id(s) for s in states}) != N:
            raise AmedError("forward_batch() got the same state twice.")
        if N == 1:
            return self.forward(ids, state=states[0])[None, :]
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise AmedError(f"token id out of range [0, {c.vocab_size}).")
        if self._check_files is not None:
            self._check_files()
        for s in states:
            s.ensure_capacity(s.pos + 1)

        x = B.to_device(w.embed.rows_f32(ids))                             # [N, H]
        h = B.empty(x.shape)
        for L, lw in enumerate(w.layers):
            B.rmsnorm(x, lw.attn_norm, c.rms_norm_eps, h)
            B.add(x, self._attention_batch(states, L, lw, h))
            B.rmsnorm(x, lw.ffn_norm, c.rms_norm_eps, h)
            if lw.router is None:
                B.add(x, lw.mlp(h))
            else:
                B.add(x, self._moe(L, lw, h))                              # experts grouped over N
        for s in states:
            s.pos += 1
            s.tokens_forwarded += 1
        B.rmsnorm(x, w.norm, c.rms_norm_eps, x)
        return B.to_host(w.lm_head.matmul(x, B.empty((N, c.vocab_size))))   # [N, V]

    def logits(self, ids, state: State | None = None) -> np.ndarray:
        """Logits for every position of `ids` in a fresh context: float32 [len, V]."""
        s = self.state if state is None else state
        s.reset()
        return self.forward(ids, all_logits=True, state=s)

    # ---- blocks ---------------------------------------------------------------------------
    def _attention(self, s: State, L: int, lw, h: np.ndarray) -> np.ndarray:
        c, B = self.config, self.backend
        T = h.shape[0]
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_size
        qkv = lw.qkv.matmul(h, B.empty((T, (nh + 2 * nkv) * d)))          # [T, (nh+2nkv) d]
        q = B.empty((T, nh, d))
        no_norm = np.ones(d, F32)
        self.backend.qk_norm_rope_store(
            qkv, nh, nkv, d, c.rot_dim, lw.q_norm if lw.q_norm is not None else no_norm,
            lw.k_norm if lw.k_norm is not None else no_norm, c.use_qk_norm, c.rms_norm_eps,
            s.cos, s.sin, s.pos, q, s.k_cache[L], s.v_cache[L])
        att = B.empty((T, nh * d))
        self.backend.attention(q, s.k_cache[L], s.v_cache[L], s.pos, att)  # [T, nh d]
        return lw.attn_out.matmul(att, B.empty((T, c.hidden_size)))        # [T, H]

    def _attention_batch(self, states: list[State], L: int, lw, h: np.ndarray) -> np.ndarray:
        """_attention for one new token of each of N sequences: QKV and output projections over
        the N rows at once, RoPE, cache writes and attention per sequence at its own position."""
        c, B = self.config, self.backend
        N = h.shape[0]
        nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_size
        qkv = lw.qkv.matmul(h, B.empty((N, (nh + 2 * nkv) * d)))
        q = B.empty((N, nh, d))
        att = B.empty((N, nh * d))
        no_norm = np.ones(d, F32)
        for i, s in enumerate(states):
            self.backend.qk_norm_rope_store(
                qkv[i:i + 1], nh, nkv, d, c.rot_dim, lw.q_norm if lw.q_norm is not None else no_norm,
                lw.k_norm if lw.k_norm is not None else no_norm, c.use_qk_norm, c.rms_norm_eps,
                s.cos, s.sin, s.pos, q[i:i + 1], s.k_cache[L], s.v_cache[L])
            self.backend.attention(q[i:i + 1], s.k_cache[L], s.v_cache[L], s.pos, att[i:i + 1])
        return lw.attn_out.matmul(att, B.empty((N, c.hidden_size)))

    def _moe(self, L: int, lw, h):
        """The MoE block for h [T, H] (the backend's array). Routing runs on the host (the router's
        [T, E] logits come over; on the CPU backend they are already there), and so do the routed
        experts, except those a GPU provider keeps in VRAM; the shared expert runs on the backend,
        started first so that it overlaps the routed experts."""
        c, B = self.config, self.backend
        T, k = h.shape[0], c.num_experts_per_tok
        logits = B.to_host(lw.router.matmul(h, B.empty((T, c.num_experts))))   # [T, E] fp32
        idx = np.empty((T, k), np.int64)
        wts = np.empty((T, k), F32)
        self.backend.route(logits, lw.expert_bias, c.n_group, c.topk_group, k, c.routed_scaling_factor,
                           idx, wts)
        hh = B.to_host(h)
        if T == 1:
            return self._moe_one_token(L, lw, h, hh, idx[0], wts[0])
        out = np.zeros_like(hh)
        for t0 in range(0, T, MOE_CHUNK):
            t1 = min(T, t0 + MOE_CHUNK)
            self._moe_tokens(L, lw, h[t0:t1], hh[t0:t1], idx[t0:t1], wts[t0:t1], out[t0:t1])
        return B.to_device(out)

    def _moe_tokens(self, L: int, lw, h, hh: np.ndarray, idx: np.ndarray, wts: np.ndarray, out: np.ndarray) -> None:
        """out (zeros, host) = the MoE output for tokens h [T, H] (T <= MOE_CHUNK; hh: h on the
        host): the routed experts' weighted outputs summed in expert-id order, then the shared
        expert's."""
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
        hs = hh[tok]                                                       # [T k, H]
        ys = np.empty_like(hs)
        w = wts.reshape(-1)[order]
        # The provider starts reading experts not in memory and returns the ones the host computes,
        # in the order to compute them (ready ones first); the shared expert runs first: it needs
        # no read; experts a GPU provider runs add into its output there (device_sum).
        run = self.experts.start(L, list(span), hh)
        dev = lw.shared(h) if lw.shared is not None else None
        dev = self.experts.device_sum(L, idx, wts, h, dev)
        on_device = span.keys() - set(run)
        if on_device:                               # already in dev: nothing to add here
            w = w.copy()
            for e in on_device:
                a, b = span[e]
                w[a:b] = 0
                ys[a:b] = 0
        for e in run:
            a, b = span[e]
            self.experts.get(L, e)(hs[a:b], ys[a:b])
        self.experts.finish(L)
        self.backend.moe_combine(out, ys, tok, w)                          # in expert-id order
        if dev is not None:
            out += self.backend.to_host(dev)                               # shared expert, weight 1

    def _moe_one_token(self, L: int, lw, h, hh: np.ndarray, idx: np.ndarray, wts: np.ndarray):
        """_moe for one token (decode), without the grouping: the same sums in the same order
        (expert-id order, then the shared expert), so the logits are bit-identical. Experts a GPU
        provider keeps in VRAM take h where it is and add into the shared expert's output there
        (device_sum); the host's sum crosses over once. Python work per layer matters here: it is
        paid 32 times per decoded token."""
        B = self.backend
        order = np.argsort(idx)
        experts = idx[order].tolist()                                      # ascending ids
        wsel = wts[order]
        run = self.experts.start(L, experts, hh)                            # the host's, ready first
        dev = lw.shared(h) if lw.shared is not None else None
        dev = self.experts.device_sum(L, idx[None], wts[None], h, dev)   # + VRAM experts, on the device
        out = np.zeros_like(hh)                                 # the host's sum, in expert-id order
        # experts the provider ran on the device (in VRAM) are already in dev: marked done here
        ys = {} if len(run) == len(experts) else dict.fromkeys(set(experts) - set(run))
        nxt = 0                                     # next expert (in id order) to add to the sum
        get = self.experts.get
        for e in run:
            ys[e] = get(L, e)(hh)
            while nxt < len(experts) and experts[nxt] in ys:
                y = ys.pop(experts[nxt])
                if y is not None:
                    out += wsel[nxt] * y
                nxt += 1
        out = B.to_device(out)
        return out if dev is None else B.add(out, dev)


def load(path, ctx_size: int = 4096, max_ram=None, prefetch: bool = True, lookahead: str = "auto",
         log=None, experts=None, device: str = "cpu", gpu_experts: int | str = 0) -> Model:
    """Open a Hugging Face checkpoint directory, an amed store directory or a GGUF file.

    For a store, `max_ram` (bytes or "16G"; default: from available memory) bounds what stays
    resident: dense weights always, routed experts in a cache within the rest, the least used
    evicted first (engine/experts). `prefetch` reads chosen experts ahead; `lookahead` ("auto",
    "on", "off") also guesses the next layer's. `experts` (an ExpertOptions) sets all of these at
    once instead (and the I/O mode). `log(message)` receives warnings. `device` "cuda" runs the
    dense weights on an NVIDIA GPU (engine/backends/cuda), with `gpu_experts` (a number or "auto")
    routed experts per layer cached in VRAM, the rest on the CPU."""
    from amed.engine.backends import get_backend
    from amed.engine.experts import ExpertOptions
    from amed.engine.weights import build_weights

    path = Path(path).expanduser()
    if not path.exists():
        raise AmedError(f"{path} does not exist.")
    if (path / "amed-manifest.json").exists():
        from amed.formats.store import open_store

        source = open_store(path)
    elif path.is_file():                       # a GGUF file (llama.cpp, ollama), run in place
        from amed.formats.gguf import GGUF

        if device != "cpu":
            raise AmedError(f"{path} is a GGUF file; amed runs GGUF files on the cpu only (drop --device).")
        source = GGUF(path)
    else:
        from amed.formats.checkpoint import Checkpoint

        source = Checkpoint(path)
    backend = get_backend(device)
    options = experts if experts is not None else \
        ExpertOptions.from_env(max_ram=max_ram, prefetch=prefetch, lookahead=lookahead, gpu_experts=gpu_experts)
    model = Model(source.config, build_weights(source.config, source, backend), None, backend,
                  ctx_size=ctx_size, source=source)
    model.use_experts(options, log=log)
    return model
