"""Pre-quantized checkpoints as `amed quantize` sources: the official INT4 and FP8 AntAngelMed.

* **INT4** (`MedAIBase/AntAngelMed-INT4`): compressed-tensors, `format: pack-quantized`, symmetric int
  weights in groups along the input dimension. A quantized Linear `P` holds `P.weight_packed` (int32
  [out, ceil(in/8)], column 8k+j in bits 4j..4j+3 of word k, stored as q + 8), `P.weight_scale`
  ([out, in/G], the model dtype), `P.weight_shape` ([out, in]) and, with `actorder: "group"`,
  `P.weight_g_idx` (int32 [in], the group of each column); w[r, c] = q[r, c] * scale[r, g(c)].
  Modules in the config's `ignore` list keep a plain bf16 `P.weight`.
* **FP8** (`MedAIBase/AntAngelMed-FP8`, DeepSeek-V3 / Ling style): `quant_method: "fp8"`,
  `fmt: "e4m3"`, `weight_block_size: [128, 128]`: `P.weight` is float8_e4m3fn and
  `P.weight_scale_inv` float32 [ceil(out/128), ceil(in/128)]; w = fp8(q) * scale_inv[r//128, c//128]
  (the name notwithstanding, the scale multiplies).

`open_checkpoint(dir)` returns a `Checkpoint` whose tensor table holds the plain `P.weight` names as
virtual tensors: `read_rows_f32` dequantizes them chunk by chunk (bounded memory, one row block at a
time), so every format amed writes can be made from them by the ordinary converter.

Lossless path (`convert_direct`): an INT4 matrix going to amed q4, q6 or q8 whose amed group G
divides the source group (and whose groups are contiguous: no `g_idx`, or a g_idx that is the
identity grouping) is copied, not re-quantized: q4 stores u = q + 8 with scale s and zero -8 s, q8
stores the level q itself with scale s, q6 stores u = q + 32 with zero -32 s. amed's scales and zeros
are float16, so the copy is exact wherever s (and 8 s, 32 s) is a float16 number: a bf16 scale is one
when 2^-14 <= |s| <= 65504 (normal range; down to 2^-17 with its low bits as float16 subnormals), a
float16 scale always; 8 s overflows float16 only above 8188. A group that is not exact is stored
with the nearest float16 values and counted (`stats`, printed by `amed quantize`).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amed.errors import AmedError
from amed.formats.checkpoint import DTYPES, Checkpoint, TensorInfo, tensor_table

E4M3_MAX = 448.0


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (no infinities; S.1111.111 is NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b >> 7, -1.0, 1.0)
    e = ((b >> 3) & 15).astype(np.int32)
    m = (b & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1.0 + m / 8.0) * np.exp2(e - 7.0))
    out = (sign * mag).astype(np.float32)
    out[(e == 15) & ((b & 7) == 7)] = np.nan
    return out


E4M3 = _e4m3_table()


# ---- the quantization_config -------------------------------------------------------------------

@dataclass
class WeightArgs:
    """One compressed-tensors config group's weight scheme (4-bit, symmetric, grouped)."""
    targets: list
    num_bits: int
    group_size: int
    actorder: str | None


@dataclass
class Scheme:
    method: str                      # "compressed-tensors" (INT4) | "fp8"
    groups: list = field(default_factory=list)     # [WeightArgs] (INT4)
    ignore: list = field(default_factory=list)     # module names or "re:" patterns kept unquantized
    block: tuple = (128, 128)                      # FP8 block (rows, columns)

    @property
    def label(self) -> str:
        if self.method == "fp8":
            return f"FP8 e4m3, {self.block[0]}x{self.block[1]} blocks"
        gs = sorted({g.group_size for g in self.groups})
        return f"INT4 compressed-tensors pack-quantized, group {'/'.join(map(str, gs))}"

    @property
    def group_size(self) -> int | None:
        """The source group of an INT4 checkpoint (the default --group-size for it: copies losslessly)."""
        if self.method != "compressed-tensors" or not self.groups:
            return None
        g = self.groups[0].group_size
        return g if g in (32, 64, 128) else None


