"""Token generation: one loop for every command, as a stream of `Step`s.

A `Sequence` is one answer being generated: its prompt, where its KV cache is, how it samples and
when it ends (a stop token, a stop string, its token budget). A `Batch` steps several sequences
at once: it prefills (in chunks, so a long prompt does not stall the others) and then decodes one
token for every sequence in one batched forward (Model.forward_batch: the dense weights and the
experts the sequences share are read once per step). Each step gives back, per sequence, the
`Step`s it produced: a token and its text piece, and at the end a summary with the finish reason.
`amed chat` runs one sequence at a time (`Generator`), `amed bench` times a Batch's decode steps,
and `amed serve`'s scheduler runs a `Batch` of many.

Counting: `generated_tokens` (the server's `usage.completion_tokens`, ollama's `eval_count`)
counts every token sampled, the stop token included, as llama-server's `n_decoded` and ollama's
runner (`numPredicted`) do; the stop token's text is never shown.

The KV cache is reused across calls: a sequence that extends the tokens already in its cache
(a conversation's next turn) prefills only the new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from amed.errors import AmedError

PREFILL_CHUNK = 256        # prompt tokens per batch step: other sequences decode between chunks


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



class StopStrings:
    """Cut an answer at its first stop string, in time linear in the text: one KMP automaton per
    stop string (its state: how much of the stop the text ends with), so each new character costs
    O(1) per stop, however long the stops are. Text that could still be the start of a stop is held
    back until the next piece shows it is not. The stop that is complete first wins (the longest
    one, where several end on the same character)."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.fail = [self._table(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.buf = ""                     # held back: len(buf) == max(state)
        self.hit = False

    @staticmethod
    def _table(s: str) -> list[int]:
        """KMP failure function: fail[i] = length of the longest proper border of s[:i + 1]."""
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, text: str) -> str:
        """Add generated text; return what can be shown now (sets `hit` at a stop string)."""
        if not self.stops:
            return text
        if self.hit:
            return ""
        held = len(self.buf)
        self.buf += text
        for i, ch in enumerate(text):
            done = 0
            for j, s in enumerate(self.stops):
                k, fail = self.state[j], self.fail[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    done = max(done, k)
                    k = fail[k - 1]
                self.state[j] = k
            if done:                      # the stop ends at buf[held + i]: show what comes before it
                out, self.buf, self.hit = self.buf[:held + i + 1 - done], "", True
                return out
        keep = max(self.state)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        self.state = [0] * len(self.stops)
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class Sequence:
    """One answer being generated. `cached` is what the KV cache of `state` (None: the model's own)
    holds now; the longest prefix of it that the prompt shares is kept and only the rest of the
    prompt is prefilled. `Batch` moves it on; `sampled(logits)` picks its next token and says
    whether it ended. `cached` is kept up to date in place as tokens are forwarded."""

    def __init__(self, prompt, sampler, *, tokenizer=None, max_tokens: int = 256, stop_ids=(), stops=(),
                 ignore_eos: bool = False, ctx_size: int | None = None, state=None, cached=()):
        ids = [int(t) for t in prompt]
        if not ids:
            raise AmedError("the prompt is empty.")
        if ctx_size is not None and len(ids) >= ctx_size:
            raise AmedError(f"the prompt ({len(ids)} tokens) does not fit the context ({ctx_size} tokens).")
        self.prompt, self.state, self.sampler = ids, state, sampler
        n = min(common_prefix(ids, list(cached)), len(ids) - 1)      # always run >= 1 token to get logits
        self.cached = list(cached[:n])     # tokens whose K/V are in the state
        self.todo = ids[n:]                # prompt tokens still to prefill
        self.prefill_tokens = len(self.todo)
        self.history = list(ids)           # prompt + generated (repetition penalty)
        self.decoder = tokenizer.stream() if tokenizer is not None else None
        self.stopper = StopStrings(stops)
        self.stop_ids = frozenset() if ignore_eos else frozenset(int(s) for s in stop_ids)
        self.budget = max_tokens if ctx_size is None else min(max_tokens, ctx_size - len(ids))
        self.generated = 0                 # tokens sampled, the stop token included
        self.next: int | None = None       # sampled token to forward in the next decode step
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.t_start = self.t_prefilled = self.t_first = 0.0

    def step(self, text: str, token: int | None, finish_reason: str | None = None) -> Step:
        """A Step with this sequence's running statistics."""
        decode_s = time.perf_counter() - self.t_prefilled if self.generated else 0.0
        return Step(text, token, len(self.prompt), self.prefill_tokens, self.generated,
                    self.t_prefilled - self.t_start, decode_s, finish_reason)

    def sampled(self, logits) -> list[Step]:
        """Sample the next token from `logits`: its Step, and the final Step if the sequence ended
        (a stop token, a stop string, the budget); else the token waits for the next decode."""
        tok = self.sampler(logits, self.history)
        if not self.t_first:
            self.t_first = time.perf_counter()
        self.generated += 1
        if tok in self.stop_ids:
            return [self.finish("stop")]
        self.history.append(tok)
        text = self.stopper.feed(self.decoder.step(tok) if self.decoder else "")
        steps = [self.step(text, tok)]
        if self.stopper.hit:
            steps.append(self.finish("stop"))
        elif self.generated >= self.budget:
            steps.append(self.finish("length"))
        else:
            self.next = tok
        return steps

    def finish(self, reason: str) -> Step:
        """End the sequence: the final Step, with the held-back tail of the text (unless a stop
        string cut it) and the finish reason ("stop" wherever a stop string ended the text)."""
        text = ""
        if not self.stopper.hit:
            text = self.stopper.feed(self.decoder.flush() if self.decoder else "")
            text += "" if self.stopper.hit else self.stopper.flush()
        if self.stopper.hit and reason != "error":
            reason = "stop"
        self.next, self.finish_reason = None, reason
        return self.step(text, None, reason)


class Batch:
    """Sequences generated together on one model. Each `step()` prefills a chunk of every sequence
    that has prompt left (all of it with `prefill_chunk=None`), then decodes one token for every
    sequence that has one waiting, in one `Model.forward_batch` (with one sequence that is exactly
    `Model.forward`). An exception while prefilling or sampling one sequence ends only that one
    (its final Step has finish_reason "error", the exception is in `seq.error`); one in the
    batched forward is raised (it cannot tell whose sequence it was)."""

    def __init__(self, model, prefill_chunk: int | None = PREFILL_CHUNK):
        self.model, self.chunk = model, prefill_chunk
        self.seqs: list[Sequence] = []
        self.stats = dict(prefill_seconds=0.0, decode_seconds=0.0, decode_tokens=0, decode_steps=0)

    def add(self, seq: Sequence) -> Sequence:
        """Start `seq`: its state keeps only the cached prefix it shares with the prompt."""
        if seq.state is None:
            seq.state = self.model.state
        seq.state.truncate(len(seq.cached))
        seq.t_start = seq.t_prefilled = time.perf_counter()
        self.seqs.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        if seq in self.seqs:
            self.seqs.remove(seq)

    def step(self) -> list[tuple[Sequence, Step]]:
        """One step of every sequence; returns the Steps they produced. Ended sequences leave."""
        out = []
        for s in [s for s in self.seqs if s.todo]:
            t0 = time.perf_counter()
            try:
                n = len(s.todo) if self.chunk is None else self.chunk
                chunk, s.todo = s.todo[:n], s.todo[n:]
                logits = self.model.forward(chunk, state=s.state)
                s.cached += chunk
                if not s.todo:
                    s.t_prefilled = time.perf_counter()
                    steps = s.sampled(logits) if s.budget > 0 else [s.finish("length")]
                    out += [(s, st) for st in steps]
            except Exception as e:          # this sequence fails, the others go on
                s.error = e
                out.append((s, s.finish("error")))
            self.stats["prefill_seconds"] += time.perf_counter() - t0
        batch = [s for s in self.seqs if s.next is not None and s.finish_reason is None]
        if batch:
            t0 = time.perf_counter()
            logits = self.model.forward_batch([s.next for s in batch], [s.state for s in batch])
            for s, row in zip(batch, logits):
                s.cached.append(s.next)
                s.next = None
                try:
                    out += [(s, st) for st in s.sampled(row)]
                except Exception as e:
                    s.error = e
                    out.append((s, s.finish("error")))
            self.stats["decode_seconds"] += time.perf_counter() - t0
            self.stats["decode_tokens"] += len(batch)
            self.stats["decode_steps"] += 1
        self.seqs = [s for s in self.seqs if s.finish_reason is None]
        return out


@dataclass
class Generator:
    """One sequence at a time on the model's own state (`amed chat`, `generate`), remembering which
    token ids are in its cache, so a prompt that extends the previous one prefills only the rest."""
    model: object
    tokenizer: object = None
    cached: list = field(default_factory=list)   # token ids whose K/V are in the model's cache

    def reset(self) -> None:
        self.cached = []
        self.model.reset()

    def stream(self, prompt_ids, sampler, max_tokens: int = 256, stop_ids=(), ctx_size: int | None = None,
               stops=()):
        """Yield a `Step` per generated token, then a final Step with finish_reason set.

        The prompt is prefilled whole. Ctrl-C (KeyboardInterrupt) inside the loop ends the stream
        with finish_reason "interrupted"; the cache stays consistent with the tokens generated so far.
        """
        seq = Sequence(prompt_ids, sampler, tokenizer=self.tokenizer, max_tokens=max_tokens, stop_ids=stop_ids,
                       stops=stops, ctx_size=ctx_size, cached=self.cached)
        batch = Batch(self.model, prefill_chunk=None)
        self.cached = seq.cached           # grows in place as tokens are forwarded
        batch.add(seq)
        try:
            while seq.finish_reason is None:
                for _, step in batch.step():
                    if step.finish_reason == "error":
                        raise seq.error
                    yield step
        except KeyboardInterrupt:
            # a forward cut short never advanced model.pos: keep what both agree is cached
            self.cached = seq.cached[: self.model.pos]
            self.model.truncate(len(self.cached))
            yield seq.finish("interrupted")


def generate(model, tokenizer, prompt_ids, sampler, max_tokens=256, stop_ids=None, stops=()) -> tuple[str, Step]:
    """Run a whole generation; returns (text, final step)."""
    g = Generator(model, tokenizer)
    stop_ids = tokenizer.stop_ids if stop_ids is None else stop_ids
    parts, last = [], None
    for step in g.stream(prompt_ids, sampler, max_tokens, stop_ids, stops=stops):
        parts.append(step.text)
        last = step
    return "".join(parts), last
