"""Routed experts cached in VRAM (`--device cuda --gpu-experts N|auto`).

A GPUExperts wraps the host provider (engine/experts/__init__.py): up to N experts per layer are
copied to the GPU and run there; the rest come from the host provider and run on the CPU with its
kernels. Which N: the hottest by use count. Every use is counted; an expert not on the GPU takes a
free place, or replaces the layer's coldest one once it has been used more than twice as often
(plus two: a little hysteresis so that two experts of equal heat do not swap back and forth, each
swap being a copy of the expert over PCIe)."""

from __future__ import annotations

from collections import Counter

from amed.engine.experts.memory import fmt_size

VRAM_MARGIN = 512 << 20          # kept free on the GPU for activations, scratch and the allocator


class GPUExperts:
    """An ExpertProvider: `per_layer` experts of each layer in VRAM, the others from `inner`."""

    def __init__(self, inner, bind_gpu, per_layer: int):
        self.inner = inner
        self.cache = inner.cache
        self.lookahead = inner.lookahead
        self.touched = inner.touched
        self.per_layer = per_layer
        self._bind_gpu = bind_gpu                  # (layer, e) -> SwiGLU on the device
        self._gpu: dict[tuple[int, int], object] = {}
        self._by_layer: dict[int, set[int]] = {}
        self.uses: Counter = Counter()
        self.swaps = 0

    def start(self, layer: int, experts: list[int], h) -> list[int]:
        on = self._by_layer.setdefault(layer, set())
        for e in experts:
            self.uses[(layer, e)] += 1
            if e not in on and self.per_layer:
                self._admit(layer, e, on)
        cpu = [e for e in experts if e not in on]
        # GPU experts first: their kernels run while the CPU ones are still being read
        return [e for e in experts if e in on] + (self.inner.start(layer, cpu, h) if cpu else [])

    def _admit(self, layer: int, e: int, on: set) -> None:
        if len(on) >= self.per_layer:
            coldest = min(on, key=lambda c: self.uses[(layer, c)])
            if self.uses[(layer, e)] <= 2 * self.uses[(layer, coldest)] + 2:
                return
            on.discard(coldest)
            del self._gpu[(layer, coldest)]
            self.swaps += 1
        self._gpu[(layer, e)] = self._bind_gpu(layer, e)
        self.touched.add((layer, e))
        on.add(e)

    def get(self, layer: int, e: int):
        w = self._gpu.get((layer, e))
        return w if w is not None else self.inner.get(layer, e)

    @property
    def resident(self) -> int:
        return len(self._gpu)

    def close(self) -> None:
        self._gpu.clear()
        self._by_layer.clear()
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
