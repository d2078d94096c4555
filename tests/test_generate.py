import pytest

import amed
from amed.generate import Generator, generate
from amed.text.sampling import SamplingParams, make_sampler
from amed.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def golden(golden_dir):
    return amed.load(golden_dir), Tokenizer.from_dir(golden_dir)


def greedy():
    return make_sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))


def test_greedy_equals_repeated_argmax(golden):
    model, tok = golden
    prompt = tok.encode_chat([{"role": "user", "content": "Hello there"}])
    g = Generator(model, tok)
    got = [s.token for s in g.stream(prompt, greedy(), max_tokens=12, stop_ids=()) if s.token is not None]
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model.logits(seq)[-1].argmax()))
    assert got == seq[len(prompt):]


def test_seeds(golden):
    model, tok = golden
    prompt = tok.encode("The patient")

    def run(seed):
        s = make_sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return [x.token for x in Generator(model, tok).stream(prompt, s, 16) if x.token is not None]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_second_turn_prefills_only_new_tokens(golden):
    model, tok = golden
    g = Generator(model, tok)
    msgs = [{"role": "user", "content": "first question"}]
    p1 = tok.encode_chat(msgs)
    steps = list(g.stream(p1, greedy(), max_tokens=5, stop_ids=()))
    answer = tok.decode([s.token for s in steps if s.token is not None])
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and a second one"}]
    p2 = tok.encode_chat(msgs)
    before = model.tokens_forwarded
    last = list(g.stream(p2, greedy(), max_tokens=1, stop_ids=()))[-1]
    # only the tokens after the common prefix with the cache were run
    common = 0
    while common < len(p1) and p1[common] == p2[common]:
        common += 1
    assert last.prefill_tokens == model.tokens_forwarded - before
    assert last.prefill_tokens <= len(p2) - common
    assert last.prefill_tokens < len(p2) // 2
    # and the logits equal a fresh full forward
    g2 = Generator(amed.load(model.source.path), tok)
    fresh = [s.token for s in g2.stream(p2, greedy(), 4, ()) if s.token is not None]
    again = [s.token for s in g.stream(p2, greedy(), 4, ()) if s.token is not None]
    assert fresh == again


def test_stop_and_length(golden):
    model, tok = golden
    prompt = tok.encode("abc")
    first = int(model.logits(prompt)[-1].argmax())
    text, last = generate(model, tok, prompt, greedy(), max_tokens=5, stop_ids=[first])
    assert last.finish_reason == "stop" and text == "" and last.generated_tokens == 1
    text, last = generate(model, tok, prompt, greedy(), max_tokens=3, stop_ids=[])
    assert last.finish_reason == "length" and last.generated_tokens == 3
    assert last.prefill_tps > 0


def test_a_batch_of_sequences_answers_as_each_alone(golden):
    """Three sequences stepped together (chunked prefill, batched decode) give the tokens each gives
    alone; a stop token ends one early and is counted, a stop string cuts another's text."""
    from amed.generate import Batch, Sequence

    model, tok = golden
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in ("hi", "Is fever dangerous?", "ok")]
    alone = [[s.token for s in Generator(model, tok).stream(p, greedy(), 10, ()) if s.token is not None]
             for p in prompts]
    stop_id = alone[1][4]                                 # the second answer ends at its 5th token
    text2 = tok.decode(alone[2])
    stop_str = text2[len(text2) // 2:len(text2) // 2 + 2]
    batch = Batch(model, prefill_chunk=7)
    seqs = [batch.add(Sequence(p, greedy(), tokenizer=tok, max_tokens=10, stop_ids=ids, stops=st,
                               state=model.new_state()))
            for p, ids, st in zip(prompts, ((), (stop_id,), ()), ((), (), (stop_str,)))]
    tokens, texts, last = [[], [], []], ["", "", ""], [None] * 3
    while batch.seqs:
        for seq, step in batch.step():
            i = seqs.index(seq)
            texts[i] += step.text
            if step.token is not None:
                tokens[i].append(step.token)
            last[i] = step
    assert tokens[0] == alone[0] and last[0].finish_reason == "length" and last[0].generated_tokens == 10
    assert tokens[1] == alone[1][:4] and last[1].finish_reason == "stop" and last[1].generated_tokens == 5
    assert last[2].finish_reason == "stop" and texts[2] == text2[:text2.index(stop_str)]
    assert batch.stats["decode_steps"] > 0 and batch.stats["decode_tokens"] > batch.stats["decode_steps"]
