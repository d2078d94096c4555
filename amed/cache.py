"""Bounded memory for models larger than RAM: the routed-expert cache, prefetch and look-ahead.

Dense weights (attention, shared experts, routers, norms, lm_head, the embedding rows in use) stay
resident. Routed experts are kept in a cache over (layer, expert), least used (decayed count,
see Frecency) evicted first, whose bytes are held under

    expert budget = max_ram - dense bytes - KV cache - runtime (the process RSS at load + margin)

An expert counts as resident from the moment it is admitted (chosen by the router, or guessed by
look-ahead) until it is evicted. Eviction is `madvise(MADV_DONTNEED)` on its byte range: on our
read-only shared file mapping that only removes the pages from our page tables, so RSS falls at
once, while the kernel page cache keeps the bytes as long as RAM allows and a later use of the
same expert is a minor fault instead of a disk read (measured faster than MADV_PAGEOUT, which
drops them from the page cache too: `AMED_EVICT=pageout` to compare). Eviction never touches a
byte outside the layer's expert region, so dense weights are never dropped.

Prefetch: as soon as a layer's router has chosen, every chosen expert that is not resident gets
`MADV_WILLNEED` (the kernel queues one large asynchronous read for the whole range; the store is
otherwise MADV_RANDOM, so a plain page fault would read 4 KiB at a time) and a job for a small
pool of reader threads that calls `MADV_POPULATE_READ` (waits for the read and maps the pages)
with the GIL released, so the compute thread does not pay the faults. Look-ahead: the next
layer's router is applied to this layer's hidden state to guess its experts and read them while
this layer computes; in "auto" mode the guesses are issued only while the reads they cause have
been right at least 60% of the time recently (they are always computed, which costs one small
matmul, and always scored). A wrong guess used to cost a whole expert read of disk time, which
the model's own reads then shared: on random weights, where 54% of those reads were right,
look-ahead was 5-15% slower than none (4 A/B pairs, 31 GB store). In the slot cache a guessed
read now goes in 1 MiB chunks, each waiting while a chosen expert is still being read, and a
guess proven wrong stops at its next chunk: steady state on the same store, look-ahead on read
203 -> 168 MB per token (138 of them used) and decoded 5.9 -> 6.3-6.7 t/s, level with off
(6.5-6.9). Published measurements on trained MoE models find next-layer routing far more
predictable than these random weights.

Where a resident expert lives (AMED_EXPERT_IO): "slots" (the default, SlotCache) reads each
admitted expert with pread, O_DIRECT where the filesystem allows it, into a slot of our own
anonymous memory and runs the kernels on that copy; eviction just frees the slot. "mmap"
(ExpertCache, as described above) pages experts into the file mapping and evicts with madvise.
Measured side by side on the 2-vCPU VM (31 GB flash-shaped int4 store, --max-ram 16G, random
decode tokens, cold): slots 4.1-4.4 t/s, mmap 2.8-3.8 t/s. On a miss, the first compute on a
freshly paged-in expert took 0.4-6 ms in the mapping (page mapping, and the VM host backing the
new page-cache pages), 0.21-0.27 ms on a reused slot, and an O_DIRECT read costs no CPU while
it waits. An expert that the page cache still holds (mincore on our mapping says so) is copied
with a buffered read instead, so what an earlier run or the mmap path left in RAM is used.

When the whole store fits the budget nothing of this runs: `Weights.expert` only counts, and the
store's own MADV_WILLNEED prefetch is used as before (the in-RAM path is unchanged).
"""

from __future__ import annotations

import ctypes
import errno
import heapq
import itertools
import math
import mmap
import os
import re
import threading
from dataclasses import dataclass, fields

import numpy as np

from .errors import AmedError

MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = 14
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
GUESS_CHUNK = 1 << 20           # a guessed read yields between chunks of this size (SlotCache)
PREFAULT_AHEAD = 16             # slots a reader faults in ahead of the next new one (SlotCache)
EVICT_ADVICE = {"dontneed": MADV_DONTNEED, "pageout": MADV_PAGEOUT}
FAULT_AROUND = 64 * 1024        # the kernel maps up to this much of cached neighbours on a fault
RUNTIME_MARGIN = 256 << 20      # kernels loaded, activations, allocator slack

