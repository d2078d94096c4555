"""Model configuration: config.json -> a frozen dataclass named with the Hugging Face keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from amed.errors import AmedError

SUPPORTED_ARCHITECTURES = ("BailingMoeV2ForCausalLM",)


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
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}  # unknown keys are ignored
        if "architectures" in kw and kw["architectures"] is not None:
            kw["architectures"] = tuple(kw["architectures"])
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kw]
        if missing:
            raise AmedError(f"config.json lacks the required key '{missing[0]}'.")
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
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AmedError(f"{path} is not valid JSON ({e}).") from None
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
        if self.rope_scaling not in (None, {}) and (self.rope_scaling or {}).get("type", (self.rope_scaling or {}).get("rope_type")) not in (None, "default"):
            bad("rope_scaling", f"is {self.rope_scaling}; only plain RoPE is supported for now")

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
