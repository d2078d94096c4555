#!/usr/bin/env bash
# The main job end to end, no download: the small BailingMoeV2 trained here on ICD-10-CM text
# (tests/data/trained, AntAngelMed's routing geometry; `make trained` rebuilds it), quantized to
# int4, one chat answer (greedy: the same words every run), and a benchmark. Reuses what an
# earlier run built.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CKPT="$REPO/tests/data/trained"
# under $AMED_HOME/demo (default ~/.cache/amed/demo), where `amed list` looks: afterwards
# `amed list` shows trained-q4, and `amed chat -m trained-q4` finds the store by name.
DIR="${AMED_DEMO_DIR:-$(python3 -c 'from amed.hub import amed_home; print(amed_home())')/demo}"
STORE="$DIR/trained-q4"
mkdir -p "$DIR"
# re-quantize when the checkpoint changed (a retrained model) or the store is unfinished
SRC="$(sha256sum "$CKPT/model.safetensors" | cut -d' ' -f1)"
if [ "$(cat "$STORE.source" 2>/dev/null || true)" != "$SRC" ] || \
   ! python3 -c "import json,sys; sys.exit(0 if json.load(open('$STORE/amed-manifest.json'))['complete'] else 1)" 2>/dev/null; then
  amed quantize "$CKPT" -o "$STORE" --bits 4 --force
  echo "$SRC" > "$STORE.source"
fi
echo "--- one-shot chat (a 7M-parameter model trained on the ICD-10-CM code list: not medical advice) ---" >&2
for q in "What is the ICD-10-CM code for essential (primary) hypertension?" \
         "What does ICD-10-CM code J45.909 mean?"; do
  echo "> $q" >&2
  amed chat -m "$STORE" -p "$q" -n 40 --temp 0 --repeat-penalty 1.0
done
echo "--- benchmark ---" >&2
amed bench -m "$STORE" -p 64 -n 32 -r 3
echo "--- the models on this computer (amed list) ---" >&2
amed list
