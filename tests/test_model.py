import json

import numpy as np
import pytest

import amed
import helpers
import reference
from conftest import DATA


def golden():
    ids = json.loads((DATA / "bailing-tiny-tokens.json").read_text())["token_ids"]
    return ids, np.load(DATA / "bailing-tiny-logits.npy")


def test_golden_logits(golden_dir):
    ids, ref = golden()
    out = amed.load(golden_dir).logits(ids)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_prefill_then_decode_equals_full_forward(golden_dir):
    ids, _ = golden()
    m = amed.load(golden_dir)
    full = m.logits(ids)
    m.reset()
    first = m.forward(ids[:17], all_logits=True)
    rest = [m.forward([t]) for t in ids[17:30]]
    chunk = m.forward(ids[30:], all_logits=True)                # a second prefill chunk
    got = np.concatenate([first, np.stack(rest), chunk])
    assert np.abs(got - full).max() <= 1e-4
    assert m.pos == len(ids)


def test_forward_returns_last_logits_and_reset(golden_dir):
    ids, ref = golden()
    m = amed.load(golden_dir)
    last = m.forward(ids)
    assert np.abs(last - ref[-1]).max() <= 1e-4
    m.reset()
    assert np.abs(m.forward(ids[:5]) - ref[4]).max() <= 1e-4


def test_matches_numpy_reference_long_sequence(tiny_ckpt):
    """Another shape (6 q-heads over 2 kv-heads, 16 experts, top-3), 300 positions."""
    path, tensors = tiny_ckpt
    ids = np.random.default_rng(7).integers(0, helpers.TINY["vocab_size"], 300)
    out = amed.load(path, ctx_size=64).logits(ids)              # also exercises cache growth
    ref = reference.forward(tensors, helpers.TINY, ids)
    assert np.abs(out - ref).max() <= 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("variant", [
    dict(rotary_dim=12, partial_rotary_factor=None, head_dim=None, hidden_size=72),  # full rotary
    dict(use_qk_norm=False, num_shared_experts=0, first_k_dense_replace=0),
    dict(n_group=1, topk_group=1, moe_router_enable_expert_bias=False, num_key_value_heads=6),
])
def test_config_variants_match_reference(tmp_path, variant):
    cfg = {**helpers.TINY, **variant}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    tensors = helpers.random_tensors(cfg, seed=3)
    path = helpers.write_checkpoint(tmp_path / "m", cfg, tensors, shards=1)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], 40)
    out = amed.load(path).logits(ids)
    assert np.abs(out - reference.forward(tensors, cfg, ids)).max() <= 1e-4


def test_only_routed_experts_are_read(tiny_ckpt):
    path, _ = tiny_ckpt
    m = amed.load(path)
    assert m.experts.touched == set()                           # loading touches no expert
    m.forward([5])
    # one token: exactly top-k experts in each MoE layer
    k = helpers.TINY["num_experts_per_tok"]
    moe_layers = range(helpers.TINY["first_k_dense_replace"], helpers.TINY["num_hidden_layers"])
    assert sorted({L for L, _ in m.experts.touched}) == list(moe_layers)
    for L in moe_layers:
        assert len([e for LL, e in m.experts.touched if LL == L]) == k


def test_token_out_of_range_is_a_clear_error(golden_dir):
    m = amed.load(golden_dir)
    with pytest.raises(amed.errors.AmedError, match="out of range"):
        m.forward([10_000])


def test_load_is_instant_and_does_not_grow_rss(tmp_path):
    """Loading maps the files but reads no weights: RSS barely moves whatever the model size."""
    import time

    from amed.app.bench import current_rss_bytes
    from amed.app.synth import write_synthetic_checkpoint

    path = write_synthetic_checkpoint(tmp_path / "big", preset="flash", layers=2, hidden_size=1024,
                                      num_attention_heads=8, head_dim=128, intermediate_size=2048,
                                      moe_intermediate_size=512, moe_shared_expert_intermediate_size=512,
                                      num_experts=64, vocab_size=8192)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size > 200e6
    amed.load(path)                                   # warm imports
    before = current_rss_bytes()
    t = time.perf_counter()
    m = amed.load(path)
    elapsed = time.perf_counter() - t
    grown = current_rss_bytes() - before
    assert elapsed < 1.0
    assert grown < 0.05 * size, f"RSS grew by {grown / 1e6:.1f} MB for a {size / 1e6:.0f} MB checkpoint"
    assert m.experts.touched == set()


@pytest.mark.parametrize("quantized", [False, True])
def test_batched_moe_is_bit_identical_to_one_token_at_a_time(golden_dir, golden_store, monkeypatch, quantized):
    """The prefill MoE path (tokens grouped by expert, chunked, combined by moe_combine) sums the
    same products in the same order as the decode path: identical bits, for the bf16 checkpoint
    (unfused SwiGLU) and an int4 store (fused r8 kernels, padded token blocks)."""
    import amed.engine.model as M

    m = amed.load(golden_store(bits=4) if quantized else golden_dir)
    c = m.config
    L = next(i for i in range(c.num_hidden_layers) if c.is_moe_layer(i))
    lw = m.weights.layers[L]
    h = np.random.default_rng(0).standard_normal((11, c.hidden_size)).astype(np.float32)
    monkeypatch.setattr(M, "MOE_CHUNK", 4)                 # 3 chunks: 4 + 4 + 3 tokens
    batched = m._moe(L, lw, h)
    one = np.stack([m._moe(L, lw, h[t:t + 1])[0] for t in range(len(h))])
    np.testing.assert_array_equal(batched, one)
