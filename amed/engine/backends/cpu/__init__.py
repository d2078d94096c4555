"""The CPU backend: Numba kernels (kernels.py: float kernels; qdot/qrows/qr8.py: quantized ones;
dispatch.py: which kernel a weight's format and layout take)."""

from __future__ import annotations

import numpy as np

from amed.engine.backends.cpu import dispatch, kernels


class CPUBackend:
    """The kernels the forward pass calls, for NumPy arrays in host memory (see backends/__init__.py)."""

    name = "cpu"
    linear = staticmethod(dispatch.linear)
    swiglu = staticmethod(dispatch.swiglu)
    rmsnorm = staticmethod(kernels.rmsnorm)
    qk_norm_rope_store = staticmethod(kernels.qk_norm_rope_store)
    attention = staticmethod(kernels.attention)
    route = staticmethod(kernels.route)
    moe_combine = staticmethod(kernels.moe_combine)
    embedding = staticmethod(dispatch.linear)

    # activations are NumPy arrays in host memory: these are the plain NumPy operations
    vector = staticmethod(lambda v: v)
    to_host = staticmethod(lambda a: a)
    to_device = staticmethod(lambda a: a)
    empty = staticmethod(lambda shape: np.empty(shape, np.float32))
    zeros = staticmethod(lambda shape: np.zeros(shape, np.float32))
    zeros_like = staticmethod(np.zeros_like)

    @property
    def routed_backend(self):
        """The backend routed experts run on: this one."""
        return self

    @staticmethod
    def add(x, y):
        """x += y (in place); returns x."""
        x += y
        return x

    @staticmethod
    def axpy(x, a, y):
        """x += a * y (in place); returns x."""
        x += a * y
        return x

    @staticmethod
    def copy_prefix(dst, src, n: int) -> None:
        """dst[:, :n] = src[:, :n] (growing the KV cache)."""
        dst[:, :n] = src[:, :n]

    @staticmethod
    def synchronize() -> None:
        pass
