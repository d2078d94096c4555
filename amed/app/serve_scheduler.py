"""`amed serve`'s engine thread: the Scheduler admits jobs into slots (each a sequence with its own
State and the tokens in its KV cache), prefills in chunks and decodes every active slot in one
batched forward (Model.forward_batch). Events go back to the request through each job's `emit`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from amed.app.serve_errors import ApiError, client_message

PREFILL_CHUNK = 256        # prompt tokens per engine step: other sequences decode between chunks


@dataclass
class Job:
    """One generation request: what to run, and where its events go (`emit` is thread-safe)."""
    prompt: list[int]
    params: object                         # SamplingParams
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    emit: object = None                    # emit(kind, value): kind "text" | "done" | "error"
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    prefill_tokens: int = 0                # prompt tokens actually run (the rest came from the slot)
    completion_tokens: int = 0
    t_submit: float = 0.0
    t_start: float = 0.0
    t_first: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Slot:
    """A sequence the engine runs: its State, the tokens in its KV cache, and its current job."""
    index: int
    state: object = None                   # engine State, made on first use
    cached: list = field(default_factory=list)
    job: Job | None = None
    todo: list = field(default_factory=list)      # prompt tokens still to prefill
    next: int | None = None                # sampled token to forward in the next decode step
    history: list = field(default_factory=list)   # prompt + generated (repetition penalty)
    sampler: object = None
    decoder: object = None
    stopper: object = None
    budget: int = 0
    last_used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class StopMatcher:
    """Cut an answer at its first stop string, in time linear in the text: one KMP automaton per
    stop string (its state: how much of the stop the text ends with), so each new character costs
    O(1) per stop, however long the stops are. Text that could still be the start of a stop is held
    back until the next piece shows it is not. Same interface as chat's StopStrings; the stop that
    is complete first wins (the longest one, where several end on the same character)."""

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


class Scheduler:
    """The engine thread: admits jobs into slots, prefills, decodes all active slots together."""

    def __init__(self, model, tokenizer, parallel: int = 4, ctx_size: int = 4096):
        self.model, self.tok = model, tokenizer
        self.ctx_size = ctx_size
        self.slots = [Slot(i) for i in range(max(1, parallel))]
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="amed-engine", daemon=True)
        self.died: str | None = None       # why the engine thread ended, if it ever does unasked
        self.counters = dict(requests=0, prompt_tokens=0, prefill_tokens=0, prefill_seconds=0.0,
                             completion_tokens=0, decode_tokens=0, decode_seconds=0.0, decode_steps=0,
                             errors=0, cancelled=0)
        self.started = time.time()

    # ---- called from the server ----
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self.died is None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        job.t_submit = time.perf_counter()
        if self.died is not None:
            job.emit("error", ApiError(500, f"the engine stopped ({self.died}); restart amed serve.",
                                       "server_error"))
            return
        with self._cond:
            self.waiting.append(job)
            self.counters["requests"] += 1
            self._cond.notify()

    def wake(self) -> None:
        """A job was cancelled: let the thread notice even if it is idle-waiting."""
        with self._cond:
            self._cond.notify()

    def stats(self) -> dict:
        c = dict(self.counters)
        cache = getattr(self.model.experts, "cache", None)
        expert = None
        if cache is not None:
            st = cache.stats
            expert = dict(hits=st.hits, uses=st.uses, hit_rate=(st.hits / st.uses if st.uses else None))
        return dict(
            slots=len(self.slots), active=sum(s.job is not None for s in self.slots), queued=len(self.waiting),
            requests=c["requests"], cancelled=c["cancelled"], errors=c["errors"],
            prompt_tokens=c["prompt_tokens"], prefill_tokens=c["prefill_tokens"],
            completion_tokens=c["completion_tokens"],
            prefill_tokens_per_second=c["prefill_tokens"] / c["prefill_seconds"] if c["prefill_seconds"] else 0.0,
            decode_tokens_per_second=c["decode_tokens"] / c["decode_seconds"] if c["decode_seconds"] else 0.0,
            mean_decode_batch=c["decode_tokens"] / c["decode_steps"] if c["decode_steps"] else 0.0,
            decode_tokens=c["decode_tokens"], decode_seconds=c["decode_seconds"], decode_steps=c["decode_steps"],
            expert_cache=expert, uptime_seconds=time.time() - self.started)

    # ---- the thread ----
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._has_work():
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._admit()
                try:
                    self._step()
                except Exception as e:      # a bug or a bad store must not kill the server
                    self._fail_active(e)
        except BaseException as e:          # never expected: say so on /health, fail what waits
            self.died = f"{type(e).__name__}: {e}"
            print(f"amed serve: the engine thread stopped: {self.died}", file=sys.stderr, flush=True)
            with self._cond:
                jobs = [s.job for s in self.slots if s.job is not None] + list(self.waiting)
                self.waiting.clear()
            for job in jobs:
                job.emit("error", ApiError(500, "the engine stopped; restart amed serve.", "server_error"))

    def _has_work(self) -> bool:
        return bool(self.waiting) or any(s.job is not None for s in self.slots)

    def _admit(self) -> None:
        """Waiting jobs into free slots; each goes where the longest prefix of its prompt is cached
        (then the least recently used slot, so other conversations' caches live longer)."""
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled.is_set():
                self.waiting.popleft()
                self.counters["cancelled"] += 1
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            self.waiting.popleft()
            slot = max(free, key=lambda s: (common_prefix(job.prompt, s.cached), -s.last_used))
            try:
                self._start(slot, job)
            except Exception as e:          # this request fails, the others go on
                slot.job = job
                self._fail(slot, e)

    def _start(self, slot: Slot, job: Job) -> None:
        from amed.text.sampling import make_sampler

        if slot.state is None:
            slot.state = self.model.state if slot.index == 0 else self.model.new_state(self.ctx_size)
        n = min(common_prefix(job.prompt, slot.cached), len(job.prompt) - 1)   # run >= 1 token
        slot.state.truncate(n)
        slot.cached = slot.cached[:n]
        slot.todo = list(job.prompt[n:])
        slot.job, slot.next = job, None
        slot.history = list(job.prompt)
        slot.sampler = make_sampler(job.params)
        slot.decoder = self.tok.stream()
        slot.stopper = StopMatcher(job.stops)
        slot.budget = min(job.max_tokens, self.ctx_size - len(job.prompt))
        job.prefill_tokens = len(slot.todo)
        job.t_start = time.perf_counter()
        self.counters["prompt_tokens"] += len(job.prompt)
        self.counters["prefill_tokens"] += len(slot.todo)

    def _step(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancelled.is_set():
                self.counters["cancelled"] += 1
                self._free(s)
        for s in [s for s in self.slots if s.job is not None and s.todo]:
            t0 = time.perf_counter()
            try:
                chunk, s.todo = s.todo[:PREFILL_CHUNK], s.todo[PREFILL_CHUNK:]
                logits = self.model.forward(chunk, state=s.state)
                s.cached += chunk
                if not s.todo:
                    self._sampled(s, logits)
            except Exception as e:          # this sequence fails, the others go on
                self._fail(s, e)
            self.counters["prefill_seconds"] += time.perf_counter() - t0
        batch = [s for s in self.slots if s.job is not None and s.next is not None]
        if batch:
            t0 = time.perf_counter()
            logits = self.model.forward_batch([s.next for s in batch], [s.state for s in batch])
            for s, row in zip(batch, logits):
                s.cached.append(s.next)
                s.next = None
                try:
                    self._sampled(s, row)
                except Exception as e:
                    self._fail(s, e)
            self.counters["decode_seconds"] += time.perf_counter() - t0
            self.counters["decode_tokens"] += len(batch)
            self.counters["decode_steps"] += 1

    def _sampled(self, s: Slot, logits) -> None:
        """Sample the slot's next token from `logits` and stream it; finish on a stop token, a
        stop string or the token budget, else queue the token for the next decode step."""
        job = s.job
        tok = s.sampler(logits, s.history)
        if not job.t_first:
            job.t_first = time.perf_counter()
        if tok in self.tok.stop_ids and not job.ignore_eos:
            return self._finish(s, "stop")
        s.history.append(tok)
        job.completion_tokens += 1
        self.counters["completion_tokens"] += 1
        text = s.stopper.feed(s.decoder.step(tok))
        if text:
            job.emit("text", text)
        if s.stopper.hit:
            return self._finish(s, "stop")
        if job.completion_tokens >= s.budget:
            return self._finish(s, "length")
        s.next = tok

    def _finish(self, s: Slot, reason: str) -> None:
        job = s.job
        text = ""
        if not s.stopper.hit:                       # the held-back tail, unless a stop string cut it
            text = s.stopper.feed(s.decoder.flush())
            text += "" if s.stopper.hit else s.stopper.flush()
        stopped = s.stopper.hit
        if text:
            job.emit("text", text)
        now = time.perf_counter()
        first = job.t_first or now
        decode_s = now - first
        job.emit("done", dict(
            finish_reason="stop" if stopped else reason,
            usage=dict(prompt_tokens=len(job.prompt), completion_tokens=job.completion_tokens,
                       total_tokens=len(job.prompt) + job.completion_tokens),
            timings=dict(prompt_n=job.prefill_tokens, prompt_ms=1e3 * (first - job.t_start),
                         predicted_n=job.completion_tokens, predicted_ms=1e3 * decode_s,
                         predicted_per_second=(job.completion_tokens - 1) / decode_s
                         if job.completion_tokens > 1 and decode_s > 0 else None,
                         queued_ms=1e3 * (job.t_start - job.t_submit))))
        self._free(s)

    def _free(self, s: Slot) -> None:
        s.job, s.next, s.todo = None, None, []
        s.sampler = s.decoder = s.stopper = None
        s.last_used = time.perf_counter()

    def _fail(self, s: Slot, e: Exception) -> None:
        """Report the error to the slot's job only, and forget the slot's cache (a forward cut short
        may have left it half-written)."""
        self.counters["errors"] += 1
        if s.job is not None:
            s.job.emit("error", ApiError(500, client_message(e), "server_error"))
        self._free(s)
        if s.state is not None:
            s.state.reset()
        s.cached = []

    def _fail_active(self, e: Exception) -> None:
        """Report the error to every job in flight and forget their slots' caches (a batched
        forward failed: it cannot tell whose sequence it was)."""
        message = client_message(e)
        for s in self.slots:
            if s.job is not None:
                self.counters["errors"] += 1
                s.job.emit("error", ApiError(500, message, "server_error"))
                self._free(s)
            if s.state is not None:
                s.state.reset()
            s.cached = []

