"""Token generation: prefill, then sample one token at a time, as a stream of `Step`s.

The KV cache is reused across calls: a `Generator` remembers which token ids are in the cache, so
a new prompt that extends the previous conversation prefills only the new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from amed.errors import AmedError


@dataclass
class Step:
    """One streamed piece of output with running statistics."""
    text: str                      # newly completed text (may be "" mid-character)
    token: int | None              # the sampled id (None on the final summary step)
    prompt_tokens: int = 0         # tokens in the prompt
    prefill_tokens: int = 0        # prompt tokens actually run (the rest came from the cache)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str | None = None   # stop | length | interrupted, on the last step

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from the prefill logits; decode time covers the rest
        n = self.generated_tokens - 1
        return n / self.decode_seconds if self.decode_seconds and n > 0 else 0.0

    @property
    def ttft(self) -> float:
        return self.prefill_seconds


@dataclass
class Generator:
    model: object
    tokenizer: object = None
    cached: list = field(default_factory=list)   # token ids whose K/V are in the model's cache

    def reset(self) -> None:
        self.cached = []
        self.model.reset()

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to `ids`, reusing the longest common prefix; return last logits."""
        n = 0
        limit = min(len(ids) - 1, len(self.cached))   # always run >= 1 token to get logits
        while n < limit and ids[n] == self.cached[n]:
            n += 1
        self.model.truncate(n)
        logits = self.model.forward(ids[n:])
        self.cached = list(ids)
        return logits, len(ids) - n

    def stream(self, prompt_ids, sampler, max_tokens: int = 256, stop_ids=(), ctx_size: int | None = None):
        """Yield a `Step` per generated token, then a final Step with finish_reason set.

        Ctrl-C (KeyboardInterrupt) inside the loop ends the stream with finish_reason
        "interrupted"; the cache stays consistent with the tokens generated so far.
        """
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise AmedError("the prompt is empty.")
        if ctx_size is not None and len(ids) >= ctx_size:
            raise AmedError(f"the prompt ({len(ids)} tokens) does not fit the context ({ctx_size} tokens).")
        stops = set(int(s) for s in stop_ids)
        decoder = self.tokenizer.stream() if self.tokenizer is not None else None
        st = Step("", None, prompt_tokens=len(ids))
        reason = "length"
        history = list(ids)
        t0 = t1 = time.perf_counter()
        try:
            logits, st.prefill_tokens = self._prefill(ids)
            st.prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            budget = max_tokens if ctx_size is None else min(max_tokens, ctx_size - len(ids))
            for i in range(budget):
                tok = sampler(logits, history)
                st.generated_tokens += 1
                if tok in stops:
                    reason = "stop"
                    break
                history.append(tok)
                text = decoder.step(tok) if decoder else ""
                st.decode_seconds = time.perf_counter() - t1
                yield Step(text, tok, st.prompt_tokens, st.prefill_tokens, st.generated_tokens,
                           st.prefill_seconds, st.decode_seconds)
                if i + 1 < budget:
                    logits = self.model.forward([tok])
                    self.cached.append(tok)
        except KeyboardInterrupt:
            reason = "interrupted"
            # a forward cut short never advanced model.pos: keep what both agree is cached
            self.cached = self.cached[: self.model.pos]
            self.model.truncate(len(self.cached))
        if st.generated_tokens:
            st.decode_seconds = time.perf_counter() - t1
        tail = decoder.flush() if decoder else ""
        yield Step(tail, None, st.prompt_tokens, st.prefill_tokens, st.generated_tokens,
                   st.prefill_seconds, st.decode_seconds, finish_reason=reason)


def generate(model, tokenizer, prompt_ids, sampler, max_tokens=256, stop_ids=None) -> tuple[str, Step]:
    """Run a whole generation; returns (text, final step)."""
    g = Generator(model, tokenizer)
    stops = tokenizer.stop_ids if stop_ids is None else stop_ids
    parts, last = [], None
    for step in g.stream(prompt_ids, sampler, max_tokens, stops):
        parts.append(step.text)
        last = step
    return "".join(parts), last
