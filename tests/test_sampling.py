import json
from pathlib import Path

import numpy as np
import pytest

from amed.errors import AmedError
from amed.text.sampling import SamplingParams, apply_repetition_penalty, candidates, make_sampler

TINY = Path(__file__).parent / "data" / "bailing-tiny"
PLAIN = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


def params(**kw):
    return SamplingParams(**{**PLAIN, **kw})


def logits_for(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


P = [0.05, 0.5, 0.15, 0.3]  # sorted: ids 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def check(ids, p, want_ids, want_p):
    assert list(ids) == want_ids
    np.testing.assert_allclose(p, want_p, rtol=1e-5)


def test_plain_softmax_keeps_everything_sorted():
    ids, p = candidates(logits_for(P), params())
    check(ids, p, [1, 3, 2, 0], [0.5, 0.3, 0.15, 0.05])


def test_top_k():
    ids, p = candidates(logits_for(P), params(top_k=2))
    check(ids, p, [1, 3], [0.5 / 0.8, 0.3 / 0.8])
    ids, p = candidates(logits_for(P), params(top_k=10))  # k >= V: everything
    assert list(ids) == [1, 3, 2, 0]


@pytest.mark.parametrize("top_p,kept", [(0.01, 1), (0.5, 1), (0.75, 2), (0.85, 3), (0.99, 4), (1.0, 4)])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    ids, p = candidates(logits_for(P), params(top_p=top_p))
    sorted_p = np.array([0.5, 0.3, 0.15, 0.05])[:kept]
    check(ids, p, [1, 3, 2, 0][:kept], sorted_p / sorted_p.sum())


@pytest.mark.parametrize("min_p,kept", [(0.05, 4), (0.2, 3), (0.5, 2), (1.0, 1)])
def test_min_p_relative_to_max(min_p, kept):
    ids, p = candidates(logits_for(P), params(min_p=min_p))
    sorted_p = np.array([0.5, 0.3, 0.15, 0.05])[:kept]
    check(ids, p, [1, 3, 2, 0][:kept], sorted_p / sorted_p.sum())


def test_temperature_then_top_k_top_p_min_p_in_order():
    # T = 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 (then renormalized)
    sq = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    ids, p = candidates(logits_for(P), params(temperature=0.5))
    check(ids, p, [1, 3, 2, 0], sq / sq.sum())
    # top_k=3 first, then top_p on the renormalized three: 0.25/0.3625 = 0.69 < 0.7 -> two kept
    ids, p = candidates(logits_for(P), params(temperature=0.5, top_k=3, top_p=0.7))
    check(ids, p, [1, 3], sq[:2] / sq[:2].sum())
    # min_p after top_p: 0.09 < 0.4 * 0.25, so only the best survives
    ids, p = candidates(logits_for(P), params(temperature=0.5, top_p=0.7, min_p=0.4))
    check(ids, p, [1], [1.0])


def test_draw_frequencies_follow_the_kept_distribution():
    sampler = make_sampler(params(top_k=3, seed=123))
    x = logits_for(P)
    draws = np.array([sampler(x, ()) for _ in range(20000)])
    assert set(np.unique(draws)) <= {1, 3, 2}
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq[[1, 3, 2]], np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    x[17] = 9.0
    x[3] = np.nan
    sampler = make_sampler(params(temperature=0.0, top_k=5, top_p=0.1, seed=1))
    assert all(sampler(x, ()) == 17 for _ in range(5))
    assert candidates(x, params(temperature=0.0))[0].tolist() == [17]


def test_never_returns_nan_or_masked_ids():
    x = np.full(50, -np.inf, dtype=np.float32)
    x[:20] = np.nan
    x[[30, 40, 45]] = [0.0, 0.1, -0.1]
    for seed in range(20):
        s = make_sampler(params(top_k=10, seed=seed))
        assert all(s(x, ()) in (30, 40, 45) for _ in range(20))
    x[[30, 40, 45]] = -np.inf
    with pytest.raises(AmedError):
        make_sampler(params())(x, ())
    with pytest.raises(AmedError):
        make_sampler(params(temperature=0))(x, ())


def test_extreme_temperature_drops_underflowed_tokens():
    ids, p = candidates(np.array([0.0, -1000.0, -2000.0], np.float32), params(temperature=0.01))
    assert list(ids) == [0] and p.tolist() == [1.0]


def test_seeded_sequences():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((64, 2000)).astype(np.float32)

    def run(seed):
        s = make_sampler(SamplingParams(temperature=1.0, top_k=50, seed=seed))
        hist = []
        for x in logits:
            hist.append(s(x, hist))
        return hist

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_repetition_penalty_hf_style():
    x = np.array([2.0, -2.0, 1.0, 0.0, 3.0], np.float32)
    out = apply_repetition_penalty(x, [0, 1, 0, 3, 99, -1], 2.0)  # out-of-range ids are ignored
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, 0.0, 3.0])
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, 0.0, 3.0])  # input untouched
    assert apply_repetition_penalty(x, [0], 1.0) is x
    # 3.0 / 2 = 1.5 < 2.0: the penalty moves the argmax from id 4 to id 0
    s = make_sampler(params(temperature=0.0, repetition_penalty=2.0))
    assert s(x, []) == 4 and s(x, np.array([4])) == 0


def test_large_vocab_top_k_does_not_sort_the_vocab(monkeypatch):
    V = 157184
    x = np.random.default_rng(3).standard_normal(V).astype(np.float32)
    hist = list(range(0, V, 7))
    top20 = set(np.argsort(apply_repetition_penalty(x, hist, 1.05))[-20:].tolist())
    sizes = []
    real_argsort = np.argsort

    def spy(a, *args, **kw):
        sizes.append(np.size(a))
        return real_argsort(a, *args, **kw)

    monkeypatch.setattr(np, "argsort", spy)
    s = make_sampler(SamplingParams(seed=0))  # model-card defaults: top_k=20
    assert {s(x, hist) for _ in range(50)} <= top20
    assert sizes and max(sizes) <= 20


def test_defaults_and_validation():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.seed) == (0.6, 0.95, 20, 0.0, 1.05, None)
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=2), dict(repetition_penalty=0)]:
        with pytest.raises(AmedError):
            SamplingParams(**bad)


def test_from_generation_config_override_order(tmp_path):
    assert SamplingParams.from_generation_config(TINY) == SamplingParams()  # eos ids only
    assert SamplingParams.from_generation_config(tmp_path) == SamplingParams()  # no file
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.7, "top_k": 40, "top_p": None, "repetition_penalty": 1.1, "eos_token_id": 1})
    )
    p = SamplingParams.from_generation_config(tmp_path, top_k=5, temperature=None, seed=9)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed) == (0.7, 0.95, 5, 1.1, 9)
    assert SamplingParams.from_generation_config(tmp_path, temperature=0.0).temperature == 0.0
    with pytest.raises(TypeError):
        SamplingParams.from_generation_config(tmp_path, temprature=1.0)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(AmedError, match="generation_config.json"):
        SamplingParams.from_generation_config(tmp_path)
