"""The CUDA backend: dense weights and activations on an NVIDIA GPU, routed experts on the CPU
(or, with --gpu-experts, the hottest ones cached in VRAM; in a prefill batch, the others possibly
copied up for the batch: engine/experts/gpu.py).

What lives where:
  * on the GPU: every dense matrix (attention, dense MLP, shared experts, routers, lm_head) in the
    store's own quantized bytes (bf16/f32 matrices widened to float32), the norms, the KV cache,
    the RoPE tables and every activation of the forward pass;
  * on the host: the embedding (one row per token is gathered on the CPU and copied up), the
    routing decision (the router's [T, E] logits come down; group top-k runs on the CPU kernel,
    which also decides which experts run where), and the routed experts with today's CPU kernels.
Per MoE layer the hidden state crosses PCIe down once and the host's routed sum up once; the
shared expert's kernels (and in decode those of the experts in VRAM, which add into the shared
expert's output on the device) are launched before the CPU experts run, so the two sides overlap.

Kernels: kernels.py (each has a NumPy-checked twin on the CPU). Launch sizes: 128 threads per
block on a GPU, 8 in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), where every thread is a
Python thread and the tests run."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from amed.errors import AmedError

F32 = np.float32
CPU_HINT = "run on the CPU instead (leave out --device cuda)"
MIN_CC = (7, 5)              # Turing: the oldest card the wheels of CUDA 13 still compile for
ATTN_CHUNK = 64              # queries per attention launch: bounds the scores scratch


def _simulator() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _import_cuda():
    """numba.cuda, or an AmedError that says what is missing and how to run on the CPU."""
    import importlib.util

    missing = "numba-cuda" if importlib.util.find_spec("numba_cuda") is None else None
    if missing is None:
        try:
            from numba import cuda                # numba-cuda's, redirected by its .pth file
        except ImportError as e:                  # e.g. its cuda-bindings wheel is missing
            missing = f"a working numba-cuda ({e})"
    if missing:
        raise AmedError(f"--device cuda needs {missing}: pip install 'amed[cuda]'; or {CPU_HINT}.")
    if _simulator():
        _lock_simulator_shared()
        return cuda
    try:
        ok = cuda.is_available()
    except Exception:                      # noqa: BLE001 - a broken driver raises all kinds
        ok = False
    if not ok:
        raise AmedError(f"--device cuda found no usable NVIDIA GPU (no driver, or no device visible); {CPU_HINT}.")
    cc = tuple(cuda.get_current_device().compute_capability)
    if cc < MIN_CC:
        raise AmedError(f"this GPU has compute capability {cc[0]}.{cc[1]}; amed's CUDA kernels need "
                        f"{MIN_CC[0]}.{MIN_CC[1]} or newer; {CPU_HINT}.")
    return cuda


def _lock_simulator_shared() -> None:
    """Make the CUDA simulator's shared arrays shared. numba-cuda's simulator (0.30) finds a block's
    `cuda.shared.array` by its source line with an unlocked get-then-set, so two of the block's
    threads (Python threads) can each make their own array and never see each other's writes: a
    block sum came out wrong in 2 of 2000 launches at a 1 us switch interval, and the whole-model
    test failed now and then under load (off by 1.8, once NaN). The same lookup, under a lock."""
    import sys
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_amed_locked", False):
        return
    lock = threading.Lock()
    unlocked = shared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:            # dynamic shared memory; errors
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        f = sys._getframe(1)
        caller = (f.f_code.co_filename, f.f_lineno)          # what the simulator keys arrays by
        with lock:
            got = self._allocations.get(caller)
            if got is None:
                got = self._allocations[caller] = np.empty(shape, dtype)
        return got

    shared.array = array
    shared._amed_locked = True


class CUDABackend:
    """The kernels the forward pass calls, for device arrays (see backends/__init__.py)."""

    name = "cuda"

    def __init__(self):
        from amed.engine.backends.cpu import CPUBackend

        self.cuda = _import_cuda()
        from amed.engine.backends.cuda import kernels

        self.k = kernels
        self.simulator = _simulator()
        # threads per block (a power of two, 8..MAXT); in the simulator each is a Python thread
        self.nt = 8 if self.simulator else 128
        self.routed_backend = CPUBackend()            # routed experts run on the host
        self.host = self.routed_backend
        self.uploaded = 0                              # bytes of weights put on the device

    # ---- memory ---------------------------------------------------------------------------------
    def _put(self, a: np.ndarray, weights: bool = True):
        """A device copy of a host array (weights, counted in `uploaded`, or buffers); running out
        of VRAM is an AmedError."""
        with self._vram():
            d = self.cuda.to_device(np.ascontiguousarray(a))
        if weights:
            self.uploaded += a.nbytes
        return d

    def device_array(self, shape, dtype):
        """An uninitialised device array that will hold weights (counted in `uploaded`)."""
        with self._vram():
            d = self.cuda.device_array(shape, dtype)
        self.uploaded += d.nbytes
        return d

    @contextmanager
    def _vram(self):
        """Running out of VRAM inside becomes an AmedError that says what to do."""
        try:
            yield
        except Exception as e:                 # noqa: BLE001 - CudaAPIError(OUT_OF_MEMORY) and kin
            if "MEMORY" in str(e).upper():
                raise AmedError(f"the GPU ran out of memory after {self.uploaded / 2**30:.1f} GiB of weights; "
                                f"use --gpu-experts 0, a smaller --ctx-size, or {CPU_HINT}.") from None
            raise

    def expert_slots(self, count: int, expert):
        """`count` VRAM slots for routed experts shaped like `expert` (gate, up, down as the store
        hands them out), run together in decode (bind.ExpertSlots); None where the format has no
        grouped kernel (the experts are then bound one by one)."""
        from amed.engine.backends.cuda.bind import ExpertSlots

        return ExpertSlots(self, count, expert) if ExpertSlots.supports(expert) else None

    def slot0(self):
        """Device arrays [0] (int32) and [1.0] (float32): a lone SwiGLU as a one-slot expert group."""
        got = getattr(self, "_slot0", None)
        if got is None:
            got = self._slot0 = (self.cuda.to_device(np.zeros(1, np.int32)),
                                 self.cuda.to_device(np.ones(1, F32)))
        return got

    def free_vram(self) -> float:
        """Free device memory in bytes (inf in the simulator)."""
        return float(self.cuda.current_context().get_memory_info()[0])

    def vector(self, v: np.ndarray):
        return self._put(np.asarray(v, F32))

    def empty(self, shape):
        with self._vram():
            return self.cuda.device_array(shape, F32)

    def zeros(self, shape):
        return self._put(np.zeros(shape, F32), weights=False)

    def zeros_like(self, a):
        return self.zeros(a.shape)

    def to_host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else a.copy_to_host()

    def to_device(self, a):
        return self.cuda.to_device(np.ascontiguousarray(a, F32)) if isinstance(a, np.ndarray) else a

    def copy_prefix(self, dst, src, n: int) -> None:
        """dst[:, :n] = src[:, :n] (growing the KV cache)."""
        for h in range(src.shape[0]):
            dst[h, :n].copy_to_device(src[h, :n])

    # ---- binding weights ------------------------------------------------------------------------
    def linear(self, w):
        from amed.engine.backends.cuda.bind import linear

        return linear(self, w)

    def embedding(self, w):
        """Token embeddings stay on the host (one row per token is all a forward reads)."""
        return self.host.embedding(w)

    def swiglu(self, gate, up, down):
        from amed.engine.backends.cuda.bind import SwiGLU

        return SwiGLU(self.linear(gate), self.linear(up), self.linear(down))

    # ---- activations ----------------------------------------------------------------------------
    def _grid1(self, n: int) -> tuple[int, int]:
        return (n + self.nt - 1) // self.nt, self.nt

    def add(self, x, y):
        """x += y (in place); returns x."""
        y = self.to_device(y)
        b, t = self._grid1(x.shape[0] * x.shape[1])
        self.k.axpy_inplace[b, t](x, F32(1.0), y)
        return x

    def axpy(self, x, a, y):
        """x += a * y (in place); returns x."""
        b, t = self._grid1(x.shape[0] * x.shape[1])
        self.k.axpy_inplace[b, t](x, F32(a), y)
        return x

    def silu_mul(self, g, u, out):
        b, t = self._grid1(g.shape[0] * g.shape[1])
        self.k.silu_mul[b, t](g, u, out)
        return out

    def rmsnorm(self, x, w, eps, out):
        self.k.rmsnorm[x.shape[0], self.nt](x, w, F32(eps), out)

    def qk_norm_rope_store(self, qkv, nh, nkv, d, rot, q_norm, k_norm, use_qk_norm, eps, cos, sin, pos,
                           q_out, k_cache, v_cache):
        if d > self.k.MAXD:
            raise AmedError(f"head dimension {d} is larger than the CUDA kernels handle ({self.k.MAXD}); {CPU_HINT}.")
        if not use_qk_norm:              # the model passes host ones; the kernel does not read them
            q_norm = k_norm = self._dummy_norm(d)
        self.k.qk_norm_rope_store[(qkv.shape[0], nh + nkv), self.nt](
            qkv, nh, nkv, d, rot, q_norm, k_norm, bool(use_qk_norm), F32(eps), cos, sin, pos, q_out, k_cache, v_cache)

    def _dummy_norm(self, d):
        got = getattr(self, "_ones", None)
        if got is None or got.shape[0] != d:
            got = self._ones = self.vector(np.ones(d, F32))
        return got

    def attention(self, q, k_cache, v_cache, pos, out):
        T, nh, _ = q.shape
        for t0 in range(0, T, ATTN_CHUNK):
            t1 = min(T, t0 + ATTN_CHUNK)
            scores = self.cuda.device_array((t1 - t0, nh, pos + t1), F32)
            self.k.attention[(t1 - t0, nh), self.nt](q[t0:t1], k_cache, v_cache, pos + t0, scores, out[t0:t1])

    # routing decides on the host which experts run where: the CPU kernels, on host arrays
    @property
    def route(self):
        return self.host.route

    @property
    def moe_combine(self):
        return self.host.moe_combine

    def synchronize(self) -> None:
        self.cuda.synchronize()
