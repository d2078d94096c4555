"""The one place where a weight's (format, layout) is bound to a CPU kernel.

The store and the checkpoint hand out plain arrays: a 2-D bf16 (uint16 bits) or float32 matrix,
or a QTensor (quant/formats.py: packed levels, scales, zeros, format, group, layout). `linear(w)`
binds one matrix to its kernel once, at load, and returns an object with one verb,
`matmul(x, out)`; `swiglu(gate, up, down)` binds a SwiGLU block (an expert, the shared expert, a
dense MLP), using the fused expert kernel when the three matrices share a quantized format. The
forward pass never branches on formats: it calls these verbs.
"""

from __future__ import annotations

import numpy as np

from amed.engine.backends.cpu import ggml, kernels
from amed.engine.backends.cpu.qr8 import expert_r8, matmul_r8
from amed.engine.backends.cpu.qrows import expert_q4, expert_q6, expert_q8, matmul_q4, matmul_q6, matmul_q8
from amed.formats.gguf import GGMLTensor
from amed.quant.formats import QTensor, dequantize_rows


# ---- quantized matrices: (kernel, bound arguments) ----------------------------------------------

def qmatmul(x: np.ndarray, qt, out: np.ndarray | None = None) -> np.ndarray:
    """out[T, N] = x[T, K] @ W.T for a QTensor (x float32 C-contiguous, 1-D x is one token)."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise TypeError("qmatmul: x must be a C-contiguous float32 array")
    if out is None:
        out = np.empty(x.shape[:-1] + (qt.shape[0],), dtype=np.float32)
    elif out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TypeError("qmatmul: out must be a C-contiguous float32 array")
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    o2 = out if out.ndim == 2 else out.reshape(-1, out.shape[-1])
    kernel, args = matmul_call(qt)
    kernel(x2, *args, o2)
    return out


def r8_args(qt) -> tuple:
    """(q, s, z) for the r8 kernels: one signature for q4 and q8 (q8 passes its scales as the
    zero array, which the q8 code never reads)."""
    q, s, z = qt.kargs
    return q, s, s if z is None else z


def matmul_call(qt):
    """(kernel, weight arguments) for `kernel(x, *args, out)`: out[T, N] = x[T, K] @ W.T, x and out
    2-D C-contiguous float32 (what qmatmul checks). For callers that bind a matrix once."""
    q, s, z = qt.kargs
    if qt.layout == "r8":
        return matmul_r8, r8_args(qt)
    if qt.fmt == "q4":
        return matmul_q4, (q, s, z)
    if qt.fmt == "q6":
        return matmul_q6, (q, s, z)
    if qt.fmt == "q8":
        return matmul_q8, (q, s)
    raise ValueError(f"qmatmul: unknown quantized format {qt.fmt!r}")


def expert_call(gate, up, down):
    """(kernel, weight arguments) of the fused expert kernel for three QTensors, checked."""
    if not (gate.fmt == up.fmt == down.fmt and gate.layout == up.layout == down.layout
            and gate.group == up.group and gate.shape == up.shape):
        raise ValueError("expert_q: gate, up and down must share a format and layout, and gate/up a group size and shape")
    g, u, d = gate.kargs, up.kargs, down.kargs
    if gate.layout == "r8":
        return expert_r8, r8_args(gate) + r8_args(up) + r8_args(down)
    if gate.fmt == "q4":
        return expert_q4, (g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2])
    if gate.fmt == "q6":
        return expert_q6, (g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2])
    if gate.fmt == "q8":
        return expert_q8, (g[0], g[1], u[0], u[1], d[0], d[1])
    raise ValueError(f"expert_q: unknown quantized format {gate.fmt!r}")


def expert_q(x: np.ndarray, gate, up, down, out: np.ndarray | None = None) -> np.ndarray:
    """out[T, H] = down @ (silu(gate @ x) * (up @ x)) for one expert given as three QTensors
    (gate, up [I, H]; down [H, I]); x float32 [T, H] C-contiguous. One call from Python: gate and
    up share one rounding of x and run in the same pass over rows."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim != 2:
        raise TypeError("expert_q: x must be a 2-D C-contiguous float32 array")
    if out is None:
        out = np.empty((x.shape[0], down.shape[0]), dtype=np.float32)
    elif out.dtype != np.float32 or not out.flags.c_contiguous:
        raise TypeError("expert_q: out must be a C-contiguous float32 array")
    kernel, args = expert_call(gate, up, down)
    kernel(x, *args, out)
    return out


