"""YaRN (rope_scaling type 'yarn'): config validation, the cos/sin tables against a NumPy transcription
of Hugging Face transformers' _compute_yarn_parameters, and a tiny model's logits past
original_max_position_embeddings against tests/reference.py's float64 forward."""

import math

import numpy as np
import pytest

import amed
import helpers
import reference
from amed.config import ModelConfig
from amed.engine.state import rope_tables
from amed.errors import AmedError

LING = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}   # Ling 2.0 README


def hf_yarn(rot, theta, rs, max_pos):
    """HF's _compute_yarn_parameters (modeling_rope_utils.py), transcribed in NumPy float64, dim = rot."""
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings", max_pos)

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = float(get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"]))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
        high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def linear_ramp_factor(lo, hi, dim):
        if lo == hi:
            hi += 0.001
        return np.clip((np.arange(dim, dtype=np.float64) - lo) / (hi - lo), 0, 1)

    pos_freqs = theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    low, high = find_correction_range(beta_fast, beta_slow, rot, theta, orig, rs.get("truncate", True))
    inv_freq_extrapolation_factor = 1 - linear_ramp_factor(low, high, rot // 2)
    inv_freq = (inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
                + inv_freq_extrapolation * inv_freq_extrapolation_factor)
    return inv_freq, attention_factor


def cfg_with(rs, **kw):
    return ModelConfig.from_dict({**helpers.TINY, **kw, "rope_scaling": rs})


@pytest.mark.parametrize("rot,theta,rs,max_pos", [
    (64, 600000.0, LING, 32768),                                            # AntAngelMed + Ling's YaRN
    (64, 600000.0, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096,
                    "beta_fast": 16, "beta_slow": 2}, 4096),
    (64, 10000.0, {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                   "truncate": False}, 8192),
    (32, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                   "mscale": 1.0, "mscale_all_dim": 0.707}, 2048),
    (16, 500.0, {"type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1000,
                 "attention_factor": 1.25}, 1000),
    (8, 10.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 16),
])
def test_tables_equal_hf_formula(rot, theta, rs, max_pos):
    c = cfg_with(rs, rotary_dim=rot, head_dim=max(rot, 12), rope_theta=theta, max_position_embeddings=max_pos)
    inv, scale = hf_yarn(rot, theta, rs, max_pos)
    n = 4 * rs["original_max_position_embeddings"] if rot != 64 or rs is not LING else 4096
    pos = np.arange(0, int(rs["factor"] * rs["original_max_position_embeddings"]),
                    max(1, int(rs["factor"] * rs["original_max_position_embeddings"]) // 4096))[:n]
    cos, sin = rope_tables(int(pos[-1]) + 1, rot, theta, c.yarn)
    ang = pos[:, None] * inv[None, :]
    assert cos.shape == (pos[-1] + 1, rot // 2)
    assert np.abs(cos[pos] - scale * np.cos(ang)).max() <= 1e-6
    assert np.abs(sin[pos] - scale * np.sin(ang)).max() <= 1e-6


def test_ling_numbers():
    c = cfg_with(LING, rotary_dim=64, head_dim=128, hidden_size=48, max_position_embeddings=32768)
    assert c.context_limit == 131072
    cos, sin = rope_tables(2, 64, 600000.0, c.yarn)
    assert abs(cos[0, 0] - (0.1 * math.log(4) + 1)) < 1e-6        # 1.1386: the attention scale
    plain = ModelConfig.from_dict(helpers.TINY)
    assert plain.yarn is None and plain.context_limit == plain.max_position_embeddings
    c0, s0 = rope_tables(50, 6, 600000.0, None)                      # plain RoPE untouched
    ang = np.arange(50)[:, None] / 600000.0 ** (np.arange(0, 6, 2) / 6)
    assert np.abs(c0 - np.cos(ang)).max() <= 1e-6 and np.abs(s0 - np.sin(ang)).max() <= 1e-6


TINY_YARN = dict(helpers.TINY, head_dim=16, rope_theta=10.0, max_position_embeddings=16,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})


@pytest.fixture(scope="module")
def yarn_ckpt(tmp_path_factory):
    t = helpers.random_tensors(TINY_YARN, seed=3)
    return helpers.write_checkpoint(tmp_path_factory.mktemp("yarn"), TINY_YARN, t), t


def test_tiny_model_logits_past_original_context(yarn_ckpt):
    path, tensors = yarn_ckpt
    m = amed.load(path, ctx_size=64)
    assert m.config.context_limit == 64 and m.config.yarn["factor"] == 4.0
    ids = np.random.default_rng(5).integers(0, TINY_YARN["vocab_size"], 60)
    out = m.logits(ids)
    ref = reference.forward(tensors, TINY_YARN, ids)
    assert np.abs(out - ref).max() <= 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    plain = reference.forward(tensors, dict(TINY_YARN, rope_scaling=None), ids)
    assert np.abs(plain[16:] - ref[16:]).max() > 1e-2                 # YaRN changes them
    m.reset()                                                          # prefill, then decode past 16
    first = m.forward(ids[:10], all_logits=True)
    rest = np.stack([m.forward([t]) for t in ids[10:]])
    assert np.abs(np.concatenate([first, rest]) - ref).max() <= 1e-4


def test_store_and_gguf_carry_yarn(yarn_ckpt, tmp_path):
    from amed.formats.gguf import config_dict

    path, _ = yarn_ckpt
    try:
        from amed.quant.convert import Settings, quantize_model
        quantize_model(path, tmp_path / "s", Settings(bits=8, dense="bf16", head="bf16"))
    except AmedError as e:                                             # pragma: no cover
        pytest.skip(f"no store of this shape: {e}")
    assert amed.load(tmp_path / "s", ctx_size=64).config.yarn == ModelConfig.from_file(path).yarn

    a = "bailingmoe2."
    base = {"general.architecture": "bailingmoe2", a + "block_count": 3, a + "attention.head_count": 6,
            a + "embedding_length": 48, a + "feed_forward_length": 80, a + "expert_feed_forward_length": 16,
            a + "expert_count": 16, a + "expert_used_count": 3, a + "context_length": 32768}
    yarn = {a + "rope.scaling.type": "yarn", a + "rope.scaling.factor": np.float32(4.0),   # as llama.cpp's
            a + "rope.scaling.original_context_length": np.uint32(32768),                 # converter writes
            a + "rope.scaling.yarn_beta_fast": np.float32(32.0)}

    class H:
        path = "x.gguf"
        tensors = {"token_embd.weight": type("T", (), {"shape": (300, 48)})()}
        meta = {**base, **yarn}
    assert config_dict(H)["rope_scaling"] == {"type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                              "original_max_position_embeddings": 32768}
    H.meta = {**base, **yarn, a + "rope.scaling.yarn_log_multiplier": np.float32(0.1)}
    with pytest.raises(AmedError, match="yarn_log_multiplier"):
        config_dict(H)
    H.meta = {**base, a + "rope.scaling.type": "none"}
    assert "rope_scaling" not in config_dict(H)


@pytest.mark.parametrize("rs,words", [
    ({"type": "linear", "factor": 2.0}, "type 'linear'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "type 'dynamic'"),
    ({"type": "longrope", "short_factor": [1.0]}, "type 'longrope'"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16}, "factor must be"),
    ({"type": "yarn", "factor": "4", "original_max_position_embeddings": 16}, "factor must be"),
    ({"type": "yarn", "factor": float("nan")}, "factor must be"),
    ({"type": "yarn", "original_max_position_embeddings": 16}, "needs a 'factor'"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": -1}, "beta_fast"),
    ({"type": "yarn", "factor": 4.0, "attention_factor": 0}, "attention_factor"),
    ({"type": "yarn", "factor": 4.0, "truncate": "no"}, "truncate"),
])
def test_bad_rope_scaling_is_one_sentence(rs, words):
    with pytest.raises(AmedError) as e:
        cfg_with(rs)
    msg = str(e.value)
    assert words in msg and msg.startswith("config.json: 'rope_scaling'") and msg.count(". ") == 0


def test_plain_configs_still_load():
    for rs in (None, {}, {"rope_type": "default"}, {"type": "default"}):
        assert cfg_with(rs).yarn is None


def test_context_note():
    plain = ModelConfig.from_dict(helpers.TINY)
    assert plain.context_note(2048) is None
    assert "trained on" in plain.context_note(2049) and "yarn" in plain.context_note(2049)
    y = ModelConfig.from_dict(TINY_YARN)
    assert y.context_note(64) is None
    note = y.context_note(65)
    assert "64 tokens this config's YaRN allows" in note and "factor 4 x" in note


def test_show_names_rope_scaling(yarn_ckpt):
    from amed.app.models import show

    lines = dict(show(yarn_ckpt[0]))
    assert '"factor": 4.0' in lines["rope_scaling"] and '"type": "yarn"' in lines["rope_scaling"]
    assert "rope_scaling" not in dict(show(helpers.write_checkpoint(
        yarn_ckpt[0].parent / "plain", helpers.TINY, helpers.random_tensors(helpers.TINY))))
