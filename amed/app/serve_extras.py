"""`amed serve`'s other APIs, beside OpenAI's: ollama's and llama-server's, and the runtime file
`amed ps` reads.

    ollama        POST /api/chat, /api/generate (NDJSON stream or one object), GET /api/tags,
                  POST /api/show, GET /api/ps, GET /api/version
    llama-server  POST /tokenize, /detokenize; GET /slots, /props

Generation goes the OpenAI endpoints' way (serve_requests.Api.job -> Scheduler -> run_job): this module
only turns ollama's request into that job and run_job's events into ollama's shapes. run_job
frames a stream as server-sent events; `ndjson()` re-frames it as one JSON object per line.

While it runs, `amed serve` keeps $AMED_HOME/run/serve-<pid>.json (pid, address, model, start
time); `amed ps` reads those files (dropping the ones whose process is gone) and asks each server
its /props.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

NS = 1_000_000               # nanoseconds per millisecond (ollama's durations are in ns)
LONG_AGO = "0001-01-01T00:00:00Z"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parameter_count(cfg) -> int:
    """Parameters of a Bailing-MoE config (embeddings, attention, dense and MoE MLPs, head)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    hd = cfg.head_dim or h // cfg.num_attention_heads
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    dense = min(cfg.first_k_dense_replace, layers)
    shared = (cfg.moe_shared_expert_intermediate_size or cfg.moe_intermediate_size) * cfg.num_shared_experts
    moe = 3 * h * (cfg.num_experts * cfg.moe_intermediate_size + shared) + h * cfg.num_experts
    n = layers * attn + dense * 3 * h * cfg.intermediate_size + (layers - dense) * moe
    return n + cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)


def short_count(n: int) -> str:
    """103251234567 -> '103.3B' (ollama's parameter_size)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def memory_info(sched) -> dict:
    """What the serving process holds: resident memory, the slots' KV caches, the expert cache."""
    from amed.engine.experts.memory import proc_field

    rss = proc_field("/proc/self/status", "VmRSS")
    peak = proc_field("/proc/self/status", "VmHWM")
    model = sched.model
    states = {id(s.state): s.state for s in sched.slots if s.state is not None}
    states.setdefault(id(model.state), model.state)          # slot 0's, allocated with the model
    kv = sum(st.nbytes for st in states.values())
    cache = getattr(model.experts, "cache", None)
    backend = getattr(model, "backend", None)
    return dict(rss_bytes=rss * 1024 if rss is not None else None,
                peak_rss_bytes=peak * 1024 if peak is not None else None,
                kv_cache_bytes=int(kv),
                expert_cache_bytes=int(cache.used) if cache is not None else None,
                expert_cache_budget_bytes=cache.budget if cache is not None else None,
                device=getattr(backend, "name", None) or "cpu")


