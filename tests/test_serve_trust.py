"""`amed serve` survives any one client (issue 26): each bad or hostile request gets its 4xx JSON
error (never a traceback or internal text) and the next normal request still answers; an engine
error fails only its own request; cross-site requests, oversized bodies and idle connections are
refused; SIGTERM lets active streams end with a final event and `[DONE]`, then exits 0."""

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import helpers

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from amed.app.serve import (MAX_STOP_CHARS, MAX_STOPS, allowed_origins, create_app,  # noqa: E402
                            model_loader, resolve_api_key)
from amed.errors import AmedError  # noqa: E402
from amed.generate import StopStrings  # noqa: E402
from test_serve import ENV, PROMPT, Server  # noqa: E402

CTX = 1024
CHAT = "/v1/chat/completions"
ALLOWED = "http://allowed.example"


@pytest.fixture(scope="module")
def store(golden_store):
    return golden_store(bits=4)


@pytest.fixture(scope="module")
def loaded(store):
    return model_loader(store, ctx_size=CTX, parallel=2)()


def start(store, loaded, **kw):
    """Another server on the same loaded model (a test that changes its state for good)."""
    s = Server(create_app(store.name, lambda: loaded, **{"parallel": 2, "ctx_size": CTX, **kw}))
    s.wait_ready()
    return s


@pytest.fixture(scope="module")
def server(store, loaded):
    """The server most tests share: default limits, one extra allowed origin, short idle timeout."""
    s = Server(create_app(store.name, lambda: loaded, parallel=2, ctx_size=CTX, cors_origins=[ALLOWED]),
               idle_timeout=1.0)
    s.wait_ready()
    yield s
    s.stop()


def user(text=PROMPT, **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 2, "temperature": 0, **kw}


def check_error(got, status, code=None, param=None):
    """`got` is OpenAI's error shape with `status`, one sentence and nothing internal."""
    st, body = got
    assert st == status, got
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    assert "Traceback" not in err["message"] and "File \"" not in err["message"] and len(err["message"]) < 300
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serving(server):
    status, body = server.post(CHAT, user())
    assert status == 200 and body["choices"][0]["message"]["content"] is not None, body


