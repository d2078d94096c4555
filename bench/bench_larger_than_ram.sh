#!/usr/bin/env bash
# A model larger than RAM: a flash-shaped int4 store (real widths; each MoE layer ~1.87 GB) decoded
# under --max-ram, with prefetch on vs off, then a one-shot chat under /usr/bin/time (peak RSS).
#   bash bench/bench_larger_than_ram.sh [LAYERS=17] [MAX_RAM=16G] [TOKENS=64]
# 17 layers = ~31 GB of store (needs that much free disk; ~25 min to write on 2 cores).
# AMED_BENCH_KEEP=1 keeps the store afterwards (default: deleted, disk is usually shared).
set -euo pipefail
LAYERS="${1:-17}"; MAX_RAM="${2:-16G}"; N="${3:-64}"
DIR="${AMED_BENCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/amed/bench}"
STORE="$DIR/flash-$LAYERS-q4"
mkdir -p "$DIR"
echo "RAM: $(free -g | awk '/Mem:/{print $2}') GiB; disk free: $(df -h "$DIR" | awk 'NR==2{print $4}')"
if [ ! -f "$STORE/amed-manifest.json" ] || ! grep -q '"complete": true' "$STORE/amed-manifest.json"; then
  /usr/bin/time -f "synth: %e s wall, %M KB peak RSS" \
    amed synth "$STORE" --preset flash --layers "$LAYERS" --bits 4 --force 2>&1 | tail -3
fi
du -sh "$STORE"

# Decode with the expert cache bounded by MAX_RAM: prefetch + look-ahead, prefetch alone, none,
# side by side, each from a cold page cache (--cold) so that no variant reads what another left.
# --random-ids: random decode tokens, the most varied routing (worst case for any cache).
amed bench -m "$STORE" -p 16 -n "$N" -r 1 --max-ram "$MAX_RAM" --prefetch on,off --lookahead auto,off \
  --cold --random-ids
# The same without --cold, run twice: the second run finds its working set in RAM (in-RAM speed).
amed bench -m "$STORE" -p 16 -n "$N" -r 1 --max-ram "$MAX_RAM" --prefetch on,on 2>/dev/null | tail -3

# One-shot chat: peak RSS as the kernel saw it.
echo "Explain the management of an acute myocardial infarction." |
  /usr/bin/time -f "chat: %e s wall, %M KB peak RSS" \
    amed chat -m "$STORE" -n "$N" --temp 0 --max-ram "$MAX_RAM" -v > /dev/null

if [ "${AMED_BENCH_KEEP:-0}" != 1 ]; then rm -rf "$STORE"; fi
