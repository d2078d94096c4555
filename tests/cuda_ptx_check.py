"""Compile every CUDA kernel (amed/engine/backends/cuda/kernels.py) to PTX for the compute
capabilities amed supports, without a GPU: `python tests/cuda_ptx_check.py [cc ...]`.

Run as its own process (tests/test_cuda.py does): compile_ptx needs the real numba.cuda target,
the other CUDA tests the simulator, and Numba picks one per process at import. numba-cuda asks
the current device for its compute capability when it compiles a device function called by a
kernel, so here that question is answered with the capability being compiled for.
Prints one line per kernel and capability; exits 1 on the first failure, 77 when numba-cuda or
its NVVM wheel is not installed (the test then skips)."""

import sys
import time

CCS = [(7, 5), (8, 6), (8, 9), (12, 0)]


def main(argv) -> int:
    ccs = [tuple(int(p) for p in a.split(".")) for a in argv] or CCS
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:
        print("numba-cuda is not installed (pip install -e '.[cuda]'): PTX not checked")
        return 77
    from numba import cuda
    from numba.cuda import dispatcher

    from amed.engine.backends.cuda import kernels as K

    class _Device:
        compute_capability = None

    device = _Device()
    dispatcher.get_current_device = lambda: device
    for cc in ccs:
        device.compute_capability = cc
        for name, sig in K.signatures().items():
            t = time.perf_counter()
            try:
                ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=cc)
            except Exception as e:          # noqa: BLE001
                if "nvvm" in f"{type(e).__name__} {e}".lower() and "not found" in str(e).lower():
                    print(f"NVVM is not installed (pip install -e '.[cuda]'): PTX not checked ({e})")
                    return 77
                raise
            target = f".target sm_{cc[0]}{cc[1]}"
            if target not in ptx:
                print(f"FAIL {name} sm_{cc[0]}{cc[1]}: no '{target}' in the PTX")
                return 1
            print(f"ok {name} sm_{cc[0]}{cc[1]} {len(ptx)} chars {time.perf_counter() - t:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