def raw(server, data: bytes, head: str) -> bytes:
    """`head` (request line and headers) and `data` sent as they are; the whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as c:
        c.sendall(head.encode("latin-1") + b"\r\n" + data)
        out = b""
        while True:
            piece = c.recv(65536)
            if not piece:
                return out
            out += piece
            if b"\r\n\r\n" in out:
                head_part, _, rest = out.partition(b"\r\n\r\n")
                length = [int(h.split(b":")[1]) for h in head_part.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    return out


def status_and_json(answer: bytes):
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# ---- bad bodies: 400, one sentence, and the server keeps serving -----------------------------------
BAD_BODIES = {
    "100k-deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "100k-deep nesting in a field": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "5000-digit integer": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "lone surrogate in a key": b'{"messages": [{"role": "user", "content": "hi"}], "\\udfff": 1}',
    "NaN": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "1e400": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}',
    "not UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_malformed_json_is_a_400(server, name):
    check_error(server.post(CHAT, BAD_BODIES[name]), 400)
    still_serving(server)


@pytest.mark.parametrize("extra, param, code", [
    ({"n": True}, "n", None),
    ({"n": "1"}, "n", None),
    ({"n": 2}, "n", None),
    ({"max_tokens": 10 ** 30}, "max_tokens", None),
    ({"seed": 2 ** 64}, "seed", None),
    ({"seed": "x"}, "seed", None),
    ({"top_k": "5"}, "top_k", None),
    ({"temperature": [1]}, "temperature", None),
    ({"ignore_eos": "no"}, "ignore_eos", None),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options", None),
    ({"model": 5}, "model", None),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"stop": ["x"] * (MAX_STOPS + 1)}, "stop", None),
    ({"stop": "y" * (MAX_STOP_CHARS + 1)}, "stop", None),
    ({"stop": "y" * 400_000}, "stop", None),
])
def test_bad_fields_are_400(server, extra, param, code):
    check_error(server.post(CHAT, user(**extra)), 400, code=code, param=param)
    still_serving(server)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "system", "content": "be brief"}, {"role": "user"}], "messages[1].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content"),
    ([{"role": 7, "content": "hi"}], "messages[0]"),
    ("hi", "messages"),
    ([{"role": "user", "content": ""}] * CTX, "messages"),
])
def test_bad_messages_are_400(server, messages, param):
    check_error(server.post(CHAT, {"messages": messages}), 400, param=param)
    still_serving(server)


def test_fields_that_ask_for_nothing_are_accepted(server):
    ok = dict(logprobs=False, tools=[], response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0.0,
              n=1, stop=["x"] * MAX_STOPS, model="any-name")
    status, body = server.post(CHAT, user(**ok))
    assert status == 200, body


# ---- seeds and engine errors -----------------------------------------------------------------------
def test_seed_minus_one_means_random(server):
    for stream in (False, True):
        status, body = server.post(CHAT, user(seed=-1, temperature=1.0, max_tokens=4, stream=stream))
        assert status == 200, body
    assert server.post(CHAT, user(seed=2 ** 64 - 1, temperature=1.0))[0] == 200      # any uint64 seed
    assert server.get("/health") == (200, {"status": "ok"})
    still_serving(server)


def test_an_error_in_one_sequence_fails_only_that_request(server, loaded, monkeypatch):
    """A sequence whose admission raises (its sampler) or whose prefill raises (the forward) gets a
    500 JSON error (or an error event and [DONE] when streaming); a request running at the same
    time answers as usual, and so do the next ones."""
    import amed.text.sampling as sampling

    model, tok, _ = loaded
    real_sampler, real_forward = sampling.make_sampler, model.forward
    poison = [5, 6, 7, 8, 9]                                 # the prompt whose prefill fails

    def sampler(params):
        if params.seed == 666:
            raise ValueError("a bug in admitting one sequence: secret internal detail")
        return real_sampler(params)

    def forward(ids, *a, **kw):
        if [int(i) for i in ids] == poison:
            raise RuntimeError("a bug in one sequence's forward: secret internal detail")
        return real_forward(ids, *a, **kw)
    monkeypatch.setattr(sampling, "make_sampler", sampler)
    monkeypatch.setattr(model, "forward", forward, raising=False)

    results = {}

    def long_one():
        results["long"] = server.post(CHAT, user(max_tokens=40, ignore_eos=True))
    t = threading.Thread(target=long_one)
    t.start()
    err = check_error(server.post(CHAT, user(seed=666)), 500)
    assert "secret" not in err["message"]
    check_error(server.post("/v1/completions", {"prompt": poison, "max_tokens": 2}), 500)
    status, text = server.post("/v1/completions", {"prompt": poison, "max_tokens": 2, "stream": True})
    assert status == 200 and '"error"' in text and text.endswith("data: [DONE]\n\n") and "secret" not in text
    t.join(timeout=60)
    assert results["long"][0] == 200 and results["long"][1]["usage"]["completion_tokens"] == 40
    assert server.get("/health") == (200, {"status": "ok"})
    monkeypatch.undo()
    still_serving(server)
    assert server.get("/stats")[1]["errors"] >= 3


def test_health_reports_a_dead_engine(store, loaded):
    s = start(store, loaded, parallel=1)
    try:
        sched = s.app.state.amed["sched"]

        def broken():
            raise RuntimeError("the engine loop itself broke")
        sched._has_work = broken
        sched.wake()
        t0 = time.time()
        while sched.alive() and time.time() - t0 < 10:
            time.sleep(0.02)
        status, body = s.get("/health")
        assert status == 503 and body["status"] == "error" and "engine stopped" in body["error"]
        check_error(s.post(CHAT, user()), 500)                 # an answer, not a hang
    finally:
        s.stop()


# ---- sizes, and the event loop stays free ---------------------------------------------------------------
def test_body_over_the_limit_is_413(server, store, loaded):
    answer = raw(server, b"", f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {100 << 20}\r\n")
    status, body = status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    still_serving(server)
    small = start(store, loaded, max_body=4096)
    try:
        check_error(small.post(CHAT, user("word " * 2000)), 413)                   # Content-Length
        c = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)      # chunked, no length
        c.request("POST", CHAT, body=iter([b'{"messages": [{"role": "user", "content": "', b"x" * 8000, b'"}]}']),
                  headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = c.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
        c.close()
        still_serving(small)
    finally:
        small.stop()


def test_a_huge_message_does_not_block_health(server):
    """A 7 MB message (under the 8 MiB limit) is refused for the context without tokenizing it all,
    and /health answers meanwhile."""
    done = {}

    def big():
        done["r"] = server.post(CHAT, {"messages": [{"role": "user", "content": "medicine " * 800_000}]})
    t = threading.Thread(target=big)
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert server.get("/health")[0] == 200
        worst = max(worst, time.perf_counter() - t0)
    t.join()
    check_error(done["r"], 400, code="context_length_exceeded")
    assert worst < 1.0
    still_serving(server)


def test_tokenizing_runs_off_the_event_loop(server, loaded, monkeypatch):
    tok = loaded[1]
    real = tok.encode_chat

    def slow(*a, **kw):
        time.sleep(1.5)                       # as a long prompt would take
        return real(*a, **kw)
    monkeypatch.setattr(tok, "encode_chat", slow, raising=False)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", server.post(CHAT, user())))
    t.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    assert server.get("/health")[0] == 200
    assert time.perf_counter() - t0 < 0.5
    t.join(timeout=30)
    assert done["r"][0] == 200


# ---- stop strings: bounded, and linear in the text ---------------------------------------------------
def first_completed_stop(stops, text):
    """The reference: the text up to the first stop string to be complete (longest on a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def test_stop_strings_equals_the_reference():
    rng = random.Random(7)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(0, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        m, out = StopStrings(stops), []
        for p in pieces:
            out.append(m.feed(p))
            if m.hit:
                break
        got = ("".join(out) if m.hit else "".join(out) + m.flush(), m.hit)
        assert got == first_completed_stop(stops, text), (stops, pieces)


def test_stop_strings_is_linear_on_adversarial_stops():
    stops = ["a" * (MAX_STOP_CHARS - 1) + "b"] * (MAX_STOPS - 1) + ["ab" * (MAX_STOP_CHARS // 2)]
    m = StopStrings(stops)
    t0 = time.perf_counter()
    shown = sum(len(m.feed("aaa")) for _ in range(2000))           # 6000 characters, all could start a stop
    assert time.perf_counter() - t0 < 2.0
    assert not m.hit and shown == 6000 - (MAX_STOP_CHARS - 1)       # only a stop's length is held back


# ---- cross-site protection ------------------------------------------------------------------------------
def test_dns_rebinding_host_is_403(server):
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.nip.io", "localhost.evil.example"):
        check_error(server.get("/v1/models", headers={"Host": host}), 403, code="host_not_allowed")
        check_error(server.post(CHAT, user(), headers={"Host": host}), 403, code="host_not_allowed")
    assert server.get("/", headers={"Host": "evil.example"})[0] == 403
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("GET", "/")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("x-frame-options") == "DENY"        # no framing by another page
    r.read()
    c.close()
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.2", f"app.localhost:{server.port}"):
        assert server.get("/health", headers={"Host": host})[0] == 200, host
    still_serving(server)


def test_cross_origin_requests_are_refused_unless_allowed(server):
    evil = {"Origin": "http://evil.example"}
    check_error(server.post(CHAT, user(), headers=evil), 403, code="origin_not_allowed")
    check_error(server.get("/v1/models", headers=evil), 403, code="origin_not_allowed")
    check_error(server.post(CHAT, user(), headers={"Origin": "null"}), 403)
    check_error(server.post(CHAT, user(), headers={"Origin": f"http://127.0.0.1:{server.port + 1}"}), 403)
    assert server.post(CHAT, user(), headers={"Origin": f"http://127.0.0.1:{server.port}"})[0] == 200  # the page
    # an allowed origin: CORS headers on the answer and on its preflight
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("OPTIONS", CHAT, headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST",
                                        "Access-Control-Request-Headers": "content-type, authorization"})
    r = c.getresponse()
    r.read()
    assert r.status == 204 and r.getheader("access-control-allow-origin") == ALLOWED
    assert "POST" in r.getheader("access-control-allow-methods")
    c.request("POST", CHAT, body=json.dumps(user()), headers={"Origin": ALLOWED, "Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("access-control-allow-origin") == ALLOWED
    c.request("OPTIONS", CHAT, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    r = c.getresponse()
    assert r.status == 403 and r.getheader("access-control-allow-origin") is None
    r.read()
    c.close()
    still_serving(server)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_post_needs_json_content_type(server, ctype):
    """A browser's POST (it always carries Origin; here this server's own, so the origin check
    passes) must be JSON: a form or text/plain needs no preflight. curl -d (no Origin) may omit it."""
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: {len(json.dumps(user()))}\r\n" \
           + (f"Content-Type: {ctype}\r\n" if ctype else "")
    status, body = status_and_json(raw(server, json.dumps(user()).encode(), head + f"Origin: http://127.0.0.1:{server.port}\r\n"))
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    assert status_and_json(raw(server, json.dumps(user()).encode(), head))[0] == 200
    assert server.post(CHAT, user(), headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_origins_from_flags_and_environment():
    assert allowed_origins(["http://a.example"], {"AMED_ORIGINS": " http://b.example, http://localhost:*,"}) == [
        "http://a.example", "http://b.example", "http://localhost:*"]
    assert allowed_origins([], {"AMED_ORIGINS": "*"}) == ["*"]
    with pytest.raises(AmedError):
        allowed_origins(["evil.example"], {})


# ---- the API key ---------------------------------------------------------------------------------------
def test_api_key_sources(tmp_path):
    assert resolve_api_key(None, None, {}) is None
    assert resolve_api_key("k1", None, {}) == "k1"
    assert resolve_api_key(None, None, {"AMED_API_KEY": "k2"}) == "k2"
    f = tmp_path / "key"
    f.write_text("k3\n")
    assert resolve_api_key(None, f, {}) == "k3"
    for args in [("", None, {}), ("  ", None, {}), (None, None, {"AMED_API_KEY": ""}), ("k", f, {}),
                 (None, tmp_path / "missing", {}), ("key with spaces", None, {})]:
        with pytest.raises(AmedError) as e:
            resolve_api_key(*args)
        assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")       # one sentence
    f.write_text("\n")
    with pytest.raises(AmedError, match="empty"):
        resolve_api_key(None, f, {})


def test_empty_api_key_is_refused_by_the_command(store):
    for args, env in [(["--api-key", ""], {}), ([], {"AMED_API_KEY": ""})]:
        r = subprocess.run([sys.executable, "-m", "amed", "serve", "-m", str(store), "--port", "1", *args],
                           env={**ENV, **env}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "API key is empty" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- idle connections ------------------------------------------------------------------------------
def test_idle_and_half_sent_connections_are_closed(server):
    for first in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"):     # nothing; a head never finished
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
            c.sendall(first)
            t0 = time.time()
            assert c.recv(1024) == b""                                  # the server closed it
            assert time.time() - t0 < 5
    still_serving(server)


# ---- shutting down -------------------------------------------------------------------------------------
def sse_events(resp):
    events, buf = [], b""
    while True:
        line = resp.readline()
        if not line:
            return events
        buf += line
        if buf.endswith(b"\n\n"):
            events.append(buf.decode().strip())
            buf = b""
            if events[-1] == "data: [DONE]":
                return events


def open_stream(port, max_tokens):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", CHAT, headers={"Content-Type": "application/json"}, body=json.dumps(
        user(max_tokens=max_tokens, ignore_eos=True, stream=True)))
    r = c.getresponse()
    assert r.status == 200
    first = r.readline()
    assert first.startswith(b"data: ")
    r.readline()
    return c, r


def test_shutdown_stops_admitting_and_ends_streams_after_the_grace(store, loaded):
    s = start(store, loaded, grace=1.0)
    try:
        c_long, r_long = open_stream(s.port, 900)
        c_short, r_short = open_stream(s.port, 6)
        t0 = time.time()
        s.app.state.amed["shutdown"]()
        check_error(s.post(CHAT, user()), 503, code="shutting_down")
        assert s.get("/health") == (503, {"status": "stopping"})
        short = sse_events(r_short)                   # finished within the grace: a normal end
        assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"]
        long = sse_events(r_long)                     # cut at the grace: an error event, then [DONE]
        assert long[-1] == "data: [DONE]" and json.loads(long[-2][6:])["error"]["code"] == "shutting_down"
        assert 0.8 < time.time() - t0 < 10
        c_long.close()
        c_short.close()
    finally:
        s.stop()


def test_sigterm_with_an_active_stream(store):
    p, port = helpers.start_amed_serve(store, "-np", "1", "-c", "1024", "--grace", "0.5", env=ENV)
    try:
        c, r = open_stream(port, 1000)
        p.send_signal(signal.SIGTERM)
        events = sse_events(r)
        c.close()
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"]
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "server stopped" in err
    assert err.strip().splitlines()[-1].strip() == "server stopped"
