"""`amed serve`: an OpenAI-compatible HTTP server that several clients can use at once.

    clients ──HTTP──► Starlette app (asyncio) ──Job──► Scheduler (one engine thread) ──► Model
            ◄─SSE/JSON── per-request asyncio queue ◄── events (text, done, error) ◄──┘

The model is not thread-safe, so every forward pass runs on one engine thread. It keeps up to
`parallel` slots, each a sequence with its own State; a slot remembers the tokens in its KV cache,
so a follow-up turn of a conversation prefills only its new tokens. Each step the thread prefills
(in chunks, so a long prompt does not stall the others) and then decodes one token for every
active sequence in one batched forward (Model.forward_batch: the dense weights and the experts
the sequences share are read once per step). Requests beyond `parallel` wait in a queue.

One client cannot stop the server: Guard (a middleware before every route) refuses foreign Host
names, cross-origin pages, non-JSON POSTs and oversized bodies; bodies are parsed and prompts
tokenized off the event loop; an exception while admitting or running one sequence fails only
that request; SIGTERM / Ctrl-C stop admitting and give active answers a grace period.

Starlette and uvicorn are imported only here, when the server starts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hmac
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from amed.errors import AmedError

PREFILL_CHUNK = 256        # prompt tokens per engine step: other sequences decode between chunks
PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_BODY = 8 << 20         # default --max-body: bytes of one request (413 beyond)
MAX_STOPS = 16             # stop strings per request, and characters in each
MAX_STOP_CHARS = 1000
GRACE = 10.0               # default --grace: seconds active generations get after SIGTERM / Ctrl-C
IDLE_TIMEOUT = 30.0        # seconds a connection may take to send a request's headers (or a body chunk)
KEEP_ALIVE = 5             # seconds an idle keep-alive connection stays open


# ---------------------------------------------------------------------------------------------
# errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# the engine thread
# ---------------------------------------------------------------------------------------------
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


def client_message(e: Exception) -> str:
    """What a client is told about an exception: an AmedError's sentence; for anything else only
    its kind (the details go to the server's log, never into an answer)."""
    if isinstance(e, AmedError):
        return str(e)
    print(f"amed serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return f"internal error ({type(e).__name__}); the server's log has the details."


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


# ---------------------------------------------------------------------------------------------
# requests -> jobs
# ---------------------------------------------------------------------------------------------
def _number(body: dict, key: str, *, integer: bool = False, minimum=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, not {_show(v)}.",
                       param=key)
    if isinstance(v, int) and abs(v) >= 2 ** 63 or isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"'{key}' is out of range.", param=key)
    if integer and not float(v).is_integer():
        raise ApiError(400, f"'{key}' must be an integer, not {v!r}.", param=key)
    if minimum is not None and v < minimum:
        raise ApiError(400, f"'{key}' must be at least {minimum}, not {v!r}.", param=key)
    return int(v) if integer else float(v)


def _show(v) -> str:
    """A short description of a wrong value for an error message (never a megabyte of it)."""
    text = repr(v)
    return text if len(text) <= 40 else f"a {type(v).__name__}"


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object; 400 for anything else: invalid JSON or UTF-8, NaN or
    Infinity, nesting too deep for the parser, an integer of thousands of digits, a lone
    surrogate (\\ud800) in any string."""
    def constant(name):
        raise ValueError(name)
    try:
        body = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):     # JSONDecodeError, NaN/Infinity, 4300+ digit integers
        raise ApiError(400, "the request body is not valid JSON (UTF-8, no NaN or Infinity, numbers of "
                            "normal size).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    todo = [body]                                # every string, without recursion
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request holds text that is not valid Unicode (a lone surrogate "
                                    "such as \\ud800).") from None
    return body


def message_text(content, i: int) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, not {_show(kind)}.",
                               param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts.",
                   param=f"messages[{i}].content")


# Fields amed does not implement: a request may send them only with a value that asks for nothing
# (so an answer never silently lacks what was asked for).
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "response_format": (None, {"type": "text"}),
}


class Api:
    """Turns request bodies into Jobs for one loaded model (validation, defaults, prompt ids)."""

    def __init__(self, model_id: str, tokenizer, defaults, ctx_size: int, vocab_size: int):
        self.model_id, self.tok, self.defaults = model_id, tokenizer, defaults
        self.ctx_size, self.vocab_size = ctx_size, vocab_size
        self.max_token_bytes = self._max_token_bytes(tokenizer)

    @staticmethod
    def _max_token_bytes(tok) -> int | None:
        """The most UTF-8 bytes any token's text has (an upper bound on the bytes one token covers),
        so that a text that cannot fit the context is refused without tokenizing megabytes."""
        try:
            return max(len(t.encode("utf-8")) for t in tok._tok.get_vocab(with_added_tokens=True))
        except Exception:                # another tokenizer: no shortcut
            return None

    def check_too_long(self, nbytes: int, param: str) -> None:
        if self.max_token_bytes and nbytes > 4 * self.max_token_bytes * self.ctx_size:   # 4x: normalizers
            raise ApiError(400, f"the prompt is longer than this server's context of {self.ctx_size - 1} "
                                f"tokens (raise -c/--ctx-size or shorten the prompt).",
                           param=param, code="context_length_exceeded")

    def check_model(self, body: dict) -> None:
        """One model is served, so any name selects it (as llama-server does); it must be a string."""
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise ApiError(400, "'model' must be a string.", param="model")

    def check_unsupported(self, body: dict) -> None:
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        for key, fine in UNSUPPORTED.items():
            v = body.get(key)
            if not any(v is f or (number(v) and number(f) or type(v) is type(f)) and v == f for f in fine):
                raise ApiError(400, f"'{key}' is not supported by amed serve.", param=key,
                               code="unsupported_parameter")

    def job(self, body: dict, prompt: list[int], param: str) -> Job:
        self.check_unsupported(body)
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or n != 1):
            raise ApiError(400, "only n=1 is supported.", param="n")
        if len(prompt) >= self.ctx_size:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than this server's context of "
                                f"{self.ctx_size - 1} (raise -c/--ctx-size or shorten the prompt).",
                           param=param, code="context_length_exceeded")
        max_tokens = _number(body, "max_completion_tokens", integer=True, minimum=1)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", integer=True, minimum=1)
        seed = body.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, (int, float, type(None))) or (
                isinstance(seed, float) and not (math.isfinite(seed) and seed.is_integer())):
            raise ApiError(400, f"'seed' must be an integer (-1 for a random one), not {_show(seed)}.", param="seed")
        if seed is not None and seed >= 2 ** 64:
            raise ApiError(400, "'seed' must be below 2**64 (or -1 for a random one).", param="seed")
        seed = None if seed is None or seed < 0 else int(seed)   # -1 (any negative): random, as llama.cpp's
        overrides = dict(temperature=_number(body, "temperature", minimum=0),
                         top_p=_number(body, "top_p"), top_k=_number(body, "top_k", integer=True),
                         min_p=_number(body, "min_p"), seed=seed,
                         repetition_penalty=_number(body, "repetition_penalty")
                         or _number(body, "repeat_penalty"))
        if overrides["top_k"] is not None and overrides["top_k"] < 0:   # OpenAI-style clients send -1 for "off"
            overrides["top_k"] = 0
        try:
            params = dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        except AmedError as e:
            raise ApiError(400, str(e)) from None
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = stop
        else:
            raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                                f"characters each.", param="stop")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be true or false.", param="ignore_eos")
        return Job(prompt=prompt, params=params, max_tokens=max_tokens or self.ctx_size, stops=stops,
                   ignore_eos=ignore_eos)

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
        if len(msgs) >= self.ctx_size:               # each message takes a token at least
            raise ApiError(400, f"{len(msgs)} messages cannot fit this server's context of {self.ctx_size - 1} "
                                f"tokens.", param="messages", code="context_length_exceeded")
        out, nbytes = [], 0
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
            if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"messages[{i}].role {_show(m['role'])} is not one of system, user, "
                                    f"assistant, tool.", param=f"messages[{i}].role")
            if m.get("content") is None and m["role"] != "assistant":
                raise ApiError(400, f"messages[{i}] ({m['role']}) has no 'content'.",
                               param=f"messages[{i}].content")
            msg = {k: v for k, v in m.items() if k in ("role", "reasoning_content", "tool_calls")}
            msg["role"] = "system" if m["role"] == "developer" else m["role"]
            msg["content"] = message_text(m.get("content"), i)
            nbytes += len(msg["content"].encode("utf-8"))
            out.append(msg)
        self.check_too_long(nbytes, "messages")
        try:
            return self.tok.encode_chat(out)
        except AmedError as e:
            raise ApiError(400, str(e), param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]                                    # a batch of one prompt
        if isinstance(p, str) and p:
            self.check_too_long(len(p.encode("utf-8")), "prompt")
            return self.tok.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab_size}).", param="prompt")
            return list(p)
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per "
                            "request).", param="prompt")


# ---------------------------------------------------------------------------------------------
# what every request passes first: Host, Origin, Content-Type, body size
# ---------------------------------------------------------------------------------------------
def split_host(value: str) -> tuple[str, int | None]:
    """A Host header (or an origin's netloc) -> (lowercase name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1:]) if end > 0 else (value, "")
    else:
        name, _, rest = value.partition(":")
        rest = ":" + rest if rest else ""
    port = rest[1:] if rest.startswith(":") else ""
    return name.rstrip("."), int(port) if port.isdigit() else (None if not port else -1)


def is_loopback(name: str) -> bool:
    name = name.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of every route (the OpenAI API, the page, and any added later):

    - bound to a loopback address, a request must name this computer in `Host` (localhost, a
      loopback address, or the bound address): a web page whose domain was re-bound to 127.0.0.1
      (DNS rebinding) gets 403;
    - a browser's cross-origin request (an `Origin` that is not this server's) gets 403 unless the
      origin is allowed (`--cors-origin`, $AMED_ORIGINS; `*` and other glob patterns as ollama's
      OLLAMA_ORIGINS); allowed ones get CORS headers and their preflights an answer;
    - a POST from a browser (it carries `Origin`, as every browser POST does) must say
      `Content-Type: application/json` (415): a form or text/plain POST, which a page may send
      anywhere without a preflight, is never read; other clients (curl -d) may omit the type;
    - a body is at most `max_body` bytes (413), each chunk arriving within IDLE_TIMEOUT (408);
    - once a shutdown began, new requests get 503.
    Each refusal is OpenAI's JSON error shape."""

    def __init__(self, app, *, host: str, max_body: int, origins=(), state=None):
        self.app, self.max_body, self.state = app, max_body, state if state is not None else {}
        self.origins = [o.strip().lower().rstrip("/") for o in origins if o and o.strip()]
        bound = host.strip("[]").lower()
        self.check_host = is_loopback(bound)
        self.bound = bound

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            cors = self.check(scope, headers)
            if cors is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                return await self.preflight(cors, headers, send)
            if self.state.get("draining") and scope["path"] != "/health":
                raise ApiError(503, "the server is shutting down.", "server_error", code="shutting_down")
            if scope["method"] in ("POST", "PUT", "PATCH"):
                media = headers.get("content-type", "").split(";")[0].strip().lower()
                # only a browser can be tricked into posting, and a browser names the Origin of every
                # POST: there, require JSON; curl -d (ollama's docs) sends a form type and is welcome
                if media != "application/json" and "origin" in headers:
                    raise ApiError(415, "send the request body as JSON, with 'Content-Type: application/json'.",
                                   code="unsupported_media_type")
                raw = await self.read(receive, headers)
                if raw is None:              # the client went away
                    return
                receive = self.replay(raw, receive)
        except ApiError as e:
            return await self.refuse(e, scope, receive, send)
        if cors is not None:
            send = self.with_cors(cors, send)
        await self.app(scope, receive, send)

    def check(self, scope, headers) -> str | None:
        """Host and Origin; returns the origin to answer with CORS headers (None: same-origin or none)."""
        host = headers.get("host")
        if self.check_host and host is not None:
            name, _ = split_host(host)
            if not (is_loopback(name) or name == self.bound):
                raise ApiError(403, f"this server answers only to this computer's names (localhost, "
                                    f"127.0.0.1), not {_show(host)}: a guard against DNS rebinding.",
                               "permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is None:
            return None
        if self.same_origin(origin, host, scope):
            return None
        o = origin.strip().lower().rstrip("/")
        if any(fnmatch.fnmatchcase(o, pattern) for pattern in self.origins):
            return origin
        raise ApiError(403, f"requests from the web page at {_show(origin)} are refused; allow its origin with "
                            f"amed serve --cors-origin ORIGIN (or $AMED_ORIGINS).", "permission_error",
                       code="origin_not_allowed")

    @staticmethod
    def same_origin(origin: str, host: str | None, scope) -> bool:
        scheme, sep, netloc = origin.strip().lower().partition("://")
        if not sep or "/" in netloc:
            return False
        default = {"http": 80, "https": 443}.get(scheme)
        o_name, o_port = split_host(netloc)
        if host is not None:
            h_name, h_port = split_host(host)
        else:
            h_name, h_port = (str(scope["server"][0]).lower(), scope["server"][1]) if scope.get("server") else ("", 0)
        return (scheme == scope.get("scheme", "http") and o_name == h_name
                and (o_port or default) == (h_port or default))

    async def read(self, receive, headers) -> bytes | None:
        import asyncio

        length = headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than this server's limit of {self.max_body} bytes "
                                f"(amed serve --max-body).", code="request_too_large")
        if length.isdigit() and int(length) > self.max_body:
            raise too_big
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise ApiError(408, "the request body stopped arriving.", code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    def replay(raw: bytes, receive):
        """A receive() that gives the app the body already read, then the connection's messages."""
        pending = [{"type": "http.request", "body": raw, "more_body": False}]

        async def replayed():
            return pending.pop() if pending else await receive()
        return replayed

    @staticmethod
    def with_cors(origin: str, send):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"vary", b"Origin")]}
            await send(message)
        return sending

    async def preflight(self, origin: str, headers, send) -> None:
        asked = headers.get("access-control-request-headers", "authorization, content-type")
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", asked.encode("latin-1")), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    async def refuse(self, e: ApiError, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        body = {"error": e.message} if scope["path"].startswith("/api/") else e.body()   # ollama's shape there
        await JSONResponse(body, status_code=e.status)(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# the HTTP app
# ---------------------------------------------------------------------------------------------
def create_app(model_id: str, loader, *, parallel: int = 4, ctx_size: int = 4096, api_key: str | None = None,
               on_ready=None, on_error=None, host: str = "127.0.0.1", max_body: int = MAX_BODY,
               cors_origins=(), grace: float = GRACE):
    """The Starlette app. `loader()` -> (model, tokenizer, default SamplingParams) runs on a thread
    at startup; until it returns, /health answers 503 and the API 503 "loading". Every request
    first passes Guard (Host, Origin, Content-Type, body size; see there). `host` is the address
    the server listens on, `cors_origins` the other web origins allowed to use it, `grace` the
    seconds active generations get to finish once a shutdown begins (app.state.amed["shutdown"]())."""
    import asyncio
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from amed.app.serve_extras import routes as extra_routes

    state = dict(sched=None, api=None, error=None, draining=False, deadline=None)
    prompt_slots = asyncio.Semaphore(2)    # prompts tokenized at once (each may be megabytes)

    def shutdown() -> None:
        """Stop admitting requests (503); active ones get `grace` seconds, then an error event."""
        if not state["draining"]:
            state["draining"], state["deadline"] = True, time.monotonic() + grace
    state["shutdown"] = shutdown

    def load() -> None:
        try:
            model, tok, defaults = loader()
            state["api"] = Api(model_id, tok, defaults, ctx_size, model.config.vocab_size)
            state["sched"] = Scheduler(model, tok, parallel, ctx_size).start()
        except Exception as e:       # AmedError: the user's problem; anything else: ours
            state["error"] = str(e) if isinstance(e, AmedError) else f"{type(e).__name__}: {e}"
            if on_error:
                on_error(state["error"])
            return
        if on_ready:
            on_ready()

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="amed-load", daemon=True).start()
        yield
        if state["sched"] is not None:
            await asyncio.to_thread(state["sched"].stop)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status,
                            headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    def ready() -> tuple[Scheduler, Api]:
        if state["error"]:
            raise ApiError(500, f"the model failed to load: {state['error']}", "server_error")
        if state["draining"]:
            raise ApiError(503, "the server is shutting down.", "server_error", code="shutting_down")
        if state["sched"] is None:
            raise ApiError(503, "the model is loading; retry in a moment.", "server_error", code="model_loading")
        if not state["sched"].alive():
            raise ApiError(500, f"the engine stopped ({state['sched'].died}); restart amed serve.", "server_error")
        return state["sched"], state["api"]

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key "
                                "given to amed serve --api-key.", code="invalid_api_key")

    def guarded(handler):
        """Auth, then the handler; every ApiError becomes its JSON, anything else a 500 (logged)."""
        async def endpoint(request: Request):
            try:
                authorize(request)
                return await handler(request)
            except ApiError as e:
                return error(e)
            except Exception as e:  # never a traceback to the client, never a dead server
                return error(ApiError(500, client_message(e), "server_error"))
        return endpoint

    async def read_body(request: Request) -> dict:
        """The body (Guard has bounded its size) as a JSON object, parsed off the event loop."""
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ApiError(499, "the client went away before sending the whole request.") from None
        if len(raw) < 65536:
            return parse_body(raw)
        return await run_in_threadpool(parse_body, raw)

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={        # no framing by other pages
            "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer"})

    async def health(request: Request):
        if state["error"]:
            return JSONResponse({"status": "error", "error": state["error"]}, status_code=500)
        if state["draining"]:
            return JSONResponse({"status": "stopping"}, status_code=503)
        if state["sched"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state["sched"].alive():
            return JSONResponse({"status": "error", "error": f"the engine stopped ({state['sched'].died}); "
                                 "restart amed serve."}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "amed"}]})

    async def stats(request: Request):
        sched, _ = ready()
        return JSONResponse({"model": model_id, **sched.stats()})

    async def metrics(request: Request):
        sched, _ = ready()
        s = sched.stats()
        lines = []
        for key, v in s.items():
            if key == "expert_cache":
                for k2, v2 in (v or {}).items():
                    if v2 is not None:
                        lines.append(f"amed_expert_cache_{k2} {v2}")
            elif isinstance(v, (int, float)):
                lines.append(f"amed_{key} {v}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def run_job(request: Request, job: Job, sched: Scheduler, stream: bool, chunks):
        """Submit the job and answer: SSE chunks (stream) or one JSON object. `chunks` knows the
        endpoint's shapes: chunks.delta(text), .final(done), .usage(done), .whole(text, done)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:        # the event loop is gone (server shutting down)
                job.cancel()
        job.emit = emit
        sched.submit(job)

        checked = [loop.time()]

        async def next_event():
            """The next event; ("gone", None) when the client went away (the job is cancelled,
            which frees its slot at the engine's next step). Checked every 0.25 s, also while
            events keep coming (a non-stream answer sends nothing until it is complete). Past a
            shutdown's grace period: an error (the job is cancelled)."""
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if state["deadline"] is not None and time.monotonic() > state["deadline"]:
                    job.cancel()
                    sched.wake()
                    return "error", ApiError(503, "the server is shutting down; the answer was cut short.",
                                             "server_error", code="shutting_down")
                if event is None or loop.time() - checked[0] > 0.25:
                    checked[0] = loop.time()
                    if await request.is_disconnected():
                        job.cancel()
                        sched.wake()
                        return "gone", None
                if event is not None:
                    return event

        if not stream:
            parts = []
            try:
                while True:
                    kind, value = await next_event()
                    if kind == "gone":
                        return Response(status_code=499)        # nobody is listening
                    if kind == "text":
                        parts.append(value)
                    elif kind == "error":
                        return error(value)
                    else:
                        return JSONResponse(chunks.whole("".join(parts), value))
            finally:
                job.cancel()

        async def sse():
            try:
                for c in chunks.opening():
                    yield f"data: {json.dumps(c)}\n\n"
                while True:
                    kind, value = await next_event()
                    if kind == "gone":
                        return
                    if kind == "text":
                        yield f"data: {json.dumps(chunks.delta(value))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(chunks.final(value))}\n\n"
                        if chunks.include_usage:
                            yield f"data: {json.dumps(chunks.usage(value))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:                    # finished, or the client went away mid-stream
                job.cancel()
                sched.wake()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def generation_endpoint(prompt_of, field: str, chunks):
        """A POST handler: the request's prompt (Api.chat_prompt / completion_prompt, read from
        `field`) as a job, answered in `chunks`' shape."""
        def make_job(api: Api, body: dict) -> Job:
            api.check_model(body)
            return api.job(body, prompt_of(api, body), field)

        async def handle(request: Request):
            body = await read_body(request)
            sched, api = ready()
            flags = stream_flags(body, chunks)
            async with prompt_slots:            # tokenizing may take a while: never on the event loop
                job = await run_in_threadpool(make_job, api, body)
            return await run_job(request, job, sched, *flags)
        return handle

    chat_completions = generation_endpoint(Api.chat_prompt, "messages", ChatChunks)
    completions = generation_endpoint(Api.completion_prompt, "prompt", TextChunks)

    def stream_flags(body: dict, kind):
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false.", param="stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
        usage = opts.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise ApiError(400, "'stream_options.include_usage' must be true or false.", param="stream_options")
        return stream, kind(model_id, include_usage=bool(usage))

    async def not_found(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            e = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            e = ApiError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        else:
            e = ApiError(exc.status_code, str(exc.detail))
        return error(e)

    async def server_error(request: Request, exc: Exception):
        return error(ApiError(500, client_message(exc), "server_error"))

    routes = [
        Route("/", page), Route("/health", health),
        Route("/v1/models", guarded(models)), Route("/models", guarded(models)),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/completions", guarded(completions), methods=["POST"]),
        Route("/stats", guarded(stats)), Route("/metrics", guarded(metrics)),
        *extra_routes(model_id=model_id, state=state, ready=ready, guarded=guarded, read_body=read_body,
                      run_job=run_job, ctx_size=ctx_size, parallel=parallel),     # ollama's, llama-server's
    ]
    guard = Middleware(Guard, host=host, max_body=max_body, origins=cors_origins, state=state)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[guard],
                    exception_handlers={HTTPException: not_found, Exception: server_error})
    app.state.amed = state
    return app


class ChatChunks:
    """Response shapes of /v1/chat/completions."""
    ID_PREFIX, CHUNK_OBJECT = "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool = False):
        self.model, self.include_usage = model, include_usage
        self.id = f"{self.ID_PREFIX}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _chunk(self, choices) -> dict:
        c = {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created, "model": self.model,
             "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def opening(self) -> list[dict]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def delta(self, text: str) -> dict:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def final(self, done: dict) -> dict:
        c = self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": done["finish_reason"]}])
        c["timings"] = done["timings"]          # llama-server's extension: the chat page's speed line
        return c

    def usage(self, done: dict) -> dict:
        c = self._chunk([])
        c["usage"] = done["usage"]
        return c

    def whole(self, text: str, done: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": done["finish_reason"]}],
                "usage": done["usage"], "timings": done["timings"]}


class TextChunks(ChatChunks):
    """Response shapes of /v1/completions."""
    ID_PREFIX, CHUNK_OBJECT = "cmpl", "text_completion"

    def opening(self) -> list[dict]:
        return []

    def delta(self, text: str) -> dict:
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def final(self, done: dict) -> dict:
        c = self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": done["finish_reason"]}])
        c["timings"] = done["timings"]
        return c

    def whole(self, text: str, done: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": done["usage"], "timings": done["timings"]}


# ---------------------------------------------------------------------------------------------
# `amed serve`
# ---------------------------------------------------------------------------------------------
def model_loader(path, *, ctx_size: int, parallel: int, max_ram=None, prefetch: bool = True, log=None,
                 device: str = "cpu", gpu_experts: int | str = 0):
    """loader() for create_app: the model (on the CPU, its expert budget leaves room for
    `parallel` KV caches; on a GPU they live in VRAM), its tokenizer and its default sampling
    parameters."""
    def load():
        from amed import load as load_model
        from amed.engine.experts import ExpertOptions
        from amed.engine.experts.memory import default_max_ram, parse_size
        from amed.text.sampling import SamplingParams
        from amed.text.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(path)
        defaults = SamplingParams.from_generation_config(path)
        model = load_model(path, ctx_size=ctx_size, max_ram=max_ram, prefetch=prefetch, log=log, device=device,
                           gpu_experts=gpu_experts)
        if parallel > 1 and model.experts.cache is not None and device == "cpu":
            limit = parse_size(max_ram) if max_ram is not None else default_max_ram()
            extra = (parallel - 1) * model.state.nbytes        # the other slots' KV caches
            model.use_experts(ExpertOptions.from_env(max_ram=limit - extra, prefetch=prefetch), log=log)
        return model, tok, defaults
    return load


def resolve_api_key(api_key: str | None, api_key_file=None, environ=None) -> str | None:
    """The key from --api-key / $AMED_API_KEY or --api-key-file (which keeps it out of the process
    list); None serves without one. An empty key is refused: it would leave the API open while
    looking protected."""
    environ = os.environ if environ is None else environ
    if api_key is None and "AMED_API_KEY" in environ:       # the CLI drops an empty variable: see it here
        api_key = environ["AMED_API_KEY"]
    if api_key_file is not None:
        if api_key is not None:
            raise AmedError("give the API key one way: --api-key-file, or --api-key / $AMED_API_KEY, not both.")
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AmedError(f"cannot read the API key file {api_key_file} ({e.strerror or e}).") from None
        except UnicodeDecodeError:
            raise AmedError(f"the API key file {api_key_file} is not text.") from None
        if not api_key:
            raise AmedError(f"the API key file {api_key_file} is empty; write the key in it, or leave "
                            f"--api-key-file out to serve without a key.")
        what = "the key in " + str(api_key_file)
    else:
        what = "the API key (--api-key or $AMED_API_KEY)"
    if api_key is None:
        return None
    api_key = api_key.strip()
    if not api_key:
        raise AmedError("the API key is empty (--api-key '' or AMED_API_KEY=); give a key, or unset it to "
                        "serve without one.")
    if not all(33 <= ord(c) < 127 for c in api_key):
        raise AmedError(f"{what} must be printable ASCII without spaces (it travels in an HTTP header).")
    return api_key


def allowed_origins(flags=(), environ=None) -> list[str]:
    """--cors-origin values and $AMED_ORIGINS (comma-separated), as ollama's OLLAMA_ORIGINS."""
    environ = os.environ if environ is None else environ
    out = [o.strip() for o in flags or () if o and o.strip()]
    out += [o.strip() for o in environ.get("AMED_ORIGINS", "").split(",") if o.strip()]
    for o in out:
        if o != "*" and "://" not in o:
            raise AmedError(f"{o!r} is not a web origin; give one like http://localhost:3000 (patterns such "
                            f"as http://localhost:* and * work too).")
    return out


def http_protocol(idle_timeout: float = IDLE_TIMEOUT):
    """uvicorn's HTTP/1.1 protocol class, which also closes a connection that sends no complete
    request head within `idle_timeout` seconds (uvicorn itself times out only the keep-alive wait
    after a response: a connection that never sends a request would stay open forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm()

        def on_response_complete(self):
            super().on_response_complete()
            self.arm()

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def arm(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(idle_timeout, self.head_timeout)

        def head_timeout(self):
            self.head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()
    return Protocol


def uvicorn_server(app, *, verbose: bool = False, grace: float = GRACE, idle_timeout: float = IDLE_TIMEOUT):
    """A uvicorn Server for `app` with amed's timeouts and shutdown: the first SIGTERM or Ctrl-C
    starts app.state.amed["shutdown"] (new requests 503, active ones `grace` seconds to finish,
    then an error event) and a normal exit (0, no re-raised signal); a second Ctrl-C quits at once."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.amed["shutdown"]()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            http=http_protocol(idle_timeout), timeout_keep_alive=KEEP_ALIVE,
                            timeout_graceful_shutdown=grace + 5)
    return Server(config)


def run_command(path, err, *, host: str = "127.0.0.1", port: int = 8080, ctx_size: int = 4096,
                parallel: int = 4, api_key: str | None = None, api_key_file=None, max_ram=None,
                prefetch: bool = True, verbose: bool = False, device: str = "cpu", gpu_experts: int | str = 0,
                max_body: int | str = MAX_BODY, cors_origins=(), grace: float = GRACE) -> None:
    """`amed serve`: listen at once (/health says 503 while the model loads), serve until SIGTERM
    or Ctrl-C, which let active answers finish (up to `grace` seconds) before it exits."""
    from amed.app.chat import NOTICE
    from amed.engine.experts.memory import parse_size

    api_key = resolve_api_key(api_key, api_key_file)
    origins = allowed_origins(cors_origins)
    max_body = parse_size(max_body)
    if max_body < 1024:
        raise AmedError(f"--max-body must be at least 1K, not {max_body} bytes.")
    if not (grace >= 0 and math.isfinite(grace)):
        raise AmedError(f"--grace takes seconds (0 or more), not {grace}.")
    path = Path(path)
    model_id = path.name
    failed = []
    server = None

    def on_ready():
        err.print(f"[green]ready[/]: {model_id} on http://{host}:{port}/ ({parallel} parallel sequences, "
                  f"context {ctx_size}); OpenAI API at http://{host}:{port}/v1")

    def on_error(message):
        failed.append(message)          # printed once, by the CLI, when server.run() returns
        if server is not None:
            server.should_exit = True

    err.print(f"[dim]{NOTICE}[/]")
    if not is_loopback(host) and api_key is None:
        err.print("[yellow]listening beyond this computer without an API key ($AMED_API_KEY or "
                  f"--api-key-file): anyone who can reach {host}:{port} can use the model.[/]")
    app = create_app(model_id, model_loader(path, ctx_size=ctx_size, parallel=parallel, max_ram=max_ram,
                                            prefetch=prefetch, log=lambda m: err.print(f"[yellow]{m}[/]"),
                                            device=device, gpu_experts=gpu_experts),
                     parallel=parallel, ctx_size=ctx_size, api_key=api_key, on_ready=on_ready, on_error=on_error,
                     host=host, max_body=max_body, cors_origins=origins, grace=grace)
    try:                                 # bind first: a busy port is one sentence, before any loading
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise AmedError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another with --port "
                        f"(or --host).") from None
    server = uvicorn_server(app, verbose=verbose, grace=grace)
    err.print(f"[dim]loading {path} ...[/]")
    from amed.app.serve_extras import remove_runtime_file, write_runtime_file

    runfile = write_runtime_file(host=host, port=sock.getsockname()[1], model=model_id, path=path,   # `amed ps`
                                 ctx_size=ctx_size, parallel=parallel)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:            # a Ctrl-C outside uvicorn's handler (e.g. while it starts)
        pass
    finally:
        remove_runtime_file(runfile)
    err.print("[dim]server stopped[/]")
    if failed:
        raise AmedError(f"amed serve stopped: {failed[0]}")
