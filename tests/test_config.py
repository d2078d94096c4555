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
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "'rope_scaling'"),
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