def expert_runner(gate, up, down):
    """`run(x) -> out` for one expert (three QTensors), with expert_q's checks on the weights
    done once here rather than on every call: decode runs ~300 experts per token, and Python
    work per call adds up. x must be a 2-D C-contiguous float32 array (the model's own)."""
    kernel, args = expert_call(gate, up, down)
    H = down.shape[0]

    def run(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((x.shape[0], H), dtype=np.float32)
        kernel(x, *args, out)
        return out
    return run


# ---- matrices as the forward pass sees them -------------------------------------------------------

class Dense:
    """A bf16 (uint16 bits) or float32 matrix [N, K]."""
    __slots__ = ("w", "shape", "nbytes", "_kernel")

    def __init__(self, w: np.ndarray):
        if w.dtype not in (np.uint16, np.float32) or w.ndim != 2:
            raise TypeError(f"Dense needs a 2-D bf16 (uint16) or float32 matrix, got {w.dtype} {w.shape}")
        self.w = w
        self.shape = w.shape
        self.nbytes = w.nbytes
        self._kernel = kernels.matmul_bf16 if w.dtype == np.uint16 else kernels.matmul_f32

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[T, N] = x[T, K] @ W.T"""
        self._kernel(x, self.w, out)
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        """Selected rows as float32 (embedding lookup)."""
        if self.w.dtype == np.float32:
            return np.ascontiguousarray(self.w[rows])
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        kernels.bf16_rows_to_f32(self.w, rows, out)
        return out


class Quant:
    """A quantized matrix; matmul dequantizes inside the kernel."""
    __slots__ = ("qt", "shape", "nbytes", "_kernel", "_args")

    def __init__(self, qt: QTensor):
        self.qt = qt
        self.shape = tuple(qt.shape)
        self.nbytes = sum(a.nbytes for a in (qt.q, qt.scale, qt.zero) if a is not None)
        self._kernel, self._args = matmul_call(qt)     # bound once: matmul runs ~100x per token

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[T, N] = x[T, K] @ W.T; x and out 2-D C-contiguous float32 (qmatmul checks for
        other callers)."""
        self._kernel(x, *self._args, out)
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        return dequantize_rows(self.qt, rows)


class GGML:
    """A matrix in one of llama.cpp's block types (a GGUF file's; cpu/ggml.py): each row is
    dequantized once into a float32 buffer and used for every token."""
    __slots__ = ("gt", "shape", "nbytes")

    def __init__(self, gt: GGMLTensor):
        if gt.type_id not in ggml.SUPPORTED_IDS:
            raise TypeError(f"no kernel for the ggml block type {gt.type_name}")
        self.gt = gt
        self.shape = tuple(gt.shape)
        self.nbytes = gt.nbytes

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        ggml.matmul_ggml(x, self.gt.raw, self.gt.type_id, ggml.H2F, out)
        return out

    def rows_f32(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        ggml.rows_ggml(self.gt.raw, self.gt.type_id, self.shape[1], np.asarray(rows, np.int64), ggml.H2F, out)
        return out


def linear(w):
    """Bind a matrix as the store, checkpoint or GGUF file hands it out (ndarray, QTensor or
    GGMLTensor)."""
    if isinstance(w, GGMLTensor):
        return GGML(w)
    return Quant(w) if isinstance(w, QTensor) else Dense(w)


class SwiGLU(tuple):
    """(gate, up, down) bound matrices of a SwiGLU block; calling it computes
    down(silu(gate x) * up x). Three quantized matrices of one format and layout run as one fused
    kernel call (expert_runner), prepared once here, not per token."""

    on_device = False         # host arrays in and out (the CPU backend's own)

    def __new__(cls, gate, up, down):
        self = super().__new__(cls, (gate, up, down))
        self._run = None
        if type(gate) is Quant and type(up) is Quant and type(down) is Quant \
                and gate.qt.fmt == up.qt.fmt == down.qt.fmt and gate.qt.group == up.qt.group \
                and gate.qt.layout == up.qt.layout == down.qt.layout:
            self._run = expert_runner(gate.qt, up.qt, down.qt)
        return self

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x float32 [T, H] C-contiguous -> [T, H] (into `out`, C-contiguous, when given)."""
        if self._run is not None:
            return self._run(x, out)
        gate, up, down = self
        T, I = x.shape[0], gate.shape[0]
        g = gate.matmul(x, np.empty((T, I), np.float32))
        u = up.matmul(x, np.empty((T, I), np.float32))
        kernels.silu_mul(g, u, g)
        return down.matmul(g, np.empty((T, down.shape[0]), np.float32) if out is None else out)


def swiglu(gate, up, down) -> SwiGLU:
    """Bind a SwiGLU block from three matrices as handed out (ndarrays or QTensors)."""
    return SwiGLU(linear(gate), linear(up), linear(down))
