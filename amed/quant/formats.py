"""Quantized weight formats: pure NumPy quantize / dequantize, and the byte layout of one matrix.

A matrix W [N, K] is in PyTorch layout (y = x @ W.T). Each row is split into ng = K // G groups of
G consecutive weights (G = 32, 64 or 128, G divides K); each group has its own float16 scale.

q8 (symmetric int8), 8 + 16/G bits per weight:
    w[n, g*G + j] ~= q[n, g, j] * scale[n, g]          q in -127..127
    q      int8    [N, ng, G]
    scale  float16 [N, ng]

q4 (asymmetric 4-bit, "split nibbles" as in llama.cpp Q4_0/Q4_1), 4 + 32/G bits per weight:
    w[n, g*G + j] ~= u * scale[n, g] + zero[n, g]      u in 0..15
    q      uint8   [N, ng, G/2]   byte j of group g holds u of element g*G + j     in its LOW nibble
                                                     and u of element g*G + G/2 + j in its HIGH nibble
    scale  float16 [N, ng]
    zero   float16 [N, ng]        the group's offset (the value of u = 0, i.e. the "min")

    Example, G = 32, one group holding elements e0..e31: byte 0 = e0 | e16 << 4,
    byte 1 = e1 | e17 << 4, ..., byte 15 = e15 | e31 << 4.

q6 (asymmetric 6-bit: q4's nibbles plus a plane of high bit pairs), 6 + 32/G bits per weight:
    w[n, g*G + j] ~= u * scale[n, g] + zero[n, g]      u in 0..63
    q      uint8   [N, ng, 3G/4]  per group: G/2 bytes of low nibbles, then G/4 bytes of high pairs
             bytes 0 .. G/2-1:       byte j = (u[j] & 15) | (u[j + G/2] & 15) << 4   (q4's layout)
             bytes G/2 .. 3G/4-1:    byte G/2 + i = (u[i] >> 4)
                                                  | (u[i + G/4] >> 4) << 2
                                                  | (u[i + G/2] >> 4) << 4
                                                  | (u[i + 3G/4] >> 4) << 6          i < G/4
             where u[j] is the level of element g*G + j
    scale  float16 [N, ng]
    zero   float16 [N, ng]

    Example, G = 32 (24 bytes per group): byte 0 = low4(e0) | low4(e16) << 4, ...,
    byte 15 = low4(e15) | low4(e31) << 4; byte 16 = hi2(e0) | hi2(e8) << 2 | hi2(e16) << 4 |
    hi2(e24) << 6, ..., byte 23 = hi2(e7) | hi2(e15) << 2 | hi2(e23) << 4 | hi2(e31) << 6.
    With u(e0) = 45 = 0b10_1101 and u(e16) = 7 = 0b00_0111: byte 0 = 0x7D, and bits 0-1 of byte
    16 are 0b10, bits 4-5 are 0b00.
    Why this plane order: quarter k of a group (elements kG/4 .. (k+1)G/4 - 1) is
    (plane >> 2k) & 3, a uniform shift of the whole plane, so the kernel builds a chunk of levels
    from one zero-extended load of the plane with shifts, masks and at most one concatenating
    shuffle (engine/backends/cpu/qdot.py: _q6_high_bits); the nibble plane is unpacked exactly like q4's.

Row layouts ("layout", recorded per weight in a store's manifest):
  rows  the arrays above, row after row.
  r8    q4 and q8 only, N a multiple of 8: 8 consecutive rows interleaved 4 weights at a time, so
        one 32-byte load of the kernel holds inputs k..k+3 of 8 rows and the dot products need no
        horizontal sums (engine/backends/cpu/qr8.py, "rows interleaved by 8"; 1.4-2x faster prefill). Same bytes:
        q      [N/8, ng, 8 * bytes per group]; for row block b and group g:
               q8  byte 32c + 4r + j      = level of element 4c + j of row 8b + r     (c < G/4)
               q4  byte 32m + 4r + j      = level of element 8m + j       (low nibble)
                                          | level of element 8m + 4 + j   << 4       (m < G/8)
        scale, zero  [N/8, ng, 8]: scale[b, g, r] is the scale of row 8b + r, group g.
        `interleave` and `to_rows` convert; r8 is what `amed quantize` writes for q4/q8 matrices.

Byte layout of one matrix (`QTensor.write_into` / `QTensor.from_buffer` / `layout_nbytes`), a pure
function of (fmt, shape, group); all integers little-endian, arrays C-order:
    q      at offset 0                                   N*K bytes (q8), N*K/2 (q4) or 3*N*K/4 (q6)
    scale  at align64(end of q)                          2*N*ng bytes (IEEE binary16)
    zero   at align64(end of scale)     (q4 and q6 only) 2*N*ng bytes (IEEE binary16)
    total  layout_nbytes = align64(end of the last section); padding bytes are zero.
The offset passed to write_into / from_buffer should be a multiple of 64 (checked by from_buffer)
so that every section starts on a cache line.

Why this scheme (measured with bench/bench_qkernels.py on 1024x4096 matrices; relative RMSE):
  * q4 is asymmetric (scale + zero). At equal bits per weight it ties with symmetric q4 on
    Gaussian weights and wins on heavy-tailed ones (Student-t(4): asym G=64, 4.5 bits: 0.110;
    sym G=32, 4.5 bits: 0.112), and larger groups make the kernel faster (fewer per-group scale
    operations). Asymmetry costs nothing measurable in the kernel: the zero term is
    zero[n, g] * sum(x over group g), with the group sums computed once per call for all rows.
    Gaussian, searched: G=32 0.073, G=64 0.084, G=128 0.094 (q8 G=64: 0.0059).
  * Scales (and zeros) are float16: 4.5 bits per weight at q4 G=64 instead of 5 with float32.
    Rounding a scale to 11 significant bits is invisible next to 4-bit rounding (the search
    already evaluates the float16-rounded candidates). Numba cannot load float16 arrays on the CPU
    ("NotImplementedError: float16"), so the kernels read the raw uint16 bits and widen them with
    integer ops (engine/backends/cpu/qdot.py: half_to_f32), 16 groups at a time; that measured as fast as vcvtph2ps.
  * The scale search (`quantize(..., method="search")`) alternates "round every weight to its
    nearest level" with "least-squares refit of (scale, zero) to those levels", from the min/max
    fit and from one shrunken range, and keeps each group's best, evaluated with the float16-rounded
    parameters. Every step lowers a group's squared error, so it never loses to the min/max fit
    (`method="naive"`): q4 G=64 Gaussian 0.0897 -> 0.0844 (-6%), about 65 M weights/s per core
    against 230 for naive. (q6 scores every candidate with float16-rounded parameters, not only
    the last of each start: at its small error the float16 rounding of a float32 winner could
    otherwise lose to the min/max fit.)
  * q6 is q4 with two more bits per level (same asymmetric fit and search, 63 steps, a smaller
    shrink start), for matrices read every token (lm_head, attention) where q4's error shows:
    each extra bit halves the error, so it is ~4x below q4 at +2 bits per weight. Relative RMSE,
    searched (naive), 1024x4096:
                     G=32             G=64             G=128
      Gaussian  q4   0.0726 (0.0782)  0.0844 (0.0897)  0.0937 (0.0998)
                q6   0.0174 (0.0186)  0.0204 (0.0213)  0.0230 (0.0238)
                q8   0.0053 (0.0054)  0.0059 (0.0059)  0.0064 (0.0065)
      t(4)      q4   0.0866 (0.0935)  0.1099 (0.1173)  0.1344 (0.1442)
                q6   0.0208 (0.0223)  0.0267 (0.0279)  0.0333 (0.0343)
                q8   0.0072 (0.0073)  0.0088 (0.0089)  0.0107 (0.0108)
    q6 G=64 (6.5 bits) is below llama.cpp Q6_K's 6.56 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORMATS = ("q4", "q6", "q8")
LAYOUTS = ("rows", "r8")
R8 = 8                    # rows per interleaved block of the r8 layout
GROUPS = (32, 64, 128)
ALIGN = 64
Q8_MAX = 127
Q4_MAX = 15
Q6_MAX = 63
# formats with a zero (group offset) array, and the top level u of each
ASYM_MAX = {"q4": Q4_MAX, "q6": Q6_MAX}

_SCALE_DTYPE = np.dtype("<f2")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _check_format(fmt: str, shape, group: int) -> tuple[int, int, int]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")
    if group not in GROUPS:
        raise ValueError(f"group size must be one of {GROUPS}, not {group}")
    N, K = (int(d) for d in shape)
    if N < 0 or K <= 0 or K % group:
        raise ValueError(f"shape {tuple(shape)}: the row length must be a positive multiple of the group size {group}")
    return N, K, K // group


def section_offsets(fmt: str, shape, group: int) -> dict[str, tuple[int, int]]:
    """{"q"|"scale"|"zero": (byte offset, byte length)} of one matrix's sections, plus "total"."""
    N, K, ng = _check_format(fmt, shape, group)
    q_len = N * ng * _q_bytes(fmt, group)
    s_len = 2 * N * ng
    out = {"q": (0, q_len), "scale": (_align(q_len), s_len)}
    end = out["scale"][0] + s_len
    if fmt in ASYM_MAX:
        out["zero"] = (_align(end), s_len)
        end = out["zero"][0] + s_len
    out["total"] = (0, _align(end))
    return out


