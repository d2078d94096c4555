"""`amed serve`: an OpenAI-compatible HTTP server that several clients can use at once.

    clients ──HTTP──► Starlette app (asyncio) ──Job──► Scheduler (one engine thread) ──► Model
            ◄─SSE/JSON── per-request asyncio queue ◄── events (text, done, error) ◄──┘

The model is not thread-safe, so every forward pass runs on one engine thread. It keeps up to
`parallel` slots, each a sequence with its own State; a slot remembers the tokens in its KV cache,
so a follow-up turn of a conversation prefills only its new tokens. Each step the thread prefills
(in chunks, so a long prompt does not stall the others) and then decodes one token for every
active sequence in one batched forward (Model.forward_batch: the dense weights and the experts
the sequences share are read once per step). Requests beyond `parallel` wait in a queue.

Starlette and uvicorn are imported only here, when the server starts.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from amed.errors import AmedError

PREFILL_CHUNK = 256        # prompt tokens per engine step: other sequences decode between chunks
PAGE = Path(__file__).parent / "static" / "chat.html"


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

    def submit(self, job: Job) -> None:
        job.t_submit = time.perf_counter()
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
            self._start(slot, job)

    def _start(self, slot: Slot, job: Job) -> None:
        from amed.app.chat import StopStrings
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
        slot.stopper = StopStrings(job.stops)
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
            chunk, s.todo = s.todo[:PREFILL_CHUNK], s.todo[PREFILL_CHUNK:]
            logits = self.model.forward(chunk, state=s.state)
            s.cached += chunk
            self.counters["prefill_seconds"] += time.perf_counter() - t0
            if not s.todo:
                self._sampled(s, logits)
        batch = [s for s in self.slots if s.job is not None and s.next is not None]
        if batch:
            t0 = time.perf_counter()
            logits = self.model.forward_batch([s.next for s in batch], [s.state for s in batch])
            for s, row in zip(batch, logits):
                s.cached.append(s.next)
                s.next = None
                self._sampled(s, row)
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

    def _fail_active(self, e: Exception) -> None:
        """Report the error to every job in flight and forget their slots' caches (a forward cut
        short may have left them half-written)."""
        message = str(e) if isinstance(e, AmedError) else f"internal error: {type(e).__name__}: {e}"
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
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, not {v!r}.", param=key)
    if minimum is not None and v < minimum:
        raise ApiError(400, f"'{key}' must be at least {minimum}, not {v!r}.", param=key)
    return int(v) if integer else float(v)


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
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, not {kind!r}.",
                               param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts.",
                   param=f"messages[{i}].content")


class Api:
    """Turns request bodies into Jobs for one loaded model (validation, defaults, prompt ids)."""

    def __init__(self, model_id: str, tokenizer, defaults, ctx_size: int, vocab_size: int):
        self.model_id, self.tok, self.defaults = model_id, tokenizer, defaults
        self.ctx_size, self.vocab_size = ctx_size, vocab_size

    def check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_id:
            raise ApiError(404, f"The model {m!r} does not exist; this server serves {self.model_id!r}.",
                           param="model", code="model_not_found")

    def job(self, body: dict, prompt: list[int], param: str) -> Job:
        if body.get("n") not in (None, 1):
            raise ApiError(400, "only n=1 is supported.", param="n")
        if len(prompt) >= self.ctx_size:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than this server's context of "
                                f"{self.ctx_size - 1} (raise -c/--ctx-size or shorten the prompt).",
                           param=param, code="context_length_exceeded")
        max_tokens = _number(body, "max_completion_tokens", integer=True, minimum=1)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", integer=True, minimum=1)
        overrides = dict(temperature=_number(body, "temperature", minimum=0),
                         top_p=_number(body, "top_p"), top_k=_number(body, "top_k", integer=True),
                         min_p=_number(body, "min_p"), seed=_number(body, "seed", integer=True),
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
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be true or false.", param="ignore_eos")
        return Job(prompt=prompt, params=params, max_tokens=max_tokens or self.ctx_size, stops=stops,
                   ignore_eos=ignore_eos)

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
            if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"messages[{i}].role {m['role']!r} is not one of system, user, assistant, "
                                    f"tool.", param=f"messages[{i}].role")
            msg = {k: v for k, v in m.items() if k in ("role", "reasoning_content", "tool_calls")}
            msg["role"] = "system" if m["role"] == "developer" else m["role"]
            msg["content"] = message_text(m.get("content"), i)
            out.append(msg)
        try:
            return self.tok.encode_chat(out)
        except AmedError as e:
            raise ApiError(400, str(e), param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]                                    # a batch of one prompt
        if isinstance(p, str) and p:
            return self.tok.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab_size}).", param="prompt")
            return list(p)
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per "
                            "request).", param="prompt")


# ---------------------------------------------------------------------------------------------
# the HTTP app
# ---------------------------------------------------------------------------------------------
def create_app(model_id: str, loader, *, parallel: int = 4, ctx_size: int = 4096, api_key: str | None = None,
               on_ready=None, on_error=None):
    """The Starlette app. `loader()` -> (model, tokenizer, default SamplingParams) runs on a thread
    at startup; until it returns, /health answers 503 and the API 503 "loading"."""
    import asyncio
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from amed.app.serve_extras import routes as extra_routes

    state = dict(sched=None, api=None, error=None)

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
        if state["sched"] is None:
            raise ApiError(503, "the model is loading; retry in a moment.", "server_error", code="model_loading")
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
                import traceback

                traceback.print_exc()
                return error(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        return endpoint

    async def read_body(request: Request) -> dict:
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ApiError(499, "the client went away before sending the whole request.") from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object.")
        return body

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(request: Request):
        if state["error"]:
            return JSONResponse({"status": "error", "error": state["error"]}, status_code=500)
        if state["sched"] is None:
            return JSONResponse({"status": "loading"}, status_code=503)
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
            events keep coming (a non-stream answer sends nothing until it is complete)."""
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
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
        async def handle(request: Request):
            body = await read_body(request)
            sched, api = ready()
            api.check_model(body)
            job = api.job(body, prompt_of(api, body), field)
            return await run_job(request, job, sched, *stream_flags(body, chunks))
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
        return stream, kind(model_id, include_usage=bool(opts.get("include_usage")))

    async def not_found(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            e = ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            e = ApiError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        else:
            e = ApiError(exc.status_code, str(exc.detail))
        return error(e)

    async def server_error(request: Request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

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
    app = Starlette(routes=routes, lifespan=lifespan,
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


def run_command(path, err, *, host: str = "127.0.0.1", port: int = 8080, ctx_size: int = 4096,
                parallel: int = 4, api_key: str | None = None, max_ram=None, prefetch: bool = True,
                verbose: bool = False, device: str = "cpu", gpu_experts: int | str = 0) -> None:
    """`amed serve`: listen at once (/health says 503 while the model loads), serve until Ctrl-C."""
    import uvicorn

    from amed.app.chat import NOTICE

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
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err.print("[yellow]listening beyond this computer without --api-key: anyone who can reach "
                  f"{host}:{port} can use the model.[/]")
    app = create_app(model_id, model_loader(path, ctx_size=ctx_size, parallel=parallel, max_ram=max_ram,
                                            prefetch=prefetch, log=lambda m: err.print(f"[yellow]{m}[/]"),
                                            device=device, gpu_experts=gpu_experts),
                     parallel=parallel, ctx_size=ctx_size, api_key=api_key, on_ready=on_ready, on_error=on_error)
    try:                                 # bind first: a busy port is one sentence, before any loading
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise AmedError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another with --port "
                        f"(or --host).") from None
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    err.print(f"[dim]loading {path} ...[/]")
    from amed.app.serve_extras import remove_runtime_file, write_runtime_file

    runfile = write_runtime_file(host=host, port=sock.getsockname()[1], model=model_id, path=path,   # `amed ps`
                                 ctx_size=ctx_size, parallel=parallel)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:            # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
        pass
    finally:
        remove_runtime_file(runfile)
    err.print("[dim]server stopped[/]")
    if failed:
        raise AmedError(f"amed serve stopped: {failed[0]}")
