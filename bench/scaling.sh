#!/usr/bin/env bash
# Thread scaling of decode and prefill on AntAngelMed's per-layer shape, for a machine with more
# cores than the 2-vCPU development VM (e.g. the 16-core GPU machine). One prepared run, < 8 min.
#   bash bench/scaling.sh [THREADS=1,2,4,8,16] [LAYERS=8]
# Builds (once) a random int4 store with the real widths and top-8 of 32 experts per layer
# (`amed synth --preset flash --layers LAYERS --experts 32 --bits 4`, ~0.35 GB per layer), then
# `amed bench -t THREADS`: prefill pp64 and decode tg32, medians of 3, and each count's speed-up.
# With $LLAMA_BENCH and $GGUF set (the same weights as a GGUF: bench/README.md), llama-bench runs
# the same thread counts right after, for the speed-up ratio against llama.cpp's.
# Writes everything to $OUT (default ./scaling-out): the JSON rows, the table, machine facts.
set -euo pipefail
THREADS="${1:-1,2,4,8,16}"; LAYERS="${2:-8}"
OUT="${OUT:-scaling-out}"; mkdir -p "$OUT"
DIR="${AMED_BENCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/amed/bench}"
STORE="$DIR/synthetic-flash-$LAYERS-e32-q4"
PY="${PYTHON:-python3}"
{ nproc; lscpu | grep -E "Model name|Socket|Core|Thread|NUMA node\(s\)|L3"; free -g | head -2; } > "$OUT/machine.txt" 2>&1 || true
cat "$OUT/machine.txt"
$PY -c "import amed" 2>/dev/null || $PY -m pip install -q -e ".[dev]"
if [ ! -f "$STORE/amed-manifest.json" ] || ! grep -q '"complete": true' "$STORE/amed-manifest.json"; then
  /usr/bin/time -f "synth: %e s wall, %M KB peak RSS" \
    $PY -m amed synth "$STORE" --preset flash --layers "$LAYERS" --experts 32 --bits 4 --force 2>&1 | tail -2
fi
# the kernels compile once (untimed by the bench itself; this keeps the first count fair too)
$PY -m amed bench -m "$STORE" -p 8 -n 4 -r 1 -t 1 > /dev/null 2>&1 || true
$PY -m amed bench -m "$STORE" -p 64 -n 32 -r 3 -t "$THREADS" -o json > "$OUT/amed.json"
if [ -n "${LLAMA_BENCH:-}" ] && [ -n "${GGUF:-}" ]; then
  "$LLAMA_BENCH" -m "$GGUF" -p 64 -n 32 -r 3 -t "$THREADS" -o json > "$OUT/llama.json"
fi
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = json.loads((out / "amed.json").read_text())
lines = ["| tool | threads | test | t/s median | speed-up |", "|---|---:|---|---:|---:|"]
first = {}
for r in rows:
    t = r["test"][:2]
    first.setdefault(t, r["tps_median"])
    lines.append(f"| amed | {r['threads']} | {r['test']} | {r['tps_median']:.2f} | {r['tps_median'] / first[t]:.2f}x |")
if (out / "llama.json").exists():
    first = {}
    for r in json.loads((out / "llama.json").read_text()):
        t = "pp" if r["n_prompt"] else "tg"
        v = sorted(r["samples_ts"])[len(r["samples_ts"]) // 2]
        first.setdefault(t, v)
        lines.append(f"| llama.cpp | {r['n_threads']} | {t}{r['n_prompt'] or r['n_gen']} | {v:.2f} | {v / first[t]:.2f}x |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
