"""`amed serve`'s ollama API (/api/chat, /api/generate as NDJSON, /api/tags, /api/show, /api/ps,
/api/version), llama-server's /tokenize, /detokenize, /slots, /props, and `amed ps`; raw HTTP on
a loopback port with the golden checkpoint's int4 store."""

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

import helpers

uvicorn = pytest.importorskip("uvicorn")

from amed.app.serve import create_app, model_loader  # noqa: E402
from amed.app.serve_extras import ndjson  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"}
CTX = 256
PROMPT = "What helps a headache?"
COUNTERS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration")


class Server:
    """A uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started and time.time() - t0 < 30:
            time.sleep(0.02)
        t0 = time.time()
        while self.get("/health")[0] != 200:
            assert time.time() - t0 < 60, "the server did not become ready"
            time.sleep(0.05)

    def raw(self, method, path, body=None, content_type="application/json"):
        """(status, content type, body text)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = None if body is None else body if isinstance(body, (str, bytes)) else json.dumps(body)
        c.request(method, path, body=data, headers={"Content-Type": content_type} if data is not None else {})
        r = c.getresponse()
        out = r.status, r.getheader("content-type") or "", r.read().decode()
        c.close()
        return out

    def get(self, path):
        status, _, text = self.raw("GET", path)
        return status, json.loads(text)

    def post(self, path, body):
        status, _, text = self.raw("POST", path, body)
        return status, json.loads(text)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def store(golden_store):
    return golden_store(bits=4)


@pytest.fixture(scope="module")
def loaded(store):
    return model_loader(store, ctx_size=CTX, parallel=2)()


@pytest.fixture(scope="module")
def server(store, loaded):
    s = Server(create_app(store.name, lambda: loaded, parallel=2, ctx_size=CTX))
    yield s
    s.stop()


def lines_of(text):
    """Every line of an NDJSON body as an object (each must be valid JSON on its own)."""
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def check_final(last, model):
    assert last["done"] is True and last["model"] == model
    assert last["done_reason"] in ("stop", "length")
    for k in COUNTERS:
        assert isinstance(last[k], int) and last[k] >= 0, k
    assert last["prompt_eval_count"] > 0 and last["total_duration"] >= last["eval_duration"]
    datetime.fromisoformat(last["created_at"].replace("Z", "+00:00"))


GREEDY = {"temperature": 0, "num_predict": 12}


# ---- ollama: generation -------------------------------------------------------------------------
def test_chat_ndjson_framing_as_ollama_documents(server, store):
    body = {"model": store.name, "messages": [{"role": "user", "content": PROMPT}], "options": GREEDY}
    status, ctype, text = server.raw("POST", "/api/chat", body)                   # ollama streams by default
    assert status == 200 and ctype.startswith("application/x-ndjson")
    objs = lines_of(text)
    *pieces, last = objs
    assert pieces and all(o["done"] is False for o in pieces)
    for o in pieces:
        assert set(o) == {"model", "created_at", "message", "done"} and o["model"] == store.name
        assert o["message"]["role"] == "assistant" and isinstance(o["message"]["content"], str)
    check_final(last, store.name)
    assert last["message"] == {"role": "assistant", "content": ""}
    streamed = "".join(o["message"]["content"] for o in pieces)

    # one object with "stream": false: the same greedy answer and counters
    status, one = server.post("/api/chat", {**body, "stream": False})
    assert status == 200 and one["message"]["content"] == streamed
    check_final(one, store.name)
    assert one["eval_count"] == last["eval_count"] and one["done_reason"] == last["done_reason"]
    if last["done_reason"] == "length":
        assert last["eval_count"] == GREEDY["num_predict"]

    # the same answer as the OpenAI endpoint's, from the same job path
    status, oa = server.post("/v1/chat/completions", {"messages": body["messages"], "temperature": 0,
                                                      "max_tokens": GREEDY["num_predict"]})
    assert status == 200 and oa["choices"][0]["message"]["content"] == streamed


