"""Every progress display of the command line, in one place (Rich, on stderr).

The library reports progress through small hooks (a callable taking a byte count, or the
`hub.DownloadHooks` / `stream.StreamProgress` classes, which do nothing); the classes here fill
those hooks with Rich bars. Nothing below the app layer imports Rich's progress."""

from __future__ import annotations

import contextlib

from amed.hub import DownloadHooks
from amed.quant.stream import StreamProgress


def _progress(console, *columns, **kw):
    from rich.progress import Progress

    return Progress(*columns, console=console, **kw)


def _byte_columns(description: str, extra=()):
    from rich.progress import (BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return (TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            *(TextColumn(c) for c in extra), TimeRemainingColumn())


class _Live:
    """A Rich Progress (`self._p`) shown while the object is used as a context."""

    def __enter__(self):
        self._p.start()
        return self

    def __exit__(self, *exc):
        self._p.stop()
        return False


class Bars(_Live):
    """Byte progress bars: a description, a bar, bytes, rate, `extra` columns, ETA; notes
    printed above the bars. Shared by `amed download` and `amed download --quantize`."""

    def __init__(self, console, description: str = "{task.description}", extra=()):
        self.console = console
        self._p = _progress(console, *_byte_columns(description, extra))

    def note(self, msg: str) -> None:
        self._p.console.print(f"[yellow]{msg}[/]")


class DownloadBars(Bars, DownloadHooks):
    """`amed download`: one overall bar (bytes, rate, ETA) and a line per file in flight."""

    def __init__(self, console):
        super().__init__(console)
        self._total = None

    def start(self, total: int, done: int) -> None:
        self._total = self._p.add_task("[bold]total", total=total, completed=done)

    @contextlib.contextmanager
    def file(self, f, have: int = 0):
        """A line for `f` while it downloads; yields the callable that advances it and the total bar."""
        name = f.path if len(f.path) <= 40 else "…" + f.path[-39:]
        task = self._p.add_task(f"  {name}", total=f.size, completed=have)

        def advance(n: int) -> None:
            self._p.update(task, advance=n)
            if self._total is not None:
                self._p.update(self._total, advance=n)
        try:
            yield advance
        finally:
            self._p.remove_task(task)


class StreamBars(Bars, StreamProgress):
    """`amed download --quantize`: the download (bytes) and the conversion (source bytes, tensors)."""

    def __init__(self, console):
        super().__init__(console, "[bold]{task.description:<9}", extra=("{task.fields[info]}",))
        self._dl = self._q = None

    def start(self, download_total, download_done, convert_total, convert_done, tensors_done):
        self._dl = self._p.add_task("download", total=download_total, completed=download_done, info="")
        self._q = self._p.add_task("quantize", total=convert_total, completed=convert_done,
                                   info=f"{tensors_done} tensors")

    def downloaded(self, nbytes):
        if self._dl is not None:
            self._p.update(self._dl, advance=nbytes)

    def converted(self, done, tensors):
        if self._q is not None:
            self._p.update(self._q, completed=done, info=f"{tensors} tensors")

    def shard(self, name, event):
        if self._dl is not None and event in ("downloaded", "deleted"):
            self._p.update(self._dl, info=f"{name} {event}")


class QuantizeBar(_Live):
    """`amed quantize`: a bar that appears at the first progress call (once validation has passed,
    so an error prints alone). Use as a context; call it with (bytes done, tensors done, total)."""

    def __init__(self, console):
        self._p = _progress(console, *_byte_columns("[bold]quantize", extra=("{task.fields[tensors]} tensors",)))
        self._task = None

    def __call__(self, done: int, ntensors: int, total: int) -> None:
        if self._task is None:
            self._p.start()
            self._task = self._p.add_task("quantize", total=total, tensors=0)
        self._p.update(self._task, completed=done, tensors=ntensors)

    def __enter__(self):
        return self                  # started by the first call


class ByteBar(_Live):
    """One bar of bytes (`amed verify`, `amed synth`), as a context. `advance(n)` adds bytes;
    `update(done, total)` sets them. A transient bar is cleared at the end and drawn only on a
    terminal."""

    def __init__(self, console, label: str, total: int | None = None, transient: bool = False):
        self._p = _progress(console, *_byte_columns(label), transient=transient,
                            disable=transient and not console.is_terminal)
        self._task = self._p.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self._p.advance(self._task, n)

    def update(self, done: int, total: int | None = None) -> None:
        self._p.update(self._task, completed=done, **({"total": total} if total is not None else {}))

    def stop(self) -> None:
        self._p.stop()


class Counted:
    """A long counted job (the -d context prefill of `amed bench`), as a context; `update(done,
    total)`. On a terminal a bar that is cleared at the end; outside one (a log, a pipe) a line at
    most every `every` seconds, so whoever reads the log sees the job is alive."""

    def __init__(self, console, label: str, unit: str = "", every: float = 5.0):
        import time

        self.console, self.label, self.unit, self.every = console, label, unit, every
        self._clock = time.monotonic
        self._t0 = self._last = self._clock()
        self._p = self._task = None
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

            self._p = _progress(console, TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                TextColumn(unit), TimeRemainingColumn(), transient=True)

    def update(self, done: int, total: int) -> None:
        if self._p is not None:
            if self._task is None:
                self._p.start()
                self._task = self._p.add_task(self.label, total=total)
            self._p.update(self._task, completed=done, total=total)
            return
        now = self._clock()
        if now - self._last >= self.every or (done >= total and now - self._t0 >= self.every):
            self._last = now
            self.console.print(f"{self.label}: {done}/{total}{' ' + self.unit if self.unit else ''} "
                               f"({now - self._t0:.0f} s)", markup=False, highlight=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()
        return False


@contextlib.contextmanager
def compile_progress(console, status=None, label: str = "compiling kernels"):
    """While Numba compiles amed's kernels (about a minute on a first run), report each one as it
    is done: in the text of `status` (a Rich spinner on a terminal), or else as a line on
    `console` ("compiling kernels: 3 compiled (attention), 12 s"), so a log shows the process is
    alive. Yields the listener (`.done`: kernels compiled so far). Only real compiles count:
    kernels loaded from the on-disk cache fire no event."""
    import threading
    import time

    from numba.core import event

    t0 = time.monotonic()
    lock = threading.Lock()

    class Listener(event.Listener):
        def __init__(self):
            self.depth = 0            # nested compiles: a kernel's helpers compile inside it
            self.done = 0

        def on_start(self, ev):
            with lock:
                self.depth += 1

        def on_end(self, ev):
            with lock:
                self.depth -= 1
                if self.depth > 0:
                    return
                func = getattr(ev.data.get("dispatcher"), "py_func", None)
                if not getattr(func, "__module__", "").startswith("amed."):
                    return
                self.done += 1
                done, name = self.done, func.__name__
            text = f"{label}: {done} compiled ({name}), {time.monotonic() - t0:.0f} s"
            if status is not None:
                status.update(f"{label} (first run only, ~1 min): {done} compiled ({name})...")
            else:
                console.print(text, markup=False, highlight=False)

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield listener
    finally:
        event.unregister("numba:compile", listener)
