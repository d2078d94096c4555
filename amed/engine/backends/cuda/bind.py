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

    r8 = None             # "q4" / "q8" for r8 matrices: the grouped decode kernels read them

    @classmethod
    def over(cls, backend, kernel, args, shape, nbytes) -> "Linear":
        """A Linear over device arrays already in place (an expert's slot in ExpertSlots)."""
        m = cls.__new__(cls)
        m.B, m._kernel, m._args, m.shape, m.nbytes = backend, kernel, args, shape, nbytes
        return m

    def __init__(self, backend, w):
        self.B = backend
        k = backend.k
        if isinstance(w, QTensor):
            if w.layout == "r8" and w.fmt in ("q4", "q8"):
                self.r8 = w.fmt
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
        self = super().__new__(cls, (gate, up, down))
        # r8 q4/q8 (the dense MLP and shared experts `amed quantize` writes): one token runs in
        # the two grouped expert kernels, over one-slot views of the matrices
        self._slot = None
        if gate.r8 and gate.r8 == up.r8 == down.r8 and gate.shape == up.shape:
            q8 = gate.r8 == "q8"
            self._slot = (q8,) + tuple(tuple(a.reshape((1,) + a.shape) for a in m._args + (m._args[1],) * q8)
                                       for m in self)
        return self

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
        if T == 1 and self._slot is not None:               # decode: two launches, not four
            q8, (gq, gs, gz), (uq, us, uz), (dq, ds, dz) = self._slot
            h = B.empty((1, I))
            out = B.empty((1, down.shape[0])) if out is None else out
            slot0, one = B.slot0()
            B.k.moe_gate_up_r8[(I // 8, 1), B.nt](x, slot0, gq, gs, gz, uq, us, uz, q8, h)
            B.k.moe_down_r8[down.shape[0] // 8, B.nt](h, slot0, one, dq, ds, dz, q8, False, out)
            return out
        g = gate.matmul(x, B.empty((T, I)))
        u = up.matmul(x, B.empty((T, I)))
        B.silu_mul(g, u, g)
        return down.matmul(g, B.empty((T, down.shape[0])) if out is None else out)


class ExpertSlots:
    """`count` routed experts of one layer in VRAM, each matrix kind stacked over the slots
    ([count, N/8, words] levels, [count, N/8, ng, 8] scales and zeros), so that a decode step
    runs all of its chosen experts in two launches (kernels.moe_gate_up_r8: gate, up and silu*up
    for every expert; kernels.moe_down_r8: down and the weighted sum) instead of five per expert.
    For the r8 layout in q4 or q8 (what `amed quantize` writes); `supports` says which."""

    @staticmethod
    def supports(expert) -> bool:
        g, u, d = expert
        return all(isinstance(m, QTensor) and m.layout == "r8" for m in expert) \
            and g.fmt == u.fmt == d.fmt and g.fmt in ("q4", "q8") and g.shape == u.shape

    def __init__(self, backend, count: int, expert):
        self.B = backend
        self.count = count
        self.q8 = expert[0].fmt == "q8"
        self.mats = []                      # per matrix kind: (q, scale, zero or scale) stacks
        for m in expert:
            q = _words(m.q, m.shape[0] // 8)
            stacks = (backend.device_array((count,) + q.shape, np.uint32),
                      backend.device_array((count,) + m.scale.shape, np.float16))
            stacks += (stacks[1] if self.q8 else backend.device_array((count,) + m.zero.shape, np.float16),)
            self.mats.append(stacks)
        self.shapes = [m.shape for m in expert]
        self.nbytes = sum(m.nbytes for m in expert)       # one expert's bytes
        k = backend.k
        self._kernel = k.mm_q8_r8 if self.q8 else k.mm_q4_r8

    def put(self, slot: int, expert) -> None:
        """Copy an expert (gate, up, down QTensors) into a slot."""
        for (q, s, z), m in zip(self.mats, expert):
            q[slot].copy_to_device(_words(m.q, m.shape[0] // 8))
            s[slot].copy_to_device(np.ascontiguousarray(m.scale).view(np.float16))
            if not self.q8:
                z[slot].copy_to_device(np.ascontiguousarray(m.zero).view(np.float16))

    def swiglu(self, slot: int) -> SwiGLU:
        """The expert in `slot` as a SwiGLU over its slot (prefill batches call it one by one)."""
        mats = []
        for (q, s, z), shape in zip(self.mats, self.shapes):
            args = (q[slot], s[slot]) + (() if self.q8 else (z[slot],))
            mats.append(Linear.over(self.B, self._kernel, args, shape, 0))
        return SwiGLU(*mats)

    def run(self, slots: list[int], weights, x, out) -> None:
        """out[0] += sum_j weights[j] * expert(slots[j])(x[0]) for one token x [1, H], on the device."""
        B = self.B
        (gq, gs, gz), (uq, us, uz), (dq, ds, dz) = self.mats
        I = self.shapes[0][0]
        ids = B.cuda.to_device(np.asarray(slots, np.int32))
        w = B.cuda.to_device(np.asarray(weights, np.float32))
        h = B.empty((len(slots), I))
        B.k.moe_gate_up_r8[(I // 8, len(slots)), B.nt](x, ids, gq, gs, gz, uq, us, uz, self.q8, h)
        B.k.moe_down_r8[self.shapes[2][0] // 8, B.nt](h, ids, w, dq, ds, dz, self.q8, True, out)

    def run_pairs(self, x, groups, out) -> None:
        """Prefill: out[t] += w * expert(slot)(x[t]) for each (slot, tokens, weights) in groups
        (tokens: rows of x [T, H], weights alike), on the device, in four launches whatever the
        number of experts: gate+up+silu and down over the (token, expert) pairs grouped by expert,
        then each token's pairs summed in the order given."""
        B, k = self.B, self.B.k
        (gq, gs, gz), (uq, us, uz), (dq, ds, dz) = self.mats
        lens = [len(t) for _, t, _ in groups]
        n, R, T = len(groups), sum(lens), x.shape[0]
        rows = np.concatenate([t for _, t, _ in groups]).astype(np.int32)
        seg = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        slots = np.array([s for s, _, _ in groups], np.int32)
        tok_pairs = np.argsort(rows, kind="stable").astype(np.int32)     # per token, in group order
        tok_seg = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=T))]).astype(np.int32)
        ints = B.cuda.to_device(np.concatenate([rows, seg, slots, tok_seg, tok_pairs]))   # one copy up
        cut = np.cumsum([0, R, n + 1, n, T + 1, R])
        d_rows, d_seg, d_slots, d_tok_seg, d_tok_pairs = (ints[a:b] for a, b in zip(cut[:-1], cut[1:]))
        w = B.cuda.to_device(np.concatenate([ws for _, _, ws in groups]).astype(np.float32))
        I, H = self.shapes[0][0], self.shapes[2][0]
        h = B.empty((R, I))
        y = B.empty((R, H))
        chunks = (max(lens) + k.TT - 1) // k.TT
        k.moe_gate_up_pairs_r8[(I // 8, n, chunks), B.nt](x, d_rows, d_seg, d_slots, gq, gs, gz, uq, us, uz,
                                                         self.q8, h)
        k.moe_down_pairs_r8[(H // 8, n, chunks), B.nt](h, d_seg, d_slots, dq, ds, dz, self.q8, y)
        k.moe_combine_pairs[(T, (H + B.nt - 1) // B.nt), B.nt](y, d_tok_seg, d_tok_pairs, w, out)
