"""`amed chat` as a person uses it: a pseudo-terminal REPL, and one-shot mode through pipes."""

import json
import os
import subprocess
import sys
import time

import pexpect
import pytest

from amed.app.chat import ChatSession, Conversation
from amed.text.sampling import SamplingParams, make_sampler
from amed.text.tokenizer import Tokenizer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "TERM": "dumb"}


def test_one_shot_stdin_prints_only_the_answer(golden_dir):
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(golden_dir), "-n", "8", "--temp", "0"],
                       input="What helps a headache?", capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "not medical advice" in r.stderr and "not medical advice" not in r.stdout
    assert r.stdout.endswith("\n") and len(r.stdout.strip()) > 0
    # deterministic: greedy answers agree between runs and with -p
    r2 = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(golden_dir), "-n", "8", "--temp", "0",
                         "-p", "What helps a headache?"], capture_output=True, text=True, env=ENV, timeout=120,
                        stdin=subprocess.DEVNULL)
    assert r2.stdout == r.stdout


def test_missing_model_is_one_clear_sentence(tmp_path):
    env = {**ENV, "AMED_HOME": str(tmp_path), "AMED_MODEL": ""}
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-p", "hi"], capture_output=True, text=True,
                       env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert "amed download" in r.stderr and "amed quantize" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_repl_in_a_pty(golden_dir, tmp_path):
    child = pexpect.spawn(sys.executable, ["-m", "amed", "chat", "-m", str(golden_dir), "-n", "400",
                                           "--temp", "0.8", "-s", "1"],
                          env=ENV, encoding="utf-8", timeout=90, dimensions=(40, 200))
    try:
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/reset")
        child.expect(">>> ")
        child.sendline("Tell me about fever")
        child.expect("prompt tokens")          # the answer streamed, then the stats line
        child.expect(">>> ")
        # a long answer, interrupted with Ctrl-C: the REPL survives and keeps the conversation
        child.sendline("and more, please")
        child.expect("please\r\n")
        time.sleep(1.0)                        # let the answer start streaming
        child.sendintr()
        child.expect(r"answer stopped|stopped|prompt tokens")
        child.expect(">>> ")
        child.sendline(f"/save {tmp_path}")          # a directory: an error inside the chat (issue 25)
        child.expect("is a directory")
        child.expect(">>> ")
        child.sendline("/system")                    # shows the (empty) system prompt; clears nothing
        child.expect("no system prompt")
        child.expect(">>> ")
        child.sendline(f"/save {tmp_path / 'conv.json'}")
        child.expect("saved to")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "conv.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]


def test_context_overflow_drops_oldest_turns(golden_dir):
    import amed
    tok = Tokenizer.from_dir(golden_dir)
    m = amed.load(golden_dir)
    s = ChatSession(m, tok, make_sampler(SamplingParams(temperature=0)), max_tokens=4, ctx_size=120,
                    system="be brief")
    for i in range(6):
        s.ask(f"question number {i} about headaches", out=open(os.devnull, "w"))
    assert s.conv.system == "be brief"
    assert len(tok.encode_chat(s.conv.messages()[:-1])) + 4 <= 120   # the last prompt fit
    assert s.conv.turns[-2]["content"] == "question number 5 about headaches"
    with pytest.raises(amed.errors.AmedError, match="ctx-size"):
        s.ask("word " * 200, out=open(os.devnull, "w"))
    assert isinstance(s.conv, Conversation)


def test_one_shot_on_a_store_verbose(tmp_path):
    from amed.quant.convert import Settings, quantize_model
    from amed.app.synth import SyntheticSource

    store = tmp_path / "store"
    quantize_model(SyntheticSource("tiny"), store, Settings(bits=4))
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(store), "-n", "4", "--temp", "0", "-v",
                        "-p", "Is fever dangerous?"], capture_output=True, text=True, env=ENV, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "memory: dense weights" in r.stderr and "generated at" in r.stderr
    assert "Traceback" not in r.stderr and "memory:" not in r.stdout


# ---- issue 25: a failed /command stays inside the chat; Ctrl-C in a one-shot run -----------------

