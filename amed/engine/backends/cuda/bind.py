"""Weights bound to the CUDA kernels: the one place a (format, layout) picks its GPU kernel (the
twin of backends/cpu/dispatch.py). Matrices are uploaded once, at bind time, in the store's bytes:
packed levels as uint32 words, scales and zeros as float16; bf16/f32 matrices as float32.

A bound matrix computes on device arrays; given host arrays (look-ahead, experts cached in VRAM
called from the host loop) it copies x up and the result down, so any caller can use it."""

from __future__ import annotations

import numpy as np

from amed.quant.formats import QTensor

F32 = np.float32


def _words(q: np.ndarray, lead: int) -> np.ndarray:
    """Packed bytes as uint32 words, `lead` rows (or row blocks) of them."""
    return np.ascontiguousarray(q).reshape(lead, -1).view(np.uint32)


class Linear:
    """A matrix [N, K] on the device; matmul(x, out) = x @ W.T."""

    def __init__(self, backend, w):
        self.B = backend
        k = backend.k
        if isinstance(w, QTensor):
            N, K = w.shape
            f16 = lambda a: backend._put(a.view(np.float16))        # noqa: E731
            if w.layout == "r8":
                self._kernel = {"q4": k.mm_q4_r8, "q8": k.mm_q8_r8}[w.fmt]
                q = _words(w.q, N // 8)
            else:
                self._kernel = {"q4": k.mm_q4_rows, "q6": k.mm_q6_rows, "q8": k.mm_q8_rows}[w.fmt]
                q = _words(w.q, N)
            self._args = (backend._put(q), f16(w.scale)) + (() if w.zero is None else (f16(w.zero),))
            self.nbytes = sum(a.nbytes for a in (w.q, w.scale, w.zero) if a is not None)
        else:
            if w.dtype not in (np.uint16, np.float32) or w.ndim != 2:
                raise TypeError(f"a dense matrix must be 2-D bf16 (uint16) or float32, got {w.dtype} {w.shape}")
            N, K = w.shape
            f = (w.astype(np.uint32) << 16).view(F32) if w.dtype == np.uint16 else w
            self._kernel = k.mm_f32
            self._args = (backend._put(f),)
            self.nbytes = f.nbytes
        self.shape = (N, K)

    def matmul(self, x, out):
        if isinstance(x, np.ndarray):                       # host in, host out
            out[...] = self.B.to_host(self.matmul(self.B.to_device(x), self.B.empty(out.shape)))
            return out
        T = x.shape[0]
        RB, TT = self.B.k.RB, self.B.k.TT
        grid = ((self.shape[0] + RB - 1) // RB, (T + TT - 1) // TT)
        self._kernel[grid, self.B.nt](x, *self._args, out)
        return out


def linear(backend, w) -> Linear:
    return Linear(backend, w)


class SwiGLU(tuple):
    """(gate, up, down) on the device; calling it computes down(silu(gate x) * up x)."""

    on_device = True          # takes and returns device arrays (host ones: copied over and back)

    def __new__(cls, gate, up, down):
        return super().__new__(cls, (gate, up, down))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self)

    def __call__(self, x, out=None):
        gate, up, down = self
        B = gate.B
        if isinstance(x, np.ndarray):                       # host in, host out
            y = B.to_host(self(B.to_device(x)))
            if out is None:
                return y
            out[...] = y
            return out
        T, I = x.shape[0], gate.shape[0]
        g = gate.matmul(x, B.empty((T, I)))
        u = up.matmul(x, B.empty((T, I)))
        B.silu_mul(g, u, g)
        return down.matmul(g, B.empty((T, down.shape[0])) if out is None else out)
