import json
import random
import shutil
from pathlib import Path

import pytest

from amed.errors import AmedError
from amed.text.tokenizer import (
    FALLBACK_CHAT_TEMPLATE,
    Tokenizer,
    compile_chat_template,
    render_chat_template,
)

DATA = Path(__file__).parent / "data"
TINY = DATA / "bailing-tiny"

# The tiny tokenizer's byte-level pieces: 😀 = F0 9F 98 80, 世 = E4 B8 96, é = C3 A9.
EMOJI, CJK, ACCENT = "\U0001F600", "\u4e16", "\u00e9"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TINY)


def model_dir(tmp_path, config=None, generation=None):
    """A copy of the tiny tokenizer with a replaced tokenizer_config / generation_config."""
    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((TINY / "tokenizer_config.json").read_text())
    cfg.update(config or {})
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


@pytest.fixture(scope="module")
def fallback_tok(tmp_path_factory):
    return Tokenizer.from_dir(model_dir(tmp_path_factory.mktemp("fb"), {"chat_template": None}))


# ---- encode / decode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "  leading and trailing  \n\n", f"caf{ACCENT} {CJK}界 {EMOJI}!", "a\tb\r\nc", ""],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    for name, i in [("<|startoftext|>", 0), ("<|endoftext|>", 1), ("<|role_end|>", 4), ("<role>", 5), ("</role>", 6)]:
        assert tok.encode(name) == [i]
        assert tok.token_to_id(name) == i and tok.id_to_token(i) == name
    ids = tok.encode("x<role>HUMAN</role>y<|role_end|>")
    assert ids[1] == 5 and 6 in ids and ids[-1] == 4
    assert tok.decode(ids) == "x<role>HUMAN</role>y<|role_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "xHUMANy"


def test_no_bos_unless_configured(tok, tmp_path):
    assert tok.bos_token_id == 0 and not tok.add_bos_token
    assert tok.encode("hi")[0] != 0
    assert tok.encode("hi", add_bos=True) == [0] + tok.encode("hi")
    with_bos = Tokenizer.from_dir(model_dir(tmp_path, {"add_bos_token": True}))
    assert with_bos.encode("hi") == [0] + tok.encode("hi")
    # the chat template decides on BOS itself; encode_chat never adds one
    assert with_bos.encode_chat([{"role": "user", "content": "hi"}])[0] == 5


def test_stop_ids(tok, tmp_path):
    for sub in "abc":
        (tmp_path / sub).mkdir()
    assert tok.stop_ids == {1, 4}  # generation_config eos [1, 4]
    assert Tokenizer.from_dir(model_dir(tmp_path / "a", generation={"eos_token_id": 1})).stop_ids == {1, 4}
    assert Tokenizer.from_dir(model_dir(tmp_path / "b", generation={"eos_token_id": [2]})).stop_ids == {1, 2, 4}
    assert Tokenizer.from_dir(model_dir(tmp_path / "c")).stop_ids == {1, 4}  # no generation_config


# ---- streaming detokenizer ----------------------------------------------------------------


def stream_all(tok, ids, skip=False):
    s = tok.stream(skip_special_tokens=skip)
    steps = [s.step(i) for i in ids]
    return steps, s.flush()


def test_stream_emits_whole_characters_once(tok):
    text = f"a{EMOJI}b{CJK}{ACCENT}<role>{EMOJI}"
    ids = tok.encode(text)
    steps, tail = stream_all(tok, ids)
    assert [s for s in steps if s] == ["a", EMOJI, "b", CJK, ACCENT, "<role>", EMOJI]
    assert "".join(steps) == text and tail == ""
    assert len(tok.encode(EMOJI)) == 4  # really split over four byte-level tokens
    assert stream_all(tok, tok.encode(EMOJI))[0] == ["", "", "", EMOJI]


def test_stream_split_character_with_special_tokens_between(tok):
    e, c = tok.encode(EMOJI), tok.encode(CJK)
    for ids in ([*e[:2], 5, *e[2:]], [*c[:1], 4, *c[1:], *e], [71, *e[:3], 6, 5, *c]):
        for skip in (False, True):
            steps, tail = stream_all(tok, ids, skip)
            assert "".join(steps) + tail == tok.decode(ids, skip)
            assert not any(s.endswith("\ufffd") for s in steps)


