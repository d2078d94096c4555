"""Model.forward_batch: one decode step for several sequences equals each sequence's own
one-token forward (up to float32 summation order), and greedy decoding through it picks the same
tokens."""

import numpy as np
import pytest

import amed
import engine_reference as R
from amed.errors import AmedError


@pytest.fixture(scope="module")
def stores(golden_store):
    return {"ckpt": R.GOLDEN, "q4_r8": golden_store(bits=4), "q4_rows": golden_store(bits=4, layout="rows")}


def prompts():
    ids = R.token_ids()
    return [ids[:11], ids[30:37][::-1], ids[5:24], ids[40:43]]   # different lengths: different positions


@pytest.mark.parametrize("name", ["ckpt", "q4_r8", "q4_rows"])
def test_batch_step_equals_single_steps(stores, name):
    m = amed.load(stores[name])
    ps = prompts()
    single = [m.new_state() for _ in ps]
    batch = [m.new_state() for _ in ps]
    want = np.stack([m.forward(p, state=s) for p, s in zip(ps, single)])
    got = np.stack([m.forward(p, state=s) for p, s in zip(ps, batch)])
    np.testing.assert_array_equal(got, want)
    toks_single = [[int(np.argmax(l))] for l in want]
    toks_batch = [[int(np.argmax(l))] for l in got]
    for _ in range(10):                                    # greedy decode, both ways
        want = np.stack([m.forward([t[-1]], state=s) for t, s in zip(toks_single, single)])
        got = m.forward_batch([t[-1] for t in toks_batch], batch)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        for t, row in zip(toks_single, want):
            t.append(int(np.argmax(row)))
        for t, row in zip(toks_batch, got):
            t.append(int(np.argmax(row)))
    assert toks_batch == toks_single
    assert [s.pos for s in batch] == [s.pos for s in single] == [len(p) + 10 for p in ps]


def test_batch_of_one_is_the_single_forward(stores):
    m = amed.load(stores["q4_r8"])
    a, b = m.new_state(), m.new_state()
    p = prompts()[0]
    m.forward(p, state=a)
    m.forward(p, state=b)
    np.testing.assert_array_equal(m.forward_batch([7], [a])[0], m.forward([7], state=b))


def test_batch_grows_short_caches_and_rejects_bad_input(stores):
    m = amed.load(stores["ckpt"])
    s1, s2 = m.new_state(ctx_size=16), m.new_state(ctx_size=16)
    m.forward(list(range(1, 17)), state=s1)                # full: the next step must grow it
    m.forward([3], state=s2)
    assert m.forward_batch([5, 6], [s1, s2]).shape == (2, m.config.vocab_size)
    assert s1.pos == 17 and s1.capacity >= 17 and s2.pos == 2
    with pytest.raises(AmedError, match="same state"):
        m.forward_batch([1, 2], [s1, s1])
    with pytest.raises(AmedError, match="one token per state"):
        m.forward_batch([1, 2, 3], [s1, s2])
    with pytest.raises(AmedError, match="out of range"):
        m.forward_batch([1, 10 ** 6], [s1, s2])
