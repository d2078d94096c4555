"""The command line as a new user meets it (issue 19): one clear sentence for every bad input,
flags that mean what llama.cpp users expect, and stores that repair by re-running a command.

Most tests run the CLI in-process (`amed_cli`), which is fast: no interpreter start, kernels
already compiled."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import amed
from amed.app import cli

ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


def one_sentence(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- defect 1: tracebacks instead of one sentence -----------------------------------------------

def test_quantize_into_a_file_or_an_unwritable_dir(amed_cli, golden_dir, tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    code, out, err = amed_cli("quantize", golden_dir, "-o", f)
    assert code == 1 and "exists and is not a directory" in one_sentence(err) and out == ""

    access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: "ro" not in str(p) and access(p, m, **k))  # root here
    code, out, err = amed_cli("quantize", golden_dir, "-o", tmp_path / "ro")
    assert code == 1 and "cannot write into" in one_sentence(err) and out == ""

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("pathlib.Path.mkdir", denied)
    code, out, err = amed_cli("quantize", golden_dir, "-o", tmp_path / "ro" / "deeper")
    assert code == 1 and "cannot create" in one_sentence(err) and "permission denied" in err


def test_an_unforeseen_oserror_is_one_sentence(amed_cli, golden_dir, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device", "/some/file")
    monkeypatch.setattr("amed.app.cli.resolve_model", boom)
    code, out, err = amed_cli("chat", "-p", "hi")
    assert code == 1 and "No space left on device (/some/file)" in one_sentence(err)


def test_an_error_with_brackets_prints_them(amed_cli, monkeypatch):
    """Error text is taken literally, not as Rich markup: `pip install 'amed[cuda]'` keeps [cuda]."""
    from amed.errors import AmedError

    def missing(*a, **k):
        raise AmedError("--device cuda needs numba-cuda: pip install 'amed[cuda]'; or run on the CPU.")
    monkeypatch.setattr("amed.app.cli.resolve_model", missing)
    code, out, err = amed_cli("chat", "-p", "hi")
    assert code == 1 and "pip install 'amed[cuda]'" in one_sentence(err)
    code, out, err = amed_cli("serve", "--help")
    assert "amed[cuda]" in out


def test_bench_zero_repetitions(amed_cli, golden_dir):
    code, _, err = amed_cli("bench", "-m", golden_dir, "-r", "0")
    assert code == 1 and "-r/--repetitions must be 1 or more" in one_sentence(err)


# ---- defect 2: -n -1 / negatives -------------------------------------------------------------

def test_max_tokens_minus_one_and_negatives(amed_cli, golden_dir):
    code, out, err = amed_cli("chat", "-m", golden_dir, "-n", "-5", "-p", "hi")
    assert code == 1 and "-n/--max-tokens must be 0 or more, or -1" in one_sentence(err) and out == ""
    # -1: until a stop token or the context is full (a 64-token context, greedy)
    code, out, err = amed_cli("chat", "-m", golden_dir, "-n", "-1", "-c", "64", "--temp", "0", "-v", "-p", "hi")
    assert code == 0, err
    assert "(stop)" in err or "(length)" in err
    assert out.strip()


# ---- defect 3: threads ------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["-2", "999"])
def test_threads_out_of_range(amed_cli, golden_dir, t):
    for cmd in ("chat", "bench"):
        code, _, err = amed_cli(cmd, "-m", golden_dir, "-t", t, "-p", "2")
        assert code == 1 and "-t/--threads must be between 1 and" in one_sentence(err)


def test_verbose_prints_threads_seed_and_compile_notice(amed_cli, golden_dir, monkeypatch):
    monkeypatch.setattr(amed, "kernel_cache_cold", lambda: True)    # as on a first run
    code, out, err = amed_cli("chat", "-m", golden_dir, "-t", "1", "-n", "2", "-v", "-p", "hi")
    assert code == 0, err
    assert "compiling kernels (first run only" in err and "kernels compiled/loaded in" in err
    assert "1 threads" in err and "seed None" not in err
    seed = int(err.split("seed ")[1].split("[")[0].split()[0].rstrip("]"))
    # the seed printed repeats the run
    code, out2, err2 = amed_cli("chat", "-m", golden_dir, "-n", "4", "-s", seed, "-p", "hi")
    code, out3, err3 = amed_cli("chat", "-m", golden_dir, "-n", "4", "-s", seed, "-p", "hi")
    assert out2 == out3


# ---- defect 4: a cold kernel cache is detected --------------------------------------------------

def test_kernel_cache_cold(tmp_path):
    assert amed.kernel_cache_cold(str(tmp_path))
    sub = tmp_path / "cpu_x"
    sub.mkdir()
    for m in ("kernels", "qr8"):
        (sub / f"{m}.f-1.py311.nbi").write_bytes(b"")
    assert amed.kernel_cache_cold(str(tmp_path))
    (sub / "qrows.g-2.py311.nbi").write_bytes(b"")
    assert not amed.kernel_cache_cold(str(tmp_path))


# ---- defect 5: verify hashes everything, a damaged header is a checksum mismatch ------------------

def test_verify_damaged_header_and_edited_tokenizer(amed_cli, golden_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), store)
    man = json.loads((store / "amed-manifest.json").read_text())
    assert set(man["side_files"]) >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
    code, _, err = amed_cli("verify", store)
    assert code == 0 and "match their SHA-256" in err

    with open(store / "globals.safetensors", "r+b") as f:       # a damaged header: same size
        f.seek(20)
        f.write(b"\x00\xff")
    code, _, err = amed_cli("verify", store)
    line = one_sentence(err)
    assert code == 1 and "globals.safetensors" in line and "checksums" in line and "amed quantize" in line
    assert "dtype" not in line

    shutil.copy(golden_store(bits=4) / "globals.safetensors", store)
    cfg = json.loads((store / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ broken"
    (store / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = amed_cli("verify", store)
    assert code == 1 and "tokenizer_config.json" in one_sentence(err)


def test_verify_an_older_store_without_side_hashes(amed_cli, golden_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), store)
    man = json.loads((store / "amed-manifest.json").read_text())
    del man["side_files"]
    (store / "amed-manifest.json").write_text(json.dumps(man))
    code, _, err = amed_cli("verify", store)
    assert code == 0 and "not hashed in this older store" in err
    amed.load(store)                                              # and it opens


def test_loading_a_damaged_header_says_what_to_do(golden_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), store)
    with open(store / "layer-001.safetensors", "r+b") as f:
        f.seek(30)
        f.write(b"\x00\xff\x00")
    with pytest.raises(amed.errors.AmedError, match="amed verify .* re-run `amed quantize CHECKPOINT -o "):
        amed.load(store)


# ---- defect 6: -p "" agrees with empty stdin ----------------------------------------------------

def test_empty_prompt_is_an_error_both_ways(amed_cli, golden_dir):
    for args, stdin in ((["-p", ""], ""), (["-p", "   "], ""), ([], "")):
        code, out, err = amed_cli("chat", "-m", golden_dir, *args, stdin=stdin)
        assert code == 1 and "no prompt" in one_sentence(err) and out == ""


# ---- defects 7 and 8: repair by re-running, Ctrl-C says how to resume ---------------------------

def test_rerunning_quantize_repairs_a_damaged_store(amed_cli, golden_dir, golden_store, tmp_path):
    store = tmp_path / "s"
    assert amed_cli("quantize", golden_dir, "-o", store)[0] == 0
    ref = {p.name: p.read_bytes() for p in store.iterdir()}
    (store / "layer-001.safetensors").unlink()
    (store / "tokenizer.json").unlink()
    with pytest.raises(amed.errors.AmedError, match="re-run `amed quantize CHECKPOINT -o .*rewrites only the missing"):
        amed.load(store)
    code, _, err = amed_cli("quantize", golden_dir, "-o", store)
    assert code == 0, err
    assert "already done by an earlier run" in err
    assert {p.name: p.read_bytes() for p in store.iterdir()} == ref
    code, _, err = amed_cli("quantize", golden_dir, "-o", store)       # intact: refused as before
    assert code == 1 and "already holds a complete store" in one_sentence(err)


def test_ctrl_c_in_quantize_says_rerun_resumes(amed_cli, golden_dir, tmp_path, monkeypatch):
    import amed.quant.convert as convert

    real, calls = convert.convert_tensor, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(convert, "convert_tensor", interrupted)
    store = tmp_path / "s"
    code, _, err = amed_cli("quantize", golden_dir, "-o", store, "-g", "32")
    assert code == 130 and "run the same command again to resume" in err
    monkeypatch.setattr(convert, "convert_tensor", real)
    code, _, err = amed_cli("quantize", golden_dir, "-o", store, "-g", "32")
    assert code == 0, err
    total = sum(p.stat().st_size for p in golden_dir.glob("*.safetensors"))
    read = err.split(" read in ")[0].split("\n")[-1]
    assert "already done by an earlier run" in err and read != cli.human(total), read


# ---- defect 9: synth --force into an existing dir -----------------------------------------------

def test_synth_refuses_a_store_and_reports_its_own_size(amed_cli, golden_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), store)
    before = (store / "tokenizer.json").read_bytes()
    code, _, err = amed_cli("synth", store, "--force")
    assert code == 1 and "holds an amed store" in one_sentence(err)
    assert (store / "tokenizer.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "big.bin").write_bytes(b"\0" * 50_000_000)
    code, _, err = amed_cli("synth", other, "--force")
    assert code == 0 and " MB)" in err
    size = float(err.split("shards, ")[1].split(" MB")[0])
    assert size < 45, err


# ---- defect 10: the small ones ------------------------------------------------------------------

def test_bare_amed_shows_help_and_succeeds():
    r = subprocess.run([sys.executable, "-m", "amed"], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and "Usage" in r.stdout and "chat" in r.stdout


def test_quantize_error_leaves_stdout_empty(amed_cli, golden_dir, golden_store):
    code, out, err = amed_cli("quantize", golden_dir, "-o", golden_store(bits=4))
    assert code == 1 and out == ""


def test_bench_small_model_size_and_given_bandwidth(amed_cli, golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    monkeypatch.setenv("AMED_MEMBW_GBS", "20")
    code, out, err = amed_cli("bench", "-m", golden_dir, "-p", "4", "-n", "2", "-r", "1", "-t", "1")
    assert code == 0, err
    assert "measuring memory bandwidth" not in err
    assert "0.00 GB" not in out and " MB |" in out and "| 1 |" in out


def test_sampling_flags_have_help():
    from typer.main import get_command

    chat = get_command(cli.app).commands["chat"]
    for p in chat.params:
        if p.name in ("temp", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
            assert p.help, p.name


def test_ctx_above_training_warns(amed_cli, golden_dir):
    code, _, err = amed_cli("chat", "-m", golden_dir, "-c", "8192", "-n", "1", "-p", "hi")
    assert code == 0 and "above the 4096 tokens the model was trained on" in err


# ---- --version, -h, completion, warmup ---------------------------------------------------------

def test_version_and_short_help(amed_cli):
    code, out, _ = amed_cli("--version")
    assert code == 0 and out.strip() == f"amed {amed.__version__}"
    code, out, _ = amed_cli("-h")
    assert code == 0 and "Usage" in out and "--version" in out
    code, out, _ = amed_cli("chat", "-h")
    assert code == 0 and "--max-tokens" in out


def test_shell_completion():
    r = subprocess.run([sys.executable, "-m", "amed", "--show-completion", "bash"], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 0 and "complete -o default -F _amed_completion amed" in r.stdout
    # what bash asks when the user types `amed ch<TAB>`
    r = subprocess.run([sys.executable, "-m", "amed"], capture_output=True, text=True, timeout=60,
                       env={**ENV, "_AMED_COMPLETE": "complete_bash", "COMP_WORDS": "amed ch", "COMP_CWORD": "1"})
    assert r.stdout.split() == ["chat"]


def test_warmup_compiles_ahead(amed_cli):
    code, _, err = amed_cli("warmup")
    assert code == 0 and "kernels ready" in err


# ---- chat: -f, --stop, --json, /load, --chat-template, --no-template -----------------------------

def test_stop_strings_cut_across_pieces():
    from amed.generate import StopStrings

    c = StopStrings(["</end>", "STOP"])
    shown = [c.feed(p) for p in ("Hello wor", "ld </e", "nd> more")]
    assert "".join(shown) == "Hello world " and c.hit
    c = StopStrings(["</end>"])
    shown = [c.feed(p) for p in ("a </", "b")] + [c.flush()]
    assert "".join(shown) == "a </b" and not c.hit
    assert StopStrings([]).feed("x") == "x"


def test_prompt_file_stop_and_json(amed_cli, golden_dir, tmp_path):
    base = ["chat", "-m", golden_dir, "-n", "12", "--temp", "0"]
    code, full, err = amed_cli(*base, "-p", "hi")
    assert code == 0, err
    answer = full.rstrip("\n")
    (tmp_path / "q.txt").write_text("hi\n")
    code, out, _ = amed_cli(*base, "-f", tmp_path / "q.txt")
    assert out == full                                                    # -f FILE == -p TEXT
    stop = answer[4:7]
    code, out, _ = amed_cli(*base, "-p", "hi", "--stop", "zzzz", "--stop", stop)
    assert code == 0 and out == answer[:answer.index(stop)] + "\n"
    code, out, _ = amed_cli(*base, "-p", "hi", "--json")
    rec = json.loads(out)
    assert rec["answer"] == answer and rec["finish_reason"] == "length" and rec["generated_tokens"] == 12
    assert rec["prompt_tokens"] > 0 and rec["decode_tps"] > 0 and isinstance(rec["seed"], int)
    code, out, _ = amed_cli(*base, "-p", "hi", "--stop", stop, "--json")
    assert json.loads(out)["finish_reason"] == "stop"
    code, _, err = amed_cli(*base, "-p", "hi", "-f", tmp_path / "q.txt")
    assert code == 1 and "not both" in one_sentence(err)
    code, _, err = amed_cli(*base, "-f", tmp_path / "missing.txt")
    assert code == 1 and "cannot read the prompt file" in one_sentence(err)


def test_chat_template_override_and_raw_completion(amed_cli, golden_dir, tmp_path, monkeypatch):
    from amed.app import chat
    from amed.text.tokenizer import Tokenizer

    prompts = []
    real_stream = chat.Generator.stream

    def spy(self, ids, *a, **k):
        prompts.append(list(ids))
        return real_stream(self, ids, *a, **k)
    monkeypatch.setattr(chat.Generator, "stream", spy)
    tok = Tokenizer.from_dir(golden_dir)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:")
    base = ["chat", "-m", golden_dir, "-n", "2", "--temp", "0", "-p", "hi there"]
    assert amed_cli(*base, "--chat-template", tmp_path / "t.jinja")[0] == 0
    assert prompts[-1] == tok.encode("Q: hi there\nA:", add_bos=False)
    assert amed_cli(*base, "--no-template")[0] == 0
    assert prompts[-1] == tok.encode("hi there")
    (tmp_path / "bad.jinja").write_text("{{ broken")
    code, _, err = amed_cli(*base, "--chat-template", tmp_path / "bad.jinja")
    assert code == 1 and "does not compile" in one_sentence(err)


def test_load_a_saved_conversation(golden_dir, tmp_path, monkeypatch, capsys):
    from rich.console import Console

    from amed.app.chat import ChatSession, load_conversation, repl
    from amed.text.sampling import SamplingParams, make_sampler
    from amed.text.tokenizer import Tokenizer

    s = ChatSession(amed.load(golden_dir), Tokenizer.from_dir(golden_dir),
                    make_sampler(SamplingParams(temperature=0)), 3, 256, system="be brief",
                    err=Console(stderr=True, width=500))
    s.ask("first question", out=io.StringIO())
    s.save(str(tmp_path / "c.json"))
    s.reset()
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot"}]}')
    lines = iter([f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'c.json'}", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    repl(s)
    err = capsys.readouterr().err
    assert "is not a saved conversation" in err and "loaded 2 messages" in err
    assert s.conv.system == "be brief" and [t["role"] for t in s.conv.turns] == ["user", "assistant"]
    assert load_conversation(str(tmp_path / "c.json")).turns == s.conv.turns


# ---- bench list values ---------------------------------------------------------------------------

def test_bench_list_values(amed_cli, golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    monkeypatch.setenv("AMED_MEMBW_GBS", "20")
    code, out, err = amed_cli("bench", "-m", golden_dir, "-p", "4,6", "-n", "2", "-t", "1,2", "-r", "1",
                              "-o", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["threads"], r["test"]) for r in rows] == [(t, x) for t in (1, 2) for x in ("pp4", "tg2", "pp6")]
    code, _, err = amed_cli("bench", "-m", golden_dir, "-p", "4,x")
    assert code == 1 and "-p takes comma-separated integers" in one_sentence(err)


# ---- amed list / show / rm -------------------------------------------------------------------------

def test_list_show_rm(amed_cli, golden_store, golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = amed_cli("list")
    assert code == 0 and "no stores or checkpoints" in err
    shutil.copytree(golden_store(bits=4), tmp_path / "stores" / "tiny-q4")
    shutil.copytree(golden_store(bits=8), tmp_path / "stores" / "tiny-q8")
    (tmp_path / "stores" / "tiny-q8" / "layer-001.safetensors").unlink()
    shutil.copytree(golden_dir, tmp_path / "models" / "org--tiny")
    (tmp_path / "models" / "org--tiny" / ".amed").mkdir()
    (tmp_path / "models" / "org--tiny" / ".amed" / "download.json").write_text(json.dumps(   # what download records
        {"version": 1, "files": {p.name: {} for p in golden_dir.iterdir() if p.is_file()}, "partial": {}}))
    code, out, _ = amed_cli("list")
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert set(rows) == {"tiny-q4", "tiny-q8", "org--tiny"}
    assert "q4/g64" in rows["tiny-q4"] and "complete" in rows["tiny-q4"] and "kB" in rows["tiny-q4"]
    assert "damaged (1 file(s) missing)" in rows["tiny-q8"]
    assert "checkpoint" in rows["org--tiny"] and "bf16" in rows["org--tiny"]

    code, out, _ = amed_cli("show", "tiny-q4")
    assert code == 0 and "bits 4, group_size 64, dense q8" in out and "num_hidden_layers" in out
    assert "routed experts" in out and "source" in out
    code, _, err = amed_cli("show", "nope")
    assert code == 1 and "amed list" in one_sentence(err)

    code, _, err = amed_cli("rm", "tiny-q4")                     # stdin is not a terminal
    assert code == 1 and "-y/--yes" in one_sentence(err)
    (tmp_path / "stores" / "tiny-q8" / "notes.txt").write_text("mine")
    for name in ("tiny-q4", "tiny-q8", "org--tiny"):
        code, _, err = amed_cli("rm", name, "-y")
        assert code == 0 and "freed" in err
    assert not (tmp_path / "stores" / "tiny-q4").exists() and not (tmp_path / "models" / "org--tiny").exists()
    assert [p.name for p in (tmp_path / "stores" / "tiny-q8").iterdir()] == ["notes.txt"]
    code, _, err = amed_cli("rm", tmp_path / "stores" / "tiny-q8", "-y")
    assert code == 1 and "nothing removed" in one_sentence(err)


# ---- amed perplexity ------------------------------------------------------------------------------

def test_perplexity_and_kld(amed_cli, golden_dir, golden_store, tmp_path):
    from amed.app.bench import SAMPLE_TEXT
    from amed.app.quality import log_softmax, score
    from amed.text.tokenizer import Tokenizer

    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    code, out, err = amed_cli("perplexity", "-m", golden_dir, "-f", text, "-c", "32", "--max-tokens", "80",
                              "--json")
    assert code == 0, err
    rec = json.loads(out)
    # against a plain computation: windows 0-31, 32-63, 64-79, each scored after its first token
    m = amed.load(golden_dir)
    ids = Tokenizer.from_dir(golden_dir).encode(SAMPLE_TEXT)[:80]
    nll = n = 0
    for w in (ids[:32], ids[32:64], ids[64:80]):
        lp = log_softmax(m.logits(w))
        nll -= sum(lp[i, w[i + 1]] for i in range(len(w) - 1))
        n += len(w) - 1
    assert rec["tokens"] == n == 77 and abs(rec["perplexity"] - np.exp(nll / n)) < 1e-6 * rec["perplexity"]

    code, out, err = amed_cli("perplexity", "-m", golden_store(bits=4), "-f", text, "-c", "32",
                              "--max-tokens", "80", "--kld-base", golden_dir)
    assert code == 0, err
    assert "mean KLD" in out and "top-1 agreement" in out and "base perplexity" in out
    same = score(m, ids, 32, base=m).record()
    assert same["mean_kld"] < 1e-9 and same["top1_agreement"] == 1.0
    code, _, err = amed_cli("perplexity", "-m", golden_dir, "-f", tmp_path / "none.txt")
    assert code == 1 and "cannot read" in one_sentence(err)


# ---- synth flag letters agree with chat/bench -------------------------------------------------------

def test_synth_letters(amed_cli, tmp_path):
    code, _, err = amed_cli("synth", tmp_path / "a", "--preset", "tiny", "-L", "2", "-s", "3")
    assert code == 0 and "2 layers" in err
    code, _, err = amed_cli("synth", tmp_path / "b", "--layers", "2", "--seed", "3")      # long names as before
    assert code == 0
    assert (tmp_path / "a" / "model-00001-of-00003.safetensors").read_bytes() == \
        (tmp_path / "b" / "model-00001-of-00003.safetensors").read_bytes()
    for old, new in (("-p", "--preset"), ("-n", "-L/--layers")):
        code, _, err = amed_cli("synth", tmp_path / "c", old, "2")
        assert code == 1 and f"amed synth {old} is now {new}" in one_sentence(err)
    code, _, err = amed_cli("synth", tmp_path / "a", "-f")
    assert code == 1 and "is now --force" in one_sentence(err)


# ---- issue 25: values a new user tried ---------------------------------------------------------------

@pytest.mark.parametrize("t", ["999", "-3"])
def test_every_command_checks_threads_the_same_way(amed_cli, golden_dir, tmp_path, t):
    (tmp_path / "t.txt").write_text("some text to score")
    for args in (["chat", "-p", "hi"], ["bench"], ["perplexity", "-f", tmp_path / "t.txt"], ["serve"]):
        code, out, err = amed_cli(*args, "-m", golden_dir, "-t", t)
        assert code == 1 and "-t/--threads must be between 1 and" in one_sentence(err), args
        assert out == ""


def test_threads_and_seed_minus_one_mean_all_cores_and_random(amed_cli, golden_dir):
    assert cli.check_threads(-1) is None and cli.check_threads(0) is None        # llama.cpp: -1 = default
    code, out, err = amed_cli("chat", "-m", golden_dir, "-t", "-1", "-s", "-1", "-n", "2", "-v", "-p", "hi")
    assert code == 0, err
    assert "all threads" in err or f"{cli.max_threads()} threads" in err
    seed = int(err.split("seed ")[1].split()[0].rstrip("[]/"))
    assert seed >= 0                                                    # a fresh seed, printed to repeat the run
    code, _, err = amed_cli("chat", "-m", golden_dir, "-s", "-2", "-p", "hi")
    assert code == 1 and "-s/--seed must be 0 or more, or -1" in one_sentence(err)


def test_synth_seed_minus_one_is_random_and_printed(amed_cli, tmp_path):
    code, _, err = amed_cli("synth", tmp_path / "a", "-L", "1", "-s", "-1")
    assert code == 0, err
    seed = int(err.split("random seed ")[1].split()[0])
    code, _, err = amed_cli("synth", tmp_path / "b", "-L", "1", "-s", seed)       # the printed seed repeats it
    assert code == 0, err
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert shards and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in shards)
    code, _, err = amed_cli("synth", tmp_path / "c", "-s", "-7")
    assert code == 1 and "-s/--seed" in one_sentence(err)


def test_non_utf8_prompt_is_one_sentence(amed_cli, golden_dir):
    code, out, err = amed_cli("chat", "-m", golden_dir, stdin=b"\xff\xfe bad")
    assert code == 1 and "stdin is not UTF-8 (byte 0xff at offset 0)" in one_sentence(err) and out == ""
    code, out, err = amed_cli("chat", "-m", golden_dir, "-p", "bad \udcff byte")   # how Python keeps argv bytes
    assert code == 1 and "the prompt is not UTF-8" in one_sentence(err)
    code, out, err = amed_cli("chat", "-m", golden_dir, "-n", "2", "--temp", "0", stdin="héllo".encode())
    assert code == 0 and out.strip(), err                               # UTF-8 bytes still work


def test_non_utf8_stdin_in_a_real_pipe(golden_dir):
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(golden_dir)], input=b"\xff\xfe bad",
                       capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 1 and b"Traceback" not in r.stderr and b"not UTF-8" in r.stderr


def test_value_checks_of_chat_perplexity_and_bench(amed_cli, golden_dir, tmp_path):
    (tmp_path / "t.txt").write_text("some text to score, long enough")
    cases = [(["chat", "-c", "-5", "-p", "hi"], "-c/--ctx-size must be 16 or more"),
             (["perplexity", "-f", tmp_path / "t.txt", "--max-tokens", "-5"], "--max-tokens must be 2 or more"),
             (["perplexity", "-f", tmp_path / "t.txt", "-c", "-5"], "-c/--ctx-size must be 2 or more"),
             (["bench", "-p", "0", "-n", "0"], "nothing to measure"),
             (["bench", "-p", "0,0", "-n", "0"], "nothing to measure"),
             (["bench", "--bits", "3"], "--bits goes with --synthetic"),
             (["bench", "--layers", "2", "--experts", "4"], "--layers, --experts go with --synthetic"),
             (["bench", "-c", "-5"], "-c/--ctx-size must be 1 or more")]
    for args, message in cases:
        code, out, err = amed_cli(*args, "-m", golden_dir)
        assert code == 1 and message in one_sentence(err) and out == "", args
    code, _, err = amed_cli("bench", "--synthetic", "tiny", "--bits", "3")
    assert code == 1 and "--bits must be 4 or 8" in one_sentence(err)


def test_bench_unknown_synthetic_preset_builds_nothing(amed_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    code, _, err = amed_cli("bench", "--synthetic", "bogus")
    assert code == 1 and "unknown preset 'bogus'" in one_sentence(err) and "building" not in err
    assert not (tmp_path / "bench").exists()


def test_bench_checks_the_context_before_loading(amed_cli, golden_dir, monkeypatch):
    """-d 99999999 ran for 10+ minutes at 3.2 GB with no output: now one sentence, before the load."""
    import time

    def no_load(*a, **k):
        raise AssertionError("loaded the model")
    monkeypatch.setattr(amed, "load", no_load)
    t = time.perf_counter()
    code, out, err = amed_cli("bench", "-m", golden_dir, "-d", "99999999")
    assert code == 1 and out == "" and time.perf_counter() - t < 10
    line = one_sentence(err)
    assert "need 100000511 tokens of context" in line and "4096 tokens the model was trained on" in line
    code, _, err = amed_cli("bench", "-m", golden_dir, "-d", "100", "-p", "4000", "-n", "20")   # -p counts too
    assert code == 1 and "need 4100 tokens" in one_sentence(err)
    code, _, err = amed_cli("bench", "-m", golden_dir, "-c", "100", "-p", "64", "-n", "8", "-d", "40")
    assert code == 1 and "need 104 tokens" in one_sentence(err) and "more than -c 100" in err
    # past the trained context only with -c, and only as far as memory allows
    code, _, err = amed_cli("bench", "-m", golden_dir, "-c", "20000000000", "-d", "9999999999")
    assert code == 1 and "of memory available" in one_sentence(err)


def test_bench_context_arithmetic(golden_dir):
    from amed.app.bench import BenchPlan, check_context, context_needed
    from amed.config import ModelConfig

    assert context_needed(BenchPlan(n_prompt=[512], n_gen=[128], depth=4096)) == 4096 + 512
    assert context_needed(BenchPlan(n_prompt=[0], n_gen=[600], depth=10)) == 10 + 601
    assert context_needed(BenchPlan(n_prompt=[2], n_gen=[0])) == 9          # the kernel warm-up
    cfg = ModelConfig.from_file(golden_dir)
    assert check_context(BenchPlan(n_prompt=[8], n_gen=[4], depth=20), cfg, available=1 << 30) == 28
    with pytest.raises(amed.errors.AmedError, match="of memory available"):
        check_context(BenchPlan(n_prompt=[8], n_gen=[4], depth=20), cfg, available=1000)


def test_bench_ctx_size_has_help_and_an_effect(amed_cli, golden_dir, tmp_path, monkeypatch):
    from typer.main import get_command

    bench = get_command(cli.app).commands["bench"]
    assert [p.help for p in bench.params if p.name == "ctx_size"][0]
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    monkeypatch.setenv("AMED_MEMBW_GBS", "20")
    # the golden model was trained on 4096 tokens: -c lets a bench run past that, with a warning
    code, out, err = amed_cli("bench", "-m", golden_dir, "-c", "5000", "-d", "4100", "-p", "4", "-n", "1",
                              "-r", "1", "-o", "json")
    assert code == 0, err
    assert "above the 4096 tokens the model was trained on" in err
    assert [r["test"] for r in json.loads(out)] == ["pp4 @ d4100", "tg1 @ d4100"]


def test_long_context_prefill_shows_progress(golden_dir):
    """The -d context prefill reports its progress: a bar on a terminal, lines in a log."""
    from rich.console import Console

    from amed.app.bench import run_bench
    from amed.app.progress import Counted
    from amed.text.tokenizer import Tokenizer

    m = amed.load(golden_dir, ctx_size=1100)
    seen = []
    run_bench(m, Tokenizer.from_dir(golden_dir), n_prompt=4, n_gen=1, reps=1, depth=1030,
              progress=lambda done, total: seen.append((done, total)))
    assert seen[-3:] == [(512, 1030), (1024, 1030), (1030, 1030)]
    buf = io.StringIO()
    log = Console(file=buf, force_terminal=False, width=200)
    with Counted(log, "context (-d) prefill", "tokens", every=0) as bar:
        for done in (512, 1024, 1030):
            bar.update(done, 1030)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("context (-d) prefill: 512/1030 tokens")


def test_compile_progress_lines_for_a_log():
    """Outside a terminal the first compile printed one line and then a minute of nothing: now a line
    per kernel compiled (only amed's own kernels, once a kernel and the helpers it compiles are done)."""
    import numba
    from rich.console import Console

    from amed.app.progress import compile_progress

    def helper(x):
        return x + 1

    def kernel(x):
        return inner(x) * 2

    def outside(x):
        return x - 1
    helper.__module__ = kernel.__module__ = "amed.engine.testkernels"
    inner = numba.njit(helper)
    buf = io.StringIO()
    with compile_progress(Console(file=buf, force_terminal=False, width=200)) as seen:
        assert numba.njit(kernel)(1) == 4
        assert numba.njit(outside)(1) == 0           # not amed's: not counted
    with compile_progress(Console(file=buf, force_terminal=False, width=200)):
        pass
    numba.njit(kernel)(2)                             # after the context: not reported
    lines = buf.getvalue().splitlines()
    assert seen.done == 1 and len(lines) == 1, lines
    assert lines[0].startswith("compiling kernels: 1 compiled (kernel), ")


def test_help_shows_no_bool_or_braces(amed_cli):
    code, out, _ = amed_cli("chat", "-h")
    assert code == 0 and "--verbose" in out and "<bool>" not in out
    code, out, _ = amed_cli("verify", "-h")
    assert code == 0 and "{" not in out and "STORE" in out
    code, out, _ = amed_cli("run", "-h")
    assert code == 0 and "NAME [PROMPT]..." in out and "<list" not in out


# ---- amed run NAME [PROMPT] (ollama's run) ----------------------------------------------------------

def test_run_by_name_one_shot_is_chat(amed_cli, golden_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    shutil.copytree(golden_dir, tmp_path / "models" / "org--tiny")
    base = ["-n", "6", "--temp", "0"]
    code, want, err = amed_cli("chat", "-m", golden_dir, *base, "-p", "what helps a fever")
    assert code == 0, err
    code, out, err = amed_cli("run", "org--tiny", "what", "helps", "a", "fever", *base)
    assert code == 0, err
    assert out == want and "not medical advice" in err                  # the same chat, answer only on stdout
    # text piped on stdin goes before the prompt words (`cat notes | ollama run NAME summarize`)
    code, want, _ = amed_cli("chat", "-m", golden_dir, *base, "-p", "my notes\n\nsummarize")
    code, out, _ = amed_cli("run", "org--tiny", "summarize", *base, stdin="my notes\n")
    assert code == 0 and out == want
    code, out, _ = amed_cli("run", "org--tiny", *base, stdin="what helps a fever")   # no words: stdin is it
    assert code == 0 and out.strip()
    code, out, err = amed_cli("run", "no-such-model", "hi")
    assert code == 1 and "no model 'no-such-model'" in one_sentence(err) and out == ""