def _unsupported(field_: str, value, what: str) -> AmedError:
    return AmedError(f"quantization_config {field_} = {json.dumps(value)} is not supported ({what}); "
                     f"use the bf16 checkpoint (MedAIBase/AntAngelMed) with `amed quantize` instead.")


def read_scheme(config: dict) -> Scheme | None:
    """The scheme of config.json's `quantization_config`, None for an unquantized checkpoint; an
    AmedError of one sentence naming the first field amed does not support."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise _unsupported("", qc, "not a JSON object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_scheme(qc)
    if method == "compressed-tensors":
        return _ct_scheme(qc)
    raise _unsupported("quant_method", method, "amed reads compressed-tensors INT4 and block FP8")


def _fp8_scheme(qc: dict) -> Scheme:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise _unsupported("fmt", qc.get("fmt"), "amed reads float8 e4m3 only")
    if qc.get("activation_scheme", "dynamic") not in ("dynamic", None):
        raise _unsupported("activation_scheme", qc.get("activation_scheme"),
                           "amed computes activations in float and reads dynamic-activation checkpoints only")
    block = qc.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
        raise _unsupported("weight_block_size", block, "amed reads block-wise FP8 with two positive block sides")
    known = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert",
             "ignored_layers"}
    for k, v in qc.items():
        if k not in known and v not in (None, False, [], {}):
            raise _unsupported(k, v, "amed does not know this FP8 field")
    ignore = list(qc.get("modules_to_not_convert") or []) + list(qc.get("ignored_layers") or [])
    return Scheme("fp8", ignore=[str(x) for x in ignore], block=tuple(block))


def _ct_scheme(qc: dict) -> Scheme:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise _unsupported("format", fmt, "amed reads the pack-quantized INT4 format")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported("quantization_status", status, "amed reads compressed (packed) weights")
    for k in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(k) not in (None, {}, []):
            raise _unsupported(k, qc.get(k), "amed reads weight-only quantization")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _unsupported("config_groups", groups, "it must name at least one group")
    out = []
    for gname, g in groups.items():
        where = f"config_groups.{gname}"
        if not isinstance(g, dict):
            raise _unsupported(where, g, "not a JSON object")
        if g.get("format", fmt) not in (None, "pack-quantized"):
            raise _unsupported(f"{where}.format", g.get("format"), "amed reads the pack-quantized INT4 format")
        for k in ("input_activations", "output_activations"):
            if g.get(k) is not None:
                raise _unsupported(f"{where}.{k}", g.get(k), "amed reads weight-only (W4A16) quantization")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise _unsupported(f"{where}.weights", w, "weight quantization is missing")
        checks = (("num_bits", 4, "amed reads 4-bit packed weights"),
                  ("type", "int", "amed reads integer weights"),
                  ("symmetric", True, "amed reads symmetric INT4 (no zero points)"),
                  ("strategy", "group", "amed reads group-wise scales"),
                  ("dynamic", False, "amed reads static weight scales"))
        for k, want, why in checks:
            if w.get(k, want) != want:
                raise _unsupported(f"{where}.weights.{k}", w.get(k), why)
        G = w.get("group_size")
        if not isinstance(G, int) or isinstance(G, bool) or G <= 0 or G % 8:
            raise _unsupported(f"{where}.weights.group_size", G, "a positive multiple of 8 is needed")
        act = w.get("actorder")
        if act is True:
            act = "group"
        if act not in (None, False, "static", "weight", "group"):
            raise _unsupported(f"{where}.weights.actorder", act, "amed reads static, weight and group orders")
        for k in ("block_structure", "scale_dtype", "zp_dtype"):
            if w.get(k) not in (None, "bfloat16", "float16", "torch.bfloat16", "torch.float16") and k != "block_structure":
                raise _unsupported(f"{where}.weights.{k}", w.get(k), "amed reads bf16/fp16 scales")
            if k == "block_structure" and w.get(k) is not None:
                raise _unsupported(f"{where}.weights.{k}", w.get(k), "amed reads group-wise scales")
        targets = g.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _unsupported(f"{where}.targets", targets, "it must list the modules quantized")
        out.append(WeightArgs([str(t) for t in targets], 4, G, act or None))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list):
        raise _unsupported("ignore", ignore, "it must be a list of module names")
    return Scheme("compressed-tensors", groups=out, ignore=[str(x) for x in ignore])


def _matches(name: str, pattern: str) -> bool:
    """compressed-tensors' name matching: "re:REGEX" (re.match) or an exact module name / a
    class name ("Linear" matches every Linear module, which is what it targets here)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern in ("Linear", "nn.Linear", "torch.nn.Linear")


