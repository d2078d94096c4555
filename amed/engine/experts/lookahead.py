"""Router look-ahead: guess the next layer's experts from this layer's hidden state."""

from __future__ import annotations

import numpy as np

AUTO_ACCURACY = 0.6     # "auto" look-ahead issues guesses while this share of their reads is right


class LookAhead:
    """Apply layer L+1's router to layer L's hidden state and prefetch the experts it picks."""

    def __init__(self, config, layers, cache, backend, mode: str = "auto"):
        self.config = config
        self.backend = backend
        self.layers = layers
        self.cache = cache
        self.mode = mode             # "on": always issue; "auto": while recently right often enough
        self.accuracy = 1.0          # running (exponential) accuracy of the reads guesses cause
        self._last = None

    def __call__(self, L: int, h: np.ndarray) -> None:
        c = self.config
        self._score(L)
        nxt = L + 1
        if nxt >= len(self.layers) or self.layers[nxt].router is None:
            return
        lw = self.layers[nxt]
        T, k = h.shape[0], c.num_experts_per_tok
        logits = lw.router.matmul(h, np.empty((T, c.num_experts), np.float32))
        idx = np.empty((T, k), np.int64)
        wts = np.empty((T, k), np.float32)
        self.backend.route(logits, lw.expert_bias, c.n_group, c.topk_group, k, c.routed_scaling_factor, idx, wts)
        experts = np.unique(idx).tolist()
        reads = {e for e in experts if not self.cache.is_resident((nxt, e))}    # what issuing would read
        issue = self.mode == "on" or self.accuracy >= AUTO_ACCURACY
        self.cache.guess(nxt, experts, issue=issue)
        self._last = (nxt, set(experts), reads)

    def _score(self, L: int) -> None:
        """Compare the prediction made for layer L with what L's router chose (set by prefetch)."""
        if self._last is None or self._last[0] != L:
            return
        layer, chosen = self.cache.chosen
        if layer != L:
            return
        _, pred, reads = self._last
        self.cache.stats.predicted_right += len(pred & chosen)
        if reads:              # only guesses that cost a read count: resident ones are free
            self.accuracy = 0.95 * self.accuracy + 0.05 * (len(reads & chosen) / len(reads))
        self._last = None

