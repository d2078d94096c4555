"""Model configuration: config.json -> a frozen dataclass named with the Hugging Face keys."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from amed.errors import AmedError

SUPPORTED_ARCHITECTURES = ("BailingMoeV2ForCausalLM",)

MAX_CONFIG_BYTES = 1 << 20

# ---- the schema: every key's type and range, checked once when a config is read --------------
# kind: "int" (not bool), "num" (int or float, finite, stored as float), "bool", "str", "dict",
# "strs" (a list of strings), "ids" (a token id or a list of them). `None` ok where `null` is.
# The upper bounds are far above any real model and keep a hostile config from asking for
# billions of layers or experts (the tensor table is built from these numbers).
SCHEMA: dict[str, tuple] = {
    # key: (kind, null ok, low, high, low inclusive)
    "hidden_size": ("int", False, 1, 1 << 17, True),
    "num_hidden_layers": ("int", False, 1, 1024, True),
    "num_attention_heads": ("int", False, 1, 4096, True),
    "num_key_value_heads": ("int", False, 1, 4096, True),
    "intermediate_size": ("int", False, 1, 1 << 20, True),
    "moe_intermediate_size": ("int", False, 1, 1 << 20, True),
    "num_experts": ("int", False, 1, 4096, True),
    "num_experts_per_tok": ("int", False, 1, 4096, True),
    "vocab_size": ("int", False, 1, 1 << 23, True),
    "head_dim": ("int", True, 1, 4096, True),
    "moe_shared_expert_intermediate_size": ("int", True, 1, 1 << 20, True),
    "num_shared_experts": ("int", False, 0, 1, True),
    "first_k_dense_replace": ("int", False, 0, 1024, True),
    "n_group": ("int", False, 1, 4096, True),
    "topk_group": ("int", False, 1, 4096, True),
    "score_function": ("str", False, None, None, True),
    "routed_scaling_factor": ("num", False, 0.0, 1e6, False),
    "norm_topk_prob": ("bool", False, None, None, True),
    "moe_router_enable_expert_bias": ("bool", False, None, None, True),
    "use_qk_norm": ("bool", False, None, None, True),
    "partial_rotary_factor": ("num", True, 0.0, 1.0, False),
    "rotary_dim": ("int", True, 1, 4096, True),
    "rope_theta": ("num", False, 0.0, 1e12, False),
    "rope_scaling": ("dict", True, None, None, True),
    "max_position_embeddings": ("int", False, 1, 1 << 24, True),
    "rms_norm_eps": ("num", False, 0.0, 1.0, False),
    "tie_word_embeddings": ("bool", False, None, None, True),
    "use_bias": ("bool", False, None, None, True),
    "use_qkv_bias": ("bool", False, None, None, True),
    "num_nextn_predict_layers": ("int", False, 0, 64, True),
    "hidden_act": ("str", False, None, None, True),
    "architectures": ("strs", False, None, None, True),
    "model_type": ("str", True, None, None, True),
    "bos_token_id": ("ids", True, 0, 1 << 31, True),
    "eos_token_id": ("ids", True, 0, 1 << 31, True),
    "pad_token_id": ("ids", True, 0, 1 << 31, True),
}
KIND_WORDS = {"int": "an integer", "num": "a number", "bool": "true or false", "str": "a string",
              "dict": "an object", "strs": "a list of strings", "ids": "a token id or a list of ids"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_field(key: str, v):
    """One config value checked against SCHEMA: returns it normalized (numbers as float,
    architectures as a tuple) or raises an AmedError naming the key."""
    spec = SCHEMA.get(key)
    if spec is None:
        return v
    kind, nullable, lo, hi, lo_incl = spec
    if v is None:
        if nullable:
            return None
        raise AmedError(f"config.json: '{key}' is null; it must be {KIND_WORDS[kind]}.")

    def wrong():
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
        return AmedError(f"config.json: '{key}' must be {KIND_WORDS[kind]}"
                         f"{f' between {lo} and {hi}' if lo is not None else ''}, not {shown}.")

    if kind == "int":
        if not _is_int(v) or not (lo <= v <= hi):
            raise wrong()
    elif kind == "num":
        if not (_is_int(v) or isinstance(v, float)):
            raise wrong()
        if _is_int(v) and abs(v) > 1 << 60:
            raise wrong()
        v = float(v)
        if not math.isfinite(v) or not ((lo <= v) if lo_incl else (lo < v)) or v > hi:
            raise wrong()
    elif kind == "bool":
        if not isinstance(v, bool):
            raise wrong()
    elif kind == "str":
        if not isinstance(v, str):
            raise wrong()
    elif kind == "dict":
        if not isinstance(v, dict):
            raise wrong()
    elif kind == "strs":
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(a, str) for a in v):
            raise wrong()
        v = tuple(v)
    elif kind == "ids":
        ids = v if isinstance(v, list) else [v]
        if not ids and isinstance(v, list):
            return v
        if not all(_is_int(i) and lo <= i < hi for i in ids) or (key == "pad_token_id" and isinstance(v, list)):
            raise wrong()
    return v


# ---- rope_scaling: plain RoPE or YaRN -------------------------------------------------------
# The YaRN keys as Hugging Face transformers reads them (_compute_yarn_parameters); the defaults
# of beta_fast/beta_slow apply where a key is absent, null or 0 (HF's `.get(...) or 32`).
YARN_KEYS = {
    # key: (kind, low, high)
    "factor": ("num", 1.0, 1e4),
    "original_max_position_embeddings": ("int", 1, 1 << 24),
    "beta_fast": ("num", 0.0, 1e6),
    "beta_slow": ("num", 0.0, 1e6),
    "mscale": ("num", 0.0, 1e6),
    "mscale_all_dim": ("num", 0.0, 1e6),
    "attention_factor": ("num", 0.0, 1e6),
    "truncate": ("bool", None, None),
}


def yarn_parameters(rs: dict | None, max_position_embeddings: int) -> dict | None:
    """rope_scaling (config.json's object) checked: None for plain RoPE (absent, {} or type
    'default'), the normalized YaRN parameters for type 'yarn' (factor, original_max_position_
    embeddings, beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate), and an
    AmedError in one sentence for any other type or a bad value."""
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default") and not any(k in rs for k in ("factor", "original_max_position_embeddings")):
        return None
    if kind != "yarn":
        shown = repr(kind) if len(repr(kind)) <= 40 else repr(kind)[:40] + "..."
        raise AmedError(f"config.json: 'rope_scaling' has type {shown}; amed supports plain RoPE "
                        f"(no rope_scaling) or type 'yarn' only.")
    out = {}
    for key, (kind, lo, hi) in YARN_KEYS.items():
        v = rs.get(key)
        if v is None:
            out[key] = None
            continue
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "int":
            ok = _is_int(v) and lo <= v <= hi
        else:
            ok = ((_is_int(v) and abs(v) <= 1 << 60) or isinstance(v, float)) and math.isfinite(float(v)) \
                and lo <= float(v) <= hi and (float(v) > 0 or key in ("beta_fast", "beta_slow", "mscale",
                                                                        "mscale_all_dim"))
            v = float(v) if ok else v
        if not ok:
            shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
            what = {"bool": "true or false", "int": f"an integer between {lo} and {hi}",
                    "num": f"a number between {lo} and {hi}" + (" (above 0)" if lo == 0.0 else "")}[kind]
            raise AmedError(f"config.json: 'rope_scaling' {key} must be {what}, not {shown}.")
        out[key] = v
    if out["factor"] is None:
        raise AmedError("config.json: 'rope_scaling' of type 'yarn' needs a 'factor' (for example 4.0).")
    if out["original_max_position_embeddings"] is None:   # older transformers' default
        out["original_max_position_embeddings"] = max_position_embeddings
    out["beta_fast"] = out["beta_fast"] or 32.0
    out["beta_slow"] = out["beta_slow"] or 1.0
    out["truncate"] = True if out["truncate"] is None else out["truncate"]
    return out


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    head_dim: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    num_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    score_function: str = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    use_qk_norm: bool = True
    partial_rotary_factor: float | None = None
    rotary_dim: int | None = None
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    num_nextn_predict_layers: int = 0
    hidden_act: str = "silu"
    architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
    model_type: str = "bailing_moe"
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise AmedError("config.json must hold a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}  # unknown keys are ignored
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kw]
        if missing:
            raise AmedError(f"config.json lacks the required key '{missing[0]}'.")
        kw = {k: check_field(k, v) for k, v in kw.items()}
        try:
            cfg = cls(**kw)
        except TypeError as e:  # pragma: no cover - defensive
            raise AmedError(f"config.json is not a valid model config: {e}.") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise AmedError(f"{path} not found: a model directory needs its config.json.")
        from amed.formats.files import read_regular

        try:
            d = json.loads(read_regular(path, limit=MAX_CONFIG_BYTES))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise AmedError(f"{path} is not valid JSON ({' '.join(str(e).split())}).") from None
        if not isinstance(d, dict):
            raise AmedError(f"{path} must hold a JSON object.")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["architectures"] = list(self.architectures)
        return d

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        def bad(key, why):
            raise AmedError(f"config.json: '{key}' {why}.")

        archs = [a for a in self.architectures if a not in SUPPORTED_ARCHITECTURES]
        if archs or not self.architectures:
            bad("architectures", f"is {list(self.architectures)}; amed supports only "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.score_function != "sigmoid":
            bad("score_function", f"is '{self.score_function}'; only 'sigmoid' routing is supported")
        if self.hidden_act != "silu":
            bad("hidden_act", f"is '{self.hidden_act}'; only 'silu' is supported")
        if self.use_bias or self.use_qkv_bias:
            bad("use_bias" if self.use_bias else "use_qkv_bias", "is true; biased linears are not supported")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "is true; BailingMoeV2 has an untied lm_head")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "moe_intermediate_size", "num_experts",
                    "num_experts_per_tok", "vocab_size", "n_group", "topk_group"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, f"must be a positive integer, not {v!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"({self.num_attention_heads}) does not divide hidden_size "
                f"({self.hidden_size}) and no head_dim is given")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            bad("n_group", f"({self.n_group}) must divide num_experts ({self.num_experts})")
        if self.topk_group > self.n_group:
            bad("topk_group", f"({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts available in the kept groups")
        if self.num_experts // self.n_group < 2 and self.n_group > 1:
            bad("n_group", "leaves fewer than 2 experts per group (group score is a top-2 sum)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", "must be between 0 and num_hidden_layers")
        if self.num_shared_experts not in (0, 1):
            bad("num_shared_experts", f"is {self.num_shared_experts}; amed supports 0 or 1")
        rot = self.rot_dim
        if rot <= 0 or rot > self.head_size or rot % 2:
            bad("partial_rotary_factor" if self.rotary_dim is None else "rotary_dim",
                f"gives a rotary dimension of {rot}; it must be even and at most head_dim ({self.head_size})")
        yarn_parameters(self.rope_scaling, self.max_position_embeddings)   # raises on a bad one

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def rot_dim(self) -> int:
        if self.rotary_dim is not None:
            return int(self.rotary_dim)
        f = 1.0 if self.partial_rotary_factor is None else float(self.partial_rotary_factor)
        return int(self.head_size * f)

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters (yarn_parameters) when rope_scaling asks for YaRN, else None."""
        return yarn_parameters(self.rope_scaling, self.max_position_embeddings)

    @property
    def context_limit(self) -> int:
        """The longest context the config allows: factor x original_max_position_embeddings with
        YaRN (at least max_position_embeddings), else max_position_embeddings."""
        y = self.yarn
        if y is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(y["factor"] * y["original_max_position_embeddings"]))

    def context_note(self, ctx_size: int) -> str | None:
        """One sentence when ctx_size runs past what the config allows (context_limit), else None."""
        limit = self.context_limit
        if ctx_size <= limit:
            return None
        if self.yarn is not None:
            return (f"-c {ctx_size} is above the {limit} tokens this config's YaRN allows (factor "
                    f"{self.yarn['factor']:g} x original_max_position_embeddings "
                    f"{self.yarn['original_max_position_embeddings']}): answers past that point may degrade.")
        return (f"-c {ctx_size} is above the {limit} tokens the model was trained on: answers past that "
                f"point may degrade (a YaRN rope_scaling in config.json, e.g. {{\"type\": \"yarn\", "
                f"\"factor\": 4.0, \"original_max_position_embeddings\": {limit}}}, extends it).")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_size

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_shared_expert_intermediate_size or self.moe_intermediate_size

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace
