"""Routed experts: where they come from and what stays in memory.

The forward pass asks an ExpertProvider two things per MoE layer:

    order = experts.start(L, chosen, h)   # layer L's router chose `chosen` (ascending ids) for
                                          # hidden state h: start reading what is not in memory;
                                          # returns the order to compute them in (ready first)
    f = experts.get(L, e)                 # expert e's bound SwiGLU, f(x, out) -> [T, H]
    experts.finish(L)                     # a batch's routed experts are done (providers that
                                          # time their choices measure here)
    dev = experts.device_sum(L, idx, w, h, dev)   # experts run on the GPU add into dev (the
                                          # shared expert's output); start() left them out

Three providers:
    ExpertProvider   experts stay in their memory maps and the OS pages them in (checkpoints)
    CachedExperts    a store's experts in its file mapping, counted and, when the model is larger
                     than the memory budget, prefetched, looked ahead and evicted (cache.py)
    SlotExperts      a budget smaller than the experts: each resident expert is a copy in a slot
                     of our own memory, read with O_DIRECT (slots.py)

ExpertOptions holds every choice (budget, I/O mode, prefetch, look-ahead, reader threads);
`ExpertOptions.from_env` reads the AMED_* variables, once, where options are made.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from amed.engine.experts.cache import EVICT_ADVICE, HALF_LIFE_TOKENS, ExpertCache
from amed.engine.experts.lookahead import LookAhead
from amed.engine.experts.memory import current_rss_bytes, default_max_ram, fmt_size, map_address, parse_size
from amed.engine.experts.slots import SlotCache
from amed.errors import AmedError

RUNTIME_MARGIN = 256 << 20      # kernels loaded, activations, allocator slack
IO_MODES = ("slots", "mmap")
LOOKAHEAD_MODES = ("auto", "on", "off")
GPU_PREFILL_MODES = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class ExpertOptions:
    max_ram: int | str | None = None   # what may stay resident (bytes or "16G"); None: from free memory
    prefetch: bool = True              # read chosen experts ahead, on reader threads
    lookahead: str = "auto"            # guess the next layer's experts: auto | on | off
    io: str = "slots"                  # under a budget: slots (own copies) | mmap (the file mapping)
    evict: str = "dontneed"            # mmap eviction advice: dontneed | pageout
    populate: bool = True              # mmap: reader threads fault prefetched experts in
    readers: int = 4                   # reader threads
    guess_readers: int = 2             # of which at most this many read look-ahead guesses
    expert_budget: int | None = None   # expert bytes, directly (tests and bench variants)
    gpu_experts: int | str = 0         # --device cuda: experts per layer cached in VRAM (a number or "auto")
    gpu_prefill: str = "auto"          # --device cuda, prefill: experts not in VRAM run on the cpu, are
                                       # copied to the gpu for the batch, or auto: whichever measures faster

    @classmethod
    def from_env(cls, **kw) -> "ExpertOptions":
        """Options with the AMED_EXPERT_IO, AMED_EVICT, AMED_POPULATE, AMED_READERS,
        AMED_GUESS_READERS and AMED_GPU_PREFILL environment variables applied (keyword arguments win)."""
        env = os.environ
        try:
            base = dict(io=env.get("AMED_EXPERT_IO", "slots"), evict=env.get("AMED_EVICT", "dontneed"),
                        populate=env.get("AMED_POPULATE", "1") != "0",
                        readers=int(env.get("AMED_READERS", "4")),
                        guess_readers=int(env.get("AMED_GUESS_READERS", "2")),
                        gpu_prefill=env.get("AMED_GPU_PREFILL", "auto"))
        except ValueError:
            raise AmedError("AMED_READERS and AMED_GUESS_READERS must be whole numbers.") from None
        base.update(kw)
        return cls(**base)

    def validate(self) -> "ExpertOptions":
        if self.io not in IO_MODES:
            raise AmedError(f"AMED_EXPERT_IO must be slots or mmap, not {self.io!r}.")
        if self.evict not in EVICT_ADVICE:
            raise AmedError(f"unknown eviction mode {self.evict!r}; use one of {', '.join(EVICT_ADVICE)}.")
        if self.lookahead not in LOOKAHEAD_MODES:
            raise AmedError(f"--lookahead takes auto, on or off, not {self.lookahead!r}.")
        if self.gpu_experts != "auto" and not (str(self.gpu_experts).isdigit()):
            raise AmedError(f"--gpu-experts takes a number of experts per layer or auto, not {self.gpu_experts!r}.")
        if self.gpu_prefill not in GPU_PREFILL_MODES:
            raise AmedError(f"AMED_GPU_PREFILL must be auto, gpu or cpu, not {self.gpu_prefill!r}.")
        return self

    def replace(self, **kw) -> "ExpertOptions":
        return dataclasses.replace(self, **kw)


# ---- providers ------------------------------------------------------------------------------------

class ExpertProvider:
    """Experts bound on first use and kept (views of the source's memory maps; the OS pages them
    in). `touched` records every (layer, expert) ever bound, so tests can prove laziness."""

    cache = None          # an ExpertCache (residency, statistics) where there is one
    lookahead = None      # a LookAhead where one runs

    def __init__(self, bind):
        self._bind = bind                 # (layer, e) -> SwiGLU
        self._views: dict = {}
        self.touched: set[tuple[int, int]] = set()

    def start(self, layer: int, experts: list[int], h) -> list[int]:
        return experts

    def finish(self, layer: int) -> None:
        pass

    def device_sum(self, layer: int, idx, wts, h, dev):
        """Add the chosen experts (idx, wts [T, k]) this provider runs on the backend's device,
        weighted, into dev (engine/experts/gpu.py); host providers run none."""
        return dev

    def get(self, layer: int, e: int):
        key = (layer, e)
        w = self._views.get(key)
        if w is None:
            w = self._views[key] = self._bind(layer, e)
            self.touched.add(key)
        return w

    def close(self) -> None:
        pass


class CachedExperts(ExpertProvider):
    """A store's experts in its file mapping, with an ExpertCache that counts every use and, under
    a budget, evicts; `prefetch(layer, experts)` starts reads once the router has chosen, and the
    look-ahead guesses the next layer's."""

    def __init__(self, bind, cache: ExpertCache, prefetch=None, lookahead: LookAhead | None = None):
        super().__init__(bind)
        self.cache = cache
        self._prefetch = prefetch
        self.lookahead = lookahead

    def start(self, layer: int, experts: list[int], h) -> list[int]:
        if self._prefetch is not None:
            self._prefetch(layer, experts)
        if self.lookahead is not None:
            self.lookahead(layer, h)
        return self.cache.ready_first(layer, experts)

    def get(self, layer: int, e: int):
        self.cache.use(layer, e)
        return super().get(layer, e)

    def close(self) -> None:
        self.cache.clear()
        self.cache.close()