# ---- sizes -------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """'16G', '16GiB', '12000M', '1.5T', '512MiB', '2000000000' -> bytes. K/M/G/T and KiB/MiB/GiB/TiB
    are powers of 1024 (as in `free -g`, docker, Java); KB/MB/GB/TB are powers of 1000."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise AmedError(f"cannot read {text!r} as a size; use e.g. 16G, 16GiB, 12000M or 20GB.")
    num, unit, i, b = m.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (b and not i) else 1024
    return int(float(num) * base ** power)


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); physical free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_ram() -> int:
    """What amed may keep resident by default: 90% of the memory available now plus what this
    process already holds."""
    from .bench import current_rss_bytes

    return int(0.9 * mem_available()) + current_rss_bytes()


def disk_read_bytes() -> int | None:
    """Bytes this process (all threads) has caused to be read from storage (/proc/self/io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- madvise and mincore (ctypes: the GIL is released) ---------------------------------------------

_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


def madvise(addr: int, length: int, advice: int) -> int:
    """madvise(2) through ctypes (which releases the GIL); returns 0 or the errno."""
    if length <= 0:
        return 0
    return 0 if _lib().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) == 0 else ctypes.get_errno()


def map_address(m: mmap.mmap) -> int:
    return np.frombuffer(m, np.uint8, count=1).ctypes.data


def resident_fraction(m: mmap.mmap, offset: int, length: int) -> float:
    """Fraction of pages of m[offset:offset+length] resident in RAM (page cache), via mincore."""
    if length <= 0:
        return 0.0
    page = mmap.PAGESIZE
    start = (map_address(m) + offset) // page * page
    end = map_address(m) + offset + length
    npages = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * npages)()
    if _lib().mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vec) != 0:
        return float("nan")
    return float((np.frombuffer(vec, np.uint8) & 1).mean())


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

class ExpertCache:
    """Residency of routed experts under a byte budget (None: unbounded, counting only).

    `span(layer, e)` -> (address, length) of the expert's bytes in our mapping, `region(layer)` ->
    (lo, hi) addresses of the layer's whole expert region (eviction never leaves it)."""

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

    # -- bookkeeping (main thread)
    def cost(self, layer: int, e: int) -> int:
        """Bytes an expert is charged: its own plus what the kernel's fault-around may map of its
        neighbours (up to 64 KiB either side)."""
        return self.span(layer, e)[1] + 2 * FAULT_AROUND

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
        addr, length = self.span(*key)
        lo, hi = self.region(key[0])
        # widen by the fault-around window so pages mapped next to the expert go too, but never
        # past the expert region: the dense weights before it must stay resident
        a, b = max(lo, addr - FAULT_AROUND), min(hi, addr + length + FAULT_AROUND)
        if self.record_releases:
            self.released.append((key, a, b))
        madvise(a, b - a, self._advice)

    def _read_ahead(self, key, priority: int) -> None:
        addr, length = self.span(*key)
        if self.pool is None:
            madvise(addr, length, MADV_WILLNEED)    # queue the whole range as one large read, now
            return
        token = object()
        with self._lock:
            self._queued[key] = token
        self.pool.submit(priority, self._populate, key, token, addr, length)

    def _populate(self, key, token, addr: int, length: int) -> None:   # reader thread
        with self._lock:
            if self._queued.get(key) is not token:     # evicted (or re-admitted) before its turn
                return
            del self._queued[key]
            self._running.add(key)
        try:
            madvise(addr, length, MADV_WILLNEED)        # one large read for the whole expert
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
            st.miss_bytes += self.span(*key)[1]
            self.order.use(key)
            if key in self._queued:            # its reader has not started: this thread faults it in now
                with self._lock:
                    self._queued.pop(key, None)
        elif key in self._resident:
            st.hits += 1
            self.order.use(key)
        else:
            st.demand += 1
            st.miss_bytes += self.span(*key)[1]
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


