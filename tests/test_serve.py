"""`amed serve`: the OpenAI-compatible server, driven by the official `openai` client and raw HTTP
on a loopback port, with the golden checkpoint's int4 store; its chat page in headless Chromium."""

import html
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

import helpers

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from amed.app.serve import create_app, model_loader, uvicorn_server  # noqa: E402
from amed.generate import StopStrings  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"}
PROMPT = "What helps a headache?"
CTX = 1024


# ---- stop strings as the server uses them (no server) -------------------------------------------
def feed_all(stops, pieces):
    s = StopStrings(stops)
    out = []
    for p in pieces:
        out.append(s.feed(p))
        if s.hit:
            return "".join(out), True
    return "".join(out) + s.flush(), False


def test_stop_strings_cut_exactly_across_pieces():
    assert feed_all(["STOP"], ["hel", "lo S", "TO", "P and more"]) == ("hello ", True)
    assert feed_all(["STOP"], ["a ST", "ill"]) == ("a STill", False)           # a held prefix that was not a stop
    assert feed_all(["xyz", "lo"], ["hel", "lo"]) == ("hel", True)             # the earliest stop wins
    assert feed_all([], ["a", "b"]) == ("ab", False)
    assert feed_all(["ab"], ["xa"]) == ("xa", False)                           # flushed at the end
    s = StopStrings(["<end>"])
    assert s.feed("text <e") == "text " and not s.hit and s.feed("nd> tail") == "" and s.hit and s.flush() == ""


# ---- a server on a loopback port ------------------------------------------------------------------
class Server:
    """A uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app, **kw):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(app, **{"grace": 1, **kw})
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def wait_ready(self, timeout=120):
        t0 = time.time()
        while time.time() - t0 < timeout:
            status, _ = self.get("/health")
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError("the server did not become ready")

    def request(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, json.loads(raw)
        except json.JSONDecodeError:
            return r.status, raw.decode()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def store(golden_store):
    return golden_store(bits=4)


@pytest.fixture(scope="module")
def loaded(store):
    """The model, tokenizer and defaults, loaded once and shared by this file's servers."""
    return model_loader(store, ctx_size=CTX, parallel=2)()


@pytest.fixture(scope="module")
def server(store, loaded):
    s = Server(create_app(store.name, lambda: loaded, parallel=2, ctx_size=CTX))
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, model, prompt=PROMPT, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, **kw)