def test_the_same_answer_reports_the_same_counts_everywhere(server, store, amed_cli):
    """One greedy answer that ends on the stop token: `amed chat --json`, OpenAI's usage and ollama's
    eval_count all count every sampled token, the stop token included (as llama-server and ollama
    do), and agree on the prompt's length."""
    code, out, err = amed_cli("chat", "-m", store, "-p", "hi", "--temp", "0", "-n", "200", "-c", CTX, "--json")
    assert code == 0, err
    rec = json.loads(out)
    messages = [{"role": "user", "content": "hi"}]
    status, oa = server.post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 200})
    assert status == 200
    status, ol = server.post("/api/chat", {"messages": messages, "stream": False,
                                           "options": {"temperature": 0, "num_predict": 200}})
    assert status == 200
    assert rec["answer"] == oa["choices"][0]["message"]["content"] == ol["message"]["content"]
    assert rec["finish_reason"] == oa["choices"][0]["finish_reason"] == ol["done_reason"] == "stop"
    assert rec["generated_tokens"] == oa["usage"]["completion_tokens"] == ol["eval_count"]
    assert oa["timings"]["predicted_n"] == ol["eval_count"]
    assert rec["prompt_tokens"] == oa["usage"]["prompt_tokens"] == ol["prompt_eval_count"]


def test_generate_ndjson_raw_context_and_load(server, store):
    name = store.name + ":latest"                                                 # ollama's tagged name
    status, ctype, text = server.raw("POST", "/api/generate", {"model": name, "prompt": PROMPT, "options": GREEDY})
    assert status == 200 and ctype.startswith("application/x-ndjson")
    *pieces, last = lines_of(text)
    assert all(set(o) == {"model", "created_at", "response", "done"} and o["done"] is False for o in pieces)
    check_final(last, name)
    assert last["response"] == "" and all(isinstance(t, int) for t in last["context"])
    answer = "".join(o["response"] for o in pieces)

    status, one = server.post("/api/generate", {"model": name, "prompt": PROMPT, "options": GREEDY, "stream": False})
    assert status == 200 and one["response"] == answer and one["done"] is True
    # templated: the same prompt as a one-message chat
    status, chat = server.post("/api/chat", {"messages": [{"role": "user", "content": PROMPT}], "options": GREEDY,
                                             "stream": False})
    assert chat["message"]["content"] == answer and chat["prompt_eval_count"] == one["prompt_eval_count"]
    # raw: the prompt as it is (fewer tokens than the templated one); context continues a conversation
    status, raw = server.post("/api/generate", {"prompt": PROMPT, "raw": True, "stream": False, "options": GREEDY})
    assert status == 200 and raw["prompt_eval_count"] < one["prompt_eval_count"]
    status, more = server.post("/api/generate", {"prompt": "And then?", "context": one["context"], "stream": False,
                                                 "options": {"num_predict": 2}})
    assert status == 200 and more["prompt_eval_count"] > len(one["context"])
    # no prompt: ollama's "load the model" request
    status, load = server.post("/api/generate", {"model": name})
    assert status == 200 and load["done"] is True and load["done_reason"] == "load" and load["response"] == ""
    status, load = server.post("/api/chat", {"model": name, "messages": []})
    assert status == 200 and load["done_reason"] == "load" and load["message"]["content"] == ""
    # one model is served: any name selects it (an app set up for an ollama model works unchanged)
    status, other = server.post("/api/generate", {"model": "llama3.2", "prompt": PROMPT, "options": GREEDY,
                                                  "stream": False})
    assert status == 200 and other["model"] == "llama3.2" and other["response"] == answer