class SlotCache(ExpertCache):
    """The expert cache with memory of its own: a resident expert is a copy of its byte range in
    a slot (anonymous memory, reused after eviction), read with `pread` and O_DIRECT where the
    filesystem allows it, so the page cache is bypassed.

    Why (measured on the 2-vCPU VM, flash-shaped int4 store, 7 MB experts read cold): the first
    compute on an expert paged into the file mapping took 0.4-6 ms (the kernel, and the VM's host,
    map freshly read page-cache pages on first access), on a reused slot 0.21-0.27 ms every time;
    the read itself runs at the disk's speed either way (~1.2 GB/s here), and an O_DIRECT read
    needs no CPU while it waits, which leaves both cores to the compute. Eviction only returns the
    slot to the free list. Same eviction order, budget, prefetch and look-ahead as ExpertCache."""

    def __init__(self, budget: int, store, *, prefetch: bool = True, readers: int = 4, guess_readers: int = 2,
                 half_life: float = HALF_LIFE_TOKENS * 64, recent: int = 64):
        def span(L, e):
            _, off, stride = store.expert_region(L, e)
            return off, stride

        def region(L):
            i = store.experts_info[str(L)]
            return i["offset"], i["offset"] + i["stride"] * i["count"]

        super().__init__(budget, span, region, prefetch=prefetch, readers=0, half_life=half_life,
                         recent=recent)
        self.pool = ReaderPool(readers, guess_readers) if (prefetch and readers) else None
        self.store = store
        self.slot_size = S = max(i["stride"] for i in store.experts_info.values())
        # The slots the budget pays for are one reserved arena, backed on first touch (RSS grows as
        # slots are used), in huge pages where the kernel gives them, and faulted in ahead of need
        # by an idle reader (_prefault): on the 2-vCPU VM a read into never-touched memory took
        # 25 ms instead of 4.5 (faulting 1728 4 KiB pages, each backed by the VM's host too).
        self.capacity = max(1, budget // S)
        # private: MADV_DONTNEED really frees it (a shared anonymous map is shmem, kept)
        self._arena = mmap.mmap(-1, self.capacity * S, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._arena_addr = map_address(self._arena)
        madvise(self._arena_addr, self.capacity * S, MADV_HUGEPAGE)    # a hint: refused is fine
        self._handed = 0                 # slots [0, _handed) used since the last clear()
        self._faulted = 0                # arena slots [0, _faulted) are faulted in (or being)
        self._prefaulting = False        # a _prefault job is queued or running
        self._slots: list = []           # slot buffers of slot_size bytes (arena, then mmaps)
        self._free: list = []            # indices of unused slots
        self._slot_of: dict = {}         # key -> slot index
        self._loaded: set = set()        # keys whose bytes are in their slot
        self._done: dict = {}            # key -> Event, set when its read ended (well or not)
        self._views: dict = {}           # key -> (gate, up, down) over its slot
        self._fds: dict = {}             # (file name, O_DIRECT wanted) -> (fd, O_DIRECT?)
        self._cv = threading.Condition(self._lock)     # guessed reads wait on it (_may_read)
        self._want: set = set()          # the current layer's chosen experts not loaded yet
        self._abandon: set = set()       # wrong guesses whose read is running: stop it
        self._abandoned: list = []       # ... stopped, to release from the main thread

    def cost(self, layer: int, e: int) -> int:
        return self.slot_size

    @property
    def loaded_bytes(self) -> int:
        """Bytes of the slots that hold a loaded expert."""
        return len(self._loaded) * self.slot_size

    def _admit(self, key) -> int:
        n = super()._admit(key)
        if self._free:
            i = self._free.pop()
        else:          # the next slot not used since the last clear(), in index order
            i = self._handed
            self._handed += 1
            S = self.slot_size
            if i == len(self._slots):       # never used before: a new slot, from the arena or,
                # when every slot is busy (the floor budget), one more map of its own
                self._slots.append(memoryview(self._arena)[i * S:(i + 1) * S] if i < self.capacity else
                                   mmap.mmap(-1, S, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
            self._prefault_ahead()
        self._slot_of[key] = i
        self._done[key] = threading.Event()
        return n

    def _drop(self, key) -> None:
        """An evicted expert's slot goes back to the free list."""
        if self.record_releases:
            self.released.append((key,) + self.region(key[0]))
        self._views.pop(key, None)
        self._loaded.discard(key)
        self._done.pop(key, None)
        self._free.append(self._slot_of.pop(key))

    def touch_memory(self) -> None:
        """Fault the whole arena in once, then give it back (untimed, for `amed bench`). On a VM
        the first touch of memory the host has not backed yet costs several times a later one:
        on the 31 GB store, look-ahead off decoded at 2.35 t/s as a bench's first variant and at
        3.73 as its second; with this touch first, 2.88 as the first (runs vary by ~20%). Only
        slots not handed out are touched: the others may hold experts."""
        S = self.slot_size
        lo, length = self._arena_addr + self._handed * S, (self.capacity - self._handed) * S
        madvise(lo, length, MADV_POPULATE_WRITE)
        madvise(lo, length, MADV_DONTNEED)
        self._faulted = min(self._faulted, self._handed)

    def _prefault_ahead(self) -> None:
        """Have an idle reader fault in the next arena slots before they are needed."""
        if self.pool is None:
            return
        with self._lock:             # _prefault decides to stop under it too: no lost wake-up
            if self._prefaulting or self._faulted >= min(self.capacity, self._handed + PREFAULT_AHEAD):
                return
            self._prefaulting = True
        self.pool.submit(2, self._prefault)

    def _prefault(self) -> None:                                         # reader thread
        S = self.slot_size
        for _ in range(4):           # a few slots per job, so reads queued meanwhile go first
            with self._lock:
                i = max(self._faulted, self._handed)    # a slot handed out is being read into
                if i >= min(self.capacity, self._handed + PREFAULT_AHEAD):
                    self._prefaulting = False
                    return
                self._faulted = i + 1
            if madvise(self._arena_addr + i * S, S, MADV_POPULATE_WRITE):    # kernel < 5.14
                with self._lock:
                    self._faulted = self.capacity                            # stop trying
        with self._lock:
            self._prefaulting = False
        self._prefault_ahead()

    def prefetch(self, layer: int, experts) -> None:
        """ExpertCache.prefetch, and what guessed reads must now yield to: the chosen experts
        not loaded yet."""
        self._release_abandoned()
        super().prefetch(layer, experts)
        with self._cv:
            self._want = {(layer, int(e)) for e in experts} - self._loaded
            self._cv.notify_all()

    def _wrong_guess(self, key) -> None:
        """A wrong guess whose read is running stops at its next chunk (see _read), then its slot
        is released; others as in ExpertCache."""
        with self._lock:
            running = key in self._running and key not in self._loaded
            if running:
                self._abandon.add(key)
        if not running:
            return super()._wrong_guess(key)
        self._fresh.pop(key, None)
        self.stats.guesses_cancelled += 1

    def _release_abandoned(self) -> None:
        with self._lock:
            stopped, self._abandoned = self._abandoned, []
        for key in stopped:
            if key in self._resident and key not in self._loaded and key not in self._busy \
                    and key not in self._running:
                self._release(key, evicted=False)

    def _may_read(self, key) -> bool:
        """Between chunks of a guessed read: wait while a chosen expert is still being read (a
        guess must not take disk time from it), unless this guess is one of them; False when the
        router proved it wrong."""
        with self._cv:
            for _ in range(10):              # at most ~50 ms: a stale want cannot stall it
                if key in self._abandon:
                    return False
                if not self._want or key in self._want:
                    return True
                self._cv.wait(0.005)
            return key not in self._abandon

    def _read_ahead(self, key, priority: int) -> None:
        if self.pool is None:
            return                   # read on use
        token = object()
        with self._lock:
            self._queued[key] = token
        self.pool.submit(priority, self._load, key, token, priority > 0)

    def _load(self, key, token, guessed: bool = False) -> None:           # reader thread
        with self._lock:
            if self._queued.get(key) is not token:     # evicted, or taken over by use(), first
                return
            del self._queued[key]
            self._running.add(key)
            done = self._done[key]
        try:
            self._read(key, yielding=guessed)
        finally:
            with self._lock:
                self._running.discard(key)
                if key in self._abandon:
                    self._abandon.discard(key)
                    if key not in self._loaded:
                        self._abandoned.append(key)
            done.set()

    def _fd(self, fname: str, direct: bool) -> tuple[int, bool]:
        if (fname, direct) not in self._fds:
            path = str(self.store.path / fname)
            flag = getattr(os, "O_DIRECT", 0) if direct else 0
            try:
                self._fds[fname, direct] = (os.open(path, os.O_RDONLY | flag), bool(flag))
            except OSError:          # a filesystem without O_DIRECT (tmpfs): buffered reads
                self._fds[fname, direct] = (os.open(path, os.O_RDONLY), False)
        return self._fds[fname, direct]

    def _in_page_cache(self, fname: str, off: int, length: int) -> bool:
        """Whether the kernel still holds the expert's bytes (an earlier run, free RAM beyond the
        budget): then a buffered read is a memory copy, where O_DIRECT would go to the disk."""
        return resident_fraction(self.store._maps[fname], off, length) >= 0.99

    def _read(self, key, yielding: bool = False) -> None:
        """Copy the expert's bytes into its slot (any thread; the GIL is released meanwhile).
        `yielding` (a guessed read): in chunks, each waiting for the chosen experts' reads
        (_may_read), so a guess never shares the disk with a read the model waits for, and a
        wrong one stops early. Chunks of 1 MiB read as fast as one whole read on this VM."""
        L, e = key
        fname, off, length = self.store.expert_region(L, e)
        cached = self._in_page_cache(fname, off, length)
        fd, direct = self._fd(fname, direct=not cached)
        buf = memoryview(self._slots[self._slot_of[key]])[:length]
        step = GUESS_CHUNK if yielding else length
        n = 0
        try:
            for at in range(0, length, step):
                if yielding and not self._may_read(key):
                    return                               # abandoned: not loaded
                got = os.preadv(fd, [buf[at:at + step]], off + at)
                n += got
                if got < min(step, length - at):
                    break
        except OSError as err:
            if direct and err.errno == errno.EINVAL:    # O_DIRECT refused at read time: buffered
                os.close(fd)
                self._fds[fname, True] = (os.open(str(self.store.path / fname), os.O_RDONLY), False)
                return self._read(key, yielding)
            raise AmedError(f"cannot read expert {e} of layer {L} from {self.store.path / fname}: "
                            f"{err.strerror}.") from None
        finally:
            buf.release()
        if n != length:
            raise AmedError(f"{self.store.path / fname} is truncated (expert {e} of layer {L} is "
                            f"cut short); re-run `amed quantize`.")
        if not direct and not cached:    # read from disk without O_DIRECT: keep no second copy
            os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
        with self._cv:
            if key in self._slot_of:
                self._loaded.add(key)
            if key in self._want:
                self._want.discard(key)
                self._cv.notify_all()

    def use(self, layer: int, e: int):
        """Account for the use (ExpertCache.use), make sure the bytes are in the slot, and return
        the expert's (gate, up, down) over it."""
        super().use(layer, e)
        key = (layer, e)
        if key not in self._loaded:
            with self._lock:
                running = key in self._running
                self._queued.pop(key, None)       # not started: read it here, now
            if running:
                self._done[key].wait()
            if key not in self._loaded:           # demand miss, taken over, or a failed read-ahead
                self._read(key)
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = self.store.expert_in(layer, e, self._slots[self._slot_of[key]])
        return v

    def clear(self) -> None:
        super().clear()
        # give the memory back (the mappings stay valid, zeroed)
        madvise(self._arena_addr, self.capacity * self.slot_size, MADV_DONTNEED)
        for m in self._slots[self.capacity:]:
            m.madvise(mmap.MADV_DONTNEED)
        self._free, self._handed, self._faulted = [], 0, 0      # hand slots out in order again
        self._want, self._abandon, self._abandoned = set(), set(), []

    def close(self) -> None:
        super().close()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds = {}


AUTO_ACCURACY = 0.6     # "auto" look-ahead issues guesses while this share of their reads is right


class LookAhead:
    """Apply layer L+1's router to layer L's hidden state and prefetch the experts it picks."""

    def __init__(self, config, layers, cache: ExpertCache, mode: str = "auto"):
        self.config = config
        self.layers = layers
        self.cache = cache
        self.mode = mode             # "on": always issue; "auto": while recently right often enough
        self.accuracy = 1.0          # running (exponential) accuracy of the reads guesses cause
        self._last = None

    def __call__(self, L: int, h: np.ndarray) -> None:
        from . import kernels as K

        c = self.config
        self._score(L)
        nxt = L + 1
        if nxt >= len(self.layers) or self.layers[nxt].router is None:
            return
        lw = self.layers[nxt]
        T, k = h.shape[0], c.num_experts_per_tok
        logits = lw.router.matmul(h, np.empty((T, c.num_experts), np.float32))
        idx = np.empty((T, k), np.int64)
        wts = np.empty((T, k), np.float32)
        K.route(logits, lw.expert_bias, c.n_group, c.topk_group, k, c.routed_scaling_factor, idx, wts)
        experts = np.unique(idx).tolist()
        reads = {e for e in experts if (nxt, e) not in self.cache._resident}    # what issuing would read
        issue = self.mode == "on" or self.accuracy >= AUTO_ACCURACY
        self.cache.guess(nxt, experts, issue=issue)
        self._last = (nxt, set(experts), reads)

    def _score(self, L: int) -> None:
        """Compare the prediction made for layer L with what L's router chose (set by prefetch)."""
        if self._last is None or self._last[0] != L:
            return
        layer, chosen = self.cache.chosen
        if layer != L:
            return
        _, pred, reads = self._last
        self.cache.stats.predicted_right += len(pred & chosen)
        if reads:              # only guesses that cost a read count: resident ones are free
            self.accuracy = 0.95 * self.accuracy + 0.05 * (len(reads & chosen) / len(reads))
        self._last = None


# ---- wiring a store-backed model ---------------------------------------------------------------------

def kv_cache_bytes(model) -> int:
    return sum(a.nbytes for a in model.k_cache) + sum(a.nbytes for a in model.v_cache)


def attach(model, max_ram=None, *, prefetch: bool = True, lookahead: str = "auto",
           expert_budget: int | None = None, evict: str | None = None, log=None) -> ExpertCache | None:
    """Give a store-backed model its expert cache. `max_ram` (bytes or a size string; default
    derived from available memory) bounds what stays resident; `expert_budget` sets the expert
    bytes directly (tests). Returns the cache (None for a checkpoint source)."""
    from .bench import current_rss_bytes

    store, w = model.source, model.weights
    info = getattr(store, "experts_info", None)
    if not info:
        return None
    evict = evict or os.environ.get("AMED_EVICT", "dontneed")
    populate = os.environ.get("AMED_POPULATE", "1") != "0"
    readers = int(os.environ.get("AMED_READERS", "4"))
    guess_readers = int(os.environ.get("AMED_GUESS_READERS", "2"))
    expert_total = sum(i["stride"] * i["count"] for i in info.values())
    dense = store.dense_nbytes()
    kv = kv_cache_bytes(model)
    max_ram = parse_size(max_ram) if max_ram is not None else None
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
        # the kernel must see that dense weights and cached experts are in use (see there)
        store.under_memory_pressure()
    bases = {f: map_address(m) for f, m in store._maps.items()}

    def span(L, e):
        f, off, stride = store.expert_region(L, e)
        return bases[f] + off, stride

    def region(L):
        i = info[str(L)]
        base = bases[i["file"]] + i["offset"]
        return base, base + i["stride"] * i["count"]

    io = os.environ.get("AMED_EXPERT_IO", "slots")
    if io not in ("slots", "mmap"):
        raise AmedError(f"AMED_EXPERT_IO must be slots or mmap, not {io!r}.")
    c = model.config
    moe_layers = sum(c.is_moe_layer(L) for L in range(c.num_hidden_layers))
    per_token = c.num_experts_per_tok * max(1, moe_layers)                        # expert uses
    order = dict(half_life=HALF_LIFE_TOKENS * per_token, recent=per_token)
    if budget is not None and io == "slots":
        cache = SlotCache(budget, store, prefetch=prefetch, readers=readers, guess_readers=guess_readers,
                          **order)
    else:
        cache = ExpertCache(budget, span, region, prefetch=prefetch, evict=evict, populate=populate,
                            readers=readers, guess_readers=guess_readers, **order)
    cache.expert_total = expert_total
    cache.dense_bytes = dense
    cache.max_ram = max_ram
    w.cache = cache
    if not prefetch:
        w.prefetch = None
    elif budget is not None:
        w.prefetch = cache.prefetch
        if lookahead in ("on", "auto"):
            w.lookahead = LookAhead(model.config, w.layers, cache, lookahead)
    else:                                  # everything fits: the store's own prefetch, plus counting
        store_prefetch = store.prefetch_experts
        seen: set = set()                  # nothing is evicted, so an expert needs reading once

        def both(L, experts):
            cache.prefetch(L, experts)
            new = [e for e in experts if (L, e) not in seen]
            if new:
                seen.update((L, e) for e in new)
                store_prefetch(L, new)     # madvise costs ~0.1 ms per expert even when resident
        w.prefetch = both
    return cache
