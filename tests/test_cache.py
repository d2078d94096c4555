"""Models larger than RAM: the expert cache keeps its budget, never drops dense weights, and the
experts it prefetches are the ones then used (amed/engine/experts)."""

import numpy as np
import pytest

import amed
import amed.engine.experts.cache
import amed.engine.experts.memory
import amed.engine.experts.slots
from amed.engine.experts import ExpertOptions
from amed.engine.experts.memory import parse_size
from amed.errors import AmedError
from amed.quant.convert import Settings, quantize_model
from amed.app.synth import SyntheticSource

SHAPE = dict(preset="flash", layers=4, hidden_size=256, num_attention_heads=4, head_dim=64,
             intermediate_size=512, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
             num_experts=64, vocab_size=2048)       # 3 MoE layers of 64 experts, top-8 of 8 groups


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache") / "store"
    quantize_model(SyntheticSource(**SHAPE), d, Settings(bits=4))
    return d


@pytest.fixture(scope="module")
def run_ids():
    rng = np.random.default_rng(0)
    return rng.integers(0, 2048, 6).tolist(), rng.integers(0, 2048, 24).tolist()


def run(model, ids):
    """Prefill, then decode token by token (random ids: routing as varied as it gets)."""
    prompt, decode = ids
    model.reset()
    out = [model.forward(prompt)]
    out += [model.forward([t]) for t in decode]
    cache = model.experts.cache
    if cache is not None:
        cache.drain()
    return np.stack(out)


@pytest.fixture(scope="module")
def reference(store, run_ids):
    m = amed.load(store)
    assert m.experts.cache is not None and not m.experts.cache.bounded   # fits: unbounded fast path
    return run(m, run_ids)


def stride(model) -> int:
    """What the cache charges for one expert."""
    return max(i["stride"] for i in model.source.experts_info.values()) + 2 * amed.engine.experts.cache.FAULT_AROUND


def layer_files_rss(model) -> int:
    """Resident bytes of this model's mappings of its layer files (from /proc/self/smaps)."""
    st = model.source
    starts = {amed.engine.experts.memory.map_address(st.maps[i["file"]]) for i in st.experts_info.values()}
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:          # a mapping header: start-end perms ...
                mine = int(parts[0].split("-")[0], 16) in starts
            elif parts[0] == "Rss:" and mine:
                total += int(parts[1]) * 1024
    return total


def test_parse_size():
    assert parse_size("16G") == parse_size("16GiB") == 16 << 30
    assert parse_size("12000M") == 12000 << 20
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("4096") == parse_size(4096) == 4096
    with pytest.raises(AmedError, match="size"):
        parse_size("lots")


@pytest.fixture(params=["slots", "mmap"])
def io(request, monkeypatch):
    """Both ways of holding experts under a budget: slots (pread into our memory, the default)
    and the file mapping with madvise (AMED_EXPERT_IO=mmap)."""
    monkeypatch.setenv("AMED_EXPERT_IO", request.param)
    return request.param


@pytest.mark.parametrize("prefetch", [True, False])
def test_budget_respected_under_random_routing(store, run_ids, reference, prefetch, io):
    m = amed.load(store, prefetch=prefetch, lookahead="off")
    budget = 20 * stride(m)                  # 20 of the 192 experts
    cache = m.use_experts(ExpertOptions.from_env(prefetch=prefetch, lookahead="off", expert_budget=budget)).cache
    assert cache.bounded and (cache.pool is not None) == prefetch
    out = run(m, run_ids)
    np.testing.assert_array_equal(out, reference)          # eviction changes nothing but memory
    st = cache.stats
    assert cache.peak <= budget and cache.used <= budget
    assert st.evictions > 0 and st.uses == st.hits + st.prefetched + st.guessed + st.demand
    # the kernel's view: what stays mapped of the layer files is the cache plus the dense weights
    dense_in_layers = sum(t.nbytes for n, t in m.source.tensors.items()
                          if n.startswith("blk.") and "_exps." not in n)
    if io == "mmap":
        assert layer_files_rss(m) <= budget + dense_in_layers
    else:           # experts live in the slots only: the file mappings hold no expert page
        assert isinstance(cache, amed.engine.experts.slots.SlotCache)
        assert layer_files_rss(m) <= dense_in_layers + 64 * 1024 * len(m.weights.layers)
        assert len(cache._slots) * cache.slot_size <= budget