def test_stream_flush_emits_unfinished_character(tok):
    ids = tok.encode("x" + EMOJI)[:-1]
    steps, tail = stream_all(tok, ids)
    assert steps == ["x", "", "", ""] and tail == "\ufffd" == tok.decode(ids)[1:]


def test_stream_equals_decode_on_random_ids(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            steps, tail = stream_all(tok, ids, skip)
            assert "".join(steps) + tail == tok.decode(ids, skip)


def test_stream_matches_tokenizers_decodestream(tok):
    decoders = pytest.importorskip("tokenizers.decoders")
    if not hasattr(decoders, "DecodeStream"):
        pytest.skip("tokenizers has no DecodeStream")
    rng = random.Random(1)
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        ds = decoders.DecodeStream(skip_special_tokens=False)
        assert stream_all(tok, ids)[0] == [ds.step(tok._tok, i) or "" for i in ids]


# ---- chat template ------------------------------------------------------------------------

SYS, USER, ASST, END = "<role>SYSTEM</role>", "<role>HUMAN</role>", "<role>ASSISTANT</role>", "<|role_end|>"
CHATS = [
    ([{"role": "user", "content": "Hi"}], f"{SYS}detailed thinking off{END}{USER}Hi{END}"),
    (
        [
            {"role": "system", "content": "You are AntAngelMed, a helpful medical assistant."},
            {"role": "user", "content": "What should I do if I have a headache?"},
        ],
        f"{SYS}You are AntAngelMed, a helpful medical assistant.\ndetailed thinking off{END}"
        f"{USER}What should I do if I have a headache?{END}",
    ),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": f"b {CJK}"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
            {"role": "user", "content": "e\nf"},
        ],
        f"{SYS}Be brief.\ndetailed thinking off{END}{USER}a{END}{ASST}b {CJK}{END}"
        f"{USER}c{END}{ASST}d{END}{USER}e\nf{END}",
    ),
]


@pytest.mark.parametrize("messages,expected", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_template_renders_ling_format(tok, fallback_tok, messages, expected, gen):
    want = expected + (ASST if gen else "")
    assert not tok.template_is_fallback and fallback_tok.template_is_fallback
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    assert fallback_tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    assert fallback_tok.encode_chat(messages, gen) == tok.encode(want)


def test_golden_prompt_round_trip(tok, fallback_tok):
    golden = json.loads((DATA / "bailing-tiny-tokens.json").read_text())["token_ids"]
    messages = [{"role": "user", "content": "The patient presents with a headache and mild fever."}]
    text = tok.apply_chat_template(messages)
    assert tok.decode(golden) == text
    assert tok.encode_chat(messages) == golden
    assert fallback_tok.encode_chat(messages) == golden


def test_fallback_template_extras(fallback_tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nb"},
        {"role": "system", "content": "later"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"q": ACCENT}}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "<think>new</think>d"},
    ]
    assert fallback_tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        f"{SYS}detailed thinking off{END}{USER}a{END}{ASST}b{END}{SYS}later{END}{USER}c{END}"
        f'{ASST}<tool_call>\n{{"name": "f", "arguments": {{"q": "{ACCENT}"}}}}\n</tool_call>{END}'
        f"<role>OBSERVATION</role>\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>{END}"
        f"{ASST}\n<think>\nnew\n</think>\n\nd{END}"
    )
    with pytest.raises(AmedError, match="role"):
        fallback_tok.apply_chat_template([{"role": "narrator", "content": "x"}])
    with pytest.raises(AmedError, match="list"):
        fallback_tok.apply_chat_template("hello")


def test_template_globals_and_tojson():
    t = compile_chat_template("{{ messages[0].content|tojson }}|{{ bos_token }}|{{ strftime_now('%Y')|length }}")
    assert render_chat_template(t, [{"role": "user", "content": f"<{ACCENT}>"}], bos_token="B") == f'"<{ACCENT}>"|B|4'
    assert compile_chat_template(FALLBACK_CHAT_TEMPLATE) is not None


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''|attr('__class__') }}",
        "{{ messages['__class__'] }}",
    ],
)
def test_sandbox_refuses_python_internals(tmp_path, source):
    with pytest.raises(AmedError, match="refusing"):
        compile_chat_template(source)
    with pytest.raises(AmedError, match="refusing"):
        Tokenizer.from_dir(model_dir(tmp_path, {"chat_template": source}))


