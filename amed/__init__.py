"""amed: run AntAngelMed (BailingMoeV2) on your own CPU.

Public API:
    model = amed.load(path)          # a Hugging Face checkpoint dir, an amed store, a GGUF file
                                     # or "ollama:NAME:TAG" (the GGUF blob ollama pulled)
    model = amed.load(path, max_ram="16G")   # store larger than RAM: bounded expert cache + prefetch
    model.logits(ids)                # float32 [len, vocab], fresh context
    model.reset(); model.forward(ids)  # incremental: returns last-position logits
"""

from __future__ import annotations

import os
import tempfile

__version__ = "0.1.0"


def _setup_environment() -> None:
    # Numba's OpenMP pool must be the only parallel runtime in the decode loop: a spinning
    # OpenBLAS pool next to it costs ms-long stalls (docs/kernels-and-tooling.md §2).
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        os.environ.setdefault(var, "1")
    # A worker that finishes a parallel region early spins for the others (libgomp: 300k spins by
    # default) before it sleeps. On an idle machine 10k spins are as fast (4-layer flash store,
    # 2 threads, 3 alternating rounds: pp64 / tg32 within noise); when another program holds a
    # core, the default spin starved the descheduled worker: decode 1.7-1.8 vs 3.6-8.1 t/s,
    # prefill 2.7-5.7 vs 18-42 t/s (docs/performance.md, "Sharing the cores").
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    # Compiled kernels are cached on disk so the second start is fast; the package dir may
    # be read-only (site-packages), so point Numba at a user cache dir we can write. Numba
    # checks a cached function against its own file only, and our kernels call helpers in
    # other files (cpu/qdot.py): the directory is keyed by a hash of all kernel sources, so
    # an edit anywhere recompiles everything instead of running a stale helper.
    if "NUMBA_CACHE_DIR" not in os.environ:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        key = _kernel_sources_hash()
        path = os.path.join(base, "amed", "numba", key)
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise OSError
        except OSError:
            path = os.path.join(tempfile.gettempdir(), "amed-numba-cache", key)
            os.makedirs(path, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = path


def _kernel_sources_hash(here: str | None = None) -> str:
    """12 hex digits over the source of every Numba-compiled module (a few hundred kB: ~1 ms)."""
    import hashlib

    h = hashlib.sha256(__version__.encode())
    here = here or os.path.dirname(os.path.abspath(__file__))
    for sub in (os.path.join("engine", "backends", "cpu"),):
        folder = os.path.join(here, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if name.endswith(".py"):
                h.update(name.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]

_setup_environment()

# modules whose kernels every model uses: without their cache index files, the first run compiles
KERNEL_MODULES = ("kernels", "qr8", "qrows")


def kernel_cache_cold(cache_dir: str | None = None) -> bool:
    """True when the compiled-kernel cache lacks the index files (*.nbi) of a kernel module, so the
    first forward pass will compile for about a minute. A directory listing: cheap enough to ask
    before every load."""
    cache_dir = cache_dir or os.environ.get("NUMBA_CACHE_DIR", "")
    seen = set()
    for root, _dirs, files in os.walk(cache_dir):
        seen.update(f.split(".", 1)[0] for f in files if f.endswith(".nbi"))
    return not set(KERNEL_MODULES) <= seen


def load(path, **kwargs):
    """Open a model (HF checkpoint or amed store directory, GGUF file, `ollama:NAME:TAG`) for inference."""
    from amed.engine.model import load as _load

    if isinstance(path, str) and path.startswith("ollama:"):
        from amed.formats.gguf import resolve_ollama

        path = resolve_ollama(path)
    return _load(path, **kwargs)


__all__ = ["load", "kernel_cache_cold", "__version__"]