def test_eviction_never_drops_dense_weights(store, run_ids, reference, monkeypatch):
    monkeypatch.setenv("AMED_EXPERT_IO", "mmap")        # the madvise eviction of the mapping cache
    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=17 * stride(m), evict="pageout")).cache
    cache.record_releases = True
    np.testing.assert_array_equal(run(m, run_ids), reference)
    assert cache.released
    st = m.source
    bases = {f: amed.engine.experts.memory.map_address(mm) for f, mm in st.maps.items()}
    dense = [(bases[t.path.name] + t.start, bases[t.path.name] + t.end) for n, t in st.tensors.items()
             if "_exps." not in n and not n.startswith("__pad__")]
    for (L, e), lo, hi in cache.released:
        info = st.experts_info[str(L)]
        base = bases[info["file"]] + info["offset"]
        assert base <= lo < hi <= base + info["stride"] * info["count"]
        assert not any(a < hi and lo < b for a, b in dense)
    # and the dense weights are all still in the page cache after MADV_PAGEOUT of the experts
    from amed.engine.experts.memory import resident_fraction

    for n in ("blk.1.attn_qkv.q", "blk.2.ffn_gate_inp", "blk.3.ffn_up_shexp.q", "output.q"):
        t = st.tensors[n]
        assert resident_fraction(st.maps[t.path.name], t.start, t.end - t.start) == 1.0, n


def test_prefetched_experts_are_the_ones_used(store, run_ids, reference, io):
    m = amed.load(store, lookahead="off")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="off", expert_budget=40 * stride(m))).cache
    np.testing.assert_array_equal(run(m, run_ids), reference)
    st = cache.stats
    assert st.prefetched > 0 and st.guessed == 0 and st.guesses == 0
    assert not cache._fresh                 # every expert read ahead was then used
    # decode misses are all prefetched (the prefill may route to more than half the budget)
    before = cache.stats.copy()
    m.forward([5])
    d = cache.stats - before
    assert d.uses == 3 * 8 and d.demand == 0 and d.prefetched == d.uses - d.hits
    # the same token again at the same position: every expert is a hit
    m.truncate(m.pos - 1)
    before = cache.stats.copy()
    m.forward([5])
    d = cache.stats - before
    assert d.hits == d.uses == 24


def test_lookahead_guesses_are_counted(store, run_ids, reference, io):
    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=50 * stride(m))).cache
    np.testing.assert_array_equal(run(m, run_ids), reference)
    st = cache.stats
    # one prediction per MoE layer after the first, per forward
    assert st.predicted > 0 and 0 <= st.predicted_right <= st.predicted
    assert st.guesses > 0 and st.guessed == st.guesses_right <= st.guesses
    assert st.uses == st.hits + st.prefetched + st.guessed + st.demand
    assert cache.peak <= cache.budget


def test_wrong_guesses_not_yet_read_are_cancelled(store, io):
    """Look-ahead guessed experts 3 and 5 of layer 2; the router then chose 3 and 7. Expert 5's
    read had not started: it is cancelled (no disk time, no memory), not kept as a cache entry."""
    class Held:                          # a reader pool whose jobs never start
        def submit(self, *job):
            pass

        def drain(self):
            pass

        def close(self):
            pass

    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=50 * stride(m))).cache
    cache.pool = Held()
    cache.guess(2, [3, 5])
    used = cache.used
    cache.prefetch(2, [3, 7])
    assert (2, 5) not in cache._resident and (2, 5) not in cache._queued
    assert (2, 3) in cache._resident and (2, 7) in cache._resident
    assert cache.stats.guesses_cancelled == 1 and cache.stats.guesses_right == 1
    assert cache.used == used - cache.cost(2, 5) + cache.cost(2, 7)
    if io == "slots":
        assert len(cache._slots) == 2 and len(cache._slot_of) == 2     # 7 took over 5's slot


