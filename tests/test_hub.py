"""`amed download` end to end against a loopback fake hub (tests/hubserver.py): the real huggingface_hub client
code lists the repo and builds URLs/headers; amed moves the bytes. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections import namedtuple
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  (before any test sets HF_HUB_OFFLINE: read once, at import)
import pytest

from amed import hub
from amed.errors import AmedError
from hubserver import FakeHub, fake_hub, synthetic_checkpoint  # noqa: F401  (fixture)

REPO = "MedAIBase/AntAngelMed"
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
WANTED = {"README.md", "config.json", "generation_config.json", S1, S2, "model.safetensors.index.json",
          "tokenizer.json", "tokenizer_config.json"}
FAST = dict(backoff=0.001)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "AMED_HOME"):
        monkeypatch.delenv(var, raising=False)


def plan_of(fake, **kw) -> hub.Plan:
    return hub.list_files(REPO, endpoint=fake.url, **kw)


def entry(plan, path) -> hub.RemoteFile:
    return next(f for f in plan.files if f.path == path)


def assert_same_files(fake, d: Path, paths=WANTED):
    repo = fake.repos[REPO]
    for p in paths:
        assert (d / p).read_bytes() == repo.files[p], p
    assert not list(d.rglob("*.part"))


# ---------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------
def test_list_files_default_patterns_sizes_and_hashes(fake_hub):
    plan = plan_of(fake_hub)
    repo = fake_hub.repos[REPO]
    assert {f.path for f in plan.files} == WANTED  # no *.py, *.bin, images
    assert plan.commit == repo.sha
    s1 = entry(plan, S1)
    assert s1.size == len(repo.files[S1])
    assert s1.sha256 == hashlib.sha256(repo.files[S1]).hexdigest()
    assert f"/resolve/{repo.sha}/{S1}" in s1.url
    assert entry(plan, "config.json").git_oid and entry(plan, "config.json").sha256 is None
    assert [r.path.split("?")[0] for r in fake_hub.log] == [f"/api/models/{REPO}/revision/main"]


def test_include_exclude_and_never_fetch(fake_hub):
    plan = plan_of(fake_hub, include=["*.safetensors", "*.py", "*.bin"], exclude=[S2])
    assert [f.path for f in plan.files] == [S1]  # code and pickles are never fetched, even when asked
    with pytest.raises(AmedError, match="no file .* matches"):
        plan_of(fake_hub, include=["*.py"])


def test_path_traversal_refused(fake_hub):
    fake_hub.add_repo("evil/repo", {"../../escape.json": b"{}"})
    with pytest.raises(AmedError, match="leaves the download directory"):
        hub.list_files("evil/repo", endpoint=fake_hub.url)


# ---------------------------------------------------------------------------------------------
# download, skip, verify
# ---------------------------------------------------------------------------------------------
def test_full_download_then_rerun_fetches_and_hashes_nothing(fake_hub, tmp_path, monkeypatch):
    d = tmp_path / "m"
    hub.download(plan_of(fake_hub), d, **FAST)
    assert_same_files(fake_hub, d)
    assert not (d / "modeling_bailing_moe_v2.py").exists() and not (d / "pytorch_model.bin").exists()
    # every LFS body came through the CDN hop, whole, once
    assert fake_hub.ranges(S1) == [None] and fake_hub.ranges(S2) == [None]

    hashed = []
    monkeypatch.setattr(hub, "_hash_into", lambda *a, **k: hashed.append(a))
    fake_hub.log.clear()
    hub.download(plan_of(fake_hub), d, **FAST)
    assert fake_hub.file_gets() == [] and hashed == []


def test_download_file_one_at_a_time_with_progress(fake_hub, tmp_path):
    plan = plan_of(fake_hub)
    seen = []
    path = hub.download_file(entry(plan, S2), tmp_path, progress=seen.append)
    assert path == tmp_path / S2 and path.read_bytes() == fake_hub.repos[REPO].files[S2]
    assert sum(seen) == path.stat().st_size
    assert hub.is_verified(entry(plan, S2), tmp_path) and not hub.is_verified(entry(plan, S1), tmp_path)
    assert hub.bytes_needed(plan, tmp_path) == plan.total_bytes - path.stat().st_size


def test_corrupted_file_is_detected_deleted_and_refetched_later(fake_hub, tmp_path):
    d = tmp_path / "m"
    fake_hub.corrupt(S2)
    with pytest.raises(AmedError, match=rf"{S2}.*deleted"):
        hub.download(plan_of(fake_hub), d, **FAST)
    assert not (d / S2).exists() and not (d / (S2 + ".part")).exists()
    assert_same_files(fake_hub, d, WANTED - {S2})  # the other files still finished

    fake_hub.corrupt(S2, on=False)
    fake_hub.log.clear()
    hub.download(plan_of(fake_hub), d, **FAST)
    assert_same_files(fake_hub, d)
    assert {r.file for r in fake_hub.file_gets()} == {S2}


def test_local_file_changed_after_verification_is_rehashed_and_refetched(fake_hub, tmp_path):
    hub.download(plan_of(fake_hub), tmp_path, **FAST)
    p = tmp_path / S1
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    fake_hub.log.clear()
    hub.download(plan_of(fake_hub), tmp_path, **FAST)
    assert_same_files(fake_hub, tmp_path)
    assert {r.file for r in fake_hub.file_gets()} == {S1}


def test_existing_correct_file_without_record_is_verified_not_refetched(fake_hub, tmp_path):
    (tmp_path / S1).write_bytes(fake_hub.repos[REPO].files[S1])  # e.g. from an earlier `hf download`
    hub.download(plan_of(fake_hub), tmp_path, **FAST)
    assert fake_hub.gets(S1) == []
    assert_same_files(fake_hub, tmp_path)


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def test_connection_drop_resumes_within_the_call(fake_hub, tmp_path):
    fake_hub.cut(S1, 150_000)
    hub.download(plan_of(fake_hub), tmp_path, **FAST)
    assert_same_files(fake_hub, tmp_path)
    assert fake_hub.ranges(S1) == [None, "bytes=150000-"]
    assert fake_hub.bytes_served[S1] == len(fake_hub.repos[REPO].files[S1])  # nothing fetched twice


def test_failed_run_resumes_on_the_next_call_from_the_part_file(fake_hub, tmp_path):
    size = len(fake_hub.repos[REPO].files[S1])
    fake_hub.cut(S1, 150_000)
    with pytest.raises(AmedError, match="re-run to resume"):
        hub.download(plan_of(fake_hub, include=[S1]), tmp_path, retries=0, **FAST)
    part = tmp_path / (S1 + ".part")
    assert part.stat().st_size == 150_000 and not (tmp_path / S1).exists()

    hub.download(plan_of(fake_hub, include=[S1]), tmp_path, **FAST)
    assert_same_files(fake_hub, tmp_path, {S1})
    assert fake_hub.ranges(S1) == [None, "bytes=150000-"]
    assert [r.sent for r in fake_hub.gets(S1)] == [150_000, size - 150_000]


def test_ctrl_c_keeps_the_bytes_and_the_next_call_resumes(fake_hub, tmp_path):
    f = entry(plan_of(fake_hub), S1)
    got = []

    def progress(n):
        got.append(n)
        if sum(got) >= 100_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.download_file(f, tmp_path, progress=progress)
    have = (tmp_path / (S1 + ".part")).stat().st_size
    assert have == sum(got) >= 100_000

    hub.download_file(f, tmp_path)
    assert_same_files(fake_hub, tmp_path, {S1})
    assert fake_hub.ranges(S1)[-1] == f"bytes={have}-"
    assert fake_hub.gets(S1)[-1].sent == f.size - have


def test_sigkill_then_resume(fake_hub, tmp_path):
    """A real `kill -9` of the CLI mid-file: the next run asks only for the missing bytes."""
    fake_hub.throttle = 400_000  # bytes/s, so the 400 kB shard takes about a second
    d = tmp_path / "m"
    env = {**os.environ, "HF_ENDPOINT": fake_hub.url, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "amed", "download", "--local-dir", str(d), "--include", S1],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = d / (S1 + ".part")
    deadline = time.time() + 15
    try:
        while time.time() < deadline and not (part.exists() and part.stat().st_size >= 100_000):
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    have = part.stat().st_size
    assert 100_000 <= have < len(fake_hub.repos[REPO].files[S1])

    fake_hub.throttle = None
    hub.download(plan_of(fake_hub, include=[S1]), d, **FAST)
    assert_same_files(fake_hub, d, {S1})
    assert fake_hub.ranges(S1)[-1] == f"bytes={have}-"


def test_stale_part_from_another_version_is_discarded(fake_hub, tmp_path):
    (tmp_path / (S1 + ".part")).write_bytes(b"x" * 1000)  # not recorded as a partial of this file version
    hub.download(plan_of(fake_hub, include=[S1]), tmp_path, **FAST)
    assert_same_files(fake_hub, tmp_path, {S1})
    assert fake_hub.ranges(S1) == [None]


def test_transient_errors_are_retried_with_backoff(fake_hub, tmp_path):
    fake_hub.fail(S1, 503, times=2)
    fake_hub.fail("config.json", 429, times=1)
    fake_hub.cut(S2, 150_000, mode="reset")  # TCP reset: unread bytes in flight are lost, the rest resumes
    hub.download(plan_of(fake_hub), tmp_path, **FAST)
    assert_same_files(fake_hub, tmp_path)
    first, second = fake_hub.gets(S2)
    assert first.headers.get("range") is None and second.sent == len(fake_hub.repos[REPO].files[S2]) - int(
        (second.headers.get("range") or "bytes=0-")[6:-1])


def test_retries_are_bounded(fake_hub, tmp_path):
    fake_hub.fail(S1, 502, times=100)
    with pytest.raises(AmedError, match=rf"downloading {S1} failed after 2 retries"):
        hub.download(plan_of(fake_hub, include=[S1]), tmp_path, retries=2, **FAST)
    assert len([r for r in fake_hub.log if r.method == "GET" and r.file == S1 and r.path.startswith("/cdn/")]) == 3


# ---------------------------------------------------------------------------------------------
# refusals and errors: one sentence each
# ---------------------------------------------------------------------------------------------
def test_not_enough_disk_space_refused_before_any_download(fake_hub, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(tmp_path / "m"))
    assert code == 1
    assert "not enough disk space" in errtext and "needs 801.5 kB more" in errtext and "5.0 kB is free" in errtext
    assert "--include/--exclude" in errtext and "--local-dir" in errtext
    assert fake_hub.file_gets() == []


def test_unknown_repo(fake_hub):
    with pytest.raises(AmedError, match=r"repository nobody/nothing was not found on http://127\.0\.0\.1"):
        hub.list_files("nobody/nothing", endpoint=fake_hub.url)


def test_unknown_revision(fake_hub):
    with pytest.raises(AmedError, match="revision 'v9' was not found in MedAIBase/AntAngelMed"):
        plan_of(fake_hub, revision="v9")


def test_gated_repo_needs_a_token(fake_hub, tmp_path):
    fake_hub.add_repo("org/gated", gated=True)
    plan = hub.list_files("org/gated", endpoint=fake_hub.url, token=False)
    with pytest.raises(AmedError, match=r"org/gated is gated: accept its terms at http://127\.0\.0\.1:\d+/org/gated"):
        hub.check_access(plan, token=False)
    with pytest.raises(AmedError, match="org/gated is gated"):  # the file GET says the same
        hub.download_file(entry(plan, "config.json"), tmp_path, token=False)
    plan = hub.list_files("org/gated", endpoint=fake_hub.url, token="hf_good_token")
    hub.check_access(plan, token="hf_good_token")
    fake_hub.log.clear()
    hub.download(plan, tmp_path, token="hf_good_token", **FAST)
    assert (tmp_path / S1).read_bytes() == fake_hub.repos["org/gated"].files[S1]
    assert all(r.headers.get("authorization") == "Bearer hf_good_token" for r in fake_hub.file_gets())


def test_hub_unreachable(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AmedError, match=rf"cannot reach the hub at http://127\.0\.0\.1:{port} \(ConnectError"):
        hub.list_files(REPO, endpoint=f"http://127.0.0.1:{port}")


def test_offline_mode(fake_hub, tmp_path, monkeypatch, capsys):
    d = tmp_path / "m"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(d))
    assert code == 1 and "offline mode is on (HF_HUB_OFFLINE)" in errtext
    assert fake_hub.log == []

    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.download(plan_of(fake_hub), d, **FAST)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(d))
    assert code == 0 and "offline mode is on" in errtext and "using the verified files already in" in errtext
    assert f"Next: amed quantize {d} -o {d}-q4 --bits 4" in out

    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake_hub.stop()  # hub unreachable, but the directory is complete: fine, with a warning
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(d))
    assert code == 0 and "cannot reach the hub" in errtext and "Next: amed quantize" in out
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(tmp_path / "empty"))
    assert code == 1 and errtext.startswith("error: cannot reach the hub at http://127.0.0.1:")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def run_cli(capsys, monkeypatch, fake, *args):
    """`amed download ...` through amed.app.cli.main, with HF_ENDPOINT at the fake hub: (exit code, stdout, stderr)."""
    from amed.app import cli

    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(sys, "argv", ["amed", "download", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code or 0, out, " ".join(err.split())


def test_cli_download_prints_location_and_next_command(fake_hub, tmp_path, monkeypatch, capsys):
    d = tmp_path / "AntAngelMed"
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(d), "--max-workers", "2")
    assert code == 0, errtext
    assert_same_files(fake_hub, d)
    assert out.splitlines() == [f"Downloaded {REPO} to {d}", f"Next: amed quantize {d} -o {d}-q4 --bits 4"]
    assert "total" in errtext and "801.5/801.5 kB" in errtext  # the overall bar, on stderr


def test_cli_dry_run_lists_and_fetches_nothing(fake_hub, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(capsys, monkeypatch, fake_hub, "--local-dir", str(tmp_path / "m"), "--dry-run",
                           "--exclude", "README.md")
    assert code == 0
    assert S1 in out and "to fetch" in out and "README.md" not in out and "7 files" in out
    assert fake_hub.file_gets() == [] and not (tmp_path / "m").exists()


def test_cli_error_is_one_sentence(fake_hub, tmp_path, monkeypatch, capsys):
    code, out, errtext = run_cli(capsys, monkeypatch, fake_hub, "nobody/nothing", "--local-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert errtext.startswith("error: repository nobody/nothing was not found") and "Traceback" not in errtext


def test_default_local_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AMED_HOME", str(tmp_path))
    assert hub.default_local_dir() == tmp_path / "models" / "MedAIBase--AntAngelMed"
    monkeypatch.delenv("AMED_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.default_local_dir("a/b") == tmp_path / "amed" / "models" / "a--b"


# ---------------------------------------------------------------------------------------------
# ModelScope (optional extra) and the fake hub itself
# ---------------------------------------------------------------------------------------------
def test_modelscope_missing_says_how_to_enable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(AmedError, match=r"pip install 'amed\[modelscope\]'"):
        hub.download_modelscope(REPO, tmp_path)


def test_modelscope_gets_the_same_file_filter(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda **kw: calls.append(kw) or kw["local_dir"]
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    assert hub.download_modelscope(REPO, tmp_path, exclude=["README.md"]) == tmp_path
    kw = calls[0]
    assert kw["model_id"] == REPO and "*.safetensors" in kw["allow_patterns"]
    assert {"*.py", "*.bin", "README.md"} <= set(kw["ignore_patterns"])


def test_fake_hub_serves_the_real_snapshot_download(fake_hub, tmp_path):
    """The fixture is faithful enough for huggingface_hub's own downloader (useful to other tests)."""
    from huggingface_hub import snapshot_download

    out = snapshot_download(REPO, local_dir=tmp_path, endpoint=fake_hub.url, token=False,
                            allow_patterns=["*.json", "*.safetensors"])
    assert_same_files(fake_hub, Path(out), WANTED - {"README.md"})