# ---------------------------------------------------------------------------------------------
# the routes
# ---------------------------------------------------------------------------------------------
def routes(*, model_id: str, state: dict, ready, guarded, read_body, run_job, ctx_size: int, parallel: int):
    """Starlette routes for ollama's and llama-server's APIs over create_app's state: `state`
    (sched, api), `ready()` -> (Scheduler, Api) or ApiError 503, `guarded(handler)` (auth, errors),
    `read_body(request)`, `run_job(request, job, sched, stream, chunks)`."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from amed import __version__
    from amed.app.serve_errors import ApiError

    started = time.time()
    cached: dict = {}
    ollama_name = model_id if ":" in model_id else f"{model_id}:latest"

    def model_path() -> Path | None:
        sched = state["sched"]
        p = getattr(getattr(sched.model, "source", None), "path", None) if sched is not None else None
        return Path(p) if p is not None else None

    # ---- ollama ----------------------------------------------------------------------------------
    def ollama_errors(handler):
        """guarded(handler), its errors as ollama writes them: {"error": "message"}."""
        inner = guarded(handler)

        async def endpoint(request):
            resp = await inner(request)
            if resp.status_code >= 400 and isinstance(resp, JSONResponse):
                try:
                    body = json.loads(resp.body)
                except ValueError:
                    return resp
                e = body.get("error") if isinstance(body, dict) else None
                if isinstance(e, dict):
                    headers = {k: v for k, v in resp.headers.items() if k.lower() == "www-authenticate"}
                    return JSONResponse({"error": e.get("message")}, status_code=resp.status_code,
                                        headers=headers or None)
            return resp
        return endpoint

    def check_name(body: dict) -> None:
        """One model is served, so any name selects it (as serve's OpenAI endpoints do): an app set
        up for an ollama model name works unchanged. The name must be a string."""
        for key in ("model", "name"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise ApiError(400, f"'{key}' must be a string.", param=key)

    def details() -> dict:
        if "details" not in cached:
            from amed.app.models import describe

            sched, _ = ready()
            path = model_path()
            entry = describe(path) if path is not None else None
            cfg = sched.model.config
            quant = entry.quant if entry is not None else "?"
            from amed.formats.store import MANIFEST

            digest_src = (path / MANIFEST) if path is not None else None
            import hashlib

            h = hashlib.sha256()
            if digest_src is not None and digest_src.is_file():
                h.update(digest_src.read_bytes())
            else:
                h.update(model_id.encode())
            cached["details"] = dict(
                size=entry.size if entry is not None else 0,
                digest=h.hexdigest(),
                modified_at=rfc3339(path.stat().st_mtime) if path is not None else now_rfc3339(),
                params=parameter_count(cfg),
                details={"parent_model": "",
                         "format": "amed-store" if entry and entry.kind == "store" else "safetensors",
                         "family": cfg.model_type, "families": [cfg.model_type],
                         "parameter_size": short_count(parameter_count(cfg)),
                         "quantization_level": quant.split()[0].split("/")[0].upper() if quant != "?" else "unknown"})
        return cached["details"]

    def tag_entry() -> dict:
        d = details()
        return {"name": ollama_name, "model": ollama_name, "modified_at": d["modified_at"], "size": d["size"],
                "digest": d["digest"], "details": d["details"]}

    async def tags(request):
        if state["sched"] is None:              # loading (or failed): nothing to list yet
            ready()
        return JSONResponse({"models": [await run_in_threadpool(tag_entry)]})

    async def version(request):
        return JSONResponse({"version": __version__})

    async def ps(request):
        sched, _ = ready()
        mem = memory_info(sched)
        e = await run_in_threadpool(tag_entry)
        on_gpu = mem["device"] not in ("cpu", "")
        return JSONResponse({"models": [{
            "name": e["name"], "model": e["model"], "size": mem["rss_bytes"] or 0, "digest": e["digest"],
            "details": e["details"], "expires_at": "9999-12-31T23:59:59Z",
            "size_vram": (mem["rss_bytes"] or 0) if on_gpu else 0, "context_length": ctx_size}]})

    async def show(request):
        body = await read_body(request)
        check_name(body)
        sched, api = ready()
        d = await run_in_threadpool(details)
        cfg = sched.model.config
        arch = cfg.model_type
        p = api.defaults
        params = (f"temperature {p.temperature}\ntop_p {p.top_p}\ntop_k {p.top_k}\nmin_p {p.min_p}\n"
                  f"repeat_penalty {p.repetition_penalty}\nnum_ctx {ctx_size}")
        info = {"general.architecture": arch, "general.basename": model_id,
                "general.parameter_count": d["params"],
                f"{arch}.context_length": cfg.max_position_embeddings,
                f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_hidden_layers,
                f"{arch}.attention.head_count": cfg.num_attention_heads,
                f"{arch}.attention.head_count_kv": cfg.num_key_value_heads,
                f"{arch}.expert_count": cfg.num_experts, f"{arch}.expert_used_count": cfg.num_experts_per_tok,
                f"{arch}.vocab_size": cfg.vocab_size}
        path = model_path()
        return JSONResponse({
            "license": "", "modelfile": f"# amed serves {path}\nFROM {path}\n",
            "parameters": params, "template": api.tok.chat_template, "details": d["details"],
            "model_info": info, "capabilities": ["completion"], "modified_at": d["modified_at"]})

    def options_of(body: dict) -> dict:
        """ollama's `options` as the OpenAI-shaped fields Api.job reads."""
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "'options' must be an object.", param="options")

        def number(key, integer=False):
            v = opts.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
                raise ApiError(400, f"options.{key} must be {'an integer' if integer else 'a number'}, not {v!r}.",
                               param=f"options.{key}")
            return int(v) if integer else v

        out = {k: number(k) for k in ("temperature", "top_p", "min_p", "repeat_penalty")}
        out["top_k"] = number("top_k", True)
        seed = number("seed", True)
        out["seed"] = seed if seed is not None and seed >= 0 else None      # -1: a random seed
        n = number("num_predict", True)
        out["max_tokens"] = n if n is not None and n > 0 else None          # -1 infinite, -2 fill the context
        stop = opts.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ApiError(400, "options.stop must be a list of strings.", param="options.stop")
            out["stop"] = stop
        out["num_ctx"] = number("num_ctx", True)
        return {k: v for k, v in out.items() if v is not None}

    def unsupported(body: dict) -> None:
        fmt = body.get("format")
        if fmt not in (None, ""):
            raise ApiError(400, "'format' (JSON mode, structured outputs) is not supported by amed.", param="format")
        if body.get("tools"):
            raise ApiError(400, "'tools' are not supported by amed.", param="tools")
        if body.get("images"):
            raise ApiError(400, "images are not supported: this is a text model.", param="images")
        if body.get("suffix"):
            raise ApiError(400, "'suffix' (fill in the middle) is not supported by amed.", param="suffix")
        if body.get("template"):
            raise ApiError(400, "'template' is not supported: amed uses the model's own chat template.",
                           param="template")

    def make_job(body: dict, prompt: list[int], api, param: str):
        opts = options_of(body)
        num_ctx = opts.pop("num_ctx", None)
        if num_ctx is not None and len(prompt) < num_ctx < ctx_size:      # a smaller context: a smaller budget
            opts["max_tokens"] = min(opts.get("max_tokens") or num_ctx, num_ctx - len(prompt))
        return api.job(opts, prompt, param)

    def stream_of(body: dict) -> bool:
        stream = body.get("stream", True)                   # ollama streams unless told not to
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false.", param="stream")
        return stream

    def load_answer(chunks, body: dict):
        """An empty request loads (or with keep_alive 0 unloads) the model: here it is always loaded."""
        reason = "unload" if body.get("keep_alive") in (0, "0", "0s", "0m") else "load"
        return JSONResponse({**chunks.head(), **chunks.empty(), "done": True, "done_reason": reason})

    async def generation(request, body, sched, job, chunks):
        resp = await run_job(request, job, sched, stream_of(body), chunks)
        if isinstance(resp, StreamingResponse):
            return StreamingResponse(ndjson(resp.body_iterator), status_code=resp.status_code,
                                     media_type="application/x-ndjson")
        return resp

    async def chat(request):
        body = await read_body(request)
        check_name(body)
        sched, api = ready()
        unsupported(body)
        chunks = OllamaChat(ollama_name if body.get("model") in (None, "") else body["model"])
        msgs = body.get("messages")
        if msgs is None or msgs == []:
            return load_answer(chunks, body)
        if isinstance(msgs, list):
            for i, m in enumerate(msgs):
                if isinstance(m, dict) and m.get("images"):
                    raise ApiError(400, f"messages[{i}].images: images are not supported: this is a text model.",
                                   param=f"messages[{i}].images")
            msgs = [{k: v for k, v in m.items() if k in ("role", "content")} if isinstance(m, dict) else m
                    for m in msgs]
        stream_of(body)
        job = await run_in_threadpool(lambda: make_job(body, api.chat_prompt({"messages": msgs}), api, "messages"))
        return await generation(request, body, sched, job, chunks)

    async def generate(request):
        body = await read_body(request)
        check_name(body)
        sched, api = ready()
        unsupported(body)
        text, system, raw, context = body.get("prompt"), body.get("system"), body.get("raw", False), body.get("context")
        if text is not None and not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string.", param="prompt")
        if system is not None and not isinstance(system, str):
            raise ApiError(400, "'system' must be a string.", param="system")
        if not isinstance(raw, bool):
            raise ApiError(400, "'raw' must be true or false.", param="raw")
        if context is not None and not (isinstance(context, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < api.vocab_size for t in context)):
            raise ApiError(400, f"'context' must be a list of token ids in [0, {api.vocab_size}).", param="context")
        chunks = OllamaGenerate(ollama_name if body.get("model") in (None, "") else body["model"], api.tok)
        if not text:
            return load_answer(chunks, body)
        stream_of(body)

        def prompt_and_job():                   # tokenizing may take a while: never on the event loop
            if raw:
                ids = api.tok.encode(text, add_bos=None if not context else False)
            else:
                msgs = [{"role": "system", "content": system}] if system else []
                ids = api.chat_prompt({"messages": msgs + [{"role": "user", "content": text}]})
            chunks.prompt = list(context or []) + ids
            return make_job(body, chunks.prompt, api, "prompt")
        job = await run_in_threadpool(prompt_and_job)
        return await generation(request, body, sched, job, chunks)

    # ---- llama-server ------------------------------------------------------------------------------
    def flag(body: dict, key: str, default: bool) -> bool:
        v = body.get(key, default)
        if not isinstance(v, bool):
            raise ApiError(400, f"'{key}' must be true or false.", param=key)
        return v

    async def tokenize(request):
        body = await read_body(request)
        _, api = ready()
        content = body.get("content")
        if not isinstance(content, str):
            raise ApiError(400, "'content' must be a string.", param="content")
        add, pieces = flag(body, "add_special", False), flag(body, "with_pieces", False)

        def run():
            ids = api.tok.encode(content, add_bos=add)
            return [{"id": i, "piece": api.tok.decode([i])} for i in ids] if pieces else ids
        return JSONResponse({"tokens": await run_in_threadpool(run)})

    async def detokenize(request):
        body = await read_body(request)
        _, api = ready()
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "'tokens' must be a list of token ids.", param="tokens")
        if ids and (min(ids) < 0 or max(ids) >= api.vocab_size):
            raise ApiError(400, f"token ids must be in [0, {api.vocab_size}).", param="tokens")
        return JSONResponse({"content": await run_in_threadpool(api.tok.decode, ids)})

    def sampling(p, max_tokens=None, stops=()) -> dict:
        return {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                "repeat_penalty": p.repetition_penalty, "seed": -1 if p.seed is None else p.seed,
                "n_predict": -1 if max_tokens is None else max_tokens, "stop": list(stops)}

    async def slots(request):
        sched, api = ready()
        out = []
        for s in list(sched.slots):
            job, seq = s.job, s.seq
            busy = job is not None and seq is not None
            out.append({
                "id": s.index, "id_task": -1, "n_ctx": ctx_size, "speculative": False, "is_processing": busy,
                "n_cached": len(s.cached),
                "params": sampling(job.params if busy else api.defaults,
                                   job.max_tokens if busy else None, job.stops if busy else ()),
                "next_token": {"has_next_token": busy, "n_prompt_tokens": len(job.prompt) if busy else 0,
                               "n_prompt_todo": len(seq.todo) if busy else 0,
                               "n_decoded": job.completion_tokens if busy else 0,
                               "n_remain": max(0, seq.budget - job.completion_tokens) if busy else -1}})
        if request.query_params.get("fail_on_no_slot") in ("1", "true") and all(o["is_processing"] for o in out):
            raise ApiError(503, "no slot available", "unavailable_error")
        return JSONResponse(out)

    async def props(request):
        sched, api = ready()
        st = sched.stats()
        return JSONResponse({
            "default_generation_settings": {"id": 0, "n_ctx": ctx_size, "params": sampling(api.defaults)},
            "total_slots": len(sched.slots), "model_path": str(model_path() or model_id), "model_alias": model_id,
            "chat_template": api.tok.chat_template, "bos_token": api.tok.bos_token or "",
            "eos_token": api.tok.eos_token or "", "modalities": {"vision": False, "audio": False},
            "build_info": f"amed {__version__}",
            # amed's own: what `amed ps` shows
            "pid": os.getpid(), "started": started, "uptime_seconds": time.time() - started,
            "memory": memory_info(sched),
            "slots_busy": st["active"], "queued": st["queued"], "requests": st["requests"]})

    return [
        Route("/api/chat", ollama_errors(chat), methods=["POST"]),
        Route("/api/generate", ollama_errors(generate), methods=["POST"]),
        Route("/api/tags", ollama_errors(tags), methods=["GET"]),
        Route("/api/show", ollama_errors(show), methods=["POST"]),
        Route("/api/ps", ollama_errors(ps), methods=["GET"]),
        Route("/api/version", ollama_errors(version), methods=["GET"]),
        Route("/tokenize", guarded(tokenize), methods=["POST"]),
        Route("/detokenize", guarded(detokenize), methods=["POST"]),
        Route("/slots", guarded(slots), methods=["GET"]),
        Route("/props", guarded(props), methods=["GET"]),
    ]


