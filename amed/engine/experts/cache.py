"""Bounded memory for models larger than RAM: the routed-expert cache, prefetch and look-ahead.

Dense weights (attention, shared experts, routers, norms, lm_head, the embedding rows in use) stay
resident. Routed experts are kept in a cache over (layer, expert), least used (decayed count,
see Frecency) evicted first, whose bytes are held under

    expert budget = max_ram - dense bytes - KV cache - runtime (the process RSS at load + margin)

An expert counts as resident from the moment it is admitted (chosen by the router, or guessed by
look-ahead) until it is evicted. Eviction is `madvise(MADV_DONTNEED)` on its byte range: on our
read-only shared file mapping that only removes the pages from our page tables, so RSS falls at
once, while the kernel page cache keeps the bytes as long as RAM allows and a later use of the
same expert is a minor fault instead of a disk read (faster than MADV_PAGEOUT, which drops them
from the page cache too: `AMED_EVICT=pageout` to compare). Eviction never touches a
byte outside the layer's expert region, so dense weights are never dropped.

Prefetch: as soon as a layer's router has chosen, every chosen expert that is not resident gets
`MADV_WILLNEED` (the kernel queues one large asynchronous read for the whole range; the store is
otherwise MADV_RANDOM, so a plain page fault would read 4 KiB at a time) and a job for a small
pool of reader threads that calls `MADV_POPULATE_READ` (waits for the read and maps the pages)
with the GIL released, so the compute thread does not pay the faults. Look-ahead: the next
layer's router is applied to this layer's hidden state to guess its experts and read them while
this layer computes; in "auto" mode the guesses are issued only while the reads they cause have
been right at least 60% of the time recently (they are always computed, which costs one small
matmul, and always scored). In the slot cache a guessed read goes in 1 MiB chunks, each waiting
while a chosen expert is still being read, and a guess proven wrong stops at its next chunk.

Where a resident expert lives (AMED_EXPERT_IO): "slots" (the default, SlotCache) reads each
admitted expert with pread, O_DIRECT where the filesystem allows it, into a slot of our own
anonymous memory and runs the kernels on that copy; eviction just frees the slot. "mmap"
(ExpertCache, as described above) pages experts into the file mapping and evicts with madvise.
Slots won side by side (the first compute on a freshly paged-in expert is slow in the mapping;
an O_DIRECT read costs no CPU while it waits): numbers in docs/performance.md, "Larger than RAM".
An expert that the page cache still holds (mincore on our mapping says so) is copied
with a buffered read instead, so what an earlier run or the mmap path left in RAM is used.

When the whole store fits the budget nothing of this runs: the cache only counts, and the
store's own MADV_WILLNEED prefetch is used (engine/experts/__init__.py wires each case).
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from dataclasses import dataclass, fields

from amed.engine.experts.memory import (MADV_DONTNEED, MADV_PAGEOUT, MADV_POPULATE_READ, MADV_WILLNEED,
                                        fmt_size, madvise)
from amed.errors import AmedError

EVICT_ADVICE = {"dontneed": MADV_DONTNEED, "pageout": MADV_PAGEOUT}
FAULT_AROUND = 64 * 1024        # the kernel maps up to this much of cached neighbours on a fault

# ---- statistics --------------------------------------------------------------------------------

@dataclass
class CacheStats:
    uses: int = 0            # expert uses (one per chosen expert per MoE layer per forward)
    hits: int = 0            # the expert was resident before its router chose it
    prefetched: int = 0      # misses whose read was issued as soon as the router chose them
    guessed: int = 0         # misses already read by look-ahead at the previous layer
    demand: int = 0          # misses with no read ahead: faulted in by the kernel on use
    miss_bytes: int = 0      # bytes of the misses (read from disk or the page cache)
    evictions: int = 0
    evicted_bytes: int = 0
    guesses: int = 0         # experts read ahead by look-ahead
    guesses_right: int = 0   # ... that the router then chose
    guesses_cancelled: int = 0  # ... that it did not choose, cancelled before their read started
    predicted: int = 0       # experts predicted by look-ahead (issued or not)
    predicted_right: int = 0

    @property
    def misses(self) -> int:
        return self.prefetched + self.guessed + self.demand

    @property
    def hit_rate(self) -> float:
        return self.hits / self.uses if self.uses else float("nan")

    @property
    def lookahead_accuracy(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else float("nan")

    def copy(self) -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


# ---- reader threads ------------------------------------------------------------------------------

class ReaderPool:
    """A few daemon threads that run page-in jobs by priority: 0 (the router chose the expert)
    before 1 (look-ahead guessed it). At most `guess_limit` guessed reads run at once, so a read
    the model is about to wait for never shares the disk with more than that many guesses, and a
    guess still queued when the router proves it wrong can be cancelled before it costs anything."""

    def __init__(self, n: int = 4, guess_limit: int = 2):
        self.n = n
        self.guess_limit = max(1, guess_limit)
        self._cv = threading.Condition()
        self._jobs: list = []                # heap of (priority, seq, fn, args)
        self._seq = itertools.count()
        self._guessing = 0                   # guessed reads running
        self._pending = 0                    # jobs submitted and not finished
        self._threads: list[threading.Thread] = []

    def submit(self, priority: int, fn, *args) -> None:
        if not self._threads:
            for i in range(self.n):
                t = threading.Thread(target=self._run, name=f"amed-reader-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        with self._cv:
            heapq.heappush(self._jobs, (priority, next(self._seq), fn, args))
            self._pending += 1
            self._cv.notify()

    def _take(self):
        with self._cv:
            while True:
                if self._jobs:
                    priority, _, fn, _ = self._jobs[0]
                    if priority == 0 or fn is None or self._guessing < self.guess_limit:
                        job = heapq.heappop(self._jobs)
                        if priority and fn is not None:
                            self._guessing += 1
                        return job
                self._cv.wait()

    def _run(self) -> None:
        while True:
            priority, _, fn, args = self._take()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:       # a failed read-ahead only costs speed: the fault path reads it
                pass
            finally:
                with self._cv:
                    self._pending -= 1
                    if priority:
                        self._guessing -= 1
                    self._cv.notify_all()

    def drain(self) -> None:
        """Wait for every queued job (tests)."""
        with self._cv:
            while self._pending:
                self._cv.wait()

    def close(self) -> None:
        with self._cv:
            for _ in self._threads:
                heapq.heappush(self._jobs, (1 << 30, next(self._seq), None, ()))
            self._cv.notify_all()
        self._threads = []


# ---- eviction order ------------------------------------------------------------------------------

HALF_LIFE_TOKENS = 200      # how long a use of an expert keeps counting for its residency


class Frecency:
    """Which resident expert to evict: the one with the lowest decayed use count (LRFU). Each use
    adds 1 to an expert's score, and scores halve every `half_life` uses (of all experts), so an
    expert used often stays resident through the stretches it is not used, and one used once
    goes first; an expert admitted but never used (a wrong guess) goes before any used one.
    The score survives eviction: an often-used expert read again is kept longer at once.

    Why not LRU: on a recorded decode trace (31 GB flash-shaped store, 2093 of 4096 experts
    cached, random tokens) LRU hit 78.1%, LFU 84.3%, this with a 200-token half-life 84.3% (50:
    83.3%, 5: 78.3%), the offline optimum (Belady) 92.3%: 28% fewer misses than LRU, while
    still following a shift of topic within a few hundred tokens. The experts of the last token
    are evicted only after all others (`recent`; consecutive tokens of real text share experts,
    which a count alone would not see; the same 84.3% on that trace).

    Kept as the log of the score plus the time over the half-life, which orders experts the same
    at any later moment (all scores decay alike), so a heap holds them: stale entries (an expert
    used again since) are skipped when they surface."""

    NEVER = -1e12               # priority base of an expert admitted but not yet used

    def __init__(self, half_life: float, recent: int = 0):
        self.tau = float(half_life)
        self.recent = recent
        self.clock = 0
        self._hist: dict = {}       # key -> (score at its last use, time of that use), kept forever
        self._prio: dict = {}       # resident key -> its priority (the valid heap entry)
        self._heap: list = []

    def _priority(self, key) -> float:
        h = self._hist.get(key)
        if h is None:
            return self.NEVER + self.clock / self.tau     # first in, first out among these
        score, t = h
        return math.log2(score) + t / self.tau

    def _push(self, key) -> None:
        p = self._priority(key)
        self._prio[key] = p
        heapq.heappush(self._heap, (p, key))
        if len(self._heap) > 4 * len(self._prio) + 64:      # drop the stale entries
            self._heap = [(p, k) for k, p in self._prio.items()]
            heapq.heapify(self._heap)

    def admit(self, key) -> None:
        self._push(key)

    def use(self, key) -> None:
        self.clock += 1
        h = self._hist.get(key)
        score = 1.0 if h is None else h[0] * 2.0 ** ((h[1] - self.clock) / self.tau) + 1.0
        self._hist[key] = (score, self.clock)
        if key in self._prio:
            self._push(key)

    def remove(self, key) -> None:
        self._prio.pop(key, None)

    def victims(self, keep):
        """Resident keys from the first to evict on, skipping those `keep(key)` protects (they
        stay in the order); each key taken is the caller's to evict: stop iterating when enough
        are taken. Experts used within the last `recent` uses (the last token) come only after
        all others: consecutive tokens often share experts, which a pure count would not see."""
        for recent_too in (False, True):
            skipped = []
            try:
                while self._heap:
                    p, key = heapq.heappop(self._heap)
                    if self._prio.get(key) != p:
                        continue                            # stale, or no longer resident
                    if keep(key) or (not recent_too and key in self._hist
                                     and self._hist[key][1] > self.clock - self.recent):
                        skipped.append((p, key))
                        continue
                    yield key
            finally:
                for item in skipped:
                    heapq.heappush(self._heap, item)


class _Unordered:
    """The eviction order of a cache that never evicts: nothing to keep (1.3 us per use saved)."""

    def admit(self, key) -> None:
        pass

    use = remove = admit


# ---- the cache -----------------------------------------------------------------------------------

def spans(span) -> list:
    """An expert's byte ranges: `span` is one (address, length) or a list of them (a GGUF file's
    expert: one range in each of its layer's three stacked tensors)."""
    return span if isinstance(span, list) else [span]


