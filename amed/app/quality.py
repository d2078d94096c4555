"""`amed perplexity`: how well a model predicts a text (perplexity), and with `--kld-base` how far
its next-token distributions are from another model's (mean / p99 KL divergence, top-1
agreement): the way llama.cpp's `llama-perplexity --kl-divergence` measures what quantization
costs. The text is cut into windows of `ctx` tokens, each run from an empty context; every token
after a window's first is scored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from amed.errors import AmedError


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-position KL(ref || test) over the full vocabulary, in nats (float64)."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Consecutive windows of `ctx` tokens (the last one shorter; one of a single token is dropped:
    nothing in it can be scored)."""
    return [w for w in (ids[i:i + ctx] for i in range(0, len(ids), ctx)) if len(w) > 1]


@dataclass
class Quality:
    tokens: int = 0                           # scored tokens
    nll: float = 0.0                          # summed negative log-likelihood (nats)
    base_nll: float = 0.0
    kld: list = field(default_factory=list)   # per-token KL(base || model)
    top1: int = 0                             # tokens where both models' argmax agree

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_nll / self.tokens)

    def record(self) -> dict:
        out = {"tokens": self.tokens, "perplexity": self.perplexity}
        if self.kld:
            k = np.concatenate(self.kld)
            out.update(base_perplexity=self.base_perplexity, mean_kld=float(k.mean()),
                       p99_kld=float(np.percentile(k, 99)), max_kld=float(k.max()),
                       top1_agreement=self.top1 / self.tokens)
        return out


def score(model, ids: list[int], ctx: int, base=None, progress=None) -> Quality:
    """Perplexity of `model` over `ids` in windows of `ctx` tokens; with `base` (another model of
    the same vocabulary), the KL divergence and top-1 agreement against it on the same windows.
    `progress(done, total)` after each window."""
    if ctx < 2:
        raise AmedError(f"-c/--ctx-size must be 2 or more tokens; got {ctx}.")
    chunks = windows(ids, ctx)
    if not chunks:
        raise AmedError("the text is too short to score: it needs at least 2 tokens.")
    if base is not None and base.config.vocab_size != model.config.vocab_size:
        raise AmedError(f"--kld-base has a vocabulary of {base.config.vocab_size} tokens, the model "
                        f"{model.config.vocab_size}: compare two versions of the same model.")
    q = Quality()
    for i, w in enumerate(chunks):
        target = np.asarray(w[1:])
        rows = np.arange(len(target))
        lp = log_softmax(model.logits(w)[:-1])
        q.nll -= float(lp[rows, target].sum())
        q.tokens += len(target)
        if base is not None:
            lb = log_softmax(base.logits(w)[:-1])
            q.base_nll -= float(lb[rows, target].sum())
            q.kld.append((np.exp(lb) * (lb - lp)).sum(-1))
            q.top1 += int((lb.argmax(-1) == lp.argmax(-1)).sum())
        if progress:
            progress(i + 1, len(chunks))
    return q
