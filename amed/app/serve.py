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

The parts, one job each: serve_scheduler.py (the engine thread), serve_requests.py (request bodies ->
Jobs), serve_guard.py (Guard), serve_shapes.py (the response shapes), serve_errors.py (ApiError);
serve_extras.py (ollama's and llama-server's endpoints). This file: the routes, create_app and
`amed serve` itself. Starlette and uvicorn are imported only in these files' functions, when the
server starts.
"""

from __future__ import annotations

import functools
import hmac
import json
import math
import os
import socket
import threading
import time
from pathlib import Path

from amed.app.serve_errors import ApiError, client_message
from amed.app.serve_guard import IDLE_TIMEOUT, Guard, is_loopback
from amed.app.serve_requests import MAX_STOP_CHARS, MAX_STOPS, Api, parse_body
from amed.app.serve_scheduler import Job, Scheduler
from amed.app.serve_shapes import ChatChunks, TextChunks
from amed.errors import AmedError

__all__ = ["ApiError", "Api", "Guard", "Job", "Scheduler", "MAX_STOPS", "MAX_STOP_CHARS",
           "create_app", "model_loader", "allowed_origins", "resolve_api_key", "uvicorn_server", "run_command"]

PAGE = Path(__file__).parent / "static" / "chat.html"
MAX_BODY = 8 << 20         # default --max-body: bytes of one request (413 beyond)
GRACE = 10.0               # default --grace: seconds active generations get after SIGTERM / Ctrl-C
KEEP_ALIVE = 5             # seconds an idle keep-alive connection stays open


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
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from amed.app.serve_extras import routes as extra_routes

    state = dict(sched=None, api=None, error=None, draining=False, deadline=None)
    prompt_slots = asyncio.Semaphore(2)    # prompts tokenized at once (each may be megabytes)

    def shutdown() -> None:
        """Stop admitting requests (503); active ones get `grace` seconds, then an error event."""
        if not state["draining"]:
            state["draining"], state["deadline"] = True, time.monotonic() + grace
    state["shutdown"] = shutdown
    run = functools.partial(run_job, deadline=lambda: state["deadline"])

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
                return error_response(e)
            except Exception as e:  # never a traceback to the client, never a dead server
                return error_response(ApiError(500, client_message(e), "server_error"))
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
            return await run(request, job, sched, *flags)
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
        return error_response(e)

    async def server_error(request: Request, exc: Exception):
        return error_response(ApiError(500, client_message(exc), "server_error"))

    routes = [
        Route("/", page), Route("/health", health),
        Route("/v1/models", guarded(models)), Route("/models", guarded(models)),
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/completions", guarded(completions), methods=["POST"]),
        Route("/stats", guarded(stats)), Route("/metrics", guarded(metrics)),
        *extra_routes(model_id=model_id, state=state, ready=ready, guarded=guarded, read_body=read_body,
                      run_job=run, ctx_size=ctx_size, parallel=parallel),     # ollama's, llama-server's
    ]
    guard = Middleware(Guard, host=host, max_body=max_body, origins=cors_origins, state=state)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[guard],
                    exception_handlers={HTTPException: not_found, Exception: server_error})
    app.state.amed = state
    return app


def error_response(e: ApiError):
    """An ApiError as its JSON response (a 401 also says how to authenticate)."""
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status,
                        headers={"WWW-Authenticate": "Bearer"} if e.status == 401 else None)


async def run_job(request, job: Job, sched: Scheduler, stream: bool, chunks, *, deadline=lambda: None):
    """Submit the job and answer: SSE chunks (stream) or one JSON object. `chunks` knows the
    endpoint's shapes: chunks.delta(text), .final(done), .usage(done), .whole(text, done).
    `deadline()`: the time.monotonic() at which a shutdown's grace period ends (None: none begun)."""
    import asyncio

    from starlette.responses import JSONResponse, Response, StreamingResponse

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
            end = deadline()
            if end is not None and time.monotonic() > end:
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
                    return error_response(value)
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
