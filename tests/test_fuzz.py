"""Acceptance for issue 26 ("a file is untrusted input"): seeded random mutations of checkpoint and
store files, each run as a user would (verify, tokenizer + chat template, load + one forward):
0 crashes, 0 hangs, 0 tracebacks, every refusal one sentence. The mutations and the classifier
are bench/fuzz_files.py (whose larger run is `python bench/fuzz_files.py -n 400`); here a
smaller seeded run in a worker process, plus a few cases through the real CLI in subprocesses
with timeouts."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_files", ROOT / "bench" / "fuzz_files.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_mutated_files_never_crash_hang_or_traceback(tmp_path):
    fz = _fuzz()
    cases = fz.plan_cases(seed=26, n=240)
    results = fz.run(cases, tmp_path, timeout_per_case=60)
    counts = Counter(r["class"] for r in results)
    print("fuzz classes:", dict(counts))
    bugs = [r for r in results if r["class"] in fz.BUGS]
    assert not bugs, "\n".join(f"{r['class']} {r['case']} {r.get('what')} {r.get('steps') or r.get('detail')}"
                               for r in bugs[:10])
    assert len(results) == len(cases)
    assert counts["refused"] > len(cases) // 2          # the mutations do bite
    # every kind of mutation ran
    assert {r["case"][1] for r in results} == set(fz.MUTATORS)


def test_fuzz_through_the_cli_in_subprocesses(tmp_path):
    """A few seeded cases through `amed chat` / `amed verify` in subprocesses with a timeout: exit 0,
    or exit 1 with one `error:` line; never a traceback, a signal or a hang."""
    fz = _fuzz()
    results = fz.run_cli(fz.plan_cases(seed=2600, n=8), tmp_path, timeout=60)
    bugs = [r for r in results if r["class"] in fz.BUGS]
    assert not bugs, "\n".join(f"{r['class']} {r['case']} {r.get('what')} {r.get('steps')}" for r in bugs)
    assert len(results) == 8


def _amed(args, timeout=90, **env):
    return subprocess.run([sys.executable, "-m", "amed", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def _one_sentence(r):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-2000:]
    return errors[0]


@pytest.fixture
def store_copy(golden_store, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), dst)
    return dst


def _edit_manifest(d, fn):
    man = json.loads((d / "amed-manifest.json").read_text())
    fn(man)
    (d / "amed-manifest.json").write_text(json.dumps(man))


def test_cli_fifo_shard_and_bad_stride(store_copy):
    """Through the CLI: a FIFO as a store file (was a hang) and experts.stride = 10**9 under mmap
    expert I/O with --max-ram 1M (was SIGSEGV) are each one sentence and exit 1."""
    f = store_copy / "layer-002.safetensors"
    f.unlink()
    os.mkfifo(f)
    assert "FIFO" in _one_sentence(_amed(["chat", "-m", str(store_copy), "-p", "hi", "-n", "2"]))
    f.unlink()
    f.write_bytes(b"")
    _edit_manifest(store_copy, lambda m: m["experts"]["1"].__setitem__("stride", 10**9))
    line = _one_sentence(_amed(["chat", "-m", str(store_copy), "-p", "hi", "-n", "2", "--max-ram", "1M"],
                               AMED_EXPERT_IO="mmap"))
    assert "layer-002.safetensors" in line or "manifest" in line


def test_cli_verify_bad_byte_count(store_copy):
    _edit_manifest(store_copy, lambda m: m["files"]["globals.safetensors"].__setitem__("bytes", -1))
    assert "bytes" in _one_sentence(_amed(["verify", str(store_copy)]))


def test_cli_hostile_chat_template(store_copy):
    cfg = json.loads((store_copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (store_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "chat template" in _one_sentence(_amed(["chat", "-m", str(store_copy), "-p", "hi", "-n", "2"]))
