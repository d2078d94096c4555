"""Model arguments and model management as a new user meets them (issue 25 items 5-8, 10, 12):
one resolver for every command's model argument, `amed list` after `make demo`, `list --json` and
pipe-safe tables, repair advice that names the command that really repairs, `verify` and `-o ''`
answers, a synthetic tokenizer that decodes every id, and `rm`'s prompt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amed.app import cli, models
from amed.app.synth import tokenizer_json, write_synthetic_checkpoint
from amed.errors import AmedError
from amed.quant.convert import Settings, quantize_model

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.delenv("AMED_MODEL", raising=False)
    monkeypatch.setenv("AMED_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", preset="tiny", layers=2)


@pytest.fixture
def home_store(ckpt, tmp_path) -> Path:
    st = tmp_path / "home" / "stores" / "tiny-q4"
    quantize_model(ckpt, st, Settings())
    return st


def one_sentence(err: str) -> str:
    """The error line (after any progress bar): one sentence, no traceback."""
    assert "Traceback" not in err and "error: " in err, err
    return err[err.index("error: "):]


# ---- one resolver (item 5) -------------------------------------------------------------------------

def test_resolver_paths_names_and_env(home_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.resolve("tiny-q4") == home_store                       # a name from `amed list`
    assert models.resolve(str(home_store)) == home_store                 # a path
    assert models.resolve("home/stores/tiny-q4") == Path("home/stores/tiny-q4")
    for bad, words in (("nope", "amed list"), ("./nope", "does not exist"), ("..", "does not exist"),
                       ("x.gguf", "does not exist"), ("ollama:llama3", "ollama has no model")):
        if bad == "..":
            continue                                                     # `..` is a path (here: it exists)
        with pytest.raises(AmedError, match=words):
            models.resolve(bad)
    monkeypatch.setenv("AMED_MODEL", "tiny-q4")                          # AMED_MODEL takes names too
    assert models.resolve_model(None, tmp_path / "default") == home_store
    monkeypatch.setenv("AMED_MODEL", "nope")
    with pytest.raises(AmedError, match="AMED_MODEL=nope"):
        models.resolve_model(None, tmp_path / "default")
    monkeypatch.delenv("AMED_MODEL")
    with pytest.raises(AmedError, match="no model given"):
        models.resolve_model(None, tmp_path / "default")


def test_every_model_argument_takes_a_name(amed_run, home_store, tmp_path, monkeypatch):
    """cli.resolve_model is what chat, serve, bench and perplexity call for -m and AMED_MODEL."""
    assert cli.resolve_model(Path("tiny-q4")) == home_store
    monkeypatch.setenv("AMED_MODEL", "tiny-q4")
    assert cli.resolve_model(None) == home_store
    code, _, err = amed_run("verify", "tiny-q4")
    assert code == 0 and "ok" in err
    code, out, _ = amed_run("show", "tiny-q4")
    assert code == 0 and str(home_store) in out
    text = tmp_path / "t.txt"
    text.write_text("The patient has a headache and a mild fever.")
    code, out, err = amed_run("perplexity", "-m", "tiny-q4", "-f", text, "-c", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == str(home_store)
    code, _, err = amed_run("bench", "-m", "nope", "-p", "4", "-n", "0")
    assert code == 1 and "amed list" in one_sentence(err)


# ---- list after the demo, --json, piped tables (item 6) ------------------------------------------------

def test_list_shows_the_demo_models_and_json(amed_run, ckpt, tmp_path):
    """bench/demo.sh writes under $AMED_HOME/demo, where `amed list` looks."""
    script = (TESTS.parent / "bench" / "demo.sh").read_text()
    assert 'amed_home()' in script and '/demo}"' in script
    demo = tmp_path / "home" / "demo"
    shutil.copytree(ckpt, demo / "tiny-bf16")
    quantize_model(ckpt, demo / "tiny-q4", Settings())
    code, out, _ = amed_run("list")
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert set(rows) == {"tiny-bf16", "tiny-q4"}
    code, out, _ = amed_run("list", "--json")
    data = json.loads(out)
    assert {d["name"]: d["kind"] for d in data} == {"tiny-bf16": "checkpoint", "tiny-q4": "store"}
    assert {d["path"] for d in data} == {str(demo / "tiny-bf16"), str(demo / "tiny-q4")}
    assert all(isinstance(d["size"], int) and d["status"] == "complete" for d in data)
    assert models.resolve("tiny-q4") == demo / "tiny-q4"


def test_list_piped_keeps_long_paths_whole(tmp_path, ckpt):
    long = tmp_path / ("a-very-long-folder-name-" * 6) / "home"
    quantize_model(ckpt, long / "stores" / "s", Settings())
    env = {**os.environ, "AMED_HOME": str(long), "COLUMNS": "40"}
    r = subprocess.run([sys.executable, "-m", "amed", "list"], capture_output=True, text=True, env=env)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2                        # a header and one row, no wrapping
    assert lines[1].endswith(str(long / "stores" / "s"))
    assert lines[0].index("PATH") == lines[1].index(str(long))          # columns aligned


def test_show_columns_aligned(amed_run, home_store):
    code, out, _ = amed_run("show", "tiny-q4")
    import re

    starts = {re.match(r"\S+(?: \S+)*\s{2,}", ln).end() for ln in out.splitlines()}   # where each value starts
    assert code == 0 and len(starts) == 1


# ---- repair advice (item 7) --------------------------------------------------------------------------

def test_repair_advice_of_a_synth_store_is_the_synth_command(amed_run, tmp_path):
    st = tmp_path / "syn"
    assert amed_run("synth", st, "--bits", "4", "--layers", "2", "--seed", "3")[0] == 0
    (st / "layer-001.safetensors").write_bytes(b"x")
    code, _, err = amed_run("verify", st)
    assert code == 1 and f"amed synth {st} --preset tiny --layers 2 --seed 3" in one_sentence(err)
    assert "amed quantize" not in err
    (st / "layer-001.safetensors").unlink()                             # what the advice says: delete, re-run
    cmd = err.split("`")[1].split()[1:]
    assert amed_run(*cmd)[0] == 0
    assert amed_run("verify", st)[0] == 0


def test_damaged_tokenizer_in_a_store_says_how_to_restore_it(amed_run, ckpt, tmp_path):
    from amed.text.tokenizer import Tokenizer

    st = tmp_path / "store"
    quantize_model(ckpt, st, Settings())
    (st / "tokenizer.json").write_text("{broken")
    with pytest.raises(AmedError) as e:
        Tokenizer.from_dir(st)
    msg = str(e.value)
    assert "re-download" not in msg and "delete it" in msg and f"amed quantize CHECKPOINT -o {st}" in msg
    code, _, err = amed_run("verify", st)
    assert code == 1 and "tokenizer.json" in one_sentence(err) and "amed quantize" in err
    (st / "tokenizer.json").unlink()                                    # delete, re-run quantize: restored
    assert amed_run("quantize", ckpt, "-o", st)[0] == 0
    assert (st / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert amed_run("verify", st)[0] == 0


# ---- verify and -o answers (item 8) ----------------------------------------------------------------------

def test_verify_missing_path_and_file(amed_run, ckpt, tmp_path):
    code, _, err = amed_run("verify", tmp_path / "nonexist")
    assert code == 1 and "does not exist" in one_sentence(err)
    code, _, err = amed_run("verify", ckpt / "config.json")
    assert code == 1 and "is a file, not a store directory" in one_sentence(err)
    assert "Not a directory" not in err
    code, _, err = amed_run("verify", ckpt)
    assert code == 1 and "not an amed store" in one_sentence(err)


def test_empty_output_path_refused(amed_run, ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (("quantize", ckpt, "-o", ""), ("synth", ""), ("synth", "", "--bits", "4"),
                 ("download", "--quantize", "4", "-o", "")):
        code, _, err = amed_run(*args)
        assert code == 1 and "is empty" in one_sentence(err)
    assert list(tmp_path.iterdir()) == []


# ---- the synthetic tokenizer covers its vocab (item 10) ---------------------------------------------

def test_mini_tokenizer_decodes_every_id():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json(157184))
    assert tok.get_vocab_size() == 157184
    ids = list(range(2000, 157184, 5003))[:30]
    text = tok.decode(ids)
    assert len(text.split()) == len(ids)                                # 30 tokens: 30 visible words
    assert tok.decode([157183]).strip()
    # the trained part is unchanged: encoding never produces a filler id
    small = Tokenizer.from_str(tokenizer_json())
    sample = "What should I do for a headache? 38.5 °C"
    assert tok.encode(sample).ids == small.encode(sample).ids
    # tiny keeps its small padding past the tokenizer (a model vocab larger than the tokenizer's)
    assert Tokenizer.from_str(tokenizer_json(1024)).get_vocab_size() < 1024


# ---- rm (item 12) -------------------------------------------------------------------------------------------

def test_rm_handles_a_synth_checkpoint_and_no_is_not_an_error(amed_run, tmp_path):
    d = tmp_path / "home" / "models" / "syn"
    assert amed_run("synth", d, "--layers", "2")[0] == 0
    code, out, _ = amed_run("list")
    assert "syn" in out
    code, _, err = amed_run("rm", "syn", stdin="n\n", tty=True)
    assert code == 0 and "nothing removed" in err and "error" not in err
    assert d.exists()
    code, _, err = amed_run("rm", "syn", stdin="y\n", tty=True)
    assert code == 0 and "freed" in err and not d.exists()