def stream_text(client, model, prompt=PROMPT, **kw):
    chunks = list(ask(client, model, prompt, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- the API ------------------------------------------------------------------------------------
def test_health_and_models(server, store):
    assert server.get("/health") == (200, {"status": "ok"})
    status, body = server.get("/v1/models")
    assert status == 200 and body["object"] == "list"
    (m,) = body["data"]
    assert m["id"] == store.name and m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]


def test_greedy_answer_equals_amed_chat(client, store):
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(store), "-n", "16", "--temp", "0",
                        "-p", PROMPT], capture_output=True, text=True, env=ENV, timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    got = ask(client, store.name, max_tokens=16)
    assert got.choices[0].message.content == r.stdout[:-1]          # chat ends the answer with a newline
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens <= 16 and got.usage.prompt_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_stream_equals_non_stream_and_usage_only_on_request(client, store):
    whole = ask(client, store.name, max_completion_tokens=12).choices[0].message.content
    text, chunks = stream_text(client, store.name, max_tokens=12)
    assert text == whole
    assert all(c.object == "chat.completion.chunk" and c.model == store.name for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    text, chunks = stream_text(client, store.name, max_tokens=12, stream_options={"include_usage": True})
    assert text == whole
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_strings_are_cut_and_never_emitted(client, store):
    text, chunks = stream_text(client, store.name, max_tokens=24, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1].strip())
    stop = pieces[i][-2:] + pieces[i + 1][:1]            # spans a token boundary
    want = text[:text.find(stop)]
    got = ask(client, store.name, max_tokens=24, stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want and got.choices[0].finish_reason == "stop"
    streamed, chunks = stream_text(client, store.name, max_tokens=24, stop=stop, extra_body={"ignore_eos": True})
    assert streamed == want and chunks[-1].choices[0].finish_reason == "stop"


def test_content_parts_and_sampling_fields(client, store):
    want = ask(client, store.name, max_tokens=6).choices[0].message.content
    parts = client.chat.completions.create(
        model=store.name, messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        temperature=0, max_tokens=6, extra_body={"unknown_field": 1, "top_k": 5, "min_p": 0.1})
    assert parts.choices[0].message.content == want
    a = ask(client, store.name, max_tokens=6, seed=7, top_p=0.9).choices[0].message.content  # temperature 0
    sampled = [client.chat.completions.create(model=store.name, messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=8, temperature=1.0, seed=3).choices[0].message.content
               for _ in range(2)]
    assert a == want
    assert sampled[0] == sampled[1]                        # a seed makes sampling repeatable


def test_completions_endpoint(client, store, loaded):
    got = client.completions.create(model=store.name, prompt="Fever is", max_tokens=8, temperature=0)
    assert got.object == "text_completion" and got.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=store.name, prompt="Fever is", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    ids = loaded[1].encode("Fever is")                            # a prompt of token ids
    assert client.completions.create(model=store.name, prompt=ids, max_tokens=8,
                                     temperature=0).choices[0].text == got.choices[0].text


def test_two_concurrent_streams_and_a_queued_third(client, store, server):
    """Three clients at once on two slots: each answer equals its answer alone (batched decode
    picks the same greedy tokens), the third waits for a slot, and decode steps were batched."""
    prompts = [PROMPT, "Is fever dangerous?", "How much water should I drink?"]
    kw = dict(max_tokens=40, extra_body={"ignore_eos": True})
    alone = [ask(client, store.name, p, **kw).choices[0].message.content for p in prompts]
    before = server.get("/stats")[1]
    results = [None] * 3

    def run(i):
        results[i] = stream_text(client, store.name, prompts[i], **kw)[0]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone
    after = server.get("/stats")[1]
    assert after["completion_tokens"] - before["completion_tokens"] == 120
    assert after["active"] == 0 and after["queued"] == 0


def test_scheduler_batches_decode_steps_and_queues_the_rest(loaded):
    """Three jobs on two slots, submitted before the engine starts (so they surely overlap): the
    first two decode together, the third waits for a slot, and each text equals its run alone."""
    import dataclasses

    from amed.app.serve import Job, Scheduler

    model, tok, defaults = loaded
    greedy = dataclasses.replace(defaults, temperature=0)
    prompts = [tok.encode_chat([{"role": "user", "content": p}])
               for p in (PROMPT, "Is fever dangerous?", "How much water should I drink?")]

    def run(jobs_prompts, parallel):
        sched = Scheduler(model, tok, parallel=parallel, ctx_size=CTX)
        out = [dict(text="", done=None, at=None) for _ in jobs_prompts]
        jobs = []
        for i, p in enumerate(jobs_prompts):
            def emit(kind, value, o=out[i]):
                if kind == "text":
                    o["text"] += value
                else:
                    o["done"], o["at"] = value, time.perf_counter()
            jobs.append(Job(prompt=p, params=greedy, max_tokens=30, ignore_eos=True, emit=emit))
            sched.submit(jobs[-1])
        sched.start()
        t0 = time.time()
        while not all(o["done"] for o in out) and time.time() - t0 < 60:
            time.sleep(0.01)
        sched.stop()
        return out, jobs, sched.stats()

    alone = [run([p], 1)[0][0]["text"] for p in prompts]
    out, jobs, stats = run(prompts, 2)
    assert [o["text"] for o in out] == alone
    assert all(o["done"]["finish_reason"] == "length" for o in out)
    assert stats["decode_steps"] < stats["decode_tokens"]               # steps ran several sequences
    assert stats["mean_decode_batch"] >= 1.5                          # 29 steps of 2, 29 of 1
    assert jobs[2].t_start >= min(out[0]["at"], out[1]["at"]) - 1e-3    # the third waited for a slot


def test_follow_up_turn_prefills_only_new_tokens(client, store):
    first = ask(client, store.name, max_tokens=8)
    answer = first.choices[0].message.content
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "And for a fever?"}]
    follow = client.chat.completions.create(model=store.name, messages=msgs, temperature=0, max_tokens=4)
    new = follow.model_extra["timings"]["prompt_n"]
    assert new < follow.usage.prompt_tokens - first.usage.prompt_tokens + 8


