"""GGUF files (llama.cpp, ollama) of the `bailingmoe2` architecture, run in place.

A GGUF file is a header (magic, version, key/value metadata, a table of tensors: name, dims,
ggml block type, offset) followed by the tensor data, each tensor aligned. The header is hostile
input: every count, length, size, type and offset is checked against the file before anything is
mapped, and each problem is one sentence (AmedError). Then:

  * `bailingmoe2.*` metadata -> ModelConfig (config.py), as llama.cpp's converter wrote it from the
    Hugging Face config (convert_hf_to_gguf.py, BailingMoeV2Model);
  * tensors -> amed's weight names: GGUF names are amed's plus `.weight` (`exp_probs_b.bias` for
    the router's expert bias); the fused `attn_qkv` is stored as the checkpoint has it (the
    converter applies no Q/K permutation for this architecture: NeoX RoPE); each layer's routed
    experts are stacked expert-major ([E, N, K]), so expert e is one contiguous byte range;
  * the tokenizer (`tokenizer.ggml.*`, a GPT-2 style byte-level BPE) and the chat template
    (`tokenizer.chat_template`) -> a `tokenizers` object, so no tokenizer.json is needed.

F32 and BF16 matrices are handed out as arrays (the float kernels run them); every other block
type as a GGMLTensor (engine/backends/cpu/ggml.py has its kernels). `resolve_ollama` turns
`ollama:NAME:TAG` into the blob its manifest names.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amed.errors import AmedError
from amed.formats.files import Watched, open_regular

MAGIC = b"GGUF"
VERSIONS = (2, 3)
ARCH = "bailingmoe2"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_STRING = 1 << 26            # a chat template is kB; one string of 64 MB is not a GGUF
MAX_ARRAY = 1 << 26
MAX_DIMS = 4
MAX_HEADER = 1 << 30
DEFAULT_ALIGNMENT = 32

# name: (ggml type number, values per block, bytes per block)
GGML_TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292), "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50), "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136), "I8": (24, 1, 1), "I16": (25, 1, 2),
    "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8), "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2),
    "TQ1_0": (34, 256, 54), "TQ2_0": (35, 256, 66), "MXFP4": (39, 32, 17),
}
TYPE_NAMES = {v[0]: k for k, v in GGML_TYPES.items()}
# the types amed runs (engine/backends/cpu/ggml.py)
SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
             "Q5_K", "Q6_K")


# metadata value types: number -> (struct format, size); 8 string, 9 array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
       11: "<i8", 12: "<f8"}


@dataclass
class GInfo:
    name: str
    type_id: int
    shape: tuple            # NumPy order (outermost first): GGUF's dims reversed
    start: int              # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type_id]

    @property
    def end(self) -> int:
        return self.start + self.nbytes


@dataclass(frozen=True)
class GGMLTensor:
    """A matrix [N, K] in a ggml block type: `raw` is uint8 [N, row bytes] (a view of the map)."""
    type_id: int
    shape: tuple
    raw: np.ndarray

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type_id]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes


class _Reader:
    """Reads the header with pread, a growing prefix of the file at a time, never past its end."""

    def __init__(self, fd: int, size: int, path: Path):
        self.fd, self.size, self.path = fd, size, path
        self.buf = b""
        self.pos = 0

    def bad(self, why: str):
        raise AmedError(f"{self.path} is not a valid GGUF file: {why}.")

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > self.size:
            self.bad(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        if end > MAX_HEADER:
            self.bad(f"its header is larger than {MAX_HEADER >> 20} MiB")
        if end > len(self.buf):
            want = min(self.size, max(end, 2 * len(self.buf), 1 << 20), MAX_HEADER)
            try:
                more = os.pread(self.fd, want - len(self.buf), len(self.buf))
            except OSError as e:
                raise AmedError(f"cannot read {self.path}: {e.strerror or e}.") from None
            self.buf += more
            if end > len(self.buf):
                self.bad("the file ended while reading its header")
        mv = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return mv

    def scalar(self, vtype: int, what: str):
        fmt, n = _SCALARS[vtype]
        v = struct.unpack(fmt, self.take(n, what))[0]
        if vtype == 7:
            if v > 1:
                self.bad(f"{what} is a boolean of value {v}, not 0 or 1")
            return bool(v)
        return v

    def u32(self, what):
        return self.scalar(4, what)

    def u64(self, what):
        return self.scalar(10, what)

    def string(self, what: str, limit: int = MAX_STRING, strict: bool = False) -> str:
        n = self.u64(f"the length of {what}")
        if n > limit:
            self.bad(f"{what} claims {n} bytes, more than the {limit} a string may have")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            self.bad(f"{what} is not UTF-8 text")

    def value(self, vtype: int, what: str, nested: bool = False):
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            if nested:
                self.bad(f"{what} is an array of arrays, which amed does not read")
            etype = self.u32(f"the element type of {what}")
            count = self.u64(f"the length of {what}")
            if etype not in _SCALARS and etype not in (8, 9):
                self.bad(f"{what} has elements of unknown type {etype}")
            if count > MAX_ARRAY:
                self.bad(f"{what} claims {count} elements, more than {MAX_ARRAY}")
            if etype in _SCALARS:
                n = _SCALARS[etype][1]
                if count * n > self.size - self.pos:
                    self.bad(f"{what} claims {count} elements, more than the rest of the file holds")
                return np.frombuffer(self.take(count * n, what), dtype=_NP[etype]).copy()
            if count * 8 > self.size - self.pos:        # every element takes 8 bytes at least
                self.bad(f"{what} claims {count} elements, more than the rest of the file holds")
            return [self.value(etype, f"element {i} of {what}", nested=True) for i in range(count)]
        self.bad(f"{what} has unknown value type {vtype}")


@dataclass
class Header:
    path: Path
    size: int
    version: int
    meta: dict
    tensors: dict           # name -> GInfo
    data_start: int
    alignment: int


def read_header(path, fd: int | None = None) -> Header:
    """Parse and check a GGUF header: every number checked before it is used."""
    path = Path(path)
    own = fd is None
    if own:
        fd = open_regular(path, "a GGUF model")
    try:
        size = os.fstat(fd).st_size
        r = _Reader(fd, size, path)
        if size < 24:
            r.bad(f"it has {size} bytes, fewer than a GGUF header")
        if bytes(r.take(4, "the magic")) != MAGIC:
            r.bad("it does not start with the GGUF magic bytes")
        version = r.u32("the version")
        if version not in VERSIONS:
            raise AmedError(f"{path} is GGUF version {version}; amed reads versions "
                            f"{', '.join(map(str, VERSIONS))}.")
        n_tensors = r.u64("the tensor count")
        n_kv = r.u64("the metadata count")
        if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
            r.bad(f"it claims {n_tensors} tensors, more than the file can hold")
        if n_kv > MAX_KV or n_kv * 13 > size:
            r.bad(f"it claims {n_kv} metadata entries, more than the file can hold")
        meta: dict = {}
        for i in range(n_kv):
            key = r.string(f"the name of metadata entry {i}", limit=1 << 16, strict=True)
            if key in meta:
                r.bad(f"metadata key '{key[:80]}' appears twice")
            vtype = r.u32(f"the type of metadata '{key[:80]}'")
            meta[key] = r.value(vtype, f"metadata '{key[:80]}'")
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1
                or alignment > 1 << 20 or alignment & (alignment - 1)):
            r.bad(f"general.alignment is {alignment!r}, not a power of two up to 1 MiB")
        infos = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}", limit=1024, strict=True)
            nd = r.u32(f"the dimension count of tensor '{name}'")
            if not 1 <= nd <= MAX_DIMS:
                r.bad(f"tensor '{name}' has {nd} dimensions, not 1 to {MAX_DIMS}")
            dims = [r.u64(f"dimension {j} of tensor '{name}'") for j in range(nd)]
            count = 1
            for d in dims:
                if not 1 <= d <= 1 << 40:
                    r.bad(f"tensor '{name}' has a dimension of {d}")
                count *= d
                if count > 1 << 44:
                    r.bad(f"tensor '{name}' claims more values than any model has")
            tid = r.u32(f"the type of tensor '{name}'")
            off = r.u64(f"the offset of tensor '{name}'")
            if tid not in TYPE_NAMES:
                r.bad(f"tensor '{name}' has the unknown block type number {tid}")
            _, blk, bsize = GGML_TYPES[TYPE_NAMES[tid]]
            if dims[0] % blk:
                r.bad(f"tensor '{name}' has rows of {dims[0]} values, not a multiple of the "
                      f"{blk}-value blocks of {TYPE_NAMES[tid]}")
            if off % alignment:
                r.bad(f"tensor '{name}' starts at offset {off}, not a multiple of the alignment {alignment}")
            infos.append((name, tid, tuple(reversed(dims)), off, count // blk * bsize))
        data_start = -(-r.pos // alignment) * alignment
        tensors: dict = {}
        for name, tid, shape, off, nbytes in infos:
            if name in tensors:
                r.bad(f"tensor '{name}' appears twice")
            start = data_start + off
            if start + nbytes > size:
                r.bad(f"tensor '{name}' ({nbytes} bytes at byte {start}) runs past the end of the file "
                      f"({size} bytes): the file is truncated")
            tensors[name] = GInfo(name, tid, shape, start, nbytes)
        last = None
        for t in sorted(tensors.values(), key=lambda t: t.start):
            if last is not None and t.start < last.end:
                r.bad(f"tensors '{last.name}' and '{t.name}' overlap")
            last = t
        return Header(path, size, version, meta, tensors, data_start, alignment)
    finally:
        if own:
            os.close(fd)


# ---- metadata -> config -------------------------------------------------------------------------

def _get(h: Header, key: str, kind, default=None, required: bool = True):
    v = h.meta.get(key)
    if v is None:
        if required and default is None:
            raise AmedError(f"{h.path} lacks the metadata '{key}' a {ARCH} model needs.")
        return default
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and kind is int:
        v = v.tolist()
        if len(set(v)) != 1:
            raise AmedError(f"{h.path}: metadata '{key}' differs between layers ({v[:4]}...); amed "
                            f"needs one value.")
        v = v[0]
    if isinstance(v, np.generic):
        v = v.item()
    ok = ((kind is int and isinstance(v, int) and not isinstance(v, bool)) or
          (kind is float and isinstance(v, (int, float)) and not isinstance(v, bool)) or
          (kind is bool and isinstance(v, bool)) or (kind is str and isinstance(v, str)))
    if not ok:
        raise AmedError(f"{h.path}: metadata '{key}' is {str(v)[:40]!r}, not {kind.__name__}.")
    return kind(v)


def gguf_name(name: str) -> str:
    """The GGUF tensor name of an amed weight name."""
    return name + (".bias" if name.endswith(".exp_probs_b") else ".weight")


def config_dict(h: Header) -> dict:
    """The Hugging Face config keys (config.py) from the GGUF's metadata and tensor table."""
    arch = h.meta.get("general.architecture")
    if arch != ARCH:
        raise AmedError(f"{h.path} is a GGUF of architecture {str(arch)[:40]!r}; amed runs '{ARCH}' "
                        f"(BailingMoeV2: AntAngelMed, Ling/Ring 2.0).")
    k = lambda name: f"{ARCH}.{name}"          # noqa: E731
    n_layers = _get(h, k("block_count"), int)
    nextn = _get(h, k("nextn_predict_layers"), int, 0)
    heads = _get(h, k("attention.head_count"), int)
    hidden = _get(h, k("embedding_length"), int)
    head_dim = _get(h, k("attention.key_length"), int, hidden // max(heads, 1))
    embd = h.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise AmedError(f"{h.path} has no 2-D token_embd.weight tensor.")
    gating = _get(h, k("expert_gating_func"), int, 2)
    n_main = n_layers - nextn
    if n_main < 1:
        raise AmedError(f"{h.path}: block_count {n_layers} leaves no layers after {nextn} MTP layers.")
    d = {
        "architectures": ["BailingMoeV2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": n_main,
        "num_attention_heads": heads,
        "num_key_value_heads": _get(h, k("attention.head_count_kv"), int, heads),
        "head_dim": head_dim,
        "intermediate_size": _get(h, k("feed_forward_length"), int),
        "moe_intermediate_size": _get(h, k("expert_feed_forward_length"), int),
        "num_experts": _get(h, k("expert_count"), int),
        "num_experts_per_tok": _get(h, k("expert_used_count"), int),
        "num_shared_experts": min(1, _get(h, k("expert_shared_count"), int, 0, required=False)),
        "first_k_dense_replace": _get(h, k("leading_dense_block_count"), int, 0, required=False),
        "n_group": _get(h, k("expert_group_count"), int, 1, required=False) or 1,
        "topk_group": _get(h, k("expert_group_used_count"), int, 1, required=False) or 1,
        "score_function": {1: "softmax", 2: "sigmoid"}.get(gating, f"gating function {gating}"),
        "routed_scaling_factor": _get(h, k("expert_weights_scale"), float, 1.0, required=False),
        "norm_topk_prob": _get(h, k("expert_weights_norm"), bool, True, required=False),
        "moe_router_enable_expert_bias": any(n.endswith(".exp_probs_b.bias") for n in h.tensors),
        "use_qk_norm": any(n.endswith(".attn_q_norm.weight") for n in h.tensors),
        "rotary_dim": _get(h, k("rope.dimension_count"), int, head_dim, required=False),
        "rope_theta": _get(h, k("rope.freq_base"), float, 10000.0, required=False),
        "max_position_embeddings": _get(h, k("context_length"), int, 4096, required=False),
        "rms_norm_eps": _get(h, k("attention.layer_norm_rms_epsilon"), float, 1e-6, required=False),
        "vocab_size": int(embd.shape[0]),
        "num_nextn_predict_layers": nextn,
    }
    shexp = h.meta.get(k("expert_shared_feed_forward_length"))
    if shexp is not None:
        d["moe_shared_expert_intermediate_size"] = _get(h, k("expert_shared_feed_forward_length"), int)
    scaling = h.meta.get(k("rope.scaling.type"))
    if scaling == "yarn":
        # as llama.cpp's converter writes YaRN from config.json's rope_scaling
        d["rope_scaling"] = {"type": "yarn", "factor": _get(h, k("rope.scaling.factor"), float),
                             "original_max_position_embeddings": _get(
                                 h, k("rope.scaling.original_context_length"), int, d["max_position_embeddings"],
                                 required=False)}
        for key, meta in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if h.meta.get(k("rope.scaling." + meta)) is not None:
                d["rope_scaling"][key] = _get(h, k("rope.scaling." + meta), float)
        for meta, neutral in (("yarn_ext_factor", (1.0, -1.0)), ("yarn_attn_factor", (1.0,)),
                              ("yarn_log_multiplier", ())):
            v = h.meta.get(k("rope.scaling." + meta))
            if v is not None and not (isinstance(v, (int, float, np.number)) and float(v) in neutral):
                raise AmedError(f"{h.path}: metadata '{k('rope.scaling.' + meta)}' is {v!r}; amed's YaRN "
                                f"follows Hugging Face's and reads only factor, original_context_length "
                                f"and yarn_beta_fast/yarn_beta_slow.")
    elif scaling not in (None, "none", "linear") or (scaling == "linear"
                                                     and h.meta.get(k("rope.scaling.factor"), 1.0) != 1.0):
        d["rope_scaling"] = {"type": str(scaling), "factor": h.meta.get(k("rope.scaling.factor"))}
    for key, meta in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        v = h.meta.get(meta)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < d["vocab_size"]:
            d[key] = v
    return d


def gguf_config(h: Header):
    from amed.config import ModelConfig

    try:
        return ModelConfig.from_dict(config_dict(h))
    except AmedError as e:
        msg = str(e).replace("config.json: ", "").replace("config.json", "the metadata")
        raise AmedError(f"{h.path}: its {ARCH} metadata is not a model amed can run ({msg.rstrip('.')}).") from None


# ---- the weights --------------------------------------------------------------------------------

def expected_tensors(cfg) -> dict:
    """GGUF tensor name -> NumPy shape, for every weight the config implies (experts stacked).
    Built from the table of a one-expert config: a hostile expert count never makes a huge table."""
    import dataclasses

    from amed.formats.checkpoint import tensor_table

    E = cfg.num_experts
    want = {}
    for s in tensor_table(dataclasses.replace(cfg, num_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1)):
        if s.expert == 0:
            want[gguf_name(s.name.rsplit(".", 1)[0])] = (E,) + s.shape
        elif s.kind in ("router", "bias"):
            want[gguf_name(s.name)] = (E,) + s.shape[1:]
        else:
            want[gguf_name(s.name)] = s.shape
    return want


class GGUF:
    """An open GGUF file: memory-mapped, lazy, read-only; the source `load` binds weights from
    (the same verbs as a Checkpoint: matrix, vector, expert)."""

    def __init__(self, path):
        self.path = Path(path)
        fd = open_regular(self.path, "a GGUF model")
        try:
            self.header = h = read_header(self.path, fd)
            self.config = cfg = gguf_config(h)
            if cfg.num_hidden_layers > len(h.tensors):
                raise AmedError(f"{self.path}: its metadata describes {cfg.num_hidden_layers} layers, more than "
                                f"its {len(h.tensors)} tensors can hold.")
            want = expected_tensors(cfg)
            self.tied = "output.weight" not in h.tensors
            if self.tied:
                want.pop("output.weight")
            for name, shape in want.items():
                t = h.tensors.get(name)
                if t is None:
                    raise AmedError(f"{self.path} lacks the tensor '{name}' its metadata implies.")
                if t.shape != shape:
                    raise AmedError(f"tensor '{name}' in {self.path} has shape {list(t.shape)}, but the "
                                    f"metadata implies {list(shape)}.")
                if t.type_name not in SUPPORTED:
                    raise AmedError(f"tensor '{name}' in {self.path} is of block type {t.type_name}, which amed "
                                    f"does not run (it runs {', '.join(SUPPORTED)}).")
                if len(shape) == 1 and t.type_name not in ("F32", "F16", "BF16"):
                    raise AmedError(f"tensor '{name}' in {self.path} is a vector of block type {t.type_name}; "
                                    f"norms and biases must be F32, F16 or BF16.")
            pat = re.compile(r"blk\.(\d+)\.")
            for name in h.tensors:
                m = pat.match(name)
                if name not in want and ((m and int(m.group(1)) < cfg.num_hidden_layers)
                                         or name in ("token_embd.weight", "output_norm.weight")):
                    raise AmedError(f"{self.path} holds tensor '{name}', which its metadata does not describe.")
            self.tensors = {n: h.tensors[n] for n in want}
            try:
                self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise AmedError(f"cannot map {self.path}: {e}.") from None
        except BaseException:
            os.close(fd)
            raise
        self._watch = Watched("restart the command once that has finished, or download the file again if it "
                              "stays damaged")
        self._watch.add(self.path, fd)
        # The expert cache's view (engine/experts): files by name (this file is "": path / "" is
        # the path), and per MoE layer where its experts lie. An expert is three byte ranges, one
        # in each stacked tensor (expert_ranges); `stride` is their sum.
        self.maps = {"": self.map}
        self.experts_info = {}
        for L in range(cfg.num_hidden_layers):
            stacked = [self.tensors.get(f"blk.{L}.ffn_{m}_exps.weight") for m in ("gate", "up", "down")]
            if cfg.is_moe_layer(L) and all(stacked):
                self.experts_info[str(L)] = {
                    "file": "", "offset": min(t.start for t in stacked), "count": cfg.num_experts,
                    "stride": sum(t.nbytes // cfg.num_experts for t in stacked)}
        if hasattr(mmap, "MADV_RANDOM"):       # no read-around: unrouted experts stay on disk
            self.map.madvise(mmap.MADV_RANDOM)
        if hasattr(mmap, "MADV_WILLNEED"):     # dense weights: read ahead
            for name, t in self.tensors.items():
                if "_exps." not in name and name != "token_embd.weight" and t.nbytes:
                    a = t.start // mmap.PAGESIZE * mmap.PAGESIZE
                    self.map.madvise(mmap.MADV_WILLNEED, a, t.end - a)

    @property
    def type_mix(self) -> str:
        """The block types of the matrices, most bytes first (`Q4_K+Q6_K+F32`)."""
        from collections import Counter

        c = Counter()
        for t in self.tensors.values():
            c[t.type_name] += t.nbytes
        return "+".join(k for k, _ in c.most_common())

    def check_files(self) -> None:
        self._watch.check()

    def close(self) -> None:
        self._watch.close()

    def _raw(self, t: GInfo) -> np.ndarray:
        return np.frombuffer(self.map, dtype=np.uint8, count=t.nbytes, offset=t.start)

    def _as_matrix(self, t: GInfo, raw: np.ndarray, shape: tuple):
        if t.type_name == "F32":
            return raw.view(np.float32).reshape(shape)
        if t.type_name == "BF16":
            return raw.view(np.uint16).reshape(shape)
        return GGMLTensor(t.type_id, shape, raw.reshape(shape[0], -1))

    def _info(self, name: str) -> GInfo:
        if name == "output" and self.tied:
            name = "token_embd"
        t = self.tensors.get(gguf_name(name))
        if t is None:
            raise AmedError(f"tensor '{gguf_name(name)}' is not in {self.path}.")
        return t

    def matrix(self, name: str):
        """A weight by amed name: a float32/bf16 array or a GGMLTensor; routed experts by
        `blk.L.ffn_{gate,up,down}_exps.E` (a slice of the stacked tensor)."""
        parts = name.split(".")
        if len(parts) == 4 and parts[2].endswith("_exps"):
            t = self._info(".".join(parts[:3]))
            E, N, K = t.shape
            e = int(parts[3])
            if not 0 <= e < E:
                raise AmedError(f"expert {e} is not in {self.path}.")
            per = t.nbytes // E
            raw = np.frombuffer(self.map, dtype=np.uint8, count=per, offset=t.start + e * per)
            return self._as_matrix(t, raw, (N, K))
        t = self._info(name)
        return self._as_matrix(t, self._raw(t), t.shape)

    def vector(self, name: str) -> np.ndarray:
        """A norm weight or bias as float32 (a copy)."""
        t = self._info(name)
        raw = self._raw(t)
        if t.type_name == "F32":
            return raw.view(np.float32).copy()
        if t.type_name == "F16":
            return raw.view(np.float16).astype(np.float32)
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)     # BF16 (checked at open)

    def expert_ranges(self, layer: int, e: int) -> list[tuple[str, int, int]]:
        """(file, offset, length) of expert e's bytes in gate, up and down."""
        out = []
        for m in ("gate", "up", "down"):
            t = self.tensors[f"blk.{layer}.ffn_{m}_exps.weight"]
            per = t.nbytes // t.shape[0]
            out.append(("", t.start + e * per, per))
        return out

    def expert_in(self, layer: int, e: int, buf) -> tuple:
        """(gate, up, down) of expert e over a copy of its three ranges, back to back in `buf`
        (a slot of the expert cache)."""
        out, at = [], 0
        for m in ("gate", "up", "down"):
            t = self.tensors[f"blk.{layer}.ffn_{m}_exps.weight"]
            E, N, K = t.shape
            per = t.nbytes // E
            raw = np.frombuffer(buf, dtype=np.uint8, count=per, offset=at)
            raw.flags.writeable = False           # as over the file's map: one compiled kernel signature
            out.append(self._as_matrix(t, raw, (N, K)))
            at += per
        return tuple(out)

    def under_memory_pressure(self) -> None:
        """The model is larger than the memory budget: the default advice again (see Store's),
        the token embeddings excepted (read one row per token)."""
        if hasattr(mmap, "MADV_NORMAL"):
            self.map.madvise(mmap.MADV_NORMAL)
            t = self.tensors["token_embd.weight"]
            a = t.start // mmap.PAGESIZE * mmap.PAGESIZE
            self.map.madvise(mmap.MADV_RANDOM, a, t.end - a)

    def prefetch_experts(self, layer: int, experts) -> None:
        """Ask the kernel to start reading the chosen experts (MADV_WILLNEED): each is one byte
        range in each of the layer's three stacked tensors."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for m in ("gate", "up", "down"):
            t = self.tensors.get(f"blk.{layer}.ffn_{m}_exps.weight")
            if t is None:
                continue
            per = t.nbytes // t.shape[0]
            for e in experts:
                start = t.start + int(e) * per
                a = start // mmap.PAGESIZE * mmap.PAGESIZE
                self.map.madvise(mmap.MADV_WILLNEED, a, start + per - a)

    def expert(self, layer: int, e: int) -> tuple:
        return tuple(self.matrix(f"blk.{layer}.ffn_{m}_exps.{e}") for m in ("gate", "up", "down"))

    def dense_nbytes(self) -> int:
        return sum(t.nbytes for n, t in self.tensors.items() if "_exps." not in n and n != "token_embd.weight")



def describe_gguf(path) -> tuple[list[tuple[str, str]], dict]:
    """((field, value) lines for `amed show`, the config keys) of a GGUF file (its header only)."""
    from collections import Counter

    h = read_header(path)
    types = Counter()
    for t in h.tensors.values():
        types[t.type_name] += t.nbytes
    total = sum(types.values()) or 1
    mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in types.most_common())
    m = h.meta
    lines = [("format", f"GGUF version {h.version}, architecture {str(m.get('general.architecture'))[:40]}"),
             ("block types", mix)]
    for key in ("general.name", "general.file_type"):
        if key in m:
            lines.append((key.split(".")[1].replace("_", " "), str(m[key])[:80]))
    lines.append(("chat template", "in the file" if isinstance(m.get("tokenizer.chat_template"), str) else "none"))
    cfg = gguf_config(h).to_dict()
    return lines, cfg


def is_gguf(path) -> bool:
    """A regular file that starts with the GGUF magic."""
    try:
        p = Path(path)
        if not p.is_file():
            return False
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---- tokenizer ----------------------------------------------------------------------------------

# the pre-tokenizer of Ling 2.0's tokenizer.json (llama.cpp: LLAMA_VOCAB_PRE_TYPE_BAILINGMOE)
LING_SPLIT = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
              r"\s*[\r\n]|\s+(?!\S)|\s+")


def gguf_tokenizer(h: Header) -> tuple:
    """(tokenizers.Tokenizer, keyword arguments of amed's Tokenizer) from `tokenizer.ggml.*`."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    m = h.meta
    kind = m.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise AmedError(f"{h.path} has a tokenizer of kind {str(kind)[:40]!r}; amed reads the byte-level BPE "
                        f"('gpt2') that {ARCH} files carry.")
    tokens, merges = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.merges", [])
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise AmedError(f"{h.path}: tokenizer.ggml.tokens is missing or not a list of strings.")
    if not isinstance(merges, list) or not all(isinstance(t, str) and t.count(" ") == 1 for t in merges):
        raise AmedError(f"{h.path}: tokenizer.ggml.merges is not a list of 'a b' pairs.")
    types = m.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, np.ndarray) or len(types) != len(tokens)):
        raise AmedError(f"{h.path}: tokenizer.ggml.token_type does not have one entry per token.")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(p.split(" ")) for p in merges]
    known = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    try:
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=known, fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise AmedError(f"{h.path}: its vocabulary does not make a BPE tokenizer ({' '.join(str(e).split())[:160]}).") from None
    if m.get("tokenizer.ggml.pre") in ("bailingmoe", "bailingmoe2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(LING_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if types is not None:                 # 3 control, 4 user-defined: matched whole in the text
        special = [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero((types == 3) | (types == 4))]
        tok.add_special_tokens(special)

    def token(key):
        v = m.get(key)
        return tokens[v] if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens) else None

    template = m.get("tokenizer.chat_template")
    eos = [v for v in (m.get("tokenizer.ggml.eos_token_id"), m.get("tokenizer.ggml.eot_token_id"))
           if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)]
    return tok, dict(chat_template=template if isinstance(template, str) and template else None,
                     bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
                     pad_token=token("tokenizer.ggml.padding_token_id"),
                     add_bos_token=m.get("tokenizer.ggml.add_bos_token") is True, eos_token_id=eos or None)