def test_options_map_to_sampling(server):
    msgs = [{"role": "user", "content": PROMPT}]
    status, r = server.post("/api/chat", {"messages": msgs, "stream": False, "options": {"num_predict": 3}})
    assert status == 200 and r["eval_count"] <= 3
    status, a = server.post("/api/chat", {"messages": msgs, "stream": False,
                                          "options": {"num_predict": 8, "seed": 7, "temperature": 1.0,
                                                      "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1,
                                                      "num_ctx": 2048, "num_thread": 2}})
    status2, b = server.post("/api/chat", {"messages": msgs, "stream": False,
                                           "options": {"num_predict": 8, "seed": 7, "temperature": 1.0,
                                                       "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}})
    assert status == status2 == 200 and a["message"]["content"] == b["message"]["content"]   # seeded
    status, r = server.post("/api/chat", {"messages": msgs, "stream": False, "options": {"seed": -1, "num_predict": -1,
                                                                                       "num_ctx": 60}})
    assert status == 200 and r["prompt_eval_count"] + r["eval_count"] <= 60      # a smaller num_ctx: a smaller budget
    # a stop string cuts the answer and is never sent
    full = server.post("/api/generate", {"prompt": PROMPT, "stream": False, "options": GREEDY})[1]["response"]
    cut = full.strip()[3:6]
    if cut.strip():
        r = server.post("/api/generate", {"prompt": PROMPT, "stream": False, "options": {**GREEDY, "stop": [cut]}})[1]
        assert cut not in r["response"] and full.startswith(r["response"]) and r["done_reason"] == "stop"


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", {"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/api/generate", {"model": ["x"], "prompt": "x"}, 400, "model"),
    ("/api/show", {"name": 1}, 400, "name"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "options": [1]}, 400, "options"),
    ("/api/chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "images"),
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("/api/generate", {"prompt": "x", "format": "json"}, 400, "format"),
    ("/api/generate", {"prompt": 5}, 400, "prompt"),
    ("/api/generate", {"prompt": "x", "context": [-1]}, 400, "context"),
])
def test_ollama_errors_are_ollamas_shape(server, path, body, status, words):
    got, r = server.post(path, body)
    assert got == status and isinstance(r["error"], str) and words in r["error"], r


def test_curl_style_request_without_json_content_type(server, store):
    """ollama's docs use `curl -d '{...}'`, which sends application/x-www-form-urlencoded: answered,
    and answered: only a browser (which sends Origin) must send JSON's Content-Type."""
    body = json.dumps({"model": store.name, "prompt": PROMPT, "stream": False, "options": {"num_predict": 2}})
    status, _, text = server.raw("POST", "/api/generate", body, content_type="application/x-www-form-urlencoded")
    assert status == 200 and json.loads(text)["done"] is True, text


def test_ndjson_reframes_events():
    async def events():
        yield ": keep-alive\n\n"
        yield 'data: {"a": 1}\n\n'
        yield b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
        yield "data: [DONE]\n\n"

    async def collect():
        return [x async for x in ndjson(events())]
    assert asyncio.run(collect()) == ['{"a": 1}\n', '{"error": "boom"}\n']


# ---- ollama: models -------------------------------------------------------------------------------
def test_tags_show_ps_version(server, store, loaded):
    status, tags = server.get("/api/tags")
    assert status == 200
    (m,) = tags["models"]
    assert m["name"] == m["model"] == store.name + ":latest" and m["size"] > 0 and len(m["digest"]) == 64
    d = m["details"]
    assert d["family"] == "bailing_moe" and d["quantization_level"] == "Q4" and d["parameter_size"]
    datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00"))

    for key in ("model", "name"):                                                  # new and old clients
        status, show = server.post("/api/show", {key: m["name"]})
        assert status == 200 and show["details"] == d and show["template"] == loaded[1].chat_template
    info = show["model_info"]
    assert info["general.architecture"] == "bailing_moe" and info["general.parameter_count"] > 0
    assert info["bailing_moe.expert_count"] == loaded[0].config.num_experts
    assert f"num_ctx {CTX}" in show["parameters"] and "completion" in show["capabilities"]

    status, ps = server.get("/api/ps")
    assert status == 200 and ps["models"][0]["name"] == m["name"] and ps["models"][0]["size"] > 0
    assert ps["models"][0]["context_length"] == CTX
    status, v = server.get("/api/version")
    assert status == 200 and isinstance(v["version"], str)


# ---- llama-server ---------------------------------------------------------------------------------
def test_tokenize_detokenize_round_trip(server, loaded):
    tok = loaded[1]
    text = "Headache: rest, water & ibuprofen?"
    status, r = server.post("/tokenize", {"content": text})
    assert status == 200 and r["tokens"] == tok.encode(text, add_bos=False)
    status, back = server.post("/detokenize", {"tokens": r["tokens"]})
    assert status == 200 and back == {"content": text}
    status, with_bos = server.post("/tokenize", {"content": text, "add_special": True})
    if tok.bos_token_id is not None:
        assert with_bos["tokens"] == [tok.bos_token_id] + r["tokens"]
    status, pieces = server.post("/tokenize", {"content": text, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == r["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]) == text
    assert server.post("/detokenize", {"tokens": [10 ** 9]})[0] == 400
    assert server.post("/tokenize", {"content": 5})[0] == 400
    assert server.post("/tokenize", {"content": "x", "with_pieces": "yes"})[0] == 400


def test_slots_idle_and_busy(server):
    status, slots = server.get("/slots")
    assert status == 200 and len(slots) == 2
    for i, s in enumerate(slots):
        assert s["id"] == i and s["n_ctx"] == CTX and s["is_processing"] is False
        assert {"temperature", "top_p", "top_k", "seed", "n_predict"} <= set(s["params"])
    assert server.get("/slots?fail_on_no_slot=1")[0] == 200
    # a long stream: while it runs, one slot is busy with its job
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/api/generate", body=json.dumps({"prompt": "Tell me everything about migraines.", "raw": True,
                                                        "options": {"temperature": 1.0, "seed": 1}}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first = json.loads(r.readline())
    try:
        status, slots = server.get("/slots")
        busy = [s for s in slots if s["is_processing"]]
        if not first["done"] and busy:                        # (not finished already: it runs to the context)
            (s,) = busy
            assert s["next_token"]["n_decoded"] >= 1 and s["params"]["temperature"] == 1.0 and s["params"]["seed"] == 1
            assert s["n_cached"] > 0
    finally:
        c.close()                                              # the client goes away: the slot is freed
    t0 = time.time()
    while any(s["is_processing"] for s in server.get("/slots")[1]):
        assert time.time() - t0 < 5
        time.sleep(0.05)


def test_props(server, store, loaded):
    status, p = server.get("/props")
    assert status == 200
    assert p["model_path"] == str(store) and p["total_slots"] == 2
    assert p["default_generation_settings"]["n_ctx"] == CTX
    assert p["chat_template"] == loaded[1].chat_template and p["build_info"].startswith("amed ")
    mem = p["memory"]
    assert mem["rss_bytes"] > 0 and mem["kv_cache_bytes"] > 0 and mem["device"] == "cpu"


# ---- amed ps --------------------------------------------------------------------------------------
def amed(*args, home, timeout=60):
    return subprocess.run([sys.executable, "-m", "amed", *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, "AMED_HOME": str(home)}, stdin=subprocess.DEVNULL)


def test_amed_ps_against_a_running_server(store, tmp_path):
    home = tmp_path / "home"
    run = home / "run"
    run.mkdir(parents=True)
    (run / "serve-999999999.json").write_text(json.dumps({"pid": 999999999, "host": "127.0.0.1", "port": 1}))
    r = amed("ps", home=home)                            # a stale file (its process is gone) is dropped
    assert r.returncode == 0 and "no amed server is running" in r.stderr and not list(run.iterdir())

    p, port = helpers.start_amed_serve(store, "-np", "2", "-c", "128", env={**ENV, "AMED_HOME": str(home)},
                                       stdout=subprocess.DEVNULL, ready_within=90)
    try:
        assert (run / f"serve-{p.pid}.json").is_file()
        r = amed("ps", "--json", home=home)
        assert r.returncode == 0, r.stderr
        (row,) = json.loads(r.stdout)
        assert row["pid"] == p.pid and row["port"] == port and row["model"] == store.name
        assert row["status"] == "ready" and row["total_slots"] == 2 and row["slots_busy"] == 0
        assert row["memory"]["rss_bytes"] > 0 and row["model_path"] == str(store)
        r = amed("ps", home=home)
        assert r.returncode == 0 and str(p.pid) in r.stdout and store.name in r.stdout and "0/2" in r.stdout
        assert "ready" in r.stdout and "Traceback" not in r.stderr
    finally:
        p.send_signal(2)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert not (run / f"serve-{p.pid}.json").exists()      # removed on exit
    r = amed("ps", home=home)
    assert "no amed server is running" in r.stderr