def read_config_scheme(path: Path) -> Scheme | None:
    from amed.formats.files import read_regular

    try:
        cfg = json.loads(read_regular(Path(path) / "config.json", limit=1 << 24))
    except (OSError, ValueError, AmedError):
        return None                    # ModelConfig.from_file reports a bad config
    return read_scheme(cfg)


# ---- the checkpoint ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Virtual:
    """How a virtual `P.weight` is made from the stored tensors."""
    kind: str                         # "int4" | "fp8"
    shape: tuple
    parts: dict                       # component suffix -> TensorInfo
    group: int = 0                    # INT4 source group
    contiguous: bool = True           # INT4: groups are runs of `group` columns (no permutation)


def module_quantized(scheme: Scheme, module: str, is_linear: bool) -> bool:
    """Whether the config says `module` is stored quantized."""
    if not is_linear or any(_matches(module, p) for p in scheme.ignore if p not in ("Linear",)):
        return False
    if scheme.method == "fp8":
        return True
    return any(any(_matches(module, t) for t in g.targets) for g in scheme.groups)


def virtualize(raw: dict[str, TensorInfo], cfg, scheme: Scheme, where: str, partial: bool = False):
    """(tensors, virtuals): the checkpoint's tensors with every quantized `P.weight` replaced by a
    virtual entry (dtype BF16 for the table's checks; nbytes = the stored bytes), and the recipe of
    each. `partial`: a streamed checkpoint whose other shards are not here yet (skip incomplete ones)."""
    tensors = dict(raw)
    virtuals: dict[str, Virtual] = {}
    table = tensor_table(cfg)
    shapes = {s.hf: s.shape for s in table}
    linear = {s.hf for s in table if len(s.shape) == 2 and s.kind not in ("router", "embed")}
    bases = {k[:-len(".weight_packed")] for k in raw if k.endswith(".weight_packed")}
    bases |= {k[:-len(".weight_scale_inv")] for k in raw if k.endswith(".weight_scale_inv")}
    if scheme.method == "fp8":
        bases |= {k[:-len(".weight")] for k, t in raw.items() if k.endswith(".weight") and t.dtype == "F8_E4M3"}
    for base in sorted(bases):
        hf = base + ".weight"
        if scheme.method == "fp8":
            names = {"": hf, "_scale_inv": hf + "_scale_inv"}
        else:
            names = {"_packed": hf + "_packed", "_scale": hf + "_scale", "_shape": hf + "_shape"}
            if hf + "_g_idx" in raw:
                names["_g_idx"] = hf + "_g_idx"
            if hf + "_zero_point" in raw:
                raise AmedError(f"'{hf}_zero_point' in {where}: asymmetric INT4 (zero points) is not supported.")
        parts = {suf: raw.get(n) for suf, n in names.items()}
        if any(p is None for p in parts.values()):
            if partial:                          # the rest is in a shard not here yet
                for n in names.values():
                    tensors.pop(n, None)
                continue
            miss = next(n for suf, n in names.items() if parts[suf] is None)
            raise AmedError(f"tensor '{miss}' is missing from {where}: the quantized '{hf}' is incomplete.")
        if hf in raw and scheme.method != "fp8":
            raise AmedError(f"{where} holds both '{hf}' and its packed form: the checkpoint is inconsistent.")
        v = _check_virtual(hf, parts, shapes.get(hf), scheme, where)
        for n in names.values():
            tensors.pop(n, None)
        tensors[hf] = TensorInfo(hf, v.parts[next(iter(v.parts))].path, "BF16", v.shape, 0,
                                 sum(p.nbytes for p in parts.values()))
        virtuals[hf] = v
    # the config's targets / ignore list must agree with what is stored
    for hf in sorted(linear):
        t = tensors.get(hf)
        if t is None:
            continue
        want = module_quantized(scheme, hf[:-len(".weight")], True)
        if scheme.method == "fp8" and (want or hf not in virtuals):
            continue                     # FP8 configs need not list every bf16 module
        if want != (hf in virtuals):
            state = "quantized" if hf in virtuals else f"stored as {t.dtype}"
            raise AmedError(f"'{hf[:-len('.weight')]}' is {state} in {where}, but quantization_config "
                            f"({'ignore' if not want else 'targets'}) says it is "
                            f"{'not ' if not want else ''}quantized: the config does not match the weights.")
    return tensors, virtuals


