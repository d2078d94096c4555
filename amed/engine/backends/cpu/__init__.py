"""The CPU backend: Numba kernels (kernels.py: float kernels; qdot/qrows/qr8.py: quantized ones;
dispatch.py: which kernel a weight's format and layout take)."""

from __future__ import annotations

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
