"""Next-token sampling: repetition penalty, temperature, top-k, top-p, min-p, seeded RNG.

Order (as in Hugging Face / llama.cpp): repetition penalty over the ids seen so far; then
temperature 0 means greedy argmax; otherwise top-k -> softmax(logits / T) -> top-p -> min-p -> draw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from amed.errors import AmedError


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are the AntAngelMed model card's (README vLLM example)."""

    temperature: float = 0.6  # 0 = greedy
    top_p: float = 0.95  # nucleus mass; 1 = off
    top_k: int = 20  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p * max prob; 0 = off
    repetition_penalty: float = 1.05  # 1 = off
    seed: int | None = None  # None = fresh entropy

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AmedError(f"{msg}.")

    @classmethod
    def from_generation_config(cls, model_dir: str | Path | None, **overrides) -> "SamplingParams":
        """Model-card defaults, then generation_config.json values, then non-None overrides."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values: dict = {}
        path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
        if path is not None:
            from amed.text.tokenizer import read_json

            gen = read_json(path, required=False)
            for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
                v = gen.get(key)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise AmedError(f"{path}: {key} should be a number, got {v!r}.")
                values[key] = int(v) if key == "top_k" else float(v)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """HF style: for each id seen, positive logits are divided by the penalty, negative multiplied."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.copy()
    v = out[ids]
    out[ids] = np.where(v < 0, v * penalty, v / penalty)
    return out


def candidates(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the sampler may draw and their renormalized probabilities, most likely first.

    For temperature 0 this is the single argmax token with probability 1. NaN and -inf logits
    are never candidates. Raises AmedError when no logit is usable.
    """
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"logits must be 1-D, got shape {x.shape}")
    x = apply_repetition_penalty(x, history, params.repetition_penalty)
    nan = np.isnan(x)
    if nan.any():
        x = np.where(nan, np.float32(-np.inf), x)
    V = x.shape[0]

    if params.temperature == 0:
        best = int(np.argmax(x))
        if x[best] == -np.inf:
            raise AmedError("the model produced no usable logits (all NaN or -inf); the weights may be corrupt.")
        return np.array([best], dtype=np.int64), np.array([1.0])

    k = params.top_k
    if 0 < k < V:
        ids = np.argpartition(x, V - k)[V - k :]  # the k largest, unordered; no full sort
    else:
        ids = np.arange(V)
    ids = ids[x[ids] > -np.inf]
    if ids.size == 0:
        raise AmedError("the model produced no usable logits (all NaN or -inf); the weights may be corrupt.")
    l = x[ids].astype(np.float64)
    order = np.argsort(-l, kind="stable")
    ids, l = ids[order], l[order]

    if l[0] == np.inf:  # a forced token (or several): they share all the mass
        p = (l == np.inf).astype(np.float64)
    else:
        p = np.exp((l - l[0]) / params.temperature)
    p /= p.sum()

    n = p.size
    if params.top_p < 1.0:  # smallest prefix whose mass reaches top_p, at least one token
        n = min(int(np.searchsorted(np.cumsum(p), params.top_p, side="left")) + 1, n)
    if params.min_p > 0.0:
        n = min(n, int(np.count_nonzero(p >= params.min_p * p[0])))
    keep = p[:n] > 0  # underflowed tokens can never be drawn, so drop them
    ids, p = ids[:n][keep], p[:n][keep]
    return ids, p / p.sum()


class Sampler:
    """`sampler(logits, history) -> token id`, drawing from one seeded np.random.Generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        ids, p = candidates(logits, self.params, history)
        if ids.size == 1:
            return int(ids[0])
        i = int(np.searchsorted(np.cumsum(p), self.rng.random(), side="right"))
        return int(ids[min(i, ids.size - 1)])


def make_sampler(params: SamplingParams | None = None) -> Sampler:
    return Sampler(params or SamplingParams())