# ---- ollama -------------------------------------------------------------------------------------

MODEL_LAYER = "application/vnd.ollama.image.model"


def ollama_models_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def resolve_ollama(ref: str) -> Path:
    """`ollama:[HOST/][NAMESPACE/]NAME[:TAG]` -> the GGUF blob its manifest names, under
    $OLLAMA_MODELS (default ~/.ollama/models): manifests/HOST/NAMESPACE/NAME/TAG, a JSON whose
    layer of media type application/vnd.ollama.image.model has digest sha256:HEX, the file
    blobs/sha256-HEX."""
    from amed.formats.files import read_regular

    name = ref[len("ollama:"):]
    tag = "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    parts = [p for p in name.split("/")]
    if not name or any(not p or p in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in parts) \
            or not re.fullmatch(r"[A-Za-z0-9._-]+", tag) or len(parts) > 3:
        raise AmedError(f"{ref} is not an ollama model name (ollama:NAME[:TAG], e.g. "
                        f"ollama:MedAIBase/AntAngelMed:100b).")
    if len(parts) == 1:
        parts = ["library"] + parts
    if len(parts) == 2:
        parts = ["registry.ollama.ai"] + parts
    root = ollama_models_dir()
    manifest = root / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        raise AmedError(f"ollama has no model {'/'.join(parts[1:])}:{tag} in {root} (no {manifest}); "
                        f"`ollama pull` it first, or set OLLAMA_MODELS.")
    try:
        man = json.loads(read_regular(manifest, limit=1 << 20))
        layers = man["layers"]
        digest = next(l["digest"] for l in layers if isinstance(l, dict) and l.get("mediaType") == MODEL_LAYER)
    except (ValueError, KeyError, TypeError, StopIteration, UnicodeDecodeError):
        raise AmedError(f"{manifest} is not an ollama manifest with a model layer.") from None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
        raise AmedError(f"{manifest} names the model blob {str(digest)[:80]!r}, not a sha256 digest.")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise AmedError(f"the model blob {blob} of ollama's {'/'.join(parts[1:])}:{tag} is missing; "
                        f"`ollama pull` it again.")
    return blob
