import json

import pytest

import helpers
from amed.config import ModelConfig
from amed.errors import AmedError


def test_golden_config(golden_dir):
    c = ModelConfig.from_file(golden_dir)
    assert (c.head_size, c.rot_dim, c.q_dim, c.kv_dim) == (16, 8, 64, 16)
    assert c.is_moe_layer(1) and not c.is_moe_layer(0)


def test_flash_values_and_unknown_keys():
    d = dict(helpers.TINY, hidden_size=4096, num_attention_heads=32, num_key_value_heads=4,
             head_dim=None, model_type="bailing_moe_v2", some_future_key=1, embedding_dropout=0.0)
    c = ModelConfig.from_dict(d)
    assert c.head_size == 128 and c.rot_dim == 64 and c.kv_dim == 512


def test_rotary_dim_key_instead_of_factor():
    d = dict(helpers.TINY, rotary_dim=6)
    d.pop("partial_rotary_factor")
    assert ModelConfig.from_dict(d).rot_dim == 6


@pytest.mark.parametrize("change,match", [
    (dict(architectures=["LlamaForCausalLM"]), "'architectures'"),
    (dict(score_function="softmax"), "'score_function'"),
    (dict(num_key_value_heads=4), "'num_key_value_heads'"),
    (dict(n_group=3), "'n_group'"),
    (dict(topk_group=5), "'topk_group'"),
    (dict(num_experts_per_tok=40), "'num_experts_per_tok'"),
    (dict(hidden_size=0), "'hidden_size'"),
    (dict(rotary_dim=13), "'rotary_dim'"),
    (dict(tie_word_embeddings=True), "'tie_word_embeddings'"),
    (dict(rope_scaling={"type": "linear", "factor": 4.0}), "'rope_scaling'"),  # yarn is accepted (test_yarn.py)
])
def test_rejections_name_the_key(change, match):
    with pytest.raises(AmedError, match=match):
        ModelConfig.from_dict({**helpers.TINY, **change})


def test_missing_key_and_bad_file(tmp_path):
    d = dict(helpers.TINY)
    del d["num_experts"]
    with pytest.raises(AmedError, match="'num_experts'"):
        ModelConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(AmedError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(AmedError, match="config.json"):
        ModelConfig.from_file(tmp_path / "nowhere")


def test_round_trip():
    c = ModelConfig.from_dict(helpers.TINY)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("key,value", [
    ("rope_theta", None), ("rope_theta", "x"), ("rope_theta", -1.0), ("rope_theta", float("nan")),
    ("partial_rotary_factor", "x"), ("partial_rotary_factor", 0.0), ("partial_rotary_factor", 1.5),
    ("routed_scaling_factor", "x"), ("routed_scaling_factor", float("inf")), ("routed_scaling_factor", True),
    ("rope_scaling", 1.5), ("rope_scaling", "linear"), ("rms_norm_eps", 0), ("rms_norm_eps", "1e-6"),
    ("hidden_size", 64.0), ("hidden_size", True), ("num_hidden_layers", 10**6), ("num_experts", 10**9),
    ("vocab_size", -5), ("use_qk_norm", "yes"), ("use_qk_norm", 1), ("norm_topk_prob", None),
    ("architectures", "BailingMoeV2ForCausalLM"), ("architectures", [5]), ("eos_token_id", "x"),
    ("eos_token_id", [1, "2"]), ("pad_token_id", -1), ("max_position_embeddings", 0),
    ("head_dim", 0), ("score_function", 5), ("num_shared_experts", 2), ("first_k_dense_replace", -1),
])
def test_schema_rejects_types_and_ranges_in_one_sentence(key, value):
    """One schema checks every key's type and range once (issue 26): never a TypeError or a
    Numba typing error later."""
    with pytest.raises(AmedError, match=f"'{key}'") as e:
        ModelConfig.from_dict({**helpers.TINY, key: value})
    assert "\n" not in str(e.value)


def test_schema_normalizes_numbers_and_accepts_nulls():
    c = ModelConfig.from_dict({**helpers.TINY, "rope_theta": 10000, "routed_scaling_factor": 2,
                               "head_dim": None, "rope_scaling": None, "eos_token_id": [1, 2]})
    assert isinstance(c.rope_theta, float) and isinstance(c.routed_scaling_factor, float)
    with pytest.raises(AmedError, match="JSON object"):
        ModelConfig.from_dict([1, 2])


def test_config_file_must_be_a_regular_file(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(AmedError, match="FIFO"):
        ModelConfig.from_file(tmp_path)
