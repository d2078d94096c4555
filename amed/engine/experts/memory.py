"""The operating system facts the expert cache works with: sizes, available memory, this
process's RSS and disk reads, madvise(2) and mincore(2) through ctypes (which releases the GIL)."""

from __future__ import annotations

import ctypes
import mmap
import os
import re

import numpy as np

from amed.errors import AmedError

MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = 14
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

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


def proc_field(path: str, key: str) -> int | None:
    """The number after `key:` in a /proc file of "key: value" lines (/proc/meminfo, /proc/self/io,
    /proc/self/status), or None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (bytes); physical free pages elsewhere."""
    kib = proc_field("/proc/meminfo", "MemAvailable")
    return kib * 1024 if kib is not None else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_ram() -> int:
    """What amed may keep resident by default: 90% of the memory available now plus what this
    process already holds."""
    return int(0.9 * mem_available()) + current_rss_bytes()


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def disk_read_bytes() -> int | None:
    """Bytes this process (all threads) has caused to be read from storage (/proc/self/io)."""
    return proc_field("/proc/self/io", "read_bytes")


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