async def ndjson(events):
    """run_job's server-sent events (`data: {...}`, then `data: [DONE]`) as NDJSON lines; an error
    event becomes ollama's {"error": "message"} line."""
    try:
        async for chunk in events:
            if isinstance(chunk, bytes):
                chunk = chunk.decode()
            for event in chunk.split("\n\n"):
                for line in event.splitlines():
                    if not line.startswith("data:"):
                        continue                         # comments (keep-alives) and blank lines
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        continue
                    obj = json.loads(payload)
                    if isinstance(obj.get("error"), dict):
                        obj = {"error": obj["error"].get("message")}
                    yield json.dumps(obj) + "\n"
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


class OllamaChat:
    """The shapes of /api/chat for serve.run_job (its `chunks`): a chunk per piece of text, a final
    object with done=true, the reason and ollama's counters (durations in nanoseconds)."""
    include_usage = False
    KEY = "message"

    def __init__(self, model: str):
        self.model = model
        self.t0 = time.perf_counter()
        self.parts: list[str] = []

    def head(self) -> dict:
        return {"model": self.model, "created_at": now_rfc3339()}

    def piece(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    def empty(self) -> dict:
        return self.piece("")

    def opening(self) -> list:
        return []

    def delta(self, text: str) -> dict:
        self.parts.append(text)
        return {**self.head(), **self.piece(text), "done": False}

    def counters(self, done: dict) -> dict:
        t, u = done["timings"], done["usage"]
        return {"done_reason": done["finish_reason"],
                "total_duration": int((time.perf_counter() - self.t0) * 1e9),
                "load_duration": 0,
                "prompt_eval_count": u["prompt_tokens"],
                "prompt_eval_duration": int(t["prompt_ms"] * NS),
                "eval_count": u["completion_tokens"],
                "eval_duration": int(t["predicted_ms"] * NS)}

    def final(self, done: dict) -> dict:
        return {**self.head(), **self.empty(), "done": True, **self.counters(done)}

    def usage(self, done: dict) -> dict:                 # never asked for (include_usage is False)
        return {}

    def whole(self, text: str, done: dict) -> dict:
        self.parts = [text]
        return {**self.head(), **self.piece(text), "done": True, **self.counters(done)}


class OllamaGenerate(OllamaChat):
    """The shapes of /api/generate: `response` pieces; the final object also has `context` (the
    prompt and answer ids, which a client may send back to continue)."""

    def __init__(self, model: str, tok):
        super().__init__(model)
        self.tok, self.prompt = tok, []

    def piece(self, text: str) -> dict:
        return {"response": text}

    def counters(self, done: dict) -> dict:
        c = super().counters(done)
        c["context"] = self.prompt + (self.tok.encode("".join(self.parts), add_bos=False) if self.parts else [])
        return c

    def whole(self, text: str, done: dict) -> dict:
        self.parts = [text]
        return {**self.head(), **self.piece(text), "done": True, **self.counters(done)}


# ---------------------------------------------------------------------------------------------
# the runtime file and `amed ps`
# ---------------------------------------------------------------------------------------------
def run_dir() -> Path:
    from amed.hub import amed_home

    return amed_home() / "run"


def write_runtime_file(*, host: str, port: int, model: str, path, ctx_size: int, parallel: int) -> Path | None:
    """$AMED_HOME/run/serve-<pid>.json for `amed ps`; None (and no error) where it cannot be written."""
    from amed import __version__

    pid = os.getpid()
    info = dict(pid=pid, host=host, port=port, model=model, path=str(path), ctx_size=ctx_size,
                parallel=parallel, started=time.time(), version=__version__)
    try:
        d = run_dir()
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"serve-{pid}.json"
        tmp = d / f".serve-{pid}.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, f)
        return f
    except OSError:
        return None


def remove_runtime_file(f: Path | None) -> None:
    if f is not None:
        try:
            f.unlink(missing_ok=True)
        except OSError:
            pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    except OSError:
        return False
    return True


def running_servers() -> list[dict]:
    """The runtime files of live `amed serve` processes; files of dead ones are removed."""
    d = run_dir()
    out = []
    for f in sorted(d.glob("serve-*.json")) if d.is_dir() else ():
        try:
            info = json.loads(f.read_text())
            pid = int(info["pid"])
            int(info["port"])
        except (OSError, ValueError, KeyError, TypeError):
            info, pid = None, None
        if info is None or not alive(pid):
            try:
                f.unlink()
            except OSError:
                pass
            continue
        out.append(info)
    return out


def loopback(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def ask_props(info: dict, timeout: float = 3.0) -> tuple[str, dict | None]:
    """(status, /props) of a running server: "ready", "loading", "needs API key", "error ..." or
    "not answering"."""
    import http.client

    headers = {}
    key = os.environ.get("AMED_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        c = http.client.HTTPConnection(loopback(info["host"]), int(info["port"]), timeout=timeout)
        c.request("GET", "/props", headers=headers)
        r = c.getresponse()
        raw = r.read()
        c.close()
    except OSError:
        return "not answering", None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if r.status == 200 and isinstance(body, dict):
        return "ready", body
    if r.status == 503:
        return "loading", None
    if r.status == 401:
        return "needs API key (set AMED_API_KEY)", None
    msg = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else f"HTTP {r.status}"
    return f"error: {msg}", None


def ps_rows() -> list[dict]:
    """One record per running server: its runtime file, status, and (when ready) memory and slots."""
    rows = []
    for info in running_servers():
        status, props = ask_props(info)
        row = dict(info, status=status, url=f"http://{info['host']}:{info['port']}/")
        if props is not None:
            row.update(memory=props.get("memory"), total_slots=props.get("total_slots"),
                       slots_busy=props.get("slots_busy"), queued=props.get("queued"),
                       requests=props.get("requests"), model_path=props.get("model_path"))
        rows.append(row)
    return rows
