"""amed.app.synth: random checkpoints in the exact Hugging Face layout."""

import json
import math

import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors' numpy framework)
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from amed.formats.checkpoint import Checkpoint, hf_tensor_specs
from amed.config import ModelConfig
from amed.errors import AmedError
from amed.app.synth import (PRESETS, SPECIAL_TOKENS, f32_to_bf16, synthetic_config,
                        write_synthetic_checkpoint)

FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors.index.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synth") / "tiny")


def shards(path):
    return sorted(path.glob("model-*-of-*.safetensors"))


def test_tiny_layout(tiny):
    for f in FILES:
        assert (tiny / f).is_file(), f
    assert not list(tiny.glob("*.partial"))
    cfg = ModelConfig.from_file(tiny)
    assert cfg.num_hidden_layers == PRESETS["tiny"]["num_hidden_layers"]
    specs = hf_tensor_specs(cfg)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(specs)
    files = shards(tiny)
    assert len(files) >= 2
    n = len(files)
    assert [f.name for f in files] == [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    total = sum(math.prod(s) * (2 if d == "BF16" else 4) for s, d in specs.values())
    assert index["metadata"]["total_size"] == total
    seen = set()
    for f in files:
        with safe_open(str(f), framework="np") as st:
            assert st.metadata() == {"format": "pt"}
            for name in st.keys():
                a = st.get_tensor(name)
                shape, dtype = specs[name]
                assert a.shape == shape, name
                assert a.dtype == (ml_dtypes.bfloat16 if dtype == "BF16" else np.float32), name
                assert np.isfinite(a.astype(np.float32)).all(), name
                assert index["weight_map"][name] == f.name
                seen.add(name)
    assert seen == set(specs)
    Checkpoint(tiny)  # amed's own reader accepts it


def test_tiny_weights_are_sane(tiny):
    c = Checkpoint(tiny)
    emb = c.get_f32("model.word_embeddings.weight")
    assert abs(emb.std() - 1.0) < 0.05
    up = c.get_f32("model.layers.1.mlp.experts.0.up_proj.weight")
    assert abs(up.std() * math.sqrt(up.shape[1]) - 1.0) < 0.15
    norm = c.get_f32("model.layers.2.input_layernorm.weight")
    assert abs(norm.mean() - 1.0) < 0.05 and 0.02 < norm.std() < 0.3
    bias = c.get_f32("model.layers.1.mlp.gate.expert_bias")
    assert c.tensors["model.layers.1.mlp.gate.expert_bias"].dtype == "F32"
    assert 0 < bias.std() < 0.2
    # experts differ from one another
    assert not np.array_equal(c.get("model.layers.1.mlp.experts.0.gate_proj.weight"),
                              c.get("model.layers.1.mlp.experts.1.gate_proj.weight"))


def test_tiny_forward_is_sane_and_routing_varies(tiny):
    import reference

    c = Checkpoint(tiny)
    cfg = json.loads((tiny / "config.json").read_text())
    t = {k: c.get_f32(k) for k in c.tensors}
    ids = np.random.default_rng(0).integers(7, 900, 16)
    logits = reference.forward(t, cfg, ids)
    assert np.isfinite(logits).all()
    assert 0.3 < logits.std() < 5.0
    assert len(set(logits.argmax(-1))) > 4
    # the router picks varied experts, and the group limit changes some choices
    h = t["model.word_embeddings.weight"][ids]
    h = reference.rmsnorm(h, t["model.layers.1.post_attention_layernorm.weight"], 1e-6)
    lg = h @ t["model.layers.1.mlp.gate.weight"].T
    bias = t["model.layers.1.mlp.gate.expert_bias"]
    chosen, changed = set(), 0
    for row in lg:
        idx, w = reference.select_experts(row, bias, cfg["n_group"], cfg["topk_group"],
                                          cfg["num_experts_per_tok"], cfg["routed_scaling_factor"])
        chosen |= set(idx.tolist())
        flat = np.argsort(-(1 / (1 + np.exp(-row)) + bias))[: len(idx)]
        changed += set(flat.tolist()) != set(idx.tolist())
    assert len(chosen) >= cfg["num_experts"] // 2
    assert changed > 0


def test_deterministic(tiny, tmp_path):
    same = write_synthetic_checkpoint(tmp_path / "same", seed=0)
    other = write_synthetic_checkpoint(tmp_path / "other", seed=1)
    for f in FILES + [p.name for p in shards(tiny)]:
        assert (same / f).read_bytes() == (tiny / f).read_bytes(), f
    for p in shards(tiny):
        assert (other / p.name).read_bytes() != p.read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_tokenizer(tiny, golden_dir):
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    cfg = json.loads((tiny / "config.json").read_text())
    gen = json.loads((tiny / "generation_config.json").read_text())
    tc = json.loads((tiny / "tokenizer_config.json").read_text())
    ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
    assert None not in ids.values() and len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert cfg["bos_token_id"] == ids["<|startoftext|>"]
    assert cfg["eos_token_id"] == cfg["pad_token_id"] == ids["<|endoftext|>"]
    assert gen["eos_token_id"] == [ids["<|endoftext|>"], ids["<|role_end|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    assert 300 <= tok.get_vocab_size() <= 4000
    assert tok.encode("<role>").ids == [ids["<role>"]]
    golden = json.loads((golden_dir / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == golden["chat_template"]
    for key in ("bos_token", "eos_token", "pad_token", "add_bos_token", "tokenizer_class"):
        assert tc[key] == golden[key], key
    for text in ["<role>HUMAN</role>What should I do if I have a headache?<|role_end|>",
                 "Fièvre 38.5 °C, 头痛 🙂 Übelkeit\n  tabs\tand  spaces", "xyzzy qwvk 12345"]:
        enc = tok.encode(text)
        assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert len(tok.encode("the patient has a headache").ids) < 10  # merges were learned
    gold = json.loads((golden_dir / "tokenizer.json").read_text())
    mine = json.loads((tiny / "tokenizer.json").read_text())
    for key in ("pre_tokenizer", "decoder", "post_processor"):
        assert mine[key] == gold[key], key
    assert mine["model"]["type"] == "BPE"


def test_flash_widths_with_few_experts(tmp_path):
    seen = []
    path = write_synthetic_checkpoint(
        tmp_path / "flash", preset="flash", layers=2, num_experts=16, n_group=4, topk_group=2,
        vocab_size=1024, intermediate_size=1024, progress=lambda d, t: seen.append((d, t)))
    cfg = json.loads((path / "config.json").read_text())
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "moe_intermediate_size", "routed_scaling_factor", "rope_theta", "partial_rotary_factor",
              "max_position_embeddings", "rms_norm_eps", "architectures", "model_type"):
        assert cfg[k] == PRESETS["flash"][k], k
    assert cfg["num_hidden_layers"] == 2 and cfg["num_experts"] == 16
    c = Checkpoint(path)
    assert c.tensors["model.layers.1.mlp.experts.15.down_proj.weight"].shape == (4096, 1024)
    assert c.tensors["model.layers.0.attention.query_key_value.weight"].shape == (5120, 4096)
    done = [d for d, _ in seen]
    assert done == sorted(done)
    assert seen[-1][0] == seen[-1][1] == sum(p.stat().st_size for p in shards(path))


def test_presets_match_the_spec():
    f = PRESETS["flash"]
    assert (f["hidden_size"], f["num_hidden_layers"], f["num_attention_heads"],
            f["num_key_value_heads"], f["head_dim"], f["intermediate_size"],
            f["moe_intermediate_size"], f["num_experts"], f["num_experts_per_tok"], f["n_group"],
            f["topk_group"], f["vocab_size"]) == (4096, 32, 32, 4, 128, 9216, 1024, 256, 8, 8, 4, 157184)
    for name in PRESETS:
        ModelConfig.from_dict(synthetic_config(name))
    cfg = synthetic_config("flash", layers=3)
    assert cfg["num_hidden_layers"] == 3 and cfg["first_k_dense_replace"] == 1
    assert synthetic_config("tiny", layers=1, first_k_dense_replace=3)["first_k_dense_replace"] == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(AmedError):
        synthetic_config("huge")
    with pytest.raises(AmedError):
        synthetic_config("tiny", layers=0)
    with pytest.raises(AmedError):
        synthetic_config("tiny", vocab_size=100)  # smaller than the tokenizer
    with pytest.raises(AmedError):
        synthetic_config("tiny", n_group=5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AmedError):
        write_synthetic_checkpoint(tmp_path / "file")


def test_interrupted_write_does_not_look_complete(tmp_path):
    def boom(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_checkpoint(out, progress=boom)
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(out.glob("*.partial"))
    with pytest.raises(AmedError):
        Checkpoint(out)
    write_synthetic_checkpoint(out)  # a rerun completes it
    Checkpoint(out)


def test_bf16_rounding_matches_ml_dtypes():
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 3
    x[:4] = [0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8]  # ties round to even
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(f32_to_bf16(x), ref)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from amed.app.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["synth", str(out), "--preset", "tiny", "--layers", "2", "--seed", "5"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    Checkpoint(out)
    r = CliRunner().invoke(app, ["synth", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    r = CliRunner().invoke(app, ["synth", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    r = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--preset", "huge"])
    assert r.exit_code == 1 and "huge" in r.output


def test_experts_option_keeps_the_per_token_shape():
    """--experts N: a smaller pool of routed experts, same top-k, widths and groups."""
    import pytest

    from amed.app.synth import SyntheticSource, synthetic_config
    from amed.errors import AmedError

    cfg = synthetic_config("flash", 32, experts=32)
    assert cfg["num_experts"] == 32 and cfg["num_experts_per_tok"] == 8 and cfg["n_group"] == 8
    assert cfg["moe_intermediate_size"] == PRESETS["flash"]["moe_intermediate_size"]
    src = SyntheticSource("tiny", 2, 0, experts=16)
    assert src.config.num_experts == 16 and "model.layers.1.mlp.experts.15.up_proj.weight" in src.specs
    for bad in (30, 8, 0):
        with pytest.raises(AmedError, match="--experts must be a multiple of the 8 expert groups"):
            synthetic_config("flash", 2, experts=bad)