def _check_virtual(hf: str, parts: dict, shape, scheme: Scheme, where: str) -> Virtual:
    if scheme.method == "fp8":
        w, s = parts[""], parts["_scale_inv"]
        if w.dtype != "F8_E4M3" or len(w.shape) != 2:
            raise AmedError(f"'{hf}' in {where} has dtype {w.dtype} {list(w.shape)}; FP8 weights are 2-D F8_E4M3.")
        bn, bk = scheme.block
        want = (math.ceil(w.shape[0] / bn), math.ceil(w.shape[1] / bk))
        if s.dtype not in ("F32", "BF16", "F16") or tuple(s.shape) != want:
            raise AmedError(f"'{hf}_scale_inv' in {where} is {s.dtype} {list(s.shape)}; a {list(w.shape)} weight "
                            f"in {bn}x{bk} blocks needs float {list(want)}.")
        return Virtual("fp8", tuple(w.shape), parts)
    args = _weight_args(scheme, hf[:-len(".weight")])
    p, sc, sh = parts["_packed"], parts["_scale"], parts["_shape"]
    if sh.dtype not in ("I32", "I64") or sh.shape != (2,) or sh.nbytes > 64:
        raise AmedError(f"'{hf}_shape' in {where} is {sh.dtype} {list(sh.shape)}, not a 2-element integer shape.")
    G = args.group_size
    if shape is None:                             # not in the table: only its name matters (reported later)
        shape = (p.shape[0], p.shape[1] * 8) if len(p.shape) == 2 else (0, 0)
    out, inn = shape
    if p.dtype != "I32" or tuple(p.shape) != (out, math.ceil(inn / 8)):
        raise AmedError(f"'{hf}_packed' in {where} is {p.dtype} {list(p.shape)}; a {list(shape)} INT4 weight "
                        f"packs into I32 {[out, math.ceil(inn / 8)]}.")
    if sc.dtype not in ("BF16", "F16", "F32") or tuple(sc.shape) != (out, math.ceil(inn / G)):
        raise AmedError(f"'{hf}_scale' in {where} is {sc.dtype} {list(sc.shape)}; group {G} needs "
                        f"{[out, math.ceil(inn / G)]}.")
    g = parts.get("_g_idx")
    if g is not None and (g.dtype not in ("I32", "I64") or tuple(g.shape) != (inn,)):
        raise AmedError(f"'{hf}_g_idx' in {where} is {g.dtype} {list(g.shape)}, not an integer [{inn}].")
    return Virtual("int4", shape, parts, G, contiguous=g is None)


def _weight_args(scheme: Scheme, module: str) -> WeightArgs:
    for g in scheme.groups:
        if any(_matches(module, t) for t in g.targets):
            return g
    return scheme.groups[0]