def test_slots_come_from_one_arena_faulted_in_ahead(store, run_ids, reference, monkeypatch):
    """SlotCache: the budget's slots are one arena, handed out in order and faulted in ahead of
    need by a reader, never past what the budget pays for; the floor path adds separate maps."""
    monkeypatch.setenv("AMED_EXPERT_IO", "slots")
    m = amed.load(store, lookahead="off")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="off", expert_budget=30 * stride(m))).cache
    assert cache.capacity == 30 * stride(m) // cache.slot_size
    np.testing.assert_array_equal(run(m, run_ids), reference)
    arena = amed.engine.experts.memory.map_address(cache._arena)
    for i, slot in enumerate(cache._slots):
        assert np.frombuffer(slot, np.uint8, count=1).ctypes.data == arena + i * cache.slot_size
    assert len(cache._slots) <= cache.capacity
    assert cache._handed <= cache._faulted <= cache.capacity            # prefaulted ahead, bounded
    assert cache._faulted >= min(cache.capacity, cache._handed + amed.engine.experts.slots.PREFAULT_AHEAD)
    cache.touch_memory()                    # with experts loaded: only the unused slots
    assert cache._faulted <= cache._handed
    m.truncate(len(run_ids[0]))
    np.testing.assert_array_equal(m.forward([run_ids[1][0]]), reference[1])
    cache.clear()
    assert cache._handed == 0 and not cache._free and cache.used == 0
    cache.touch_memory()                                                # what amed bench does first
    np.testing.assert_array_equal(run(m, run_ids), reference)           # reused slots, same bytes


def test_max_ram_plumbing(store, run_ids, reference, io):
    msgs = []
    m = amed.load(store, max_ram="1M", log=msgs.append)       # far too small: runs on a minimal cache
    assert m.experts.cache.bounded and msgs and "minimal cache" in msgs[0]
    np.testing.assert_array_equal(run(m, run_ids), reference)
    big = amed.load(store, max_ram="64G")
    assert not big.experts.cache.bounded and big.experts.lookahead is None


def vm_flags(addr: int) -> set[str]:
    """VmFlags of the mapping that holds `addr` (/proc/self/smaps)."""
    cur = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                cur = lo <= addr < hi
            elif cur and parts[0] == "VmFlags:":
                return set(parts[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_reclaim_sees_dense_weights_and_cached_experts_in_use(store, monkeypatch):
    """Linux >= 6.3 ignores accesses through MADV_RANDOM ("rr") mappings when reclaiming: once
    memory is bounded, only the embeddings keep it (no read-around when everything fits)."""
    m = amed.load(store)
    st = m.source
    base = amed.engine.experts.memory.map_address(st.maps["layer-001.safetensors"])
    qkv = base + st.tensors["blk.1.attn_qkv.q"].start
    experts = base + st.experts_info["1"]["offset"]
    embd = amed.engine.experts.memory.map_address(st.maps["globals.safetensors"]) + st.tensors["token_embd.q"].start
    assert "rr" in vm_flags(qkv) and "rr" in vm_flags(experts)
    m.use_experts(ExpertOptions.from_env(expert_budget=20 * stride(m))).cache
    assert "rr" not in vm_flags(experts) and "rr" not in vm_flags(qkv) and "rr" in vm_flags(embd)


def test_resident_experts_run_first_and_the_sum_order_is_kept(store, run_ids, reference, io):
    m = amed.load(store, lookahead="off")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="off", expert_budget=12 * stride(m))).cache   # the last layer's experts stay
    np.testing.assert_array_equal(run(m, run_ids), reference)   # whatever order experts ran in
    resident = sorted(e for (L, e) in cache._resident if L == 3)
    absent = sorted(set(range(64)) - set(resident))
    assert resident and absent
    mixed = sorted([absent[0], resident[0], absent[-1], resident[-1]])
    assert cache.ready_first(3, mixed) == [resident[0], resident[-1], absent[0], absent[-1]]
    cache._queued[(3, resident[0])] = object()          # still being read: not ready
    assert cache.ready_first(3, mixed)[0] == resident[-1]
    cache._queued.clear()


def test_slot_cache_reads_without_o_direct(store, run_ids, reference, monkeypatch):
    """A filesystem without O_DIRECT (or a platform without it): buffered reads, same results."""
    monkeypatch.delattr(amed.engine.experts.slots.os, "O_DIRECT", raising=False)
    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=16 * stride(m))).cache
    assert isinstance(cache, amed.engine.experts.slots.SlotCache)
    np.testing.assert_array_equal(run(m, run_ids), reference)
    assert cache._fds and not any(direct for _, direct in cache._fds.values())
    assert cache.stats.evictions > 0


