"""The committed trained BailingMoeV2 (tests/data/trained, made by tools/train_tiny.py; no torch here):
amed reproduces the trainer's own forward pass, chats in English, quantizes and loads; and
bench/routing.py's look-ahead recall is what amed's look-ahead itself counts."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import amed
from amed.generate import generate
from amed.text.sampling import SamplingParams, make_sampler
from amed.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "data" / "trained"


def _routing():
    spec = importlib.util.spec_from_file_location("bench_routing", ROOT / "bench" / "routing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    return amed.load(TRAINED, ctx_size=512)


@pytest.fixture(scope="module")
def q4_store(tmp_path_factory):
    from amed.quant.convert import Settings, quantize_model

    out = tmp_path_factory.mktemp("trained") / "q4"
    quantize_model(TRAINED, out, Settings(bits=4))
    return out


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in TRAINED.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors", "reference-logits.npy", "reference-tokens.json", "held-out.txt"} <= names
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) <= 16 * 2**20
    cfg = json.loads((TRAINED / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]) == (256, 8, 8, 4)
    assert cfg["routed_scaling_factor"] == 2.5 and cfg["partial_rotary_factor"] == 0.5


def test_logits_match_the_trainer(model):
    """tools/train_tiny.py's torch forward (float64 on the bf16 weights) for a fixed sequence."""
    ids = json.loads((TRAINED / "reference-tokens.json").read_text())["ids"]
    ref = np.load(TRAINED / "reference-logits.npy")
    got = model.logits(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def _english(text: str) -> float:
    """Share of the answer's words that occur in the held-out text's words (it is English)."""
    vocab = set(re.findall(r"[a-z]+", (TRAINED / "held-out.txt").read_text().lower()))
    vocab |= {"the", "code", "for", "is", "of", "and", "in", "a", "it", "icd"}
    words = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in vocab for w in words) / max(1, len(words)), len(words)


def test_chat_answers_in_english(model):
    tok = Tokenizer.from_dir(TRAINED)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the ICD-10-CM code for essential (primary) hypertension?"}])
    model.reset()
    text, last = generate(model, tok, prompt, make_sampler(SamplingParams(temperature=0, repetition_penalty=1.0)),
                          max_tokens=16)
    share, n = _english(text)
    assert n >= 3 and share >= 0.8, text


def test_quantizes_and_loads(q4_store):
    q = amed.load(q4_store, ctx_size=512)
    ids = json.loads((TRAINED / "reference-tokens.json").read_text())["ids"]
    ref = np.load(TRAINED / "reference-logits.npy")
    got = q.logits(ids)
    assert np.isfinite(got).all()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8     # int4 experts: close, not equal


def test_lookahead_recall_on_a_tiny_case():
    r = _routing()
    pred = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    actual = np.array([[3, 2, 1, 0], [4, 5, 90, 91], [20, 21, 22, 23]])
    assert r.lookahead_recall(pred, actual) == pytest.approx((4 + 2 + 0) / 12)
    # reuse pairs only neighbours inside one window: rows 0-1 (2/4 shared) counted, 1-2 not
    idx = np.array([[0, 1, 2, 3], [0, 1, 8, 9], [0, 1, 8, 9]])
    assert r.reuse(idx, [0, 2]) == pytest.approx(0.5)
    s = r.skew(np.arange(256).reshape(32, 8), 256)
    assert s["top10pct_share"] == pytest.approx(26 / 256) and s["entropy"] == pytest.approx(1.0)


def test_lookahead_recall_is_what_amed_counts(q4_store):
    """bench/routing.py's recall, token by token, equals the hits amed's own look-ahead counts
    (engine/experts/lookahead.py) while decoding the same tokens from a store under a budget."""
    r = _routing()
    tok = Tokenizer.from_dir(TRAINED)
    ids = tok.encode((TRAINED / "held-out.txt").read_text())[:24]
    m = amed.load(q4_store, ctx_size=64, max_ram="64M", lookahead="on")
    stats = m.experts.cache.stats
    m.reset()
    for t in ids:
        m.forward([t])
    counted = stats.predicted_right
    assert stats.predicted > 0

    m2 = amed.load(q4_store, ctx_size=64, lookahead="off")
    inputs, _ = r.record(m2, ids, 64, decode=True)
    layers = sorted(inputs)
    hits = 0
    for L in layers[1:]:
        hits += round(r.lookahead_recall(r.route(m2, L, inputs[L - 1]), r.route(m2, L, inputs[L])) * 8 * len(ids))
    assert hits == counted
