"""Opening model files as the untrusted input they are: regular files only, and a file that
changes under a running process is noticed before it is read, or ends the process with one
sentence instead of a core dump.

- `open_regular` opens without blocking (O_NONBLOCK: a FIFO would wait for a writer forever) and
  refuses anything that is not a regular file (FIFOs, devices, sockets, directories).
- `Watched` keeps the descriptor of each mapped file: `check()` (an fstat per file, a few
  microseconds, once per forward pass) raises an AmedError when a file shrank, before a kernel
  touches a page past the new end (which would be SIGBUS).
- `install_sigbus_handler` is the last resort for a file truncated between that check and the
  access: a C-level handler (compiled by Numba, no GIL needed: the fault may be in a kernel thread)
  that writes one sentence to stderr and exits with status 1.
"""

from __future__ import annotations

import mmap
import os
import stat
import sys
from pathlib import Path

from amed.errors import AmedError

def _kind(mode: int) -> str:
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file")


def open_regular(path, what: str = "") -> int:
    """An O_RDONLY descriptor of `path`, which must be a regular file; an AmedError otherwise."""
    path = Path(path)
    label = what or path.name
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):        # do not even open a device: opening may have effects
            raise AmedError(f"{path} is {_kind(st.st_mode)}, not a regular file: {label} must be a file.")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AmedError(f"{path} is missing.") from None
    except OSError as e:
        raise AmedError(f"cannot read {path}: {e.strerror or e}.") from None
    st = os.fstat(fd)                            # it may have been swapped between stat and open
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AmedError(f"{path} is {_kind(st.st_mode)}, not a regular file: {label} must be a file.")
    os.set_blocking(fd, True)
    return fd


def is_regular(path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_regular(path, limit: int | None = None, what: str = "") -> bytes:
    """The bytes of a regular file (at most `limit`: a larger file is refused)."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise AmedError(f"{path} is {size} bytes, more than the {limit} such a file can be: it is "
                            f"not the file it should be.")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise AmedError(f"cannot read {path}: {e.strerror or e}.") from None
    finally:
        os.close(fd)


def map_regular(path) -> tuple[int, mmap.mmap]:
    """(descriptor, read-only mapping of the whole file) of a regular, non-empty file."""
    fd = open_regular(path)
    try:
        return fd, mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        os.close(fd)
        raise AmedError(f"cannot map {path}: {e}.") from None


class Watched:
    """Descriptors and sizes of mapped files, to notice a file shrinking under us."""

    def __init__(self, advice: str = "restart the command once that has finished"):
        self.files: dict[str, tuple[int, int]] = {}     # path -> (fd, size when mapped)
        self.advice = advice

    def add(self, path, fd: int) -> None:
        self.files[str(path)] = (fd, os.fstat(fd).st_size)
        install_sigbus_handler()

    def check(self) -> None:
        """Raise an AmedError when a mapped file is now shorter than it was (an fstat per file)."""
        for path, (fd, size) in self.files.items():
            try:
                now = os.fstat(fd).st_size
            except OSError:
                now = -1
            if now < size:
                raise AmedError(f"{path} is truncated (cut short while this process was using it; "
                                f"a quantize or download running on the same folder?): {self.advice}.")

    def close(self) -> None:
        for fd, _ in self.files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.files.clear()


_installed = False


def install_sigbus_handler() -> bool:
    """Make SIGBUS (a page of a mapped file that no longer exists) print one sentence (formats/sigbus.py) and exit 1
    instead of dumping core (it replaces the default action, or Python's faulthandler, for
    SIGBUS only). Installed once; returns whether it is in place. AMED_SIGBUS=default keeps the
    default action."""
    global _installed
    if _installed:
        return True
    if os.environ.get("AMED_SIGBUS") == "default" or sys.platform not in ("linux", "darwin"):
        return False
    try:
        import ctypes
        import signal

        from amed.formats.sigbus import on_sigbus

        libc = ctypes.CDLL(None)
        sig = libc.signal
        sig.argtypes, sig.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
        sig(int(signal.SIGBUS), on_sigbus.address)
        _installed = True
    except Exception:          # no Numba cfunc, no libc: the default action stays
        return False
    return True
