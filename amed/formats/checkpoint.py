"""Hugging Face safetensors checkpoints: the tensor table, and zero-copy views over memory maps.

Nothing here reads tensor data: a tensor is a NumPy view into an mmap of its shard, and pages
come in from disk only when a kernel touches them. Every header is treated as hostile.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amed.config import ModelConfig
from amed.errors import AmedError
from amed.formats.files import Watched

# ---- the tensor table: every tensor a BailingMoeV2 checkpoint must hold ---------------------
# This is the one bridge between the two naming schemes: Hugging Face names (the checkpoint) and
# short GGUF-style names (the amed store and the model code). `kind` feeds the quantization policy.


@dataclass(frozen=True)
class TensorSpec:
    hf: str              # name in the Hugging Face checkpoint
    name: str            # name in amed (store, weights)
    shape: tuple
    dtype: str           # safetensors dtype in the checkpoint
    kind: str            # embed | norm | attn | ffn | router | bias | expert | shared | output
    layer: int = -1
    expert: int = -1


def tensor_table(cfg: ModelConfig) -> list[TensorSpec]:
    """All tensors (excluding MTP layers) in checkpoint order: globals, then layer by layer."""
    H, V = cfg.hidden_size, cfg.vocab_size
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    d = cfg.head_size
    t = [TensorSpec("model.word_embeddings.weight", "token_embd", (V, H), "BF16", "embed")]
    for L in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{L}.", f"blk.{L}."

        def add(hf, name, shape, kind, dtype="BF16", e=-1):
            t.append(TensorSpec(p + hf, b + name, shape, dtype, kind, L, e))

        add("input_layernorm.weight", "attn_norm", (H,), "norm")
        add("attention.query_key_value.weight", "attn_qkv", (qkv, H), "attn")
        if cfg.use_qk_norm:
            add("attention.query_layernorm.weight", "attn_q_norm", (d,), "norm")
            add("attention.key_layernorm.weight", "attn_k_norm", (d,), "norm")
        add("attention.dense.weight", "attn_output", (H, cfg.q_dim), "attn")
        add("post_attention_layernorm.weight", "ffn_norm", (H,), "norm")
        if not cfg.is_moe_layer(L):
            I = cfg.intermediate_size
            add("mlp.gate_proj.weight", "ffn_gate", (I, H), "ffn")
            add("mlp.up_proj.weight", "ffn_up", (I, H), "ffn")
            add("mlp.down_proj.weight", "ffn_down", (H, I), "ffn")
            continue
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        add("mlp.gate.weight", "ffn_gate_inp", (E, H), "router")
        if cfg.moe_router_enable_expert_bias:
            add("mlp.gate.expert_bias", "exp_probs_b", (E,), "bias", dtype="F32")
        for e in range(E):
            add(f"mlp.experts.{e}.gate_proj.weight", f"ffn_gate_exps.{e}", (I, H), "expert", e=e)
            add(f"mlp.experts.{e}.up_proj.weight", f"ffn_up_exps.{e}", (I, H), "expert", e=e)
            add(f"mlp.experts.{e}.down_proj.weight", f"ffn_down_exps.{e}", (H, I), "expert", e=e)
        if cfg.num_shared_experts:
            S = cfg.shared_intermediate_size
            add("mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp", (S, H), "shared")
            add("mlp.shared_experts.up_proj.weight", "ffn_up_shexp", (S, H), "shared")
            add("mlp.shared_experts.down_proj.weight", "ffn_down_shexp", (H, S), "shared")
    t.append(TensorSpec("model.norm.weight", "output_norm", (H,), "BF16", "norm"))
    t.append(TensorSpec("lm_head.weight", "output", (V, H), "BF16", "output"))
    return t


def table_size(cfg: ModelConfig) -> int:
    """len(tensor_table(cfg)), by arithmetic (the table of a hostile config could be huge)."""
    per_layer = 4 + (2 if cfg.use_qk_norm else 0)
    moe = sum(cfg.is_moe_layer(L) for L in range(cfg.num_hidden_layers))
    dense = cfg.num_hidden_layers - moe
    per_moe = 1 + cfg.moe_router_enable_expert_bias + 3 * cfg.num_experts + 3 * (cfg.num_shared_experts > 0)
    return 3 + cfg.num_hidden_layers * per_layer + dense * 3 + moe * per_moe


def _weight_map(index: Path) -> dict[str, str]:
    """The weight_map of a safetensors index: tensor name -> shard file name, both strings."""
    from amed.formats.files import read_regular

    try:
        weight_map = json.loads(read_regular(index, limit=MAX_HEADER_BYTES))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise AmedError(f"{index} is not a valid safetensors index (no weight_map).") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise AmedError(f"{index} is not a valid safetensors index (its weight_map is not a non-empty object).")
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise AmedError(f"{index} is not a valid safetensors index: tensor '{key}' maps to "
                            f"{fname!r}, not a file name.")
    return weight_map


def hf_tensor_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, dtype) for every tensor a checkpoint must hold."""
    return {s.hf: (s.shape, s.dtype) for s in tensor_table(cfg)}