class ExpertCache:
    """Residency of routed experts under a byte budget (None: unbounded, counting only).

    `span(layer, e)` -> (address, length) of the expert's bytes in our mapping (or a list of
    them, see `spans`), `region(layer)` -> (lo, hi) addresses of the layer's whole expert region
    (eviction never leaves it)."""

    def __init__(self, budget: int | None, span, region, *, prefetch: bool = True,
                 evict: str = "dontneed", populate: bool = True, readers: int = 4, guess_readers: int = 2,
                 half_life: float = HALF_LIFE_TOKENS * 64, recent: int = 64):
        if evict not in EVICT_ADVICE:
            raise AmedError(f"unknown eviction mode {evict!r}; use one of {', '.join(EVICT_ADVICE)}.")
        self.budget = budget
        self.span = span
        self.region = region
        self.prefetch_enabled = prefetch
        self.evict_mode = evict
        self._advice = EVICT_ADVICE[evict]
        self.populate = populate
        self.pool = ReaderPool(readers, guess_readers) \
            if (budget is not None and prefetch and populate and readers) else None
        self.stats = CacheStats()
        self.used = 0              # bytes admitted and not evicted
        self.peak = 0
        self._resident: dict = {}                # (layer, e) -> bytes charged
        # which resident expert to evict first (unbounded: nothing is ever evicted, no bookkeeping)
        self.order = Frecency(half_life, recent) if budget is not None else _Unordered()
        self._fresh: dict = {}                   # admitted ahead of use: key -> "prefetched" | "guessed"
        self._guess: dict = {}                   # layer -> set of guessed experts not yet routed
        self._queued: dict = {}                  # key -> token of its queued reader job (cancellable)
        self._running: set = set()               # keys a reader thread is paging in (not evictable)
        self._busy: set = set()                  # keys of the layer being computed (not evictable)
        self.chosen = (None, set())              # the last prefetch: (layer, experts the router chose)
        self._current = None                     # the expert being computed with
        self._lock = threading.Lock()
        self.released: list = []                 # (lo, hi) of every eviction, when record_releases
        self.record_releases = False

    @property
    def bounded(self) -> bool:
        return self.budget is not None

    def is_resident(self, key) -> bool:
        """Whether (layer, expert) is admitted (in memory, or being read)."""
        return key in self._resident

    # -- bookkeeping (main thread)
    def cost(self, layer: int, e: int) -> int:
        """Bytes an expert is charged: its own plus what the kernel's fault-around may map of its
        neighbours (up to 64 KiB either side)."""
        return self.nbytes(layer, e) + 2 * FAULT_AROUND

    def nbytes(self, layer: int, e: int) -> int:
        """The expert's own bytes."""
        return sum(n for _, n in spans(self.span(layer, e)))

    def _admit(self, key) -> int:
        n = self.cost(*key)
        if self.budget is not None and self.used + n > self.budget:
            self._evict_to(self.budget - n)
        self._resident[key] = n
        self.order.admit(key)
        self.used += n
        if self.used > self.peak:
            self.peak = self.used
        return n

    def _evict_to(self, limit: int) -> None:
        with self._lock:
            victims = []
            freed = 0
            if self.used > limit:
                for key in self.order.victims(lambda k: k in self._running or k in self._busy):
                    victims.append(key)
                    self._queued.pop(key, None)      # cancel its read-ahead if it has not started
                    freed += self._resident[key]
                    if self.used - freed <= limit:
                        break
        for key in victims:
            self._release(key)

    def _release(self, key, evicted: bool = True) -> None:
        """Forget an admitted expert and free its memory (evicted=False: a cancelled guess)."""
        n = self._resident.pop(key)
        self.order.remove(key)
        self.used -= n
        self._fresh.pop(key, None)
        if evicted:
            self.stats.evictions += 1
            self.stats.evicted_bytes += n
        self._drop(key)

    def _drop(self, key) -> None:
        """Give an evicted expert's memory back: its pages leave our mapping."""
        lo, hi = self.region(key[0])
        for addr, length in spans(self.span(*key)):
            # widen by the fault-around window so pages mapped next to the expert go too, but never
            # past the expert region: the dense weights before it must stay resident
            a, b = max(lo, addr - FAULT_AROUND), min(hi, addr + length + FAULT_AROUND)
            if self.record_releases:
                self.released.append((key, a, b))
            madvise(a, b - a, self._advice)

    def _read_ahead(self, key, priority: int) -> None:
        ranges = spans(self.span(*key))
        if self.pool is None:
            for addr, length in ranges:
                madvise(addr, length, MADV_WILLNEED)    # queue the whole range as one large read, now
            return
        token = object()
        with self._lock:
            self._queued[key] = token
        self.pool.submit(priority, self._populate, key, token, ranges)

    def _populate(self, key, token, ranges: list) -> None:   # reader thread
        with self._lock:
            if self._queued.get(key) is not token:     # evicted (or re-admitted) before its turn
                return
            del self._queued[key]
            self._running.add(key)
        try:
            for addr, length in ranges:
                madvise(addr, length, MADV_WILLNEED)        # one large read for the whole expert
            for addr, length in ranges:
                madvise(addr, length, MADV_POPULATE_READ)   # wait for it and map the pages
        finally:
            with self._lock:
                self._running.discard(key)

    # -- the hooks the model calls
    def prefetch(self, layer: int, experts) -> None:
        """Layer `layer`'s router chose `experts`: start reading the ones not resident."""
        experts = [int(e) for e in experts]
        guessed = self._guess.pop(layer, None)
        if guessed is not None:
            chosen = set(experts)
            self.stats.guesses_right += len(guessed & chosen)
            for e in guessed - chosen:
                self._wrong_guess((layer, e))
        self._busy = {(layer, e) for e in experts}
        self.chosen = (layer, set(experts))
        if not self.bounded or not self.prefetch_enabled:
            return
        self._read_ahead_all(layer, experts, self.budget // 2, "prefetched", 0)   # at most half the budget

    def _wrong_guess(self, key) -> None:
        """The router did not choose a guessed expert: it becomes a plain cache entry or, if its
        read has not started, nothing (no disk time spent on it)."""
        self._fresh.pop(key, None)
        with self._lock:
            cancel = self._queued.pop(key, None) is not None
        if cancel:
            self._release(key, evicted=False)
            self.stats.guesses_cancelled += 1

    def _read_ahead_all(self, layer: int, experts, room: int, kind: str, priority: int) -> list[int]:
        """Admit and start reading the non-resident `experts` in order while they fit in `room`
        bytes (the rest are faulted in on use); returns the ones admitted."""
        admitted = []
        for e in experts:
            key = (layer, e)
            if key in self._resident:
                continue
            n = self.cost(layer, e)
            if n > room:
                break
            room -= n
            self._admit(key)
            self._fresh[key] = kind
            self._read_ahead(key, priority)
            admitted.append(e)
        return admitted

    def guess(self, layer: int, experts, issue: bool = True) -> None:
        """Look-ahead predicted `experts` for `layer`; read the non-resident ones if `issue`."""
        experts = [int(e) for e in experts]
        self.stats.predicted += len(experts)
        if not issue or not self.bounded:
            return
        mine = self._guess.setdefault(layer, set())
        busy, self._busy = self._busy, self._busy | {(layer, e) for e in experts}
        new = self._read_ahead_all(layer, experts, self.budget // 4, "guessed", 1)
        mine.update(new)
        self.stats.guesses += len(new)
        self._busy = busy | {(layer, e) for e in mine}

    def ready_first(self, layer: int, experts: list[int]) -> list[int]:
        """`experts` reordered so that the ones already resident come first: the model computes
        with them while the reader threads are still fetching the others."""
        if not self.bounded:
            return experts
        with self._lock:
            def ready(e):
                key = (layer, e)
                return key in self._resident and key not in self._queued and key not in self._running
            return sorted(experts, key=lambda e: not ready(e))     # stable: ids ascending within

    def use(self, layer: int, e: int) -> None:
        """The model is about to compute with expert e of `layer`."""
        key = (layer, e)
        st = self.stats
        st.uses += 1
        # the expert used before this one is done: it may be evicted from now on
        self._busy.discard(self._current)
        self._current = key
        kind = self._fresh.pop(key, None)
        if kind is not None:
            setattr(st, kind, getattr(st, kind) + 1)
            st.miss_bytes += self.nbytes(*key)
            self.order.use(key)
            if key in self._queued:            # its reader has not started: this thread faults it in now
                with self._lock:
                    self._queued.pop(key, None)
        elif key in self._resident:
            st.hits += 1
            self.order.use(key)
        else:
            st.demand += 1
            st.miss_bytes += self.nbytes(*key)
            self._admit(key)
            self.order.use(key)

    def drain(self) -> None:
        if self.pool is not None:
            self.pool.drain()

    def clear(self) -> None:
        """Evict every expert (RSS drops back to the dense weights)."""
        self.drain()
        self._busy, self._current = set(), None
        for key in list(self._resident):
            self._release(key)
        self._fresh.clear()
        self._guess.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def summary(self, s: CacheStats | None = None) -> str:
        s = s or self.stats
        lim = fmt_size(self.budget) if self.bounded else "unbounded"
        return (f"expert cache {fmt_size(self.used)} of {lim}: hit rate {100 * s.hit_rate:.1f}% "
                f"({s.hits} hits, {s.prefetched} prefetched, {s.guessed} looked ahead, {s.demand} faulted, "
                f"{s.evictions} evicted, {s.guesses_cancelled} wrong guesses cancelled)")

