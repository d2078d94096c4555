#!/usr/bin/env python3
"""amed vs llama.cpp on the same weights: `amed bench` and `llama-bench`, one after the other.

Pairs: amed int4 store vs GGUF Q4_0 (`q4`), amed int8 store vs GGUF Q8_0 (`q8`), and amed int4 with
`--dense q4` vs Q4_0 (`q4m`: the same bytes per token as Q4_0, which keeps everything in 4-bit but
its output in Q6_K), all made from one checkpoint (default: the 4-layer flash-shaped synthetic one
under ~/.cache/amed/bench). Prints a Markdown table of prefill (ppN) and decode (tgN) t/s and the
ratios amed / llama.cpp.

    python bench/compare_llamacpp.py -p 64 -n 32 -r 5 -t 2 --rounds 3
    python bench/compare_llamacpp.py --name flash-32-e32 -t 1,2 --rounds 3   # real per-token shape, scaling

--name NAME picks the inputs DIR/NAME-q4, NAME-q8, NAME-q4-dq4 (amed stores) and NAME-q4_0.gguf,
NAME-q8_0.gguf (default NAME flash-4; DIR is $AMED_BENCH_DIR or ~/.cache/amed/bench); any
checkpoint works: make its stores and GGUFs under those names, or pass the paths one by one.
The real per-token shape (32 layers, top-8 of 32 experts, AntAngelMed's widths) fits in RAM here:
    amed synth CKPT --preset flash --layers 32 --experts 32        # ~31 GB bf16 (for the GGUFs)
    amed quantize CKPT -o DIR/flash-32-e32-q4 --bits 4             # or `amed synth ... --bits 4`
-t takes a list (1,2,4): each pair runs at every thread count, and the table adds each tool's
speed-up over the first count. Every round runs llama.cpp then amed (A B A B ...); the ratios of
each round are printed, and the table gives their median.

llama-bench is found via --llama-bench, $LLAMA_BENCH or PATH; without it only amed runs.
To get llama.cpp (outside this repo): a llama.cpp checkout, or the copy vendored in the
llama-cpp-python sdist (`pip download --no-binary :all: --no-deps llama-cpp-python`, unpack,
vendor/llama.cpp), then

    cmake -S LLAMA_SRC -B /tmp/llamacpp-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
          -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build /tmp/llamacpp-build --target llama-bench llama-quantize -j2

Making the inputs (all from the bf16 checkpoint CKPT):
    amed quantize CKPT -o DIR/flash-4-q4 --bits 4 ; amed quantize CKPT -o DIR/flash-4-q8 --bits 8
    amed quantize CKPT -o DIR/flash-4-q4-dq4 --bits 4 --dense q4          # for --pairs q4m
    python bench/compare_llamacpp.py --convert CKPT --llama-src LLAMA_SRC --python VENV/bin/python
The last runs llama.cpp's own convert_hf_to_gguf.py (--outtype q8_0, so no bf16 GGUF is written)
and then `llama-quantize --allow-requantize Q8_0 -> Q4_0`. VENV needs torch, numpy, transformers,
sentencepiece, safetensors (llama.cpp's requirements-convert_hf_to_gguf.txt). Workaround: the
converter hashes the tokenizer's pre-tokenizer output and refuses hashes it does not know (the
synthetic byte-level BPE tokenizer is not the real Ling one), so we patch
TextModel.get_vocab_base_pre to return "bailingmoe2" (what the real Ling-2.0 tokenizer maps to).
That only sets the GGUF's tokenizer.ggml.pre string; the weights are converted untouched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

DIR = Path(os.environ.get("AMED_BENCH_DIR") or Path.home() / ".cache/amed/bench")

CONVERT = """import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as b  # see the module docstring: the weights are not touched
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "bailingmoe2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed(cmd: list[str], out: Path) -> None:
    """Run cmd (which writes out) under /usr/bin/time -v, if there, and print its wall time and peak RSS."""
    print("+", " ".join("<convert with the tokenizer patch>" if c == CONVERT else str(c) for c in cmd),
          file=sys.stderr, flush=True)
    gnu_time = Path("/usr/bin/time").exists()
    p = subprocess.run((["/usr/bin/time", "-v"] if gnu_time else []) + cmd, stderr=subprocess.PIPE, text=True)
    lines = p.stderr.splitlines()
    keep = lines[-40:] if p.returncode else [x for x in lines if "Elapsed" in x or "Maximum resident" in x]
    print("\n".join(keep), file=sys.stderr)
    if p.returncode:
        out.unlink(missing_ok=True)
        sys.exit(f"failed: {cmd[0]}")