class _Reader:
    """Row reads of the stored tensors of virtual weights, and their dequantization."""

    virtuals: dict
    stats: dict

    def _rows(self, info: TensorInfo, row0: int, nrows: int) -> np.ndarray:
        import os

        dt = np.dtype(DTYPES[info.dtype])
        rows = info.shape[0] if info.shape else 1
        row_bytes = info.nbytes // max(rows, 1)
        buf = np.empty(nrows * row_bytes, np.uint8)
        fd = self._fd(info.path)
        mv, pos = memoryview(buf), info.start + row0 * row_bytes
        while mv:
            n = os.preadv(fd, [mv], pos)
            if n <= 0:
                raise AmedError(f"{info.path.name} ended early while reading '{info.name}': the file is truncated.")
            mv, pos = mv[n:], pos + n
        return buf.view(dt).reshape((nrows,) + tuple(info.shape[1:]))

    def _f32(self, info, row0, nrows) -> np.ndarray:
        a = self._rows(info, row0, nrows)
        if info.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def _g_idx(self, v: Virtual) -> np.ndarray | None:
        g = v.parts.get("_g_idx")
        if g is None:
            return None
        idx = self._rows(g, 0, g.shape[0]).astype(np.int64)
        ng = math.ceil(v.shape[1] / v.group)
        if idx.size and (idx.min() < 0 or idx.max() >= ng):
            raise AmedError(f"'{g.name}' maps a column to a group outside 0..{ng - 1}: the checkpoint is damaged.")
        return idx

    def _check_shape(self, v: Virtual, hf: str) -> None:
        sh = v.parts.get("_shape")
        if sh is not None:
            got = tuple(int(x) for x in self._rows(sh, 0, 2))
            if got != tuple(v.shape):
                raise AmedError(f"'{hf}_shape' says {list(got)} but config.json implies {list(v.shape)}.")

    def int4_levels(self, hf: str, row0: int, nrows: int) -> tuple[np.ndarray, np.ndarray]:
        """(q int8 [nrows, in] in -8..7, scale float32 [nrows, ngroups]) of an INT4 weight's rows."""
        v = self.virtuals[hf]
        out, inn = v.shape
        u = self._rows(v.parts["_packed"], row0, nrows).view(np.uint32)
        shifts = np.arange(0, 32, 4, dtype=np.uint32)
        q = ((u[:, :, None] >> shifts) & np.uint32(15)).astype(np.int8).reshape(nrows, -1)[:, :inn] - np.int8(8)
        return q, self._f32(v.parts["_scale"], row0, nrows)

    def dequant_rows(self, hf: str, row0: int, nrows: int) -> np.ndarray:
        v = self.virtuals[hf]
        if v.kind == "fp8":
            w = E4M3[self._rows(v.parts[""], row0, nrows).view(np.uint8)]
            bn, bk = self.scheme.block
            b0, b1 = row0 // bn, (row0 + nrows - 1) // bn + 1
            s = self._f32(v.parts["_scale_inv"], b0, b1 - b0)
            s = np.repeat(np.repeat(s, bn, axis=0)[row0 - b0 * bn:row0 - b0 * bn + nrows], bk, axis=1)
            w *= s[:, :w.shape[1]]
            if not np.isfinite(w).all():
                raise AmedError(f"'{hf}' holds NaN FP8 values (rows {row0}..{row0 + nrows - 1}): the checkpoint is damaged.")
            return w
        q, s = self.int4_levels(hf, row0, nrows)
        g = self._g_idx(v)
        cols = g if g is not None else np.arange(v.shape[1]) // v.group
        return q.astype(np.float32) * s[:, cols]


