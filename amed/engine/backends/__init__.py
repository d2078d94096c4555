"""Backends: the kernels the forward pass calls, behind one small interface.

A backend provides, for its own arrays (float32 activations [T, ...], C-contiguous):

    linear(w) -> M            bind a matrix as the store/checkpoint hands it out (a bf16/f32
                              ndarray or a QTensor) to its kernel; M.matmul(x, out) computes
                              out[T, N] = x[T, K] @ W.T, M.rows_f32(ids) gathers rows (embeddings),
                              M.shape, M.nbytes
    swiglu(gate, up, down) -> F   a bound SwiGLU block: F(x, out=None) = down(silu(gate x) * up x);
                              F.on_device: True where F runs on the backend's arrays, not the host's
    rmsnorm(x, w, eps, out)
    qk_norm_rope_store(qkv, nh, nkv, d, rot, q_norm, k_norm, use_qk_norm, eps, cos, sin, pos,
                       q_out, k_cache, v_cache)      QK-norm, partial NeoX RoPE, K/V into the cache
    attention(q, k_cache, v_cache, pos, out)          causal GQA over the cache
    route(logits, bias, n_group, topk_group, k, scaling, idx_out, w_out)   sigmoid group top-k
    moe_combine(out, ys, tok, w)                      out[tok[i]] += w[i] * ys[i], in order (host arrays)

and, because activations live where the backend computes (host memory for "cpu", the GPU for
"cuda"), the forward pass allocates, adds and crosses over through it:

    empty(shape), zeros(shape), zeros_like(a)   float32 activations; vector(v) a bound 1-D weight
    add(x, y)                   x += y in place (y may be a host array), returns x
    axpy(x, a, y)               x += a * y in place (a a float), returns x
    to_host(a) / to_device(a)   a host ndarray / an array of the backend (the CPU's: `a` itself)
    embedding(m)                bind the token embedding (rows_f32(ids) gives host rows)
    copy_prefix(dst, src, n)    dst[:, :n] = src[:, :n] (a KV cache growing)
    routed_backend              the backend routed experts are bound to (the CPU's for "cuda")

The forward pass (engine/model.py) only calls these; which kernel runs for which format is
decided once, when a weight is bound (cpu/dispatch.py, cuda/bind.py). Backends: "cpu"; "cuda"
(cuda/: NVIDIA GPUs through numba-cuda, imported only when asked for).
"""

from __future__ import annotations

from amed.errors import AmedError

BACKENDS = ("cpu", "cuda")


def get_backend(name: str = "cpu"):
    if name == "cpu":
        from amed.engine.backends.cpu import CPUBackend

        return CPUBackend()
    if name == "cuda":
        from amed.engine.backends.cuda import CUDABackend

        return CUDABackend()
    raise AmedError(f"unknown device {name!r}; amed runs on: {', '.join(BACKENDS)}.")
