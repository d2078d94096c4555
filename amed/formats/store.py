"""The amed store: a quantized model as a directory of page-aligned safetensors files.

Layout (docs/store-format.md is the full description):
    amed-manifest.json          format, version, `complete`, config, quantization, files + SHA-256
    globals.safetensors         token_embd, output_norm, output
    layer-000.safetensors ...   one file per decoder layer; the layer's routed experts come last,
                                each expert one page-aligned contiguous byte range
    config.json, tokenizer*.json, generation_config.json   copied from the source

A weight in format q4/q6/q8 is stored as `NAME.q` (packed ints), `NAME.s` (scales) and, for q4
and q6, `NAME.m` (group minimums); f32/bf16 weights are stored as `NAME`. Opening a store maps the
files and does cheap structural checks only; `verify()` hashes every byte on demand.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

from amed.formats.checkpoint import DTYPES, read_safetensors_header
from amed.config import ModelConfig
from amed.errors import AmedError
from amed.quant.formats import QTensor

MANIFEST = "amed-manifest.json"
FORMAT = "amed-store"
VERSION = 2               # 2: q4/q8 matrices may be in the r8 layout (manifest "layout"); 1: rows only
READS_VERSIONS = (1, 2)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")

SCALE_DTYPE = "F16"
# what fixes a store with missing or damaged files (amed/quant/convert.py prepare_output)
REPAIR = ("re-run the `amed quantize` (or `amed download --quantize`) command that made it: it rewrites only "
          "the missing or damaged files.")

MADV_RANDOM = getattr(mmap, "MADV_RANDOM", None)
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
MADV_NORMAL = getattr(mmap, "MADV_NORMAL", None)


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    try:
        man = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise AmedError(f"{path} is not an amed store (no {MANIFEST}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AmedError(f"{mpath} is corrupt (not valid JSON); re-run `amed quantize`.") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise AmedError(f"{mpath} is not an amed store manifest.")
    if man.get("version") not in READS_VERSIONS:
        raise AmedError(f"{path} is an amed store of format version {man.get('version')}; this amed "
                        f"reads versions {', '.join(map(str, READS_VERSIONS))}: re-run `amed quantize`, "
                        f"or use a matching amed.")
    return man


class Store:
    """An open store: memory-mapped, lazy, read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        man = read_manifest(self.path)
        if not man.get("complete"):
            raise AmedError(f"{self.path} is an incomplete store (quantization was interrupted); "
                            f"re-run the same `amed quantize` command to finish it.")
        self.manifest = man
        self.config = ModelConfig.from_dict(man["config"])
        self.weights_info: dict = man["weights"]
        self.experts_info: dict = man["experts"]
        self.tensors = {}
        self.maps: dict[str, mmap.mmap] = {}
        for fname, meta in man["files"].items():
            fpath = self.path / fname
            if os.sep in fname or not fname.endswith(".safetensors"):
                raise AmedError(f"{MANIFEST} names an invalid file {fname!r}.")
            if not fpath.exists():
                raise AmedError(f"{fname} is missing from the store {self.path}; {REPAIR}")
            size = fpath.stat().st_size
            if size != meta["bytes"]:
                raise AmedError(f"{fname} in {self.path} has {size} bytes but the manifest says "
                                f"{meta['bytes']}: the store is damaged; {REPAIR}")
            try:
                headers = read_safetensors_header(fpath)
            except AmedError as e:
                raise AmedError(f"{self.path} is damaged ({e}); run `amed verify {self.path}` to find the "
                                f"damaged files, delete them, and {REPAIR}") from None
            for name, info in headers.items():
                self.tensors[name] = info
            with open(fpath, "rb") as f:
                self.maps[fname] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        missing = [n for n, w in self.weights_info.items() if not all(c in self.tensors for c in components(n, w["format"]))]
        if missing:
            raise AmedError(f"weight '{missing[0]}' is missing from the store files: the store is damaged.")
        # No read-around on faults anywhere (the kernel's default window of several MB would pull
        # unrouted experts next to a touched page into RAM); instead, dense weights are read ahead
        # explicitly and asynchronously (MADV_WILLNEED), and a routed expert is paged in on use or
        # by `prefetch_experts` once the router has chosen it. (When the model is larger than the
        # memory budget, `under_memory_pressure` lifts MADV_RANDOM: see there.)
        if MADV_RANDOM is not None:
            for m in self.maps.values():
                m.madvise(MADV_RANDOM)
            for name in self.weights_info:
                if name != "token_embd":              # embeddings are read one row per token
                    for c in components(name, self.weights_info[name]["format"]):
                        self._willneed(self.tensors[c])

    def _willneed(self, t) -> None:
        self._advise(t, MADV_WILLNEED)

    def _advise(self, t, advice) -> None:
        if advice is None or t.end <= t.start:
            return
        start = t.start // mmap.PAGESIZE * mmap.PAGESIZE
        self.maps[t.path.name].madvise(advice, start, t.end - start)

    def under_memory_pressure(self) -> None:
        """The model does not fit the memory budget (engine/experts): give every weight but the
        embeddings the default advice again. Since Linux 6.3 the kernel ignores accesses through
        MADV_RANDOM mappings when it picks pages to reclaim, so under memory pressure it would drop
        dense weights and cached experts that are in use every token (measured: thousands of
        major faults per token). Routed experts are then read explicitly by the expert cache's
        prefetch, so fault read-around is rare."""
        if MADV_NORMAL is None:
            return
        for m in self.maps.values():
            m.madvise(MADV_NORMAL)
        if "token_embd" in self.weights_info:         # read one row per token: no read-around
            for c in components("token_embd", self.weights_info["token_embd"]["format"]):
                self._advise(self.tensors[c], MADV_RANDOM)

    # -- raw access
    def array(self, name: str, copy=None) -> np.ndarray:
        """A tensor as a read-only view of its file's mapping, or with `copy=(buf, origin)` of a
        buffer holding a copy of the file's bytes from offset `origin` on (an expert-cache slot)."""
        t = self.tensors.get(name)
        if t is None:
            raise AmedError(f"tensor '{name}' is missing from the store {self.path}.")
        dt = np.dtype(DTYPES[t.dtype])
        buf, origin = copy if copy is not None else (self.maps[t.path.name], 0)
        return np.frombuffer(buf, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.start - origin).reshape(t.shape)

    # -- weights for the model
    def matrix(self, name: str, copy=None):
        """A weight matrix as arrays: a float32/bf16 ndarray, or a QTensor (quant/formats.py)."""
        info = self.weights_info.get(name) or self._expert_weight_info(name)
        fmt, shape, group = info["format"], tuple(info["shape"]), info.get("group")
        layout = info.get("layout", "rows")
        try:     # QTensor checks the arrays against the entry (format, layout, shapes)
            parts = {suffix.lstrip(".") or "w": self.array(name + suffix, copy)
                     for suffix, _, _ in component_specs(fmt, shape, group, layout)}
            if fmt in ("f32", "bf16"):
                return parts["w"]
            return QTensor(fmt=fmt, shape=shape, group=group, q=parts["q"], scale=parts["s"],
                           zero=parts.get("m"), layout=layout)
        except (ValueError, TypeError) as e:
            raise AmedError(f"weight '{name}' in {self.path} does not match its manifest entry ({e}): the "
                            f"store is damaged; re-run `amed quantize`.") from None

    def vector(self, name: str) -> np.ndarray:
        a = self.array(name)
        if self.tensors[name].dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(a, dtype=np.float32)

    def _expert_weight_info(self, name: str) -> dict:
        _, L, which, _ = name.split(".")                    # blk.L.ffn_{gate,up,down}_exps.E
        return self.experts_info[L]["matrices"][which]

    def expert(self, layer: int, e: int) -> tuple:
        """(gate, up, down) of routed expert e of `layer`, as views of the mapping."""
        return tuple(self.matrix(f"blk.{layer}.ffn_{m}_exps.{e}") for m in ("gate", "up", "down"))

    def prefetch_experts(self, layer: int, experts) -> None:
        """Ask the kernel to start reading the chosen experts' pages (MADV_WILLNEED)."""
        info = self.experts_info.get(str(layer))
        if info is None or MADV_WILLNEED is None:
            return
        m = self.maps[info["file"]]
        for e in experts:
            m.madvise(MADV_WILLNEED, info["offset"] + int(e) * info["stride"], info["stride"])

    def dense_nbytes(self) -> int:
        """Bytes of every weight that stays resident: all but the routed experts and the token
        embeddings (read one row per token)."""
        return sum(self.tensors[c].nbytes for name, w in self.weights_info.items() if name != "token_embd"
                   for c in components(name, w["format"]))

    def expert_region(self, layer: int, e: int) -> tuple[str, int, int]:
        info = self.experts_info[str(layer)]
        return info["file"], info["offset"] + e * info["stride"], info["stride"]

    def expert_in(self, layer: int, e: int, buf):
        """(gate, up, down) of expert e of `layer` over a copy of its byte range in `buf` (a
        writable buffer at least `stride` long, e.g. a slot of the expert cache). Each component
        sits at the same place relative to the start of the range as in the file."""
        fname, start, stride = self.expert_region(layer, e)
        names = [f"blk.{layer}.ffn_{m}_exps.{e}" for m in ("gate", "up", "down")]
        for name in names:
            info = self._expert_weight_info(name)
            for c in components(name, info["format"]):
                t = self.tensors[c]
                if t.path.name != fname or not start <= t.start <= t.start + t.nbytes <= start + stride:
                    raise AmedError(f"{self.path}: tensor {c} lies outside its expert's byte range; "
                                    f"the store is damaged: re-run `amed quantize`.")
        return tuple(self.matrix(name, (buf, start)) for name in names)

    def verify(self, progress=None) -> list[str]:
        """Hash every file against the manifest; returns the names of damaged files."""
        return verify_files(self.path, self.manifest, progress)


