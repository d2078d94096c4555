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

from amed.formats.checkpoint import DTYPES, read_safetensors_header, tensor_table
from amed.formats.files import Watched, is_regular, open_regular, read_regular
from amed.config import ModelConfig
from amed.errors import AmedError
from amed.quant.formats import QTensor

MANIFEST = "amed-manifest.json"
MAX_MANIFEST_BYTES = 1 << 28     # the real 32-layer manifest is ~1 MB
FORMAT = "amed-store"
VERSION = 2               # 2: q4/q8 matrices may be in the r8 layout (manifest "layout"); 1: rows only
READS_VERSIONS = (1, 2)
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")

SCALE_DTYPE = "F16"
# what fixes a store with missing or damaged files (amed/quant/convert.py prepare_output)
REPAIR = ("re-run the `amed quantize` (or `amed download --quantize`) command that made it: it rewrites only "
          "the missing or damaged files.")

def repair(path: Path, man: dict) -> str:
    """The command that repairs this store, from its manifest: the synth or quantize command that
    made it (amed.quant.convert.repair_advice); REPAIR if that cannot be told."""
    try:
        from amed.quant.convert import repair_advice

        return repair_advice(path, man)
    except Exception:                   # pragma: no cover - advice only, never a new failure
        return REPAIR


MADV_RANDOM = getattr(mmap, "MADV_RANDOM", None)
MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)
MADV_NORMAL = getattr(mmap, "MADV_NORMAL", None)


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise AmedError(f"{path} is not an amed store (no {MANIFEST}).")
    try:        # a regular file of sane size only: a FIFO would block, /dev/zero never end
        man = json.loads(read_regular(mpath, limit=MAX_MANIFEST_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise AmedError(f"{mpath} is corrupt (not valid JSON); re-run `amed quantize`.") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise AmedError(f"{mpath} is not an amed store manifest.")
    if man.get("version") not in READS_VERSIONS:
        raise AmedError(f"{path} is an amed store of format version {man.get('version')!r}; this amed "
                        f"reads versions {', '.join(map(str, READS_VERSIONS))}: re-run `amed quantize`, "
                        f"or use a matching amed.")
    check_manifest(man, mpath)
    return man


# ---- the manifest is untrusted input: its structure, checked before anything uses it ----------
WEIGHT_FORMATS = ("f32", "bf16", "q4", "q6", "q8")
LAYOUTS = ("rows", "r8")
EXPERT_MATRICES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MAX_FILE_BYTES = 1 << 50


def _int(v, lo: int = 0, hi: int = MAX_FILE_BYTES) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def safe_file_name(fname) -> bool:
    """A plain file name inside the store folder: no separators, no '..', not hidden."""
    return (isinstance(fname, str) and 0 < len(fname) <= 255 and "/" not in fname and os.sep not in fname
            and "\\" not in fname and not fname.startswith(".") and "\0" not in fname)


def check_manifest(man: dict, mpath) -> None:
    """Types and ranges of every manifest field (the parts that need the files and the config
    are checked by Store). Raises an AmedError naming the first bad field."""
    def bad(field, why):
        raise AmedError(f"{mpath} is damaged: {field} {why}; re-run `amed quantize` to rewrite the store.")

    complete = man.get("complete")
    if not isinstance(complete, bool):
        bad("'complete'", f"is {complete!r}, not true or false")
    for key in ("files", "side_files"):
        if key not in man:
            if key == "files" and complete:
                bad("'files'", "is missing")
            continue
        files = man[key]
        if not isinstance(files, dict):
            bad(f"'{key}'", "is not an object")
        if key == "files" and complete and not files:
            bad("'files'", "is empty")
        for fname, meta in files.items():
            if not safe_file_name(fname) or (key == "files" and not fname.endswith(".safetensors")):
                bad(f"'{key}'", f"names an invalid file {fname!r}")
            if not isinstance(meta, dict):
                bad(f"{key}[{fname!r}]", "is not an object")
            if not _int(meta.get("bytes"), 1 if key == "files" else 0):
                bad(f"{key}[{fname!r}].bytes", f"is {meta.get('bytes')!r}, not a positive byte count")
            sha = meta.get("sha256")
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                bad(f"{key}[{fname!r}].sha256", "is not a SHA-256 hex digest")
    if not complete:
        return
    if not isinstance(man.get("config"), dict):
        bad("'config'", "is missing or not an object")
    weights, experts = man.get("weights"), man.get("experts")
    if not isinstance(weights, dict) or not weights:
        bad("'weights'", "is missing, empty or not an object")
    if not isinstance(experts, dict):
        bad("'experts'", "is missing or not an object")

    def check_entry(where, w, with_file):
        if not isinstance(w, dict):
            bad(where, "is not an object")
        if w.get("format") not in WEIGHT_FORMATS:
            bad(f"{where}.format", f"is {w.get('format')!r}, not one of {', '.join(WEIGHT_FORMATS)}")
        shape = w.get("shape")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(_int(n, 1, 1 << 31) for n in shape)):
            bad(f"{where}.shape", f"is {shape!r}, not a list of one or two positive sizes")
        if w.get("group") is not None and not _int(w.get("group"), 1, 1 << 20):
            bad(f"{where}.group", f"is {w.get('group')!r}, not a positive group size")
        if w.get("layout", "rows") not in LAYOUTS:
            bad(f"{where}.layout", f"is {w.get('layout')!r}, not one of {', '.join(LAYOUTS)}")
        if with_file and not (isinstance(w.get("file"), str) and w["file"] in man["files"]):
            bad(f"{where}.file", f"is {w.get('file')!r}, not a file of the manifest")

    for name, w in weights.items():
        check_entry(f"weights[{name!r}]", w, True)
    for layer, info in experts.items():
        where = f"experts[{layer!r}]"
        if not (isinstance(layer, str) and layer.isdigit() and len(layer) <= 4):
            bad("'experts'", f"has a key {layer!r} that is not a layer number")
        if not isinstance(info, dict):
            bad(where, "is not an object")
        if not (isinstance(info.get("file"), str) and info["file"] in man["files"]):
            bad(f"{where}.file", f"is {info.get('file')!r}, not a file of the manifest")
        for key, lo in (("count", 1), ("offset", 0), ("stride", 1)):
            if not _int(info.get(key), lo):
                bad(f"{where}.{key}", f"is {info.get(key)!r}, not a {'positive' if lo else 'non-negative'} integer")
        mats = info.get("matrices")
        if not isinstance(mats, dict) or sorted(mats) != sorted(EXPERT_MATRICES):
            bad(f"{where}.matrices", f"must hold exactly {', '.join(EXPERT_MATRICES)}")
        for which, w in mats.items():
            check_entry(f"{where}.matrices.{which}", w, False)


class Store:
    """An open store: memory-mapped, lazy, read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        man = read_manifest(self.path)
        if not man.get("complete"):
            raise AmedError(f"{self.path} is an incomplete store (quantization was interrupted); "
                            f"re-run the same `amed quantize` command to finish it.")
        self.manifest = man
        try:
            self.config = ModelConfig.from_dict(man["config"])
        except AmedError as e:
            raise AmedError(f"the config in {self.path / MANIFEST} is invalid ({str(e).rstrip('.')}): "
                            f"the store is damaged; re-run `amed quantize`.") from None
        self.weights_info: dict = man["weights"]
        self.experts_info: dict = man["experts"]
        self.tensors = {}
        self.maps: dict[str, mmap.mmap] = {}
        self.sizes: dict[str, int] = {}
        self._watch = Watched("restart the command once that has finished, or re-run `amed quantize` if "
                              "the store stays damaged")
        fds = {}
        try:
            for fname, meta in man["files"].items():
                fpath = self.path / fname
                if not fpath.exists() and not fpath.is_symlink():
                    raise AmedError(f"{fname} is missing from the store {self.path}; {repair(self.path, man)}")
                fds[fname] = fd = open_regular(fpath)
                size = os.fstat(fd).st_size
                if size != meta["bytes"]:
                    raise AmedError(f"{fname} in {self.path} has {size} bytes but the manifest says "
                                    f"{meta['bytes']}: the store is damaged; {repair(self.path, man)}")
                self.sizes[fname] = size
                try:
                    headers = read_safetensors_header(fpath)
                except AmedError as e:
                    raise AmedError(f"{self.path} is damaged ({str(e).rstrip('.')}); run `amed verify {self.path}` "
                                    f"to find the damaged files, delete them, and {repair(self.path, man)}") from None
                for name, info in headers.items():
                    if name in self.tensors and not name.startswith("__pad__."):
                        raise AmedError(f"tensor '{name}' is in both {self.tensors[name].path.name} and "
                                        f"{fname} of {self.path}: the store is damaged; {repair(self.path, man)}")
                    self.tensors[name] = info
            # every field checked against the config and the files before anything is mapped
            check_store(self)
            for fname, fd in fds.items():
                try:
                    self.maps[fname] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as e:
                    raise AmedError(f"cannot map {self.path / fname}: {e}.") from None
                self._watch.add(self.path / fname, fd)
        except BaseException:
            for fd in fds.values():
                if all(fd != f for f, _ in self._watch.files.values()):
                    os.close(fd)
            self._watch.close()
            raise
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

    def check_files(self) -> None:
        """Raise an AmedError if a store file shrank since it was mapped (formats/files.Watched):
        an fstat per file, called once per forward pass, so a kernel never faults past its end."""
        self._watch.check()

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
    if "side_files" in man:       # a store that hashes its side files hashes every one it has
        bad += [n for n in COPIED_FILES if n not in man["side_files"]
                and ((Path(path) / n).exists() or (Path(path) / n).is_symlink())]
    for fname, meta in verified_files(man).items():
        fpath = Path(path) / fname
        if (not safe_file_name(fname) or not is_regular(fpath) or fpath.stat().st_size != meta["bytes"]
                or sha256_file(fpath) != meta["sha256"]):
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


def check_store(st: Store) -> None:
    """Cross-check a store's manifest against its config and its files' headers, before anything
    is mapped: every weight the config implies is there with the shape it implies, nothing the
    config does not describe is there, and each layer's routed experts lie back to back at
    `offset + e * stride` inside their file, each tensor inside its expert's byte range. The
    kernels and the expert cache then index only ranges checked here."""
    cfg, path = st.config, st.path

    def damaged(why):
        raise AmedError(f"{path} does not match its manifest: {why}; the store is damaged, re-run "
                        f"`amed quantize`.")

    spec_cache: dict = {}

    def check_components(name, info, where, lo=None, hi=None):
        key = (info["format"], tuple(info["shape"]), info.get("group"), info.get("layout", "rows"))
        specs = spec_cache.get(key)
        if specs is None:
            try:
                specs = spec_cache[key] = component_specs(*key)
            except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
                damaged(f"{where} is not a valid weight ({' '.join(str(e).split())})")
        for suffix, dtype, shape in specs:
            t = st.tensors.get(name + suffix)
            if t is None:
                damaged(f"tensor '{name + suffix}' of {where} is missing from the store files")
            if t.dtype != dtype or t.shape != tuple(shape):
                damaged(f"tensor '{name + suffix}' is {t.dtype} {list(t.shape)} in {t.path.name}, but its "
                        f"manifest entry needs {dtype} {list(shape)}")
            if lo is not None and (t.path.name != info["file"] or not lo <= t.start <= t.end <= hi):
                damaged(f"tensor '{name + suffix}' lies outside its expert's byte range in {info['file']}")
            elif lo is None and info.get("file") not in (None, t.path.name):
                damaged(f"tensor '{name + suffix}' is in {t.path.name}, not in {info['file']} as listed")
            used.add(name + suffix)

    from amed.formats.checkpoint import table_size

    if table_size(cfg) > 2 * len(st.tensors) + 1024:   # before building a table the config may make huge
        damaged(f"its config describes {table_size(cfg)} weights, more than the {len(st.tensors)} "
                f"tensors its files hold")
    used: set[str] = set()
    dense = [s for s in tensor_table(cfg) if s.expert < 0]
    want = {s.name: s for s in dense}
    for name in st.weights_info:
        if name not in want:
            damaged(f"it lists weight '{name}', which its config does not describe (num_hidden_layers, "
                    f"use_qk_norm, ... disagree with the weights)")
    for s in dense:
        info = st.weights_info.get(s.name)
        if info is None:
            damaged(f"weight '{s.name}' is missing from the manifest")
        if tuple(info["shape"]) != s.shape:
            damaged(f"weight '{s.name}' has shape {info['shape']} but the config implies {list(s.shape)}")
        if s.kind in ("norm", "bias") and info["format"] not in ("f32", "bf16"):
            damaged(f"weight '{s.name}' is {info['format']}, but a norm or bias must be f32 or bf16")
        if s.kind == "router" and info["format"] not in ("f32", "bf16"):
            damaged(f"router '{s.name}' is {info['format']}, but a router must be f32 or bf16")
        check_components(s.name, info, f"weight '{s.name}'")

    moe = {str(L) for L in range(cfg.num_hidden_layers) if cfg.is_moe_layer(L)}
    extra = sorted(set(st.experts_info) - moe)
    if extra:
        damaged(f"it lists routed experts for layer {extra[0]}, which its config says is not an MoE layer")
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {"ffn_gate_exps": (I, H), "ffn_up_exps": (I, H), "ffn_down_exps": (H, I)}
    for layer in sorted(moe, key=int):
        info = st.experts_info.get(layer)
        if info is None:
            damaged(f"the routed experts of layer {layer} are missing from the manifest")
        where = f"the routed experts of layer {layer}"
        if info["count"] != cfg.num_experts:
            damaged(f"{where} number {info['count']}, but the config has {cfg.num_experts}")
        fname, off, stride = info["file"], info["offset"], info["stride"]
        if off + info["count"] * stride > st.sizes[fname]:
            damaged(f"{where} would end at byte {off + info['count'] * stride} of {fname}, which has "
                    f"{st.sizes[fname]} bytes")
        for which, m in info["matrices"].items():
            if tuple(m["shape"]) != shapes[which]:
                damaged(f"{where}: {which} has shape {m['shape']} but the config implies {list(shapes[which])}")
            m = {**m, "file": fname}
            for e in range(info["count"]):
                check_components(f"blk.{layer}.{which}.{e}", m, f"{which} of expert {e} of layer {layer}",
                                 off + e * stride, off + (e + 1) * stride)
    stray = [n for n in st.tensors if n not in used and not n.startswith("__pad__.")]
    if stray:
        damaged(f"its files hold tensor '{stray[0]}', which neither the manifest nor the config describe")
