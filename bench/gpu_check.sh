#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one go, sized for one device call (under 10 minutes, every step
# with its own timeout, 580 s at the most; about 6 minutes expected on a 16-core machine with an H100):
#   1. make amed importable with what the machine has: the lent GPU machines have no internet but
#      carry numba, numba-cuda, numpy, typer, rich, safetensors, tokenizers, jinja2 and pytest, so
#      amed installs without dependencies (or runs from the tree through PYTHONPATH);
#   2. run tests/test_cuda.py on the GPU (NUMBA_ENABLE_CUDASIM=0: the same tests the simulator runs in CI);
#   3. decode/prefill t/s on a 4-layer synthetic flash store (AntAngelMed's per-token shape, top-8 of
#      64 experts: 1.7 GB): CPU only, then --device cuda with 0 and all experts in VRAM (side by side
#      on this machine); then pp512 with the prefill's experts forced to the CPU and forced to the
#      GPU (AMED_GPU_PREFILL; the default "auto" above times both and should match the faster)
#      (each bench reports "kernel compile/load before timing": the first compiles the CUDA kernels,
#      later ones should load them from the cache);
#   4. each quantized GEMV kernel's GB/s on flash-sized matrices against the card's memory bandwidth.
# Not yet run on a GPU (no session had one): expect to fix things. Output: $OUT/gpu_check.out
# (device runs) or bench/gpu_check.out.
#   run:  bash bench/gpu_check.sh          (from the repository root; PY=python3 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench}/gpu_check.out
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

PY=${PY:-python3}
export PYTHONUNBUFFERED=1

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
$PY - <<'PY' || exit 1
import amed, numba, numba_cuda
from numba import cuda
d = cuda.get_current_device()
print("amed", amed.__version__, "numba", numba.__version__, "numba-cuda", numba_cuda.__version__,
      "device", d.name, "cc", d.compute_capability)
PY

step "GPU tests (real hardware)"
NUMBA_ENABLE_CUDASIM=0 timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py

SYN="--synthetic flash --layers 4 --experts 64 --bits 4"
step "synthetic flash store, 4 layers, 64 experts (built once, cached under \$AMED_HOME/bench)"
timeout 150 $PY -m amed bench $SYN -p 8 -n 2 -r 1 >/dev/null
for dev in "--device cpu" "--device cuda --gpu-experts 0" "--device cuda --gpu-experts auto"; do
  step "bench $dev"
  timeout 50 $PY -m amed bench $SYN -p 512 -n 32 -r 2 $dev
done
for mode in cpu gpu; do
  step "bench --device cuda --gpu-experts 0, AMED_GPU_PREFILL=$mode"
  AMED_GPU_PREFILL=$mode timeout 35 $PY -m amed bench $SYN -p 512 -n 0 -r 2 --device cuda --gpu-experts 0
done

step "GEMV GB/s (one token, 4096 x 4096 and 157184 x 4096 lm_head-sized)"
timeout 45 $PY - <<'PY'
import time, subprocess
import numpy as np
from numba import cuda
from amed.engine.backends.cuda import CUDABackend
from amed.quant.formats import quantize
B = CUDABackend()
try:
    clk = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True).stdout.split()[0])
except Exception:
    clk = 0.0
attrs = cuda.get_current_device()
bus = getattr(attrs, "GLOBAL_MEMORY_BUS_WIDTH", 0)
peak = 2 * clk * 1e6 * bus / 8 / 1e9 if clk and bus else float("nan")
print(f"theoretical memory bandwidth {peak:.0f} GB/s (2 x {clk:.0f} MHz x {bus} bit)")
rng = np.random.default_rng(0)
for fmt, layout, shape in [("q4", "r8", (4096, 4096)), ("q8", "r8", (4096, 4096)), ("q4", "rows", (4096, 4096)),
                           ("q6", "rows", (4096, 4096)), ("q6", "rows", (16384, 4096))]:
    w = rng.standard_normal(shape).astype(np.float32)
    qt = quantize(w, fmt, 64, method="naive", layout=layout)
    lin = B.linear(qt)
    x = B.to_device(rng.standard_normal((1, shape[1])).astype(np.float32))
    out = B.empty((1, shape[0]))
    for _ in range(3):
        lin.matmul(x, out)
    cuda.synchronize()
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        lin.matmul(x, out)
    cuda.synchronize()
    s = (time.perf_counter() - t) / n
    gbs = lin.nbytes / s / 1e9
    print(f"{fmt} {layout:4s} {shape}: {s * 1e6:8.1f} us  {gbs:7.1f} GB/s  {100 * gbs / peak:5.1f}% of peak")
# what one launch costs from Python (decode makes ~15 per layer): a tiny kernel, 2000 times
a, b = B.to_device(np.ones((1, 4096), np.float32)), B.to_device(np.ones((1, 4096), np.float32))
B.add(a, b)
cuda.synchronize()
t = time.perf_counter()
for _ in range(2000):
    B.add(a, b)
cuda.synchronize()
print(f"one kernel launch from Python (add, 4096 floats): {(time.perf_counter() - t) / 2000 * 1e6:.1f} us")
t = time.perf_counter()
for _ in range(200):
    B.empty((1, 4096))
print(f"one device allocation (B.empty, 16 KiB): {(time.perf_counter() - t) / 200 * 1e6:.1f} us")
PY
step done
