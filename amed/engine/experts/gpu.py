"""Routed experts on the GPU (`--device cuda`).

A GPUExperts wraps the host provider (engine/experts/__init__.py):

* up to N experts per layer (`--gpu-experts N|auto`) are copied to VRAM and run there; the rest
  come from the host provider and run on the CPU with its kernels. Which N: the hottest by use
  count. Every use is counted; an expert not on the GPU takes a free place, or replaces the
  layer's coldest one once it has been used more than twice as often (plus two: a little
  hysteresis so that two experts of equal heat do not swap back and forth, each swap being a copy
  of the expert over PCIe). When VRAM runs short (other sequences' KV caches, another program),
  no more are admitted and the model keeps running with what is there.
* in a prefill batch, the layer's chosen experts that are not in VRAM either run on the CPU, or
  are copied to the GPU for that batch only (llama.cpp copies the used experts for batches of 32
  tokens or more). Which is faster depends on the CPU, the GPU and the PCIe link, so "auto"
  measures both (PrefillChoice) and keeps using the faster; AMED_GPU_PREFILL=gpu|cpu fixes it.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from amed.engine.experts.memory import fmt_size
from amed.errors import AmedError

VRAM_MARGIN = 512 << 20          # kept free on the GPU for activations, scratch and the allocator
PREFILL_MIN_TOKENS = 16          # smaller batches keep their experts on the CPU (decode: always)
RECHECK_EVERY = 32               # auto: every this many batches, time the slower way again
BATCH_SLOTS = 32                 # experts copied up together for a prefill batch (VRAM: 32 experts)


class PrefillChoice:
    """Where a prefill batch's experts that are not in VRAM run: "cpu" (today's kernels) or "gpu"
    (copied up for the batch). Mode "auto" times both on real batches (seconds per token of the
    batch's routed experts, from `choose` to `done`), drops each way's first timing (kernel
    compilation, cold pages), then takes the faster, timing the other again now and then in case
    the machine changed (another program, a warm page cache)."""

    def __init__(self, mode: str = "auto", min_tokens: int = PREFILL_MIN_TOKENS, clock=time.perf_counter):
        self.mode = mode
        self.min_tokens = min_tokens
        self.clock = clock
        self.cost: dict[str, float | None] = {"gpu": None, "cpu": None}    # seconds per token
        self.timed = Counter()                       # timings taken per way (the first is dropped)
        self.chosen = Counter()                      # batches per way
        self._batches = 0
        self._timing = None

    def choose(self, tokens: int) -> str:
        if tokens < self.min_tokens:                 # decode steps, short batches: not counted
            return "cpu"
        if self.mode == "cpu":
            how = "cpu"
        elif self.mode == "gpu":
            how = "gpu"
        else:
            self._batches += 1
            untimed = [w for w in ("gpu", "cpu") if self.cost[w] is None]
            if untimed:
                how = untimed[0]
            else:
                fast, slow = sorted(("gpu", "cpu"), key=lambda w: self.cost[w])
                how = slow if self._batches % RECHECK_EVERY == 0 else fast
            self._timing = (how, tokens, self.clock())
        self.chosen[how] += 1
        return how

    @property
    def timing(self) -> bool:
        """A batch is being timed (choose'd, not yet done)."""
        return self._timing is not None

    def done(self) -> None:
        if self._timing is None:
            return
        how, tokens, t0 = self._timing
        self._timing = None
        per_token = (self.clock() - t0) / tokens
        self.timed[how] += 1
        if self.timed[how] == 1:                    # the first: compilation, cold pages
            return
        old = self.cost[how]
        self.cost[how] = per_token if old is None else 0.7 * old + 0.3 * per_token

    def summary(self) -> str:
        ms = {w: f"{c * 1e3:.2f} ms/token" if c is not None else "not timed" for w, c in self.cost.items()}
        return (f"prefill experts ({self.mode}): {self.chosen['gpu']} batches copied to the GPU ({ms['gpu']}), "
                f"{self.chosen['cpu']} on the CPU ({ms['cpu']})")


class GPUExperts:
    """An ExpertProvider: `per_layer` experts of each layer in VRAM, the others from `inner` (or,
    in a prefill batch, copied up for the batch: see PrefillChoice). `backend` is the CUDA
    backend, `expert_of(layer, e)` the expert's (gate, up, down) as the store hands them out.

    Experts in VRAM live in a layer's ExpertSlots (backends/cuda/bind.py) where the format has
    grouped kernels (r8 q4/q8, what `amed quantize` writes): a decode step then runs all of the
    layer's chosen VRAM experts in two launches (`device_sum`); otherwise each is bound alone."""

    def __init__(self, inner, backend, expert_of, per_layer: int, prefill: str = "auto", log=None,
                 clock=time.perf_counter):
        self.inner = inner
        self.cache = inner.cache
        self.lookahead = inner.lookahead
        self.touched = inner.touched
        self.per_layer = per_layer
        self.prefill = PrefillChoice(prefill, clock=clock)
        self.backend = backend
        self._expert_of = expert_of
        self._log = log
        self._gpu: dict[tuple[int, int], object] = {}      # (layer, e) -> SwiGLU on the device
        self._by_layer: dict[int, set[int]] = {}
        self._slots: dict[int, object] = {}                # layer -> ExpertSlots (or None: one by one)
        self._slot_of: dict[tuple[int, int], int] = {}
        self._borrowed: set[tuple[int, int]] = set()       # this batch's experts copied up for it
        self._plan = None                                  # prefill: (layer, VRAM experts, copied ones)
        self._batch_slots = None                           # ExpertSlots the copied ones go through
        self.uses: Counter = Counter()
        self.swaps = 0
        self.copied = 0                            # experts copied up for a prefill batch
        self.vram_full = False

    def start(self, layer: int, experts: list[int], h) -> list[int]:
        on = self._by_layer.setdefault(layer, set())
        for e in experts:
            self.uses[(layer, e)] += 1
            if e not in on and self.per_layer and not self.vram_full:
                self._admit(layer, e, on)
        gpu = [e for e in experts if e in on]
        cpu = [e for e in experts if e not in on]
        self._borrowed = set()
        self._plan = None
        if h.shape[0] == 1:                        # decode: the VRAM ones run in device_sum
            return self.inner.start(layer, cpu, h) if cpu else []
        copy = bool(cpu) and self.prefill.choose(h.shape[0]) == "gpu"
        if copy:
            self.inner.start(layer, cpu, h)        # starts their reads; the copies read them
        if (not gpu or self._slots.get(layer) is not None) and (not copy or self._batch(layer, cpu[0])):
            self._plan = (layer, gpu, cpu if copy else [])      # grouped, in device_sum
            return [] if copy or not cpu else self.inner.start(layer, cpu, h)
        if copy:                                   # formats without grouped kernels: one by one
            self._borrowed = {(layer, e) for e in cpu}
            return gpu + cpu
        # GPU experts first: their kernels run while the CPU ones are still being read
        return gpu + (self.inner.start(layer, cpu, h) if cpu else [])

    def _batch(self, layer: int, e: int):
        """The ExpertSlots a prefill batch's copied experts go through (made once; False where
        the format has no grouped kernels or VRAM has no room for it)."""
        if self._batch_slots is None:
            try:
                self._batch_slots = self.backend.expert_slots(BATCH_SLOTS, self._expert_of(layer, e)) or False
            except AmedError:
                self._batch_slots = False
        return self._batch_slots

    def device_sum(self, layer: int, idx, wts, h, dev):
        """dev += the weighted outputs of the chosen experts that run on the GPU, on the device
        (h: the tokens' hidden states there [T, H]; idx, wts [T, k]; dev the shared expert's
        output, or None: zeros); returns dev. Decode: the VRAM experts, in two launches where
        they have slots. Prefill: the VRAM experts and those copied up for the batch (start's
        plan), grouped by expert in four launches per group."""
        B = self.backend
        if h.shape[0] == 1:
            on = self._by_layer.get(layer)
            picked = [(e, w) for e, w in zip(idx[0].tolist(), wts[0]) if on and e in on]
            if not picked:
                return dev
            dev = B.zeros(h.shape) if dev is None else dev
            slots = self._slots.get(layer)
            if slots is not None:
                slots.run([self._slot_of[(layer, e)] for e, _ in picked], [w for _, w in picked], h, dev)
            else:
                for e, w in picked:
                    B.axpy(dev, w, self._gpu[(layer, e)](h))
            return dev
        if self._plan is None or self._plan[0] != layer or not (self._plan[1] or self._plan[2]):
            return dev
        _, gpu, copied = self._plan
        dev = B.zeros(h.shape) if dev is None else dev
        flat = idx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        ids, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], len(flat))
        k = idx.shape[1]
        pairs = {e: (order[a:b] // k, wts.reshape(-1)[order[a:b]]) for e, a, b in
                 zip(ids.tolist(), starts.tolist(), ends.tolist())}          # e -> (tokens, weights)
        if gpu:
            self._slots[layer].run_pairs(h, [(self._slot_of[(layer, e)],) + pairs[e] for e in gpu], dev)
        batch = self._batch_slots
        for i in range(0, len(copied), BATCH_SLOTS):
            group = copied[i:i + BATCH_SLOTS]
            for s, e in enumerate(group):
                batch.put(s, self._expert_of(layer, e))
            batch.run_pairs(h, [(s,) + pairs[e] for s, e in enumerate(group)], dev)
            self.copied += len(group)
            self.touched.update((layer, e) for e in group)
        return dev

    def finish(self, layer: int) -> None:
        self._borrowed = set()
        if self.prefill.timing:                    # a timed batch: its GPU work counts only once done
            self.backend.synchronize()
        self.prefill.done()
        self.inner.finish(layer)

    def _admit(self, layer: int, e: int, on: set) -> None:
        slot = None
        if len(on) >= self.per_layer:
            coldest = min(on, key=lambda c: self.uses[(layer, c)])
            if self.uses[(layer, e)] <= 2 * self.uses[(layer, coldest)] + 2:
                return
            on.discard(coldest)
            del self._gpu[(layer, coldest)]
            slot = self._slot_of.pop((layer, coldest), None)
            self.swaps += 1
        elif self.backend.free_vram() < VRAM_MARGIN:
            return self._full()
        else:
            slot = len(on)                         # slots fill in order; a swap reuses the coldest's
        try:
            self._gpu[(layer, e)] = self._place(layer, e, slot)
        except AmedError:                          # out of VRAM: keep running with what is there
            return self._full()
        self.touched.add((layer, e))
        on.add(e)

    def _place(self, layer: int, e: int, slot: int | None):
        """Copy expert e to the GPU (into `slot` of the layer's ExpertSlots, made on first use)."""
        if layer not in self._slots:
            self._slots[layer] = self.backend.expert_slots(self.per_layer, self._expert_of(layer, e))
        slots = self._slots[layer]
        if slots is None or slot is None:
            return self._bind(layer, e)
        slots.put(slot, self._expert_of(layer, e))
        self._slot_of[(layer, e)] = slot
        return slots.swiglu(slot)

    def _bind(self, layer: int, e: int, for_batch: bool = False):
        B = self.backend
        held = B.uploaded
        w = B.swiglu(*self._expert_of(layer, e))
        if for_batch:                              # freed after the batch: not among the weights held
            B.uploaded = held
        return w

    def _full(self) -> None:
        self.vram_full = True
        if self._log:
            self._log(f"GPU memory is full: {len(self._gpu)} routed experts stay in VRAM, the others run on the CPU.")

    def get(self, layer: int, e: int):
        w = self._gpu.get((layer, e))
        if w is not None:
            return w
        if (layer, e) in self._borrowed:
            try:
                w = self._bind(layer, e, for_batch=True)   # read and copied up; freed after the batch
                self.copied += 1
                self.touched.add((layer, e))
                return w
            except AmedError:                      # no VRAM for it: on the CPU after all
                self._borrowed.discard((layer, e))
        return self.inner.get(layer, e)

    @property
    def resident(self) -> int:
        return len(self._gpu)

    def close(self) -> None:
        self._gpu.clear()
        self._by_layer.clear()
        self._slots.clear()
        self._slot_of.clear()
        self.inner.close()


def experts_per_layer(request, config, store, free_vram: float) -> int:
    """How many experts per MoE layer to keep in VRAM: `request` (a number, or "auto": as many as
    fit in the free VRAM less a margin), at most the layer's experts."""
    E = config.num_experts
    if request in (None, 0, "0"):
        return 0
    if request != "auto":
        return min(E, int(request))
    info = getattr(store, "experts_info", None) or {}
    stride = max((i["stride"] for i in info.values()), default=0)
    layers = max(1, len(info))
    if not stride or free_vram == float("inf"):
        return E
    return max(0, min(E, int((free_vram - VRAM_MARGIN) // (stride * layers))))


def placement_line(per_layer: int, config, store, dense_bytes: int) -> str:
    """What goes where, for the load message."""
    info = getattr(store, "experts_info", None) or {}
    stride = max((i["stride"] for i in info.values()), default=0)
    moe = sum(config.is_moe_layer(L) for L in range(config.num_hidden_layers))
    return (f"GPU: dense weights {fmt_size(dense_bytes)}; routed experts: {per_layer} of {config.num_experts} "
            f"per layer in VRAM ({fmt_size(per_layer * stride * moe)}, the most used), the rest on the CPU.")