@pytest.mark.parametrize(
    "source",
    [
        "{% set n = '__cl' ~ 'ass__' %}{{ (''|attr(n)).mro() }}",  # spelled at run time
        "{% set x = [] %}{{ x.append(1) }}",  # mutation
    ],
)
def test_sandbox_refuses_at_render_time(source):
    with pytest.raises(AmedError, match="refusing"):
        render_chat_template(compile_chat_template(source), [])


def test_template_errors_are_one_line():
    bad = compile_chat_template("{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}")
    with pytest.raises(AmedError, match="roles must alternate user/assistant") as e:
        render_chat_template(bad, [])
    assert "\n" not in str(e.value)
    with pytest.raises(AmedError, match="does not compile"):
        compile_chat_template("{% if %}")
    with pytest.raises(AmedError, match="chat template error"):
        render_chat_template(compile_chat_template("{{ messages[3].content }}"), [])


# ---- missing and malformed files ----------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(AmedError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_malformed_json_names_the_file(tmp_path, name):
    d = model_dir(tmp_path, generation={"eos_token_id": 1})
    (d / name).write_text('{"truncated": ')
    with pytest.raises(AmedError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(d)


# ---- issue 26: tokenizer files and chat templates are untrusted input ----------------------


def test_empty_tokenizer_is_refused(tmp_path):
    """An empty vocabulary would give an empty answer for every prompt."""
    d = model_dir(tmp_path)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["vocab"], tok["model"]["merges"], tok["added_tokens"] = {}, [], []
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(AmedError, match="empty vocabulary"):
        Tokenizer.from_dir(d)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    d = model_dir(tmp_path)
    (d / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(AmedError, match="another model"):
        Tokenizer.from_dir(d)
    (d / "config.json").write_text(json.dumps({"vocab_size": 512}))
    Tokenizer.from_dir(d)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja"])
def test_fifo_in_place_of_a_tokenizer_file(tmp_path, name):
    """Regular files only: a FIFO would block the read forever."""
    import os

    d = model_dir(tmp_path, generation={"eos_token_id": 1})
    if (d / name).exists():
        (d / name).unlink()
    os.mkfifo(d / name)
    with pytest.raises(AmedError, match="FIFO"):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("source,match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "loop iterations|characters"),
    ("{{ range(10**9)|length }}", "range|passes"),
    ("{{ 'a' * 1000000000 }}", "builds a value"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "builds a value"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x }}",
     "builds a value"),
    ("{{ 'x'|center(1000000000) }}", "passes"),
    ("{{ messages[0].content.ljust(10**9) }}", "passes"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses"),
    ("{{ 2 ** 100000 ** 2 }}", "power"),
    ("{{ '{:>999999999}'.format(1) }}", "wider"),
    ("{{ '%999999999d' % 1 }}", "wider"),
    ("{{ '%999999999d'|format(1) }}", "wider"),
])
def test_template_limits(source, match):
    """A chat template from a stranger gets bounded work: range size, loop steps, value and
    output size, recursion and time; each limit is one sentence, within seconds."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(AmedError, match=match) as e:
        render_chat_template(compile_chat_template(source), [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10


def test_template_time_limit(monkeypatch):
    import amed.text.tokenizer as T

    monkeypatch.setattr(T, "TEMPLATE_MAX_SECONDS", 0.2)
    monkeypatch.setattr(T, "TEMPLATE_MAX_STEPS", 10**9)
    src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(AmedError, match="longer than 0.2 s"):
        render_chat_template(compile_chat_template(src), [{"role": "user", "content": "hi"}])


def test_limits_leave_real_templates_alone(tok):
    """loop.length / loop.last / recursive loops still work through the guards."""
    src = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %}"
           "{{ m.content }}{% endfor %}{% for x in [[1, [2]], 3] recursive %}"
           "{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}{% endfor %}")
    out = render_chat_template(compile_chat_template(src), [{"role": "user", "content": "a"},
                                                            {"role": "user", "content": "b"}])
    assert out == "1/2a2/2!b123"