def verified_files(man: dict) -> dict:
    """Every file a manifest vouches for: the tensor files, then (stores written since side files
    were hashed) config, tokenizer and generation files."""
    return {**man["files"], **man.get("side_files", {})}


def verify_files(path: Path, man: dict, progress=None) -> list[str]:
    """Hash the files of a store against its manifest without parsing them (a damaged header is a
    checksum mismatch here, not a parse error); returns the names of missing or damaged files."""
    from amed.formats.container import sha256_file

    bad = []
    for fname, meta in verified_files(man).items():
        fpath = Path(path) / fname
        if os.sep in fname or not fpath.is_file() or sha256_file(fpath) != meta["sha256"]:
            bad.append(fname)
        if progress:
            progress(meta["bytes"])
    return bad


def component_specs(fmt: str, shape: tuple, group: int | None, layout: str = "rows") -> list[tuple[str, str, tuple]]:
    """(suffix, safetensors dtype, shape) of the tensors that hold one weight [N, K] (the arrays
    of quants.array_shapes, so a QTensor's arrays are these tensors as they are)."""
    if fmt == "f32":
        return [("", "F32", shape)]
    if fmt == "bf16":
        return [("", "BF16", shape)]
    if fmt not in ("q4", "q6", "q8"):
        raise ValueError(f"unknown weight format {fmt!r}")
    from amed.quant.formats import array_shapes

    arrays = array_shapes(fmt, shape, group, layout)
    st = {"q": "I8" if fmt == "q8" else "U8", "scale": SCALE_DTYPE, "zero": SCALE_DTYPE}
    suffix = {"q": ".q", "scale": ".s", "zero": ".m"}
    return [(suffix[k], st[k], shp) for k, (shp, _) in arrays.items()]


def components(name: str, fmt: str) -> list[str]:
    """Tensor names that hold one weight in the store files (see component_specs)."""
    return [name + suffix for suffix in {"q4": (".q", ".s", ".m"), "q6": (".q", ".s", ".m"),
                                         "q8": (".q", ".s")}.get(fmt, ("",))]


def open_store(path) -> Store:
    return Store(path)