def test_raw_sse_framing(server, store):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"model": store.name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
         "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}))
    r = c.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    raw = r.read().decode()
    c.close()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = []
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e
        chunks.append(json.loads(e[len("data: "):]))
    for ch in chunks:
        assert {"id", "object", "created", "model", "choices"} <= set(ch)
        assert ch["object"] == "chat.completion.chunk" and ch["model"] == store.name
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = chunks[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation_and_frees_the_slot(server, store, stream):
    before = server.get("/stats")[1]
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 900, "ignore_eos": True,
         "stream": stream}))
    if stream:
        c.getresponse().fp.readline()                # the first event has come: generation is running
    else:
        t0 = time.time()
        while server.get("/stats")[1]["active"] == 0 and time.time() - t0 < 30:
            time.sleep(0.01)                         # the answer is being generated
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    t0 = time.time()
    while time.time() - t0 < 30:
        st = server.get("/stats")[1]
        if st["cancelled"] > before["cancelled"] and st["active"] == 0:
            break
        time.sleep(0.05)
    assert st["cancelled"] == before["cancelled"] + 1 and st["active"] == 0, (before, st)
    assert st["completion_tokens"] - before["completion_tokens"] < 900
    status, _ = server.get("/health")
    assert status == 200


# ---- bad input: the right status, OpenAI's error shape, and the server keeps serving ---------------
def error_of(status_body):
    status, body = status_body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return status, err


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, None),
    ([1, 2], 400, None, None),
    ({}, 400, "messages", None),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"content": "hi"}]}, 400, "messages[0]", None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature", None),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, None, None),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop", None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", None),
    ({"messages": [{"role": "user", "content": "hi"}], "model": 5}, 400, "model", None),
    ({"messages": [{"role": "user", "content": "word " * 1200}]}, 400, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests(server, body, status, param, code):
    got, err = error_of(server.post("/v1/chat/completions", body))
    assert got == status and err["param"] == param and err["code"] == code
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})[0] == 200   # still serving


def test_bad_completion_requests_and_paths(server, client, store):
    assert error_of(server.post("/v1/completions", {"prompt": ""}))[0] == 400
    assert error_of(server.post("/v1/completions", {"prompt": ["a", "b"]}))[0] == 400
    assert error_of(server.post("/v1/completions", {"prompt": [1, 10 ** 7]}))[0] == 400
    assert error_of(server.get("/v1/nothing-here"))[0] == 404
    assert error_of(server.get("/v1/chat/completions"))[0] == 405
    with pytest.raises(openai.BadRequestError) as e:           # the client parses our errors
        ask(client, store.name, "word " * 1200)
    assert e.value.code == "context_length_exceeded"
    assert server.get("/health")[0] == 200


def test_any_model_name_selects_the_one_model(client, store):
    """One model is served, so any name works (as with llama-server): the README's example names
    AntAngelMed-q4 whatever store is served."""
    want = ask(client, store.name, max_tokens=4).choices[0].message.content
    for name in ("AntAngelMed-q4", "gpt-4o", ""):
        got = ask(client, name, max_tokens=4)
        assert got.choices[0].message.content == want and got.model == store.name


def test_loading_503_then_api_key_401(loaded, store):
    gate = threading.Event()

    def slow_loader():
        gate.wait(30)
        return loaded
    s = Server(create_app(store.name, slow_loader, parallel=1, ctx_size=CTX, api_key="sekrit"))
    try:
        assert s.get("/health") == (503, {"status": "loading"})
        status, err = error_of(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                      headers={"Authorization": "Bearer sekrit"}))
        assert status == 503 and err["code"] == "model_loading"
        gate.set()
        s.wait_ready()
        assert error_of(s.get("/v1/models"))[0] == 401
        status, err = error_of(s.get("/v1/models", headers={"Authorization": "Bearer wrong"}))
        assert status == 401 and err["code"] == "invalid_api_key"
        assert s.get("/v1/models", headers={"Authorization": "Bearer sekrit"})[0] == 200
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert ask(good, store.name, max_tokens=2).usage.completion_tokens <= 2
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0), store.name, max_tokens=2)
        assert s.get("/")[0] == 200 and s.get("/health")[0] == 200          # public without a key
    finally:
        gate.set()
        s.stop()


