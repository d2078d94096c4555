#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one go (under 8 minutes on a 16-core machine with an H100):
#   1. install amed with the cuda extra;
#   2. run tests/test_cuda.py on the GPU (NUMBA_ENABLE_CUDASIM=0: the same tests the simulator runs in CI);
#   3. decode/prefill t/s on the 4-layer synthetic flash store: CPU only, then --device cuda with 0 and
#      all experts in VRAM (amed bench -p 512 -n 64 -r 3, side by side on this machine); then pp512
#      with the prefill's experts forced to the CPU and forced to the GPU (AMED_GPU_PREFILL; the
#      default "auto" above times both and should match the faster);
#      (each bench reports "kernel compile/load before timing": the first compiles the CUDA kernels,
#      later ones should load them from the cache);
#   4. each quantized GEMV kernel's GB/s on a flash-sized matrix against the card's memory bandwidth.
# Not yet run on a GPU (no session had one): expect to fix things. Output: bench/gpu_check.out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench}/gpu_check.out
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

step install
python -m pip install -q -e ".[dev,cuda]" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
python - <<'PY'
from numba import cuda
d = cuda.get_current_device()
print("device", d.name, "cc", d.compute_capability)
PY

step "GPU tests (real hardware)"
NUMBA_ENABLE_CUDASIM=0 timeout 240 python -m pytest -q -x tests/test_cuda.py

step "synthetic flash store, 4 layers (built once, cached under \$AMED_HOME/bench)"
timeout 240 python -m amed bench --synthetic flash --layers 4 --bits 4 -p 8 -n 2 -r 1 >/dev/null
for dev in "--device cpu" "--device cuda --gpu-experts 0" "--device cuda --gpu-experts auto"; do
  step "bench $dev"
  timeout 150 python -m amed bench --synthetic flash --layers 4 --bits 4 -p 512 -n 64 -r 3 $dev
done

for mode in cpu gpu; do
  step "bench --device cuda --gpu-experts 0, AMED_GPU_PREFILL=$mode"
  AMED_GPU_PREFILL=$mode timeout 120 python -m amed bench --synthetic flash --layers 4 --bits 4 -p 512 -n 0 -r 3 \
    --device cuda --gpu-experts 0
done

step "GEMV GB/s (one token, 4096 x 4096 and 157184 x 4096 lm_head-sized)"
timeout 120 python - <<'PY'
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
PY
step done
