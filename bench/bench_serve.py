"""`amed serve` under N concurrent clients: aggregate decode tokens/s and per-client latency.

Starts `amed serve` in a subprocess (default: the 4-layer flash store that
`amed bench --synthetic flash --layers 4` builds once), then for each N in --clients sends N
streaming chat requests at the same moment (different prompts, `ignore_eos` so each generates
exactly -n tokens) and measures:

    aggregate decode t/s   the engine's own count over the run (decode tokens / seconds spent in
                           batched decode steps, from /stats): what batching buys
    end-to-end t/s         all generated tokens / wall time from the first send to the last token
                           (prefill and HTTP included)
    TTFT, client t/s       per client: time to first token (queued + prefill, as the server
                           measured it), and its own decode rate

and prints the ratio aggregate(N)/aggregate(1). Medians over -r repetitions after a warm-up.

    python bench/bench_serve.py                        # N = 1, 2, 4; 32 tokens per client
    python bench/bench_serve.py -m STORE --clients 1,2,4,8 -n 64 -r 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["What helps a headache?", "Is a fever of 39 C dangerous for an adult?",
           "How much water should I drink each day?", "What are the signs of dehydration?",
           "When should a cough be checked by a doctor?", "How do I treat a minor burn?",
           "What causes high blood pressure?", "Is it safe to take ibuprofen every day?"]


def request(port, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST" if body else "GET", path, body=json.dumps(body) if body else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    c.close()
    return r.status, data


def stream(port, prompt, n, out, start):
    """One client: a streaming chat completion; records send, first-token and end times."""
    start.wait()
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
         "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}))
    r = c.getresponse()
    first, usage, timings = None, None, None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("timings"):
            timings = chunk["timings"]
        if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    c.close()
    out.append(dict(t0=t0, first=first, end=time.perf_counter(), tokens=usage["completion_tokens"],
                    timings=timings))


def run(port, clients, n):
    before = request(port, "/stats")[1]
    out, start = [], threading.Event()
    threads = [threading.Thread(target=stream, args=(port, PROMPTS[i % len(PROMPTS)], n, out, start))
               for i in range(clients)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    after = request(port, "/stats")[1]
    tokens = after["completion_tokens"] - before["completion_tokens"]
    assert tokens == clients * n, (tokens, clients, n)
    wall = max(o["end"] for o in out) - min(o["t0"] for o in out)
    d = {k: after[k] - before[k] for k in ("decode_tokens", "decode_seconds", "decode_steps")}
    return dict(
        aggregate=d["decode_tokens"] / d["decode_seconds"],
        end_to_end=tokens / wall,
        ttft=statistics.median((o["timings"]["queued_ms"] + o["timings"]["prompt_ms"]) / 1e3 for o in out),
        client_tps=statistics.median(o["timings"]["predicted_per_second"] for o in out),
        batch=d["decode_tokens"] / d["decode_steps"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", help="store (default: the synthetic flash store with --layers layers)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clients", default="1,2,4", help="comma-separated client counts")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="tokens each client generates")
    ap.add_argument("-r", "--reps", type=int, default=2)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    if args.model:
        store = Path(args.model)
    else:
        from rich.console import Console

        from amed.app.bench import synthetic_store
        store = synthetic_store("flash", args.layers, 4, Console(stderr=True))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "amed", "serve", "-m", str(store), "--port", str(port),
           "-np", str(max(counts)), "-c", "1024"] + (["-t", str(args.threads)] if args.threads else [])
    server = subprocess.Popen(cmd)
    try:
        t0 = time.time()
        while True:
            try:
                if request(port, "/health")[0] == 200:
                    break
            except (OSError, json.JSONDecodeError):
                pass
            if server.poll() is not None or time.time() - t0 > 600:
                sys.exit("the server did not start")
            time.sleep(0.5)
        print(f"store {store}, {args.n_gen} tokens per client, {args.reps} reps (median), "
              f"clients {counts}", file=sys.stderr)
        run(port, max(counts), 4)                                # warm-up: compile, page in
        rows = {}
        for rep in range(args.reps):
            for n in counts:                                     # interleaved: drift hits all alike
                rows.setdefault(n, []).append(run(port, n, args.n_gen))
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}
        base = med[counts[0]]["aggregate"]
        print("| clients | aggregate decode t/s | x single | end-to-end t/s | mean batch | TTFT s | per-client t/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in counts:
            m = med[n]
            print(f"| {n} | {m['aggregate']:.2f} | {m['aggregate'] / base:.2f} | {m['end_to_end']:.2f} | "
                  f"{m['batch']:.2f} | {m['ttft']:.2f} | {m['client_tps']:.2f} |")
        if 4 in med and 1 in med:
            print(f"\naggregate(4)/single = {med[4]['aggregate'] / med[1]['aggregate']:.2f}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