class SlotExperts(CachedExperts):
    """Experts copied into slots of the SlotCache; `get` returns the expert over its slot."""

    def get(self, layer: int, e: int):
        w = self.cache.use(layer, e)
        self.touched.add((layer, e))
        return w


# ---- choosing and wiring a provider -----------------------------------------------------------------

def open_experts(model, options: ExpertOptions | None = None, log=None) -> ExpertProvider:
    """The provider for `model.source` (see _host_experts); on a GPU wrapped so that the most used
    experts of each layer are cached in VRAM (`options.gpu_experts`) and a prefill batch's others
    may be copied up for the batch (`options.gpu_prefill`) (gpu.py)."""
    o = (options or ExpertOptions()).validate()
    provider = _host_experts(model, o, log)
    backend = model.backend
    if backend.name != "cuda":
        return provider
    from amed.engine.experts.gpu import GPUExperts, experts_per_layer, placement_line

    store = model.source
    per_layer = experts_per_layer(o.gpu_experts, model.config, store, backend.free_vram())
    if log:
        log(placement_line(per_layer, model.config, store, backend.uploaded))

    return GPUExperts(provider, backend, store.expert, per_layer, prefill=o.gpu_prefill, log=log)


def _host_experts(model, o: ExpertOptions, log=None) -> ExpertProvider:
    """The provider for `model.source`: a checkpoint's experts stay in its maps; a store's get an
    expert cache whose budget is

        max_ram - dense bytes - KV cache - runtime (the process RSS now + a margin)

    (or `options.expert_budget`): unbounded when every expert fits (then only counting, with the
    store's own MADV_WILLNEED prefetch), else a SlotCache (io "slots") or an mmap ExpertCache."""
    store, backend = model.source, model.backend
    swiglu = backend.routed_backend.swiglu       # routed experts run on the CPU, whatever the device

    def bind(L, e):
        return swiglu(*store.expert(L, e))

    info = getattr(store, "experts_info", None)
    if not info:
        return ExpertProvider(bind)
    expert_total = sum(i["stride"] * i["count"] for i in info.values())
    dense = store.dense_nbytes()
    kv = model.state.nbytes
    max_ram = parse_size(o.max_ram) if o.max_ram is not None else None
    expert_budget = o.expert_budget
    if expert_budget is None:
        limit = max_ram if max_ram is not None else default_max_ram()
        expert_budget = limit - dense - kv - current_rss_bytes() - RUNTIME_MARGIN
        k = model.config.num_experts_per_tok
        floor = 2 * k * max(i["stride"] for i in info.values())
        if expert_budget < floor:
            if log:
                log(f"--max-ram {fmt_size(limit)} leaves no room for experts next to the dense weights "
                    f"({fmt_size(dense)}), the KV cache ({fmt_size(kv)}) and the runtime; serving experts "
                    f"from a minimal cache of {fmt_size(floor)} (expect peak RSS near "
                    f"{fmt_size(limit - expert_budget + floor)}).")
            expert_budget = floor
    budget = None if expert_budget >= expert_total else int(expert_budget)
    if budget is not None:
        # the kernel must see that dense weights and cached experts are in use (formats/store.py)
        store.under_memory_pressure()
    bases = {f: map_address(m) for f, m in store.maps.items()}

    ranges = getattr(store, "expert_ranges", None)     # a GGUF file: one range per stacked tensor

    def span(L, e):
        if ranges is not None:
            return [(bases[f] + off, n) for f, off, n in ranges(L, e)]
        f, off, stride = store.expert_region(L, e)
        return bases[f] + off, stride

    def region(L):
        i = info[str(L)]
        base = bases[i["file"]] + i["offset"]
        return base, base + i["stride"] * i["count"]

    c = model.config
    moe_layers = sum(c.is_moe_layer(L) for L in range(c.num_hidden_layers))
    per_token = c.num_experts_per_tok * max(1, moe_layers)                        # expert uses
    order = dict(half_life=HALF_LIFE_TOKENS * per_token, recent=per_token)
    if budget is not None and o.io == "slots":
        cache = SlotCache(budget, store, swiglu, prefetch=o.prefetch, readers=o.readers,
                          guess_readers=o.guess_readers, **order)
        kind = SlotExperts
    else:
        cache = ExpertCache(budget, span, region, prefetch=o.prefetch, evict=o.evict, populate=o.populate,
                            readers=o.readers, guess_readers=o.guess_readers, **order)
        kind = CachedExperts
    cache.expert_total = expert_total
    cache.dense_bytes = dense
    cache.max_ram = max_ram
    prefetch = lookahead = None
    if not o.prefetch:
        pass
    elif budget is not None:
        prefetch = cache.prefetch
        if o.lookahead in ("on", "auto"):
            lookahead = LookAhead(c, model.weights.layers, cache, backend, o.lookahead)
    else:                                  # everything fits: the store's own prefetch, plus counting
        store_prefetch = store.prefetch_experts
        seen: set = set()                  # nothing is evicted, so an expert needs reading once

        def prefetch(L, experts):
            cache.prefetch(L, experts)
            new = [e for e in experts if (L, e) not in seen]
            if new:
                seen.update((L, e) for e in new)
                store_prefetch(L, new)     # madvise costs ~0.1 ms per expert even when resident
    return kind(bind, cache, prefetch, lookahead)