def layout_nbytes(fmt: str, shape, group: int) -> int:
    """Bytes one matrix takes in the canonical layout (a multiple of 64)."""
    return section_offsets(fmt, shape, group)["total"][1]


def _q_bytes(fmt: str, group: int) -> int:
    """Bytes of packed levels per group."""
    return {"q8": group, "q6": 3 * group // 4, "q4": group // 2}[fmt]


def r8_ok(fmt: str, shape) -> bool:
    """Whether a matrix can take the r8 layout."""
    return fmt in ("q4", "q8") and int(shape[0]) % R8 == 0


def array_shapes(fmt: str, shape, group: int, layout: str = "rows") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    N, K, ng = _check_format(fmt, shape, group)
    qdt = np.dtype(np.int8) if fmt == "q8" else np.dtype(np.uint8)
    if layout == "r8":
        if not r8_ok(fmt, shape):
            raise ValueError(f"the r8 layout needs a q4 or q8 matrix with a multiple of 8 rows, not {fmt} {tuple(shape)}")
        lead, qlast, slast = (N // R8, ng), R8 * _q_bytes(fmt, group), (R8,)
    elif layout == "rows":
        lead, qlast, slast = (N, ng), _q_bytes(fmt, group), ()
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out = {"q": (lead + (qlast,), qdt), "scale": (lead + slast, _SCALE_DTYPE)}
    if fmt in ASYM_MAX:
        out["zero"] = (lead + slast, _SCALE_DTYPE)
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class QTensor:
    """One quantized matrix [N, K] (see the module docstring for the formats).

    The arrays are kept as read-only views (weights come from a read-only mmap), so the Numba
    kernels see one array type whether a tensor was just quantized or loaded from disk.
    Scales may be given as float16 or as their uint16 bit patterns; they are stored as float16.
    """

    fmt: str
    shape: tuple[int, int]
    group: int
    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None = None
    layout: str = "rows"
    # kernel arguments: (q, scale bits as uint16, zero bits as uint16 or None); built once
    kargs: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        N, K, ng = _check_format(self.fmt, self.shape, self.group)
        object.__setattr__(self, "shape", (N, K))
        want = array_shapes(self.fmt, (N, K), self.group, self.layout)
        arrays = {"q": self.q, "scale": self.scale, "zero": self.zero}
        if self.fmt == "q8" and self.zero is not None:
            raise ValueError("q8 is symmetric: it has no zero array")
        for name, (shp, dt) in want.items():
            a = arrays[name]
            if a is None:
                raise ValueError(f"{self.fmt} needs a {name!r} array")
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{name} must be a numpy array, not {type(a).__name__}")
            if name != "q" and a.dtype == np.uint16:
                a = a.view(_SCALE_DTYPE)
            if a.dtype != dt or a.shape != shp or not a.flags.c_contiguous:
                raise ValueError(f"{self.fmt} {name}: expected a C-contiguous {dt} array of shape {shp}, "
                                 f"got {a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' (not contiguous)'}")
            object.__setattr__(self, name, _readonly(a))
        zbits = None if self.zero is None else self.zero.view(np.uint16)
        object.__setattr__(self, "kargs", (self.q, self.scale.view(np.uint16), zbits))

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes in the canonical layout (padding included)."""
        return layout_nbytes(self.fmt, self.shape, self.group)

    @property
    def bits_per_weight(self) -> float:
        N, K = self.shape
        data = self.q.nbytes + self.scale.nbytes + (0 if self.zero is None else self.zero.nbytes)
        return 8.0 * data / max(1, N * K)

    # ---- serialization -----------------------------------------------------------------------
    def write_into(self, buf, offset: int = 0) -> int:
        """Write the canonical layout into `buf` (a writable uint8 array, bytearray or memoryview)
        at byte `offset`; padding is zero-filled. Returns the offset just past the tensor."""
        dst = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
        total = self.nbytes
        if offset < 0 or offset + total > dst.size:
            raise ValueError(f"buffer too small: need {total} bytes at offset {offset}, have {dst.size}")
        region = dst[offset:offset + total]
        region[:] = 0
        for name, (off, length) in section_offsets(self.fmt, self.shape, self.group).items():
            if name == "total":
                continue
            region[off:off + length] = getattr(self, name).reshape(-1).view(np.uint8)
        return offset + total

    def tobytes(self) -> bytes:
        buf = np.zeros(self.nbytes, dtype=np.uint8)
        self.write_into(buf, 0)
        return buf.tobytes()

    @classmethod
    def from_buffer(cls, buf, offset: int, fmt: str, shape, group: int, layout: str = "rows") -> "QTensor":
        """A QTensor whose arrays are zero-copy views into `buf` (uint8 array, bytes, mmap, ...),
        laid out as written by `write_into` at byte `offset`."""
        base = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        if base.dtype != np.uint8 or base.ndim != 1:
            base = base.reshape(-1).view(np.uint8)
        if offset % ALIGN:
            raise ValueError(f"offset {offset} is not a multiple of {ALIGN}")
        secs = section_offsets(fmt, shape, group)
        if offset < 0 or offset + secs["total"][1] > base.size:
            raise ValueError(f"buffer too small: need {secs['total'][1]} bytes at offset {offset}, have {base.size}")
        arrays = {}
        for name, (shp, dt) in array_shapes(fmt, shape, group, layout).items():
            off, length = secs[name]
            arrays[name] = base[offset + off:offset + off + length].view(dt).reshape(shp)
        return cls(fmt=fmt, shape=tuple(shape), group=group, layout=layout, **arrays)


# ---- the r8 layout -------------------------------------------------------------------------------

def _levels_to_r8(fmt: str, u: np.ndarray) -> np.ndarray:
    """Levels [N, ng, G] (natural element order) -> r8 packed bytes [N/8, ng, 8 * bytes per group]."""
    N, ng, G = u.shape
    if fmt == "q8":                                   # [b, r, g, c, j] -> [b, g, c, r, j]
        return np.ascontiguousarray(u.reshape(N // R8, R8, ng, G // 4, 4).transpose(0, 2, 3, 1, 4)).reshape(N // R8, ng, -1)
    U = u.reshape(N // R8, R8, ng, G // 8, 2, 4).transpose(0, 2, 3, 4, 1, 5)      # [b, g, m, h, r, j]
    return (U[:, :, :, 0] | (U[:, :, :, 1] << 4)).astype(np.uint8).reshape(N // R8, ng, -1)


def _r8_to_levels(fmt: str, q: np.ndarray, G: int) -> np.ndarray:
    """Inverse of _levels_to_r8: [B, ng, 8 * bytes per group] -> levels [8B, ng, G]."""
    B, ng, _ = q.shape
    if fmt == "q8":
        return np.ascontiguousarray(q.reshape(B, ng, G // 4, R8, 4).transpose(0, 3, 1, 2, 4)).reshape(B * R8, ng, G)
    v = q.reshape(B, ng, G // 8, R8, 4)
    U = np.stack([v & 0x0F, v >> 4], axis=3)                                        # [b, g, m, h, r, j]
    return np.ascontiguousarray(U.transpose(0, 4, 1, 2, 3, 5)).reshape(B * R8, ng, G)


def _scales_to_r8(a: np.ndarray) -> np.ndarray:
    N, ng = a.shape
    return np.ascontiguousarray(a.reshape(N // R8, R8, ng).transpose(0, 2, 1))


def _scales_to_rows(a: np.ndarray) -> np.ndarray:
    B, ng, _ = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(B * R8, ng)


def interleave(qt: QTensor) -> QTensor:
    """The same matrix in the r8 layout (a copy); `qt` must be q4 or q8 with N % 8 == 0."""
    if qt.layout == "r8":
        return qt
    if not r8_ok(qt.fmt, qt.shape):
        raise ValueError(f"the r8 layout needs a q4 or q8 matrix with a multiple of 8 rows, not {qt.fmt} {qt.shape}")
    return QTensor(fmt=qt.fmt, shape=qt.shape, group=qt.group, layout="r8",
                   q=_levels_to_r8(qt.fmt, unpack_levels(qt.fmt, qt.q)), scale=_scales_to_r8(qt.scale),
                   zero=None if qt.zero is None else _scales_to_r8(qt.zero))


def to_rows(qt: QTensor) -> QTensor:
    """The same matrix in the rows layout (a copy unless it already is)."""
    if qt.layout == "rows":
        return qt
    u = _r8_to_levels(qt.fmt, qt.q, qt.group)
    q = u if qt.fmt == "q8" else _pack_q4(u)
    return QTensor(fmt=qt.fmt, shape=qt.shape, group=qt.group, q=q, scale=_scales_to_rows(qt.scale),
                   zero=None if qt.zero is None else _scales_to_rows(qt.zero))


# ---- dequantization ------------------------------------------------------------------------------

def _unpack_q4(q: np.ndarray) -> np.ndarray:
    """[..., G/2] packed bytes -> [..., G] levels 0..15 (uint8), split-nibble order."""
    return np.concatenate([q & 0x0F, q >> 4], axis=-1)


def _pack_q4(u: np.ndarray) -> np.ndarray:
    """[..., G] levels 0..15 -> [..., G/2] packed bytes (split-nibble order)."""
    h = u.shape[-1] // 2
    return (u[..., :h] | (u[..., h:] << 4)).astype(np.uint8)


def _unpack_q6(q: np.ndarray) -> np.ndarray:
    """[..., 3G/4] packed bytes -> [..., G] levels 0..63 (uint8): a q4 nibble plane of G/2 bytes
    (low 4 bits), then a plane of G/4 bytes whose byte i holds the high 2 bits of elements
    i, i + G/4, i + G/2, i + 3G/4 in bits 0-1, 2-3, 4-5, 6-7."""
    h = q.shape[-1] * 2 // 3                      # G/2
    p = q[..., h:]
    hi = np.concatenate([p & 3, (p >> 2) & 3, (p >> 4) & 3, p >> 6], axis=-1)
    return _unpack_q4(q[..., :h]) | (hi << 4)


def _pack_q6(u: np.ndarray) -> np.ndarray:
    """[..., G] levels 0..63 -> [..., 3G/4] packed bytes (see _unpack_q6)."""
    u = u.astype(np.uint8)
    q = u.shape[-1] // 4
    hi = u >> 4
    plane = hi[..., :q] | (hi[..., q:2 * q] << 2) | (hi[..., 2 * q:3 * q] << 4) | (hi[..., 3 * q:] << 6)
    return np.concatenate([_pack_q4(u & 0x0F), plane], axis=-1).astype(np.uint8)


def unpack_levels(fmt: str, q: np.ndarray) -> np.ndarray:
    """[..., bytes per group] packed -> [..., G] levels (int8 for q8, uint8 0..15 / 0..63 otherwise)."""
    if fmt == "q8":
        return q
    return _unpack_q4(q) if fmt == "q4" else _unpack_q6(q)


def _dequant(fmt, q, s, z) -> np.ndarray:
    """float32 [rows, K] from the rows' arrays (q [rows, ng, *], s/z [rows, ng])."""
    s = s.astype(np.float32)[..., None]
    if fmt == "q8":
        w = q.astype(np.float32) * s
    else:
        w = unpack_levels(fmt, q).astype(np.float32) * s + z.astype(np.float32)[..., None]
    return w.reshape(q.shape[0], -1)


def dequantize_rows(qt: QTensor, rows) -> np.ndarray:
    """float32 [len(rows), K] of the selected rows (e.g. an embedding lookup)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if qt.layout == "r8":                  # the blocks holding the rows, back to rows, then pick
        blocks, inv = np.unique(rows // R8, return_inverse=True)
        part = to_rows(QTensor(fmt=qt.fmt, shape=(R8 * len(blocks), qt.shape[1]), group=qt.group, layout="r8",
                               q=np.ascontiguousarray(qt.q[blocks]), scale=np.ascontiguousarray(qt.scale[blocks]),
                               zero=None if qt.zero is None else np.ascontiguousarray(qt.zero[blocks])))
        qt, rows = part, inv.reshape(-1) * R8 + rows % R8
    return _dequant(qt.fmt, qt.q[rows], qt.scale[rows], None if qt.zero is None else qt.zero[rows])


def dequantize(qt: QTensor) -> np.ndarray:
    """float32 [N, K]."""
    qt = to_rows(qt)
    return _dequant(qt.fmt, qt.q, qt.scale, qt.zero)


# ---- quantization --------------------------------------------------------------------------------

# Rows are processed in chunks of about this many weights so the temporaries stay in L2.
_CHUNK = 1 << 16
# q4 search: ranges to start from, as (low, high) shrink fractions of (max - min), and the number
# of least-squares refits from each. Measured on a 512x4096 Gaussian matrix, G=64 (relative RMSE,
# M weights/s on one core): naive 0.0897 (230); 1 start x 2 refits 0.0857 (97); these 2 starts
# 0.0844 (65); 3 starts (0, .04, .1) 0.0838 (48). Student-t(4) weights rank the same way.
_Q4_STARTS = ((0.0, 0.0), (0.06, 0.06))
_Q4_ITERS = 2
# q6: the same search; with 64 levels a smaller shrink is best. Measured on 512x4096, G=64
# (Gaussian / Student-t(4) relative RMSE): naive 0.0213 / 0.0280; (0, 0) alone 0.0206 / 0.0271;
# these 2 starts 0.0204 / 0.0267 (shrink 0.02: 0.0206, 0.06: 0.0206); 3 refits 0.0202 at -15% speed.
_Q6_STARTS = ((0.0, 0.0), (0.01, 0.01))
_Q6_ITERS = 2
# q8 search: clipping factors (scale = factor * absmax / 127), each refined by least squares.
_Q8_STARTS = (1.0,)
_Q8_ITERS = 1


def _to_f16(a: np.ndarray) -> np.ndarray:
    """Round to float16 and back to float32, saturating instead of overflowing to inf."""
    return np.clip(a, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


def _rowsum(a):
    return np.einsum("ij->i", a)


def _rowdot(a, b):
    return np.einsum("ij,ij->i", a, b)


def _levels(W, s, z, lo, hi, U):
    """U[:] = clip(rint((W - z) / s), lo, hi) (float32) for per-group s, z (z may be None)."""
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    np.multiply(W, inv[:, None], out=U)
    if z is not None:
        U -= (z * inv)[:, None]
    np.rint(U, out=U)
    np.clip(U, lo, hi, out=U)
    return U


class _Best:
    """Keeps, per group, the parameters with the lowest squared error seen so far."""

    def __init__(self, M):
        self.err = np.full(M, np.inf, dtype=np.float32)
        self.s = np.zeros(M, dtype=np.float32)
        self.z = np.zeros(M, dtype=np.float32)

    def offer(self, err, s, z):
        b = err < self.err
        self.err = np.where(b, err, self.err)
        self.s = np.where(b, s, self.s)
        self.z = np.where(b, z, self.z)


def _asym_fit(W: np.ndarray, method: str, umax: int, starts, iters: int, f16_always: bool = False):
    """(levels U float32 [M, G], scale [M], zero [M]) for groups W [M, G] float32 and levels
    0..umax; the returned scale and zero are float16 values (held in float32) and U is optimal
    for them. `starts`: (low, high) shrink fractions of the range to start from; `iters`: least-
    squares refits from each (see _Q4_STARTS). `f16_always`: round every candidate to float16
    before scoring it, not only the last of each start, so the kept error is the stored one."""
    M, G = W.shape
    wmin = W.min(axis=1)
    rng = W.max(axis=1) - wmin
    U = np.empty_like(W)
    if method == "naive":
        s, z = _to_f16(rng / umax), _to_f16(wmin)
        return _levels(W, s, z, 0.0, umax, U), s, z
    sw, sww = _rowsum(W), _rowdot(W, W)
    best = _Best(M)
    for lo, hi in starts:
        z = (wmin + lo * rng).astype(np.float32)
        s = (rng * ((1.0 - lo - hi) / umax)).astype(np.float32)
        for it in range(iters + 1):
            if it == iters or f16_always:            # the last candidate is the one stored: f16
                s, z = _to_f16(s), _to_f16(z)
            _levels(W, s, z, 0.0, umax, U)
            su, suu, swu = _rowsum(U), _rowdot(U, U), _rowdot(W, U)
            # squared error of W ~= U*s + z, expanded so it needs only the sums above
            best.offer(s * s * suu + 2 * s * z * su - 2 * s * swu + G * z * z - 2 * z * sw + sww, s, z)
            if it == iters:
                break
            det = G * suu - su * su                  # least-squares (s, z) for these levels
            ok = det > 0
            s = np.where(ok, (G * swu - su * sw) / np.where(ok, det, 1.0), s).astype(np.float32)
            z = np.where(ok, (sw - s * su) / G, z).astype(np.float32)
    s, z = _to_f16(best.s), _to_f16(best.z)
    return _levels(W, s, z, 0.0, umax, U), s, z


def _q4_fit(W: np.ndarray, method: str):
    return _asym_fit(W, method, Q4_MAX, _Q4_STARTS, _Q4_ITERS)


def _q6_fit(W: np.ndarray, method: str):
    # f16 everywhere: at q6's small error, rounding a float32 winner to float16 afterwards lost
    # to the min/max fit in 1 group of 128 (+0.5% squared error, Student-t(3) weights)
    return _asym_fit(W, method, Q6_MAX, _Q6_STARTS, _Q6_ITERS, f16_always=True)


def _q8_fit(W: np.ndarray, method: str):
    """(levels U float32 [M, G], scale [M]) for groups W [M, G]; scale holds float16 values."""
    M, G = W.shape
    amax = np.abs(W).max(axis=1)
    U = np.empty_like(W)
    if method == "naive":
        s = _to_f16(amax / Q8_MAX)
        return _levels(W, s, None, -Q8_MAX, Q8_MAX, U), s
    sww = _rowdot(W, W)
    best = _Best(M)
    for f in _Q8_STARTS:
        s = (amax * (f / Q8_MAX)).astype(np.float32)
        for it in range(_Q8_ITERS + 1):
            if it == _Q8_ITERS:
                s = _to_f16(s)
            _levels(W, s, None, -Q8_MAX, Q8_MAX, U)
            suu, swu = _rowdot(U, U), _rowdot(W, U)
            best.offer(s * s * suu - 2 * s * swu + sww, s, best.z)
            if it == _Q8_ITERS:
                break
            s = np.where(suu > 0, swu / np.where(suu > 0, suu, 1.0), s).astype(np.float32)
    s = _to_f16(best.s)
    return _levels(W, s, None, -Q8_MAX, Q8_MAX, U), s


def quantize(w: np.ndarray, fmt: str, group: int, method: str = "search", layout: str = "rows") -> QTensor:
    """Quantize a float matrix w [N, K] (PyTorch layout) to `fmt` ("q4", "q6" or "q8") with group
    size `group`. method="search" (default) minimizes each group's squared error over a few
    candidate ranges with least-squares refits; method="naive" is the plain min/max (q4, q6) or
    absmax (q8) fit. layout="r8" packs the levels straight into the r8 layout (q4/q8, N % 8 == 0)."""
    if method not in ("search", "naive"):
        raise ValueError(f"method must be 'search' or 'naive', not {method!r}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    N, K, ng = _check_format(fmt, w.shape, group)
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"quantize expects a float matrix, got {w.dtype}")
    shapes = array_shapes(fmt, (N, K), group, layout)
    q = np.empty(*shapes["q"])
    scale = np.empty(*shapes["scale"])
    zero = np.empty(*shapes["zero"]) if fmt in ASYM_MAX else None
    r8 = layout == "r8"
    step = R8 if r8 else 1                 # r8 arrays are indexed by blocks of 8 rows
    rows = max(step, _CHUNK // K // step * step)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n, b0, b1 = r1 - r0, r0 // step, r1 // step
        W = np.ascontiguousarray(w[r0:r1], dtype=np.float32).reshape(-1, group)
        if not np.isfinite(W).all():
            raise ValueError(f"rows {r0}..{r1 - 1} hold NaN or infinite weights")
        if fmt == "q8":
            U, s = _q8_fit(W, method)
            U = U.astype(np.int8).reshape(n, ng, group)
            q[b0:b1] = _levels_to_r8(fmt, U) if r8 else U
        else:
            U, s, z = (_q4_fit if fmt == "q4" else _q6_fit)(W, method)
            U = U.astype(np.uint8).reshape(n, ng, group)
            q[b0:b1] = _levels_to_r8(fmt, U) if r8 else (_pack_q4 if fmt == "q4" else _pack_q6)(U)
            zero[b0:b1] = _scales_to_r8(z.reshape(n, ng)) if r8 else z.reshape(n, ng)
        scale[b0:b1] = _scales_to_r8(s.reshape(n, ng)) if r8 else s.reshape(n, ng)
    return QTensor(fmt=fmt, shape=(N, K), group=group, q=q, scale=scale, zero=zero, layout=layout)


def quantize_q4_symmetric(w: np.ndarray, group: int, method: str = "search") -> np.ndarray:
    """Reference for the bench's symmetric-vs-asymmetric comparison (no kernel reads it):
    symmetric 4-bit, w ~= v * scale with v in -8..7 and a float16 scale (llama.cpp Q4_0 style:
    the naive scale maps the group's largest-magnitude weight to -8). Returns the dequantized
    float32 matrix."""
    w = np.asarray(w, dtype=np.float32)
    N, K, ng = _check_format("q4", w.shape, group)
    W = w.reshape(-1, group)
    U = np.empty_like(W)
    extreme = W[np.arange(W.shape[0]), np.abs(W).argmax(axis=1)]
    s = _to_f16(extreme / -8.0)
    if method == "search":
        sww = _rowdot(W, W)
        best = _Best(W.shape[0])
        for start in (extreme / -8.0, extreme / -7.2, np.abs(extreme) / 7.0, extreme / -7.0):
            c = start.astype(np.float32)
            for it in range(3):
                if it == 2:
                    c = _to_f16(c)
                _levels(W, c, None, -8.0, 7.0, U)
                suu, swu = _rowdot(U, U), _rowdot(W, U)
                best.offer(c * c * suu - 2 * c * swu + sww, c, best.z)
                c = np.where(suu > 0, swu / np.where(suu > 0, suu, 1.0), c).astype(np.float32)
        s = _to_f16(best.s)
    return (_levels(W, s, None, -8.0, 7.0, U) * s[:, None]).reshape(N, K)
