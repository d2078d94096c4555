#!/usr/bin/env bash
# Quantize a flash-shaped synthetic checkpoint (real widths: hidden 4096, 256 experts x 1024,
# vocab 157184) and report wall time and peak RSS of `amed quantize`.
#   bash bench/bench_quantize.sh [LAYERS=4] [BITS=4]      (needs ~22 GB + ~7 GB of disk for 4 layers)
set -euo pipefail
LAYERS="${1:-4}"; BITS="${2:-4}"
DIR="${AMED_BENCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/amed/bench}"
SRC="$DIR/flash-$LAYERS"; DST="$DIR/flash-$LAYERS-q$BITS"
mkdir -p "$DIR"
if [ ! -f "$SRC/model.safetensors.index.json" ]; then
  /usr/bin/time -f "synth: %e s wall, %M KB peak RSS" amed synth "$SRC" --preset flash --layers "$LAYERS" --force
fi
rm -rf "$DST"
/usr/bin/time -f "quantize: %e s wall, %M KB peak RSS" amed quantize "$SRC" -o "$DST" --bits "$BITS" 2>&1 | tail -20
du -sh "$SRC" "$DST"