class PrequantCheckpoint(_Reader, Checkpoint):
    """A compressed-tensors INT4 or block-FP8 checkpoint read as a bf16 one (see the module doc)."""

    def __init__(self, path, scheme: Scheme, config=None):
        self.scheme = scheme
        self.virtuals: dict[str, Virtual] = {}
        self.stats = {"lossless_tensors": 0, "inexact_groups": 0, "requantized_tensors": 0}
        super().__init__(path, config)
        for hf, v in self.virtuals.items():
            self._check_shape(v, hf)

    def _read_tables(self):
        raw = super()._read_tables()
        tensors, self.virtuals = virtualize(raw, self.config, self.scheme, str(self.path))
        return tensors

    def read_rows_f32(self, name: str, chunk_elems: int):
        if name not in self.virtuals:
            plain = getattr(self, "_plain_rows", None) or super().read_rows_f32
            yield from plain(name, chunk_elems)
            return
        rows, cols = self.virtuals[name].shape
        step = max(1, chunk_elems // max(cols, 1))
        if self.scheme.method == "fp8":                   # whole row blocks: each scale row read once
            step = max(self.scheme.block[0], step // self.scheme.block[0] * self.scheme.block[0])
        for r in range(0, rows, step):
            yield r, self.dequant_rows(name, r, min(step, rows - r))

    def get(self, name: str) -> np.ndarray:
        if name in self.virtuals:
            v = self.virtuals[name]
            return self.dequant_rows(name, 0, v.shape[0])
        return super().get(name)

    def convert_direct(self, writer, spec, settings) -> bool:
        return convert_direct(self, writer, spec, settings)


_STATS_LOCK = threading.Lock()


def _count(reader, key: str) -> None:
    with _STATS_LOCK:
        reader.stats[key] += 1


def convert_direct(reader, writer, spec, settings) -> bool:
    """Write an INT4 weight into a q4/q6/q8 store matrix by copying its levels, when the amed group
    divides the source group and the groups are contiguous (see the module doc). False: not
    applicable, the caller converts the dequantized weights as usual."""
    from amed.quant import formats as quants
    from amed.quant.convert import ROW_CHUNK_ELEMS, quant_parts

    v = reader.virtuals.get(spec.hf)
    if v is None or v.kind != "int4":
        return False
    fmt, G = settings.choose(spec)
    N, K = v.shape
    if fmt not in ("q4", "q6", "q8") or G is None or v.group % G or K % v.group:
        _count(reader, "requantized_tensors")
        return False
    if not v.contiguous:
        g = reader._g_idx(v)
        if not np.array_equal(g, np.arange(K) // v.group):
            _count(reader, "requantized_tensors")
            return False                          # permuted groups: no contiguous-group copy exists
    r8 = settings.layout_of(spec) == "r8"
    step = max(quants.R8, ROW_CHUNK_ELEMS // 4 // K // quants.R8 * quants.R8)
    rep = v.group // G
    inexact = 0
    for r0 in range(0, N, step):
        n = min(step, N - r0)
        q, s = reader.int4_levels(spec.hf, r0, n)
        s = np.repeat(s, rep, axis=1)                                         # [n, K/G]
        off = {"q8": 0, "q4": 8, "q6": 32}[fmt]
        s16 = s.astype(np.float16)
        bad = s16.astype(np.float32) != s
        if fmt != "q8":
            z16 = (-off * s).astype(np.float16)
            bad |= z16.astype(np.float32) != -off * s
        inexact += int(bad.sum()) // rep
        levels = (q.astype(np.int16) + off).reshape(n, K // G, G)
        if fmt == "q8":
            qt = quants.QTensor("q8", (n, K), G, levels.astype(np.int8), s16)
        else:
            u = levels.astype(np.uint8)
            packed = quants._pack_q4(u) if fmt == "q4" else quants._pack_q6(u)
            qt = quants.QTensor(fmt, (n, K), G, packed, s16, z16)
        if r8:
            qt = quants.interleave(qt)
        for suffix, arr in quant_parts(qt, fmt):
            writer.write(spec.name + suffix, arr, r0 // quants.R8 if r8 else r0)
    with _STATS_LOCK:                             # tensors convert in a thread pool
        reader.stats["lossless_tensors"] += 1
        reader.stats["inexact_groups"] += inexact
    return True


def open_checkpoint(path, config=None) -> Checkpoint:
    """A checkpoint directory as a source: a PrequantCheckpoint when config.json declares a
    supported quantization_config, else the plain Checkpoint."""
    scheme = read_config_scheme(Path(path)) if Path(path).is_dir() else None
    if scheme is None:
        return Checkpoint(path, config)
    return PrequantCheckpoint(path, scheme, config)


def resolve_group(settings, scheme: Scheme | None):
    """Settings with group_size None resolved: the INT4 source's own group (a lossless copy at the
    smallest size), else 64."""
    import dataclasses

    if settings.group_size is not None:
        return settings
    g = (scheme.group_size if scheme is not None else None) or 64
    return dataclasses.replace(settings, group_size=g)


# ---- streamed (amed download --quantize): shards come and go ------------------------------------

def index_needs(weight_map: dict[str, str], cfg, scheme: Scheme | None) -> dict[str, set[str]]:
    """HF name of every table tensor -> the shards holding what it is made of (its packed parts, or
    the FP8 weight and its scale), from a safetensors index checked as hostile input."""
    if scheme is None:
        weight_map = read_index_names(weight_map)
        return {s.hf: {weight_map[s.hf]} for s in tensor_table(cfg)}
    read_index_names(weight_map)
    needs = {}
    for s in tensor_table(cfg):
        if s.hf + "_packed" in weight_map:
            parts = [s.hf + x for x in ("_packed", "_scale", "_shape", "_g_idx") if s.hf + x in weight_map
                     or x in ("_scale", "_shape")]
        elif s.hf + "_scale_inv" in weight_map:
            parts = [s.hf, s.hf + "_scale_inv"]
        else:
            parts = [s.hf]
        for p in parts:
            if p not in weight_map:
                raise AmedError(f"tensor '{p}' is missing from model.safetensors.index.json: the checkpoint "
                                f"does not match its config.json.")
        needs[s.hf] = {weight_map[p] for p in parts}
    return needs


def read_index_names(weight_map: dict[str, str]) -> dict[str, str]:
    import os

    for fname in set(weight_map.values()):
        if "/" in fname or os.sep in fname or fname.startswith("."):
            raise AmedError(f"the index names a shard outside the model directory: {fname!r}.")
        if not fname.endswith(".safetensors"):
            raise AmedError(f"the index names a shard that is not a .safetensors file: {fname!r}.")
    return weight_map


class PrequantShardedCheckpoint(_Reader):
    """ShardedCheckpoint's interface (add_shard / drop_shard / tensors / read_rows_f32 / close) for a
    pre-quantized checkpoint: a virtual weight appears once every shard holding a part of it is here."""

    def __init__(self, path, config, weight_map: dict[str, str], scheme: Scheme):
        from amed.formats.checkpoint import hf_tensor_specs

        self.path, self.config, self.weight_map, self.scheme = Path(path), config, weight_map, scheme
        self.raw: dict[str, TensorInfo] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.virtuals: dict[str, Virtual] = {}
        self.stats = {"lossless_tensors": 0, "inexact_groups": 0, "requantized_tensors": 0}
        self._fds: dict[Path, int] = {}
        self._specs = hf_tensor_specs(config)

    def _fd(self, path: Path) -> int:
        from amed.formats.files import open_regular

        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular(path)
        return fd

    def add_shard(self, fname: str) -> None:
        from amed.formats.checkpoint import read_safetensors_header

        header = read_safetensors_header(self.path / fname)
        for key, where in self.weight_map.items():
            if where != fname:
                continue
            t = header.get(key)
            if t is None:
                raise AmedError(f"tensor '{key}' is listed in the index under {fname} "
                                f"but that shard does not contain it: the shard is damaged.")
            self.raw[key] = t
        old = set(self.virtuals)
        tensors, self.virtuals = virtualize(self.raw, self.config, self.scheme, fname, partial=True)
        for key, t in tensors.items():
            if key in self._specs:
                shape, dtype = self._specs[key]
                if t.shape != shape:
                    raise AmedError(f"tensor '{key}' in {t.path.name} has shape {list(t.shape)}, "
                                    f"but config.json implies {list(shape)}.")
                if t.dtype not in (dtype, "F32", "BF16"):
                    raise AmedError(f"tensor '{key}' in {t.path.name} has dtype {t.dtype}; expected {dtype}.")
        for hf in set(self.virtuals) - old:
            self._check_shape(self.virtuals[hf], hf)
        self.tensors = tensors

    def drop_shard(self, fname: str) -> None:
        import os

        fpath = self.path / fname
        self.raw = {k: t for k, t in self.raw.items() if t.path != fpath}
        self.tensors = {k: t for k, t in self.tensors.items() if t.path != fpath}
        self.virtuals = {k: v for k, v in self.virtuals.items() if all(p.path != fpath for p in v.parts.values())}
        fd = self._fds.pop(fpath, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        import os

        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read_rows_f32(self, name: str, chunk_elems: int):
        return PrequantCheckpoint.read_rows_f32(self, name, chunk_elems)

    def _plain_rows(self, name, chunk_elems):
        t = self.tensors[name]
        rows = t.shape[0] if t.shape else 1
        step = max(1, chunk_elems // max(1, math.prod(t.shape[1:])))
        for r in range(0, rows, step):
            a = self._f32(t, r, min(step, rows - r)) if t.shape else self._f32(t, 0, 1)
            yield r, a

    def convert_direct(self, writer, spec, settings) -> bool:
        return convert_direct(self, writer, spec, settings)
