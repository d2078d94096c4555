#!/usr/bin/env bash
# The main job end to end on a built-in default: a small RANDOM-WEIGHT model (no download),
# quantized to int4, one chat answer, and a benchmark. Reuses what an earlier run built.
set -euo pipefail
# under $AMED_HOME/demo (default ~/.cache/amed/demo), where `amed list` looks: afterwards
# `amed list` shows tiny-bf16 and tiny-q4, and `amed chat -m tiny-q4` finds the store by name.
DIR="${AMED_DEMO_DIR:-$(python3 -c 'from amed.hub import amed_home; print(amed_home())')/demo}"
CKPT="$DIR/tiny-bf16"
STORE="$DIR/tiny-q4"
mkdir -p "$DIR"
if [ ! -f "$CKPT/model.safetensors.index.json" ]; then
  amed synth "$CKPT" --preset tiny --force
fi
if ! python3 -c "import json,sys; sys.exit(0 if json.load(open('$STORE/amed-manifest.json'))['complete'] else 1)" 2>/dev/null; then
  amed quantize "$CKPT" -o "$STORE" --bits 4
fi
echo "--- one-shot chat (random weights: the answer is noise) ---" >&2
amed chat -m "$STORE" -p "What are the warning signs of a stroke?" -n 40 --seed 0 -v
echo "--- benchmark ---" >&2
amed bench -m "$STORE" -p 64 -n 32 -r 3
echo "--- the models on this computer (amed list) ---" >&2
amed list
