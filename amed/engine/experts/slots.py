"""SlotCache: the expert cache with memory of its own (see its docstring and cache.py)."""

from __future__ import annotations

import errno
import mmap
import os
import threading

from amed.engine.experts.cache import HALF_LIFE_TOKENS, ExpertCache, ReaderPool
from amed.engine.experts.memory import (MADV_DONTNEED, MADV_HUGEPAGE, MADV_POPULATE_WRITE, MAP_NORESERVE,
                                        madvise, map_address, resident_fraction)
from amed.errors import AmedError

GUESS_CHUNK = 1 << 20           # a guessed read yields between chunks of this size
PREFAULT_AHEAD = 16             # slots a reader faults in ahead of the next new one


class SlotCache(ExpertCache):
    """The expert cache with memory of its own: a resident expert is a copy of its byte range in
    a slot (anonymous memory, reused after eviction), read with `pread` and O_DIRECT where the
    filesystem allows it, so the page cache is bypassed.

    Why: the first compute on an expert freshly paged into the file mapping is slow (the kernel,
    and a VM's host, map new page-cache pages on first access), on a reused slot it runs at
    in-RAM speed every time; the read itself runs at the disk's speed either way, and an O_DIRECT
    read needs no CPU while it waits, which leaves the cores to the compute (docs/performance.md,
    "Larger than RAM"). Eviction only returns the
    slot to the free list. Same eviction order, budget, prefetch and look-ahead as ExpertCache."""

    def __init__(self, budget: int, store, bind, *, prefetch: bool = True, readers: int = 4, guess_readers: int = 2,
                 half_life: float = HALF_LIFE_TOKENS * 64, recent: int = 64):
        def span(L, e):
            if ranges is not None:                  # a GGUF file: one range per stacked tensor
                return [(off, n) for _, off, n in ranges(L, e)]
            _, off, stride = store.expert_region(L, e)
            return off, stride

        ranges = getattr(store, "expert_ranges", None)

        def region(L):
            i = store.experts_info[str(L)]
            return i["offset"], i["offset"] + i["stride"] * i["count"]

        super().__init__(budget, span, region, prefetch=prefetch, readers=0, half_life=half_life,
                         recent=recent)
        self.pool = ReaderPool(readers, guess_readers) if (prefetch and readers) else None
        self.store = store
        self.bind = bind                 # (gate, up, down) arrays -> a SwiGLU the model can call
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
        the first touch of memory the host has not backed yet costs several times a later one,
        which made a bench's first variant look slower than the next (docs/performance.md). Only
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
        return resident_fraction(self.store.maps[fname], off, length) >= 0.99

    def _read(self, key, yielding: bool = False) -> None:
        """Copy the expert's bytes into its slot (any thread; the GIL is released meanwhile).
        `yielding` (a guessed read): in chunks, each waiting for the chosen experts' reads
        (_may_read), so a guess never shares the disk with a read the model waits for, and a
        wrong one stops early. Chunks of 1 MiB read as fast as one whole read on this VM."""
        L, e = key
        ranges = getattr(self.store, "expert_ranges", None)
        if ranges is not None:                   # several ranges (a GGUF expert): back to back in the slot
            at = 0
            for fname, off, length in ranges(L, e):
                if not self._read_range(key, fname, off, length, at, yielding):
                    return                               # abandoned: not loaded
                at += length
        elif not self._read_range(key, *self.store.expert_region(L, e), 0, yielding):
            return
        with self._cv:
            if key in self._slot_of:
                self._loaded.add(key)
            if key in self._want:
                self._want.discard(key)
                self._cv.notify_all()

    def _read_range(self, key, fname: str, off: int, length: int, at0: int, yielding: bool) -> bool:
        """Copy `length` bytes at `off` of the store file `fname` to byte `at0` of key's slot;
        False when a guessed read was abandoned on the way."""
        L, e = key
        cached = self._in_page_cache(fname, off, length)
        fd, direct = self._fd(fname, direct=not cached)
        buf = memoryview(self._slots[self._slot_of[key]])[at0:at0 + length]
        step = GUESS_CHUNK if yielding else length
        n = 0
        try:
            for at in range(0, length, step):
                if yielding and not self._may_read(key):
                    return False                         # abandoned: not loaded
                got = os.preadv(fd, [buf[at:at + step]], off + at)
                n += got
                if got < min(step, length - at):
                    break
        except OSError as err:
            if direct and err.errno == errno.EINVAL:    # O_DIRECT refused at read time: buffered
                os.close(fd)
                self._fds[fname, True] = (os.open(str(self.store.path / fname), os.O_RDONLY), False)
                return self._read_range(key, fname, off, length, at0, yielding)
            raise AmedError(f"cannot read expert {e} of layer {L} from {self.store.path / fname}: "
                            f"{err.strerror}.") from None
        finally:
            buf.release()
        if n != length:
            raise AmedError(f"{self.store.path / fname} is truncated (expert {e} of layer {L} is "
                            f"cut short); re-run `amed quantize`.")
        if not direct and not cached:    # read from disk without O_DIRECT: keep no second copy
            os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
        return True

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
            v = self._views[key] = self.bind(*self.store.expert_in(layer, e, self._slots[self._slot_of[key]]))
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

