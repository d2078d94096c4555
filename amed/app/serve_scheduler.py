"""`amed serve`'s engine thread: the Scheduler admits jobs into slots (each with its own State and
the tokens in its KV cache, so a follow-up turn prefills only its new tokens) and runs their
Sequences in one generation Batch (amed/generate.py: chunked prefill, one batched decode step for
all). It is the queue, the slot choice, cancellation and errors around that loop; each Step goes
back to its request through the job's `emit`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from amed.app.serve_errors import ApiError, client_message
from amed.generate import Batch, Sequence, common_prefix


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
    """A place for one sequence: its State, the tokens in its KV cache (kept between jobs, so a
    conversation's next turn prefills only its new tokens), and its current job and Sequence."""
    index: int
    state: object = None                   # engine State, made on first use
    cached: list = field(default_factory=list)
    job: Job | None = None
    seq: Sequence | None = None
    last_used: float = 0.0


class Scheduler:
    """The engine thread: admits jobs into slots, prefills, decodes all active slots together."""

    def __init__(self, model, tokenizer, parallel: int = 4, ctx_size: int = 4096):
        self.model, self.tok = model, tokenizer
        self.ctx_size = ctx_size
        self.slots = [Slot(i) for i in range(max(1, parallel))]
        self.batch = Batch(model)          # the generation loop: chunked prefill, batched decode
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="amed-engine", daemon=True)
        self.died: str | None = None       # why the engine thread ended, if it ever does unasked
        self.counters = dict(requests=0, prompt_tokens=0, prefill_tokens=0, completion_tokens=0, errors=0,
                             cancelled=0)          # the time counters are the batch's (self.batch.stats)
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
        c = {**self.counters, **self.batch.stats}
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
        seq = Sequence(job.prompt, make_sampler(job.params), tokenizer=self.tok, max_tokens=job.max_tokens,
                       stop_ids=self.tok.stop_ids, stops=job.stops, ignore_eos=job.ignore_eos,
                       ctx_size=self.ctx_size, state=slot.state, cached=slot.cached)
        slot.cached = seq.cached           # grows in place as the batch forwards tokens
        slot.job, slot.seq = job, seq
        self.batch.add(seq)
        job.prefill_tokens = seq.prefill_tokens
        job.t_start = seq.t_start
        self.counters["prompt_tokens"] += len(job.prompt)
        self.counters["prefill_tokens"] += seq.prefill_tokens

    def _step(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancelled.is_set():
                self.counters["cancelled"] += 1
                self._free(s)
        owner = {id(s.seq): s for s in self.slots if s.seq is not None}
        for seq, step in self.batch.step():
            s = owner[id(seq)]
            if s.job is None:               # already failed
                continue
            try:
                if step.finish_reason == "error":
                    raise seq.error
                self._progress(s, step)
            except Exception as e:          # this sequence fails, the others go on
                self._fail(s, e)

    def _progress(self, s: Slot, step) -> None:
        """Pass one Step of the slot's sequence to its job: the text, and at the end its summary."""
        job, seq = s.job, s.seq
        self.counters["completion_tokens"] += seq.generated - job.completion_tokens
        job.completion_tokens = seq.generated
        if seq.t_first and not job.t_first:
            job.t_first = seq.t_first
        if step.text:
            job.emit("text", step.text)
        if step.finish_reason is not None:
            self._finish(s, step.finish_reason)

    def _finish(self, s: Slot, reason: str) -> None:
        job = s.job
        now = time.perf_counter()
        first = job.t_first or now
        decode_s = now - first
        job.emit("done", dict(
            finish_reason=reason,
            usage=dict(prompt_tokens=len(job.prompt), completion_tokens=job.completion_tokens,
                       total_tokens=len(job.prompt) + job.completion_tokens),
            timings=dict(prompt_n=job.prefill_tokens, prompt_ms=1e3 * (first - job.t_start),
                         predicted_n=job.completion_tokens, predicted_ms=1e3 * decode_s,
                         predicted_per_second=(job.completion_tokens - 1) / decode_s
                         if job.completion_tokens > 1 and decode_s > 0 else None,
                         queued_ms=1e3 * (job.t_start - job.t_submit))))
        self._free(s)

    def _free(self, s: Slot) -> None:
        if s.seq is not None:
            self.batch.remove(s.seq)
        s.job, s.seq = None, None
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
