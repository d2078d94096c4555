"""`amed bench`: llama-bench-style rows as data on stdout, the extra columns, and -d (depth)."""

import json
import os
import subprocess
import sys

import amed
import pytest
from amed.app.bench import run_bench
from amed.text.tokenizer import Tokenizer

ENV = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}


@pytest.mark.slow
def test_bench_json_rows_at_depth(golden_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run([sys.executable, "-m", "amed", "bench", "-m", str(golden_dir), "-p", "8", "-n", "4",
                        "-r", "2", "-d", "20", "-o", "json"], capture_output=True, text=True,
                       env={**ENV, "AMED_HOME": str(home), "AMED_MEMBW_GBS": "20"}, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["test"] for row in rows] == ["pp8 @ d20", "tg4 @ d20"]
    for row in rows:
        assert row["tps_mean"] > 0 and row["peak_rss_gb"] > 0 and 0 < row["compile_s"] < 300
    tg = rows[1]
    assert tg["bytes_per_token"] > 0 and tg["mem_bw_gbs"] == 20.0 and 0 < tg["pct_bw"]
    assert "Traceback" not in r.stderr


def test_depth_keeps_the_context_between_tests(golden_dir):
    m = amed.load(golden_dir, ctx_size=128)
    tok = Tokenizer.from_dir(golden_dir)
    seen = []
    forward = m.forward

    def spy(ids, **kw):
        seen.append((m.pos, len(ids)))
        return forward(ids, **kw)

    m.forward = spy
    run_bench(m, tok, n_prompt=6, n_gen=3, reps=2, depth=30)
    timed = [(pos, n) for pos, n in seen if n == 6]
    assert timed[-2:] == [(30, 6), (30, 6)]                  # every timed prefill starts at depth 30
    assert sum(1 for pos, n in seen if pos == 0 and n == 30) == 1   # the context is prefilled once



def test_warm_up_runs_the_whole_prompt_once(golden_dir):
    """Like llama-bench: the untimed warm-up runs the whole prompt, so the first timed repetition
    does not pay the first mapping of every expert; warm_prompt=False (--cold) keeps it short."""
    m = amed.load(golden_dir, ctx_size=128)
    tok = Tokenizer.from_dir(golden_dir)
    for warm, extra in ((True, 12), (False, 0)):
        before = m.tokens_forwarded
        run_bench(m, tok, n_prompt=12, n_gen=2, reps=1, warm_prompt=warm)
        # compile warm-up 8 + 1, the warm prompt, then pp12 and tg2 (one token to start, two timed)
        assert m.tokens_forwarded - before == 8 + 1 + extra + 12 + 1 + 2

@pytest.mark.slow
def test_bench_bounded_cache_reports_the_disk_ceiling(tmp_path):
    """Under --max-ram the decode rows carry the cache columns, and the ceiling is the missed bytes
    per token at the disk speed (the faster of the probes before and after the run)."""
    from amed.app.synth import SyntheticSource
    from amed.quant.convert import Settings, quantize_model

    store = tmp_path / "store"
    quantize_model(SyntheticSource(preset="tiny"), store, Settings(bits=4))
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run([sys.executable, "-m", "amed", "bench", "-m", str(store), "-p", "4", "-n", "6", "-r", "1",
                        "--max-ram", "1M", "--random-ids", "-o", "json"], capture_output=True, text=True,
                       env={**ENV, "AMED_HOME": str(home), "AMED_MEMBW_GBS": "20"}, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    tg = [row for row in json.loads(r.stdout) if row["test"].startswith("tg")][0]
    assert tg["cache_budget"] != "all" and 0 <= tg["hit_rate"] <= 1 and tg["miss_bytes_per_token"] > 0
    if tg["disk_gbs"]:            # None where the filesystem cannot bypass the page cache (tmpfs)
        assert abs(tg["ceiling_tps"] - tg["disk_gbs"] * 1e9 / tg["miss_bytes_per_token"]) < 1e-6 * tg["ceiling_tps"]


def test_memory_bandwidth_probe_measures():
    """The probe itself (bench runs it each time; tests skip it with AMED_MEMBW_GBS): a sum over
    64 MiB at some positive, finite rate, and the environment figure is checked."""
    import math

    from amed.app.bench import memory_bandwidth_gbs

    gbs = memory_bandwidth_gbs(64 << 20)
    assert math.isfinite(gbs) and 0.1 < gbs < 1e4


def test_memory_bandwidth_from_environment(monkeypatch):
    from rich.console import Console

    from amed.app.bench import bandwidth_for_bench
    from amed.errors import AmedError

    monkeypatch.setenv("AMED_MEMBW_GBS", "42.5")
    assert bandwidth_for_bench(Console(stderr=True)) == (42.5, "from AMED_MEMBW_GBS")
    monkeypatch.setenv("AMED_MEMBW_GBS", "fast")
    with pytest.raises(AmedError, match="AMED_MEMBW_GBS"):
        bandwidth_for_bench(Console(stderr=True))