def convert(a, bench_bin: str | None) -> None:
    if not a.llama_src:
        sys.exit("--convert needs --llama-src (a llama.cpp source tree with convert_hf_to_gguf.py)")
    quantize = shutil.which("llama-quantize") or (bench_bin and str(Path(bench_bin).with_name("llama-quantize")))
    if not quantize or not Path(quantize).exists():
        sys.exit("llama-quantize not found (put it on PATH or next to llama-bench)")
    if not a.gguf_q8.exists():
        timed([a.python, "-c", CONVERT, a.llama_src, str(a.convert), "--outtype", "q8_0", "--outfile", str(a.gguf_q8)],
              a.gguf_q8)
    if not a.gguf_q4.exists():
        timed([quantize, "--allow-requantize", str(a.gguf_q8), str(a.gguf_q4), "Q4_0", str(a.threads)], a.gguf_q4)


def llama_bench(bin_: str, gguf: Path, a) -> dict[str, float]:
    cmd = [bin_, "-m", str(gguf), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r), "-t", str(a.threads), "-o", "json"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    rows = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout)
    return {("pp" if r["n_prompt"] else "tg"): (r["avg_ts"], statistics.median(r["samples_ts"])) for r in rows}


def amed_bench(store: Path, a) -> dict[str, float]:
    cmd = ["amed", "bench", "-m", str(store), "-p", str(a.p), "-n", str(a.n), "-r", str(a.r),
           "-t", str(a.threads), "-o", "json"]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    rows = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout)
    return {r["test"][:2]: (r["tps_mean"], r["tps_median"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="flash-4", help="input name under DIR (see the top of this file)")
    ap.add_argument("--amed-q4", type=Path)
    ap.add_argument("--amed-q8", type=Path)
    ap.add_argument("--amed-q4m", type=Path)
    ap.add_argument("--gguf-q4", type=Path)
    ap.add_argument("--gguf-q8", type=Path)
    ap.add_argument("--pairs", default="q4,q8",
                    help="pairs to run: q4 (amed int4 vs Q4_0), q8 (int8 vs Q8_0), q4m (int4 with "
                         "--dense q4 vs Q4_0: equal bytes per token)")
    ap.add_argument("-p", type=int, default=64, help="prompt tokens (ppN)")
    ap.add_argument("-n", type=int, default=32, help="generated tokens (tgN)")
    ap.add_argument("-r", type=int, default=3, help="repetitions")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the two tools this many times; the ratio is the median of the "
                         "rounds' ratios (a shared machine's speed drifts between runs)")
    ap.add_argument("-t", "--threads", default=str(os.cpu_count()), help="thread counts, comma-separated")
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"))
    ap.add_argument("--convert", type=Path, metavar="CKPT", help="make the missing GGUFs from this HF checkpoint")
    ap.add_argument("--llama-src", help="llama.cpp source tree (for --convert)")
    ap.add_argument("--python", default=sys.executable, help="python with the converter's deps (for --convert)")
    a = ap.parse_args()
    for attr, suffix in (("amed_q4", "-q4"), ("amed_q8", "-q8"), ("amed_q4m", "-q4-dq4"),
                         ("gguf_q4", "-q4_0.gguf"), ("gguf_q8", "-q8_0.gguf")):
        if getattr(a, attr) is None:
            setattr(a, attr, DIR / f"{a.name}{suffix}")
    try:
        counts = [int(t) for t in str(a.threads).split(",") if t.strip()]
    except ValueError:
        ap.error(f"-t takes comma-separated integers, not {a.threads!r}")
    a.threads = counts[0]
    pairs = [x for x in a.pairs.split(",") if x]
    if not set(pairs) <= {"q4", "q8", "q4m"}:
        ap.error("--pairs takes a list of q4, q8, q4m (or '' with --convert to only convert)")
    if a.convert:
        convert(a, a.llama_bench)
    if not a.llama_bench:
        print("llama-bench not found: running amed only. To compare, build llama.cpp's llama-bench "
              "(see the top of this file) and pass --llama-bench PATH or set $LLAMA_BENCH.", file=sys.stderr)

    # means (what both tools print) and medians (robust to the stalls of a shared machine)
    table = ["| pair | threads | test | amed t/s mean / median | llama.cpp t/s mean / median "
             "| amed / llama.cpp mean / median | speed-up amed / llama.cpp |",
             "|---|---:|---|---:|---:|---:|---:|"]
    med = statistics.median
    for pair in pairs:
        store, gguf = {"q4": (a.amed_q4, a.gguf_q4), "q8": (a.amed_q8, a.gguf_q8),
                       "q4m": (a.amed_q4m, a.gguf_q4)}[pair]
        name = f"amed {store.name} vs {gguf.name}"
        if not store.exists():
            print(f"skipping {pair}: no amed store at {store}", file=sys.stderr)
            continue
        if a.llama_bench and not gguf.exists():
            print(f"no GGUF at {gguf} (make it with --convert CKPT --llama-src SRC)", file=sys.stderr)
        first = {}                          # (tool, test) -> median t/s at the first thread count
        for threads in counts:
            a.threads = threads
            rounds = []                     # (ours, theirs) per round, each {test: (mean, median)}
            for i in range(max(1, a.rounds)):
                theirs = llama_bench(a.llama_bench, gguf, a) if a.llama_bench and gguf.exists() else {}
                ours = amed_bench(store, a)
                rounds.append((ours, theirs))
                ratios = ", ".join(f"{t} {ours[t][1] / theirs[t][1]:.2f}x" for t in ("pp", "tg")
                                   if t in ours and t in theirs)
                print(f"round {i + 1}, {threads} threads, {pair}: amed "
                      + ", ".join(f"{t} {v[1]:.2f}" for t, v in ours.items())
                      + ("; llama.cpp " + ", ".join(f"{t} {v[1]:.2f}" for t, v in theirs.items())
                         + f"; ratios (medians) {ratios}" if theirs else ""), file=sys.stderr)
            for t, n in (("pp", a.p), ("tg", a.n)):
                us = [r[0][t] for r in rounds if t in r[0]]
                them = [r[1][t] for r in rounds if t in r[1]]
                cells = [f"{med(u[0] for u in us):.2f} / {med(u[1] for u in us):.2f}" if us else "-",
                         f"{med(x[0] for x in them):.2f} / {med(x[1] for x in them):.2f}" if them else "-"]
                if us and them and len(us) == len(them):
                    cells.append(f"{med(u[0] / x[0] for u, x in zip(us, them)):.2f}x / "
                                 f"{med(u[1] / x[1] for u, x in zip(us, them)):.2f}x")
                else:
                    cells.append("-")
                ups = []
                for tool, vals in (("amed", us), ("llama", them)):
                    if vals:
                        v = med(x[1] for x in vals)
                        first.setdefault((tool, t), v)
                        ups.append(f"{v / first[(tool, t)]:.2f}x")
                    else:
                        ups.append("-")
                cells.append(" / ".join(ups))
                table.append(f"| {name} | {threads} | {t}{n} | " + " | ".join(cells) + " |")
    if len(table) > 2:
        print(f"\nthreads {','.join(map(str, counts))}, {a.r} repetitions, {a.rounds} round(s)\n\n"
              + "\n".join(table))

if __name__ == "__main__":
    main()