def test_failed_load_is_reported(store):
    def broken():
        raise amed_error("the store is damaged.")
    from amed.errors import AmedError as amed_error
    errors = []
    s = Server(create_app(store.name, broken, on_error=errors.append))
    try:
        t0 = time.time()
        while not errors and time.time() - t0 < 10:
            time.sleep(0.02)
        assert errors == ["the store is damaged."]
        assert s.get("/health")[0] == 500
        status, err = error_of(s.post("/v1/completions", {"prompt": "hi"}))
        assert status == 500 and "damaged" in err["message"]
    finally:
        s.stop()


# ---- the command --------------------------------------------------------------------------------------
def test_amed_serve_command(store):
    p, port = helpers.start_amed_serve(store, "-np", "1", "-c", "256", env=ENV)
    try:
        # the same port again: one clear sentence, no traceback
        r = subprocess.run([sys.executable, "-m", "amed", "serve", "-m", str(store), "--port", str(port)],
                           env=ENV, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "--port" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.send_signal(2)                                                   # Ctrl-C: a clean stop
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "not medical advice" in err and "ready" in err and "Traceback" not in err


# ---- the chat page ----------------------------------------------------------------------------------
def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        r = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
        if shutil.which("chromium"):
            return shutil.which("chromium")
        pytest.skip("chromium is not installed and `apt-get install chromium` failed")
    pytest.skip("chromium is not installed and this user cannot install it (not root, or no apt-get)")


class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe (the DevTools protocol as
    NUL-terminated JSON on fds 3 and 4): no driver, no network, a fresh profile."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--remote-debugging-pipe"]

    def __init__(self, exe, profile):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds():                       # the child reads commands on fd 3, writes answers on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen([exe, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf, self.next_id = b"", 0

    def call(self, method, session=None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                data = os.read(self.from_chrome, 1 << 16)
                if not data:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += data
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


def test_chat_page_streams_an_answer_in_chromium(server, client, store, tmp_path):
    exe = find_chromium()
    want = ask(client, store.name, max_tokens=10).choices[0].message.content
    # ?q= and ?key= are ignored: a link from another page must neither send a prompt nor set a key
    query = urllib.parse.urlencode({"q": "sent by a link", "key": "from-a-link", "temperature": 0,
                                    "max_tokens": 10})
    browser = Chromium(exe, tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", url=f"{server.url}/?{query}")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def js(expr):
            return browser.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")
        t0 = time.time()
        while js("document.body && document.body.dataset.ready") != "1" and time.time() - t0 < 60:
            time.sleep(0.1)                                        # the page has asked /v1/models
        time.sleep(0.3)
        assert js("document.getElementById('messages').children.length") == 0       # nothing was sent
        assert js("document.getElementById('key').value") == ""
        js(f"document.getElementById('input').value = {json.dumps(PROMPT)}; "
           "document.getElementById('form').requestSubmit()")
        while js("document.body && document.body.dataset.done") != "1" and time.time() - t0 < 60:
            time.sleep(0.1)                                        # until the answer has streamed
        dom = js("document.documentElement.outerHTML")
        speed = js("document.getElementById('speed').textContent")
    finally:
        browser.close()
    assert 'data-done="1"' in dom, dom[-3000:]
    assert "not medical advice" in js_text(dom, "notice")
    assert f'<div class="msg assistant">{html.escape(want, quote=False)}</div>' in dom
    assert f'<div class="msg user">{html.escape(PROMPT, quote=False)}</div>' in dom
    assert "tok/s" in speed and "tokens" in speed and "first token after" in speed   # the speed line
    assert f'<span id="model">{store.name}</span>' in dom          # the model, from /v1/models


def js_text(dom, element_id):
    start = dom.index(f'id="{element_id}">') + len(f'id="{element_id}">')
    return dom[start:dom.index("<", start)]
