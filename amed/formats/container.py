"""Writing safetensors files whose layout we choose: page-aligned regions, positional writes.

The header is planned up front from (name, dtype, shape) entries, so tensor data can be written
in any order and in row chunks (a 157184 x 4096 embedding never has to sit in memory whole).
Alignment uses what the format allows: the JSON header is padded with spaces so the data section
starts on a page boundary, and gaps between tensors are filled by explicit `__pad__.N` U8
tensors (safetensors forbids holes). Files are written as `NAME.partial` and renamed only when
complete and fsynced, so a crash never leaves a file that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = 4096
ST_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.uint16): "BF16",
             np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64"}
ITEMSIZE = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


@dataclass
class Entry:
    name: str
    dtype: str          # safetensors dtype name
    shape: tuple
    align: int = 64     # start offset alignment within the data section
    start: int = 0      # filled by plan(): offset relative to the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def plan(entries: list[Entry], metadata: dict | None = None) -> tuple[bytes, int, int]:
    """Assign offsets; return (header bytes incl. the 8-byte length, data_start, total size)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    off, npad = 0, 0
    for e in entries:
        aligned = -(-off // e.align) * e.align
        if aligned > off:
            header[f"__pad__.{npad}"] = {"dtype": "U8", "shape": [aligned - off], "data_offsets": [off, aligned]}
            npad += 1
        e.start, e.end = aligned, aligned + e.nbytes
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
        off = e.end
    end = -(-off // PAGE) * PAGE                      # whole pages, so the file ends aligned too
    if end > off:
        header[f"__pad__.{npad}"] = {"dtype": "U8", "shape": [end - off], "data_offsets": [off, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    n = -(-(8 + len(raw)) // PAGE) * PAGE - 8          # pad the JSON with spaces to a page boundary
    head = n.to_bytes(8, "little") + raw + b" " * (n - len(raw))
    return head, 8 + n, 8 + n + end


class ContainerWriter:
    """Positional writer for one planned safetensors file (pwrite; any order, any row chunk)."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict | None = None, resume: bool = False):
        """resume=True reopens an existing `.partial` without truncating it, keeping the tensors
        already written there (the caller knows which ones are: see amed/quant/stream.py)."""
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.entries = {e.name: e for e in entries}
        head, self.data_start, self.size = plan(entries, metadata)
        self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC), 0o644)
        os.ftruncate(self.fd, self.size)              # holes read as zeros: the padding
        os.pwrite(self.fd, head, 0)

    def write(self, name: str, array: np.ndarray, row: int = 0) -> None:
        """Write `array` into tensor `name`, starting at row `row` of its first axis."""
        e = self.entries[name]
        a = np.ascontiguousarray(array)
        if ST_DTYPES.get(a.dtype) != e.dtype and not (e.dtype == "BF16" and a.dtype == np.uint16):
            raise TypeError(f"{name}: writing {a.dtype} into {e.dtype}")
        row_bytes = e.nbytes // e.shape[0] if e.shape and e.shape[0] else e.nbytes
        off = e.start + row * row_bytes
        if off + a.nbytes > e.end:
            raise ValueError(f"{name}: write past the end of the tensor")
        mv = memoryview(a).cast("B")
        pos = self.data_start + off
        while mv:
            n = os.pwrite(self.fd, mv, pos)
            mv, pos = mv[n:], pos + n

    def sync(self) -> None:
        """Make every write so far durable (without finishing the file)."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close, keeping the `.partial` file (to be reopened with resume=True)."""
        try:
            os.close(self.fd)
        except OSError:
            pass

    def finish(self) -> str:
        """fsync, hash, and move into place. Returns the file's SHA-256."""
        os.fsync(self.fd)
        h = hashlib.sha256()
        pos = 0
        while pos < self.size:
            chunk = os.pread(self.fd, 16 << 20, pos)
            h.update(chunk)
            pos += len(chunk)
        os.close(self.fd)
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return h.hexdigest()

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