def _session(golden_dir, **kw):
    import io

    import amed
    from rich.console import Console

    err = io.StringIO()
    s = ChatSession(amed.load(golden_dir), Tokenizer.from_dir(golden_dir),
                    make_sampler(SamplingParams(temperature=0)), 3, 256, err=Console(file=err, width=500), **kw)
    return s, err


def _repl(session, monkeypatch, lines):
    from amed.app.chat import repl

    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    repl(session)                       # returns (Ctrl-D at the end): it did not raise


def test_repl_command_errors_stay_in_the_chat(golden_dir, tmp_path, monkeypatch):
    s, err = _session(golden_dir, system="be brief")
    s.ask("first question", out=open(os.devnull, "w"))
    kept = list(s.conv.turns)

    def broken(path):
        raise RuntimeError("disk on fire")
    (tmp_path / "sub").mkdir()
    _repl(s, monkeypatch, [f"/save {tmp_path}",                    # a directory
                           f"/save {tmp_path / 'missing' / 'c.json'}",  # no such folder
                           f"/load {tmp_path / 'none.json'}",
                           "/system",                               # shows it; clears nothing
                           "/bogus",
                           f"/save {tmp_path / 'sub' / 'c.json'}"])
    text = err.getvalue()
    assert f"{tmp_path} is a directory; /save takes a file name" in text
    assert "cannot save to" in text and "No such file or directory" in text
    assert "cannot read" in text and "unknown command /bogus" in text
    assert "system prompt: be brief" in text
    assert s.conv.turns == kept and s.conv.system == "be brief"
    saved = json.loads((tmp_path / "sub" / "c.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "c.json"]     # no temporary file left
    # an error nobody foresaw inside a command, or in an answer, is one line too; the chat goes on
    monkeypatch.setattr(s, "save", broken)
    monkeypatch.setattr(s.gen, "stream", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    _repl(s, monkeypatch, [f"/save {tmp_path / 'x.json'}", "a question", "/stats"])
    text = err.getvalue()
    assert "/save failed: RuntimeError: disk on fire." in text
    assert "the answer failed: MemoryError: no room." in text and "the conversation is kept" in text
    assert s.conv.turns == kept


def test_system_without_text_shows_it(golden_dir, monkeypatch):
    s, err = _session(golden_dir)
    _repl(s, monkeypatch, ["/system"])
    assert "no system prompt" in err.getvalue()
    _repl(s, monkeypatch, ["/system be kind", "/system"])
    assert s.conv.system == "be kind" and "system prompt: be kind" in err.getvalue()


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_in_a_one_shot_answer_exits_130(golden_dir, monkeypatch, capsys, as_json):
    """Ctrl-C while a one-shot answer streams: the partial answer stays on stdout, stderr says it
    stopped, and the exit status is 130 (the shell's code for SIGINT), not 0."""
    import amed
    from amed.app import cli
    from amed.engine.model import Model

    forward, calls = Model.forward, []

    def interrupted(self, ids, **kw):
        calls.append(len(ids))
        if len(calls) == 3:            # the prompt, one decoded token, then Ctrl-C
            raise KeyboardInterrupt
        return forward(self, ids, **kw)
    monkeypatch.setattr(amed, "kernel_cache_cold", lambda: False)
    monkeypatch.setattr(Model, "forward", interrupted)
    monkeypatch.setattr(sys, "argv", ["amed", "chat", "-m", str(golden_dir), "-n", "20", "--temp", "0", "-p", "hi"]
                        + (["--json"] if as_json else []))
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    assert e.value.code == 130 and "stopped (Ctrl-C) after" in err and "Traceback" not in err
    if as_json:                         # (--json warms the kernels up first: Ctrl-C lands earlier)
        assert json.loads(out)["finish_reason"] == "interrupted"
    else:
        assert "after 2 tokens" in err and out.strip()


@pytest.mark.slow
def test_ctrl_c_in_a_real_one_shot_run(golden_dir):
    """The same with a real SIGINT to a real process."""
    import signal

    p = subprocess.Popen([sys.executable, "-m", "amed", "chat", "-m", str(golden_dir), "-n", "-1", "-c", "4096",
                          "--temp", "1", "-s", "3", "-p", "tell me everything"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert p.stdout.read(1)                   # the answer is streaming
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert b"stopped (Ctrl-C)" in err and b"Traceback" not in err