# ---- safetensors files ----------------------------------------------------------------------


DTYPES = {
    "BF16": np.uint16,  # kept as raw bits; widened to float32 in the kernels
    "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": np.uint8,  # raw bits; pre-quantized FP8 checkpoints (amed/quant/prequant.py)
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the real 24k-tensor index header is ~2 MB


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors header; never trusts a number before checking it."""
    from amed.formats.files import open_regular

    name = path.name
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise AmedError(f"{name} is truncated (only {size} bytes); delete it and download it again.")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise AmedError(f"{name} has a header length ({n} bytes) past the end of the file "
                            f"({size} bytes): the file is truncated or not a safetensors file.")
        raw = b""
        while len(raw) < n:
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                raise AmedError(f"{name} ended early while reading its header: the file is truncated.")
            raw += chunk
    except OSError as e:
        raise AmedError(f"cannot read {path}: {e.strerror}.") from None
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise AmedError(f"{name} has a corrupt header (not valid JSON): the file is damaged.") from None
    if not isinstance(header, dict):
        raise AmedError(f"{name} has a corrupt header (not a JSON object).")
    data_start = 8 + n
    data_size = size - data_start
    out: dict[str, TensorInfo] = {}
    for key, ent in header.items():
        if key == "__metadata__":
            continue
        where = f"tensor '{key}' in {name}"
        if not isinstance(ent, dict):
            raise AmedError(f"{where} has a malformed header entry.")
        dtype, shape, offs = ent.get("dtype"), ent.get("shape"), ent.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise AmedError(f"{where} has unsupported dtype {dtype!r}.")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise AmedError(f"{where} has an invalid shape {shape!r}.")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise AmedError(f"{where} has invalid data_offsets {offs!r}.")
        a, b = offs
        if not 0 <= a <= b:
            raise AmedError(f"{where} has invalid data_offsets {offs!r}.")
        if b > data_size:
            raise AmedError(f"{where} ends at byte {data_start + b} but {name} has only {size} bytes: "
                            f"the file is truncated; delete it and download it again.")
        want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if b - a != want:
            raise AmedError(f"{where} occupies {b - a} bytes but dtype {dtype} and shape {shape} "
                            f"need {want}: the header is corrupt.")
        out[key] = TensorInfo(key, path, dtype, tuple(shape), data_start + a, data_start + b)
    spans = sorted((t.start, t.end, t.name) for t in out.values() if t.end > t.start)
    for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise AmedError(f"tensors '{n0}' and '{n1}' overlap in {name}: the header is corrupt.")
    # The format has no holes: the tensors cover the data section exactly, end to end. A header
    # whose length or offsets were shifted would otherwise read every tensor a few bytes off.
    pos = data_start
    for a, b, n_ in spans:
        if a != pos:
            raise AmedError(f"{name} has {'a gap' if a > pos else 'an overlap'} before tensor '{n_}' "
                            f"(byte {pos} to {a}): the header does not match the data; the file is damaged.")
        pos = b
    if pos != size:
        raise AmedError(f"{name} has {size - pos} bytes after its last tensor: the header does not "
                        f"match the data; the file is damaged or truncated.")
    return out


def f32_to_bf16(f: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(f, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


class Checkpoint:
    """A Hugging Face BailingMoeV2 checkpoint: config plus lazily mapped tensors.

    `get(name)` returns a read-only NumPy view into the shard's memory map (BF16 as uint16).
    Opening validates every header and the full tensor table but reads no tensor data.
    """

    def __init__(self, path: str | os.PathLike, config=None):
        from amed.config import ModelConfig

        self.path = Path(path)
        if not self.path.is_dir():
            raise AmedError(f"{self.path} is not a directory.")
        self.config = config or ModelConfig.from_file(self.path)
        self.tensors = self._read_tables()
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._watch = Watched("restart the command once that has finished, or download the file again "
                              "if it stays damaged")
        self._hf = None                       # amed name -> HF name, built on first use
        self._validate()

    # -- index and headers
    def _read_tables(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _weight_map(index)
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").exists():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise AmedError(f"{self.path} holds no model.safetensors.index.json or model.safetensors: "
                            f"not a checkpoint directory (run `amed download` to fetch one).")
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            # a name, not a path; a symlink is the user's own layout (the Hugging Face cache links
            # snapshots/REV/FILE to ../../blobs/HASH), and what it points at is read as hostile input
            if "/" in fname or os.sep in fname or fname.startswith("."):
                raise AmedError(f"the index names a shard outside the model directory: {fname!r}.")
            if not fpath.exists() and not fpath.is_symlink():
                raise AmedError(f"shard {fname} is missing from {self.path} (listed in "
                                f"model.safetensors.index.json); run `amed download` again to fetch it.")
            for key, info in read_safetensors_header(fpath).items():
                if weight_map is not None and weight_map.get(key) != fname:
                    continue  # the index is authoritative about where a tensor lives
                tensors[key] = info
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in tensors and not self._is_mtp(key):
                    raise AmedError(f"tensor '{key}' is listed in the index under {fname} "
                                    f"but that shard does not contain it: the shard is damaged.")
        return tensors

    def _is_mtp(self, name: str) -> bool:
        # Multi-token-prediction layers sit after the main stack and are skipped (architecture §2f).
        parts = name.split(".")
        n = self.config.num_hidden_layers
        return (len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit()
                and n <= int(parts[2]) < n + self.config.num_nextn_predict_layers)

    def _validate(self) -> None:
        if type(self) is Checkpoint and any(k.endswith((".weight_packed", ".weight_scale_inv")) or t.dtype == "F8_E4M3"
                                            for k, t in self.tensors.items()):
            raise AmedError(f"{self.path} is a pre-quantized checkpoint (INT4 or FP8): convert it into a store "
                            f"first with `amed quantize {self.path} -o STORE`.")
        want = table_size(self.config)
        if want > 2 * len(self.tensors) + 1024:   # before building a table config.json may make huge
            raise AmedError(f"config.json implies {want} tensors but the checkpoint in {self.path} holds "
                            f"{len(self.tensors)}: the config does not match the weights.")
        for name, (shape, dtype) in hf_tensor_specs(self.config).items():
            t = self.tensors.get(name)
            if t is None:
                raise AmedError(f"tensor '{name}' is missing from the checkpoint in {self.path}.")
            if t.shape != shape:
                raise AmedError(f"tensor '{name}' in {t.path.name} has shape {list(t.shape)}, "
                                f"but config.json implies {list(shape)}.")
            if t.dtype not in (dtype, "F32", "BF16"):
                raise AmedError(f"tensor '{name}' in {t.path.name} has dtype {t.dtype}; expected {dtype}.")
        extra = self._unused_layer_tensor()
        if extra:
            raise AmedError(f"the checkpoint in {self.path} holds '{extra}', which config.json does not "
                            f"describe (num_hidden_layers, use_qk_norm, ... disagree with the weights).")

    def _unused_layer_tensor(self) -> str | None:
        """A decoder-layer or global tensor present in the files but absent from the tensor table
        (MTP layers excepted): the config disagrees with the weights."""
        known = hf_tensor_specs(self.config)
        for key in self.tensors:
            if key in known or self._is_mtp(key) or not key.startswith(("model.", "lm_head.")):
                continue
            if key.endswith((".weight", ".expert_bias", ".bias")):
                return key
        return None

    def check_files(self) -> None:
        """Raise an AmedError if a mapped shard shrank since it was mapped (formats/files.Watched)."""
        self._watch.check()

    # -- data access
    def _fd(self, path: Path) -> int:
        from amed.formats.files import open_regular

        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular(path)
        return fd

    def _map(self, path: Path) -> mmap.mmap:
        from amed.formats.files import map_regular

        m = self._maps.get(path)
        if m is None:
            fd, m = map_regular(path)
            self._maps[path] = m
            self._watch.add(path, fd)
        return m

    def get(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor (no data is read until it is touched)."""
        t = self.tensors.get(name)
        if t is None:
            raise AmedError(f"tensor '{name}' is not in the checkpoint.")
        m = self._map(t.path)
        if len(m) < t.end:
            raise AmedError(f"{t.path.name} shrank while open: it is truncated.")
        dt = np.dtype(DTYPES[t.dtype])
        return np.frombuffer(m, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.start).reshape(t.shape)

    def read_raw(self, name: str, row0: int = 0, nrows: int | None = None) -> np.ndarray:
        """Rows of a tensor read with pread into fresh memory (no mapping grows the RSS)."""
        t = self.tensors[name]
        dt = np.dtype(DTYPES[t.dtype])
        rows = t.shape[0] if t.shape else 1
        nrows = rows - row0 if nrows is None else nrows
        row_bytes = t.nbytes // max(rows, 1)
        buf = np.empty(nrows * row_bytes, np.uint8)
        fd = self._fd(t.path)
        mv, pos = memoryview(buf), t.start + row0 * row_bytes
        while mv:
            n = os.preadv(fd, [mv], pos)
            if n <= 0:
                raise AmedError(f"{t.path.name} ended early while reading '{name}': the file is truncated.")
            mv, pos = mv[n:], pos + n
        return buf.view(dt).reshape((nrows,) + t.shape[1:])

    def read_rows_f32(self, name: str, chunk_elems: int):
        """Yield (row0, float32 rows) chunks of a tensor of about `chunk_elems` elements each."""
        t = self.tensors[name]
        rows = t.shape[0] if t.shape else 1
        per_row = max(1, math.prod(t.shape[1:]))
        step = max(1, chunk_elems // per_row)
        for r in range(0, rows, step):
            a = self.read_raw(name, r, min(step, rows - r))
            if t.dtype == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            yield r, np.ascontiguousarray(a, dtype=np.float32).reshape((-1,) + t.shape[1:]) if t.shape else a

    # -- weights by amed name (tensor_table), as the engine asks for them
    def _hf_name(self, name: str) -> str:
        if self._hf is None:
            self._hf = {spec.name: spec.hf for spec in tensor_table(self.config)}
        return self._hf[name]

    def matrix(self, name: str) -> np.ndarray:
        """A weight matrix by amed name: a read-only bf16 (uint16) or float32 view."""
        return self.get(self._hf_name(name))

    def vector(self, name: str) -> np.ndarray:
        """A norm weight or bias by amed name, as float32."""
        return self.get_f32(self._hf_name(name))

    def expert(self, layer: int, e: int) -> tuple:
        """(gate, up, down) of routed expert e of `layer`."""
        return tuple(self.matrix(f"blk.{layer}.ffn_{m}_exps.{e}") for m in ("gate", "up", "down"))

    def get_f32(self, name: str) -> np.ndarray:
        """A small tensor as a float32 copy (norm weights, biases)."""
        a = self.get(name)
        if self.tensors[name].dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(a, dtype=np.float32)



# ---- a checkpoint whose shards come and go (amed download --quantize) ------------------------

def read_index(path: Path, cfg) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json, checked as hostile input: shard names
    stay inside the directory, and every tensor the config implies is listed."""
    path = Path(path)
    weight_map = _weight_map(path)
    for fname in set(weight_map.values()):
        if "/" in fname or os.sep in fname or fname.startswith("."):
            raise AmedError(f"the index names a shard outside the model directory: {fname!r}.")
        if not fname.endswith(".safetensors"):
            raise AmedError(f"the index names a shard that is not a .safetensors file: {fname!r}.")
    for spec in tensor_table(cfg):
        if spec.hf not in weight_map:
            raise AmedError(f"tensor '{spec.hf}' is missing from {path.name}: the checkpoint does not "
                            f"match its config.json.")
    return weight_map


class ShardedCheckpoint(Checkpoint):
    """A checkpoint read one shard at a time: the index is known up front, a shard is validated
    (header, then every tensor the index puts there against the tensor table) when it is added,
    and only the tensors of shards present can be read. `read_rows_f32` etc. work as in Checkpoint."""

    def __init__(self, path: str | os.PathLike, config, weight_map: dict[str, str]):
        self.path = Path(path)
        self.config = config
        self.weight_map = weight_map
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._watch = Watched()
        self._hf = None
        self._specs = hf_tensor_specs(config)

    def add_shard(self, fname: str) -> None:
        fpath = self.path / fname
        header = read_safetensors_header(fpath)
        for key, where in self.weight_map.items():
            if where != fname or self._is_mtp(key):
                continue
            t = header.get(key)
            if t is None:
                raise AmedError(f"tensor '{key}' is listed in the index under {fname} "
                                f"but that shard does not contain it: the shard is damaged.")
            if key not in self._specs and key.startswith(("model.", "lm_head.")):
                raise AmedError(f"{fname} holds '{key}', which config.json does not describe "
                                f"(num_hidden_layers, use_qk_norm, ... disagree with the weights).")
            if key in self._specs:
                shape, dtype = self._specs[key]
                if t.shape != shape:
                    raise AmedError(f"tensor '{key}' in {fname} has shape {list(t.shape)}, "
                                    f"but config.json implies {list(shape)}.")
                if t.dtype not in (dtype, "F32", "BF16"):
                    raise AmedError(f"tensor '{key}' in {fname} has dtype {t.dtype}; expected {dtype}.")
                self.tensors[key] = t

    def drop_shard(self, fname: str) -> None:
        """Forget a shard's tensors and close its file (before it is deleted)."""
        fpath = self.path / fname
        self.tensors = {k: t for k, t in self.tensors.items() if t.path != fpath}
        fd = self._fds.pop(fpath, None)
        if fd is not None:
            os.close(fd)
        m = self._maps.pop(fpath, None)
        if m is not None:
            m.close()

    def close(self) -> None:
        for fname in {t.path.name for t in self.tensors.values()} | {p.name for p in self._fds}:
            self.drop_shard(fname)