def test_slot_cache_truncated_store_is_one_clear_error(store, tmp_path):
    """A layer file cut short after the store was opened: the read of an expert past the end
    fails with one sentence naming the file, whether a reader thread or the model hit it."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    m = amed.load(copy, lookahead="off")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="off", expert_budget=16 * stride(m))).cache
    info = m.source.experts_info["1"]
    with open(copy / info["file"], "r+b") as f:                # keep the first expert only
        f.truncate(info["offset"] + info["stride"])
    with pytest.raises(AmedError, match=r"layer-001\.safetensors is truncated .*re-run `amed quantize`"):
        for t in range(40):
            m.forward([t * 37 % 2048])
    cache.close()


def test_slot_cache_reads_cold_experts_with_o_direct_and_cached_ones_buffered(store, run_ids, reference):
    """Experts the page cache still holds are copied from it (a buffered read is a memory copy);
    the others are read from the disk with O_DIRECT, which keeps no second copy in RAM."""
    import gc

    from amed.app.bench import drop_expert_pages

    gc.collect()                               # no other model keeps expert pages mapped
    m = amed.load(store, lookahead="off")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="off", expert_budget=16 * stride(m))).cache
    drop_expert_pages(m.source)
    np.testing.assert_array_equal(run(m, run_ids), reference)
    kinds = {direct for _, direct in cache._fds.values()}
    assert True in kinds or not hasattr(amed.engine.experts.slots.os, "O_DIRECT")


def test_frecency_keeps_often_used_experts_and_evicts_wrong_guesses_first():
    from amed.engine.experts.cache import Frecency

    order = Frecency(half_life=100, recent=2)
    for key in ("hot", "once", "guess"):
        order.admit(key)
    for _ in range(5):
        order.use("hot")
    order.use("once")                       # used after "hot", but once
    for t in range(4):                      # other experts' uses: "once" is no longer recent
        order.admit(t)
        order.use(t)
    first = list(order.victims(lambda k: False))
    assert first[0] == "guess"              # admitted, never used
    assert first.index("once") < first.index("hot")
    assert set(first) == {"hot", "once", "guess", 0, 1, 2, 3}
    assert first[-2:] == [2, 3]             # the last `recent` uses go last


def test_frecency_victims_skip_protected_and_keep_them():
    from amed.engine.experts.cache import Frecency

    order = Frecency(half_life=100)
    for key in "abc":
        order.admit(key)
        order.use(key)
    it = order.victims(lambda k: k == "a")
    assert next(it) == "b"
    it.close()                              # the caller took what it needed
    order.remove("b")                       # every key taken is evicted by the caller
    order.use("a")                          # a stale heap entry of "a" is skipped, not doubled
    assert list(order.victims(lambda k: False)) == ["c", "a"]


def test_a_wrong_guess_being_read_is_abandoned(store, monkeypatch):
    """SlotCache: a guessed read yields between chunks; when the router proves the guess wrong
    while it is being read, it stops, and its slot is released at the next layer."""
    import threading
    import time

    monkeypatch.setenv("AMED_EXPERT_IO", "slots")
    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=50 * stride(m))).cache
    gate = threading.Event()
    may_read = cache._may_read

    def held(key):                          # the guess's reader stops before its first chunk
        gate.wait(10)
        return may_read(key)
    cache._may_read = held
    cache.guess(2, [5])
    deadline = time.monotonic() + 10
    while (2, 5) not in cache._running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert (2, 5) in cache._running
    cache.prefetch(2, [3, 7])               # 5 was wrong, and its read has started
    assert (2, 5) in cache._abandon and cache.stats.guesses_cancelled == 1
    gate.set()
    cache.drain()
    assert (2, 5) not in cache._loaded and (2, 3) in cache._loaded and (2, 7) in cache._loaded
    slots_in_use = len(cache._slot_of)
    cache.prefetch(3, [])                   # the next layer: the stopped guess is released
    assert (2, 5) not in cache._resident and len(cache._slot_of) == slots_in_use - 1
    assert not cache._abandon and not cache._abandoned


def test_guessed_reads_in_small_chunks_give_the_same_logits(store, run_ids, reference, monkeypatch):
    monkeypatch.setenv("AMED_EXPERT_IO", "slots")
    monkeypatch.setattr(amed.engine.experts.slots, "GUESS_CHUNK", 4096)     # many chunks per expert
    m = amed.load(store, lookahead="on")
    cache = m.use_experts(ExpertOptions.from_env(lookahead="on", expert_budget=30 * stride(m))).cache
    assert cache.slot_size > 4 * 4096
    np.testing.assert_array_equal(run(m, run_ids), reference)
    assert cache.stats.guesses > 0 and cache.stats.guessed > 0
