"""Never lose a user's file (issue 26, "Data loss"): every scenario snapshots the folders involved
(relative path -> SHA-256 of every file, hidden ones included) before and after, and checks that
nothing amed did not write was changed or deleted. Also the output-folder lock (issue 25 item 2)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amed import hub
from amed.app.synth import write_synthetic_checkpoint
from amed.errors import AmedError
from amed.formats.store import MANIFEST
from amed.quant import stream
from amed.quant.convert import Settings, quantize_model
from hubserver import FakeHub

REPO = "MedAIBase/AntAngelMed"


def snapshot(*folders: Path) -> dict[str, str]:
    """path -> sha256 of every file under the folders (symlinks as their target text)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "AMED_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AMED_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint (read-only: copy it to change it)."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", preset="tiny", layers=2)


@pytest.fixture
def my_ckpt(ckpt, tmp_path) -> Path:
    """A user's own checkpoint folder (not written by amed: no marker), with a file of theirs."""
    d = tmp_path / "user-ckpt"
    shutil.copytree(ckpt, d, ignore=shutil.ignore_patterns(".amed"))
    (d / "results.json").write_text('{"mine": true}')
    return d


def one_sentence(err: str) -> str:
    assert "Traceback" not in err and err.startswith("error: "), err
    return err


# ---- quantize into the source ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "symlink", "inside", "containing"])
def test_quantize_output_overlapping_the_source_is_refused(amed_run, my_ckpt, tmp_path, where):
    (tmp_path / "link").symlink_to(my_ckpt)
    out = {"same": my_ckpt, "symlink": tmp_path / "link", "inside": my_ckpt / "store",
           "containing": tmp_path}[where]
    before = snapshot(tmp_path)
    code, _, err = amed_run("quantize", my_ckpt, "-o", out, "--force")
    assert code == 1 and "choose an -o" in one_sentence(err)
    assert snapshot(tmp_path) == before
    # the source through a symlink, the output its real folder
    code, _, err = amed_run("quantize", tmp_path / "link", "-o", my_ckpt, "--force")
    assert code == 1 and snapshot(tmp_path) == before


# ---- --force replaces only what amed wrote -----------------------------------------------------

def user_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text('{"my": "config"}')
    (d / "tokenizer.json").write_text('{"my": "tokenizer"}')
    (d / "model.safetensors").write_bytes(b"my weights")
    (d / "notes.txt").write_text("my notes")
    return d


def test_quantize_force_into_a_folder_that_is_not_a_store(amed_run, ckpt, tmp_path):
    d = user_folder(tmp_path)
    before = snapshot(d)
    code, _, err = amed_run("quantize", ckpt, "-o", d, "--force")
    assert code == 1 and "not an amed store" in one_sentence(err)
    assert snapshot(d) == before


def test_synth_bits_force_into_a_folder_that_is_not_a_store(amed_run, tmp_path):
    d = user_folder(tmp_path)
    before = snapshot(d)
    code, _, err = amed_run("synth", d, "--bits", "4", "--force")
    assert code == 1 and "not an amed store" in one_sentence(err)
    assert snapshot(d) == before


def test_synth_checkpoint_force_replaces_only_its_own_files(amed_run, tmp_path):
    d = user_folder(tmp_path)
    before = snapshot(d)
    code, _, err = amed_run("synth", d, "--force")
    assert code == 1 and "did not write" in one_sentence(err)
    assert snapshot(d) == before
    # a folder with only a user's notes: synth writes beside them, and --force again replaces its own files
    e = tmp_path / "beside"
    e.mkdir()
    (e / "notes.txt").write_text("mine")
    assert amed_run("synth", e, "--force", "--layers", "2")[0] == 0
    assert amed_run("synth", e, "--force", "--layers", "3")[0] == 0
    assert (e / "notes.txt").read_text() == "mine"
    assert json.loads((e / "config.json").read_text())["num_hidden_layers"] == 3


def test_force_keeps_user_files_in_a_store_and_refuses_unlisted_ones(amed_run, ckpt, tmp_path):
    st = tmp_path / "store"
    assert amed_run("quantize", ckpt, "-o", st)[0] == 0
    (st / "notes.txt").write_text("mine")
    assert amed_run("quantize", ckpt, "-o", st, "--force", "--bits", "8")[0] == 0
    assert (st / "notes.txt").read_text() == "mine"
    assert json.loads((st / MANIFEST).read_text())["quantization"]["bits"] == 8
    # an unfinished store whose folder also holds a config.json of the user's (not in its manifest)
    man = json.loads((st / MANIFEST).read_text())
    man["complete"] = False
    man.pop("side_files")
    (st / MANIFEST).write_text(json.dumps(man))
    (st / "config.json").write_text('{"my": "config"}')
    before = snapshot(st)
    code, _, err = amed_run("quantize", ckpt, "-o", st, "--force")
    assert code == 1 and "does not list" in one_sentence(err)
    assert snapshot(st) == before


def test_force_into_a_store_with_a_garbage_manifest(amed_run, ckpt, tmp_path):
    d = user_folder(tmp_path)
    (d / MANIFEST).write_text("not json")
    before = snapshot(d)
    for args in (("quantize", ckpt, "-o", d, "--force"), ("synth", d, "--bits", "4", "--force")):
        code, _, err = amed_run(*args)
        assert code == 1 and "cannot read" in one_sentence(err)
    assert snapshot(d) == before


# ---- amed rm --------------------------------------------------------------------------------------

def test_rm_store_deletes_exactly_its_manifest_files(amed_run, ckpt, tmp_path):
    st = tmp_path / "home" / "stores" / "s"
    assert amed_run("quantize", ckpt, "-o", st)[0] == 0
    (st / "notes.txt").write_text("mine")
    (st / "extra.safetensors").write_bytes(b"mine too")             # looks like amed's, is not listed
    keep = {k: v for k, v in snapshot(st).items() if Path(k).name in ("notes.txt", "extra.safetensors")}
    code, _, err = amed_run("rm", "s", "-y")
    assert code == 0 and "other files in it were left" in err
    assert snapshot(st) == keep


def test_rm_downloaded_checkpoint_keeps_the_users_files(amed_run, ckpt, tmp_path):
    d = tmp_path / "home" / "models" / "org--m"
    with FakeHub() as fake:
        fake.add_repo(REPO, {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()})
        hub.download(hub.list_files(REPO, endpoint=fake.url), d, backoff=0.001)
    (d / "results.json").write_text("{}")
    (d / "LICENSE-mine.txt").write_text("mine")
    keep = {k: v for k, v in snapshot(d).items() if Path(k).name in ("results.json", "LICENSE-mine.txt")}
    code, _, err = amed_run("rm", "org--m", "-y")
    assert code == 0, err
    assert snapshot(d) == keep


def test_rm_refuses_a_garbage_manifest_or_record(amed_run, my_ckpt, tmp_path):
    g = tmp_path / "home" / "stores" / "g"
    g.mkdir(parents=True)
    (g / MANIFEST).write_text('{"format": "amed-store", "files": 5}')
    (g / "data.safetensors").write_bytes(b"mine")
    (g / "notes.txt").write_text("mine")
    before = snapshot(g, my_ckpt)
    code, _, err = amed_run("rm", "g", "-y")
    assert code == 1 and "nothing removed" in one_sentence(err)
    (my_ckpt / ".amed").mkdir()
    (my_ckpt / ".amed" / "download.json").write_text("[garbage")
    before = snapshot(g, my_ckpt)
    code, _, err = amed_run("rm", my_ckpt, "-y")
    assert code == 1 and "nothing removed" in one_sentence(err)
    assert snapshot(g, my_ckpt) == before


def test_rm_refuses_a_checkpoint_amed_did_not_write(amed_run, my_ckpt):
    before = snapshot(my_ckpt)
    code, _, err = amed_run("rm", my_ckpt, "-y")
    assert code == 1 and "did not download" in one_sentence(err)
    assert snapshot(my_ckpt) == before


def test_rm_a_name_is_a_name(amed_run, ckpt, tmp_path):
    (tmp_path / "home" / "stores").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "store"
    quantize_model(ckpt, elsewhere, Settings())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(elsewhere)
    # $AMED_HOME/stores/../../elsewhere/store exists, ./../../elsewhere/store does not
    for arg in ("../../elsewhere/store", ".."):
        code, _, err = amed_run("rm", arg, "-y", cwd=cwd)
        assert code == 1 and one_sentence(err)
    assert snapshot(elsewhere) == before
    # a path is a path: named by its own path, it is removed
    code, _, err = amed_run("rm", "../elsewhere/store", "-y", cwd=cwd)
    assert code == 0 and not elsewhere.exists()


# ---- amed download ------------------------------------------------------------------------------

def download_cli(amed_run, monkeypatch, fake, *args):
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    return amed_run("download", *args)


@pytest.fixture(scope="module")
def fake(ckpt):
    h = FakeHub()
    h.add_repo(REPO, {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()})
    with h:
        yield h


def test_download_into_a_non_empty_folder_amed_did_not_make(amed_run, monkeypatch, fake, tmp_path):
    d = user_folder(tmp_path)
    before = snapshot(d)
    code, _, err = download_cli(amed_run, monkeypatch, fake, "--local-dir", d)
    assert code == 1 and "--force" in one_sentence(err) and "not empty" in err
    assert snapshot(d) == before
    code, _, err = download_cli(amed_run, monkeypatch, fake, "--local-dir", d, "--force")
    assert code == 0, err
    assert (d / "notes.txt").read_text() == "my notes" and (d / "model.safetensors").read_bytes() == b"my weights"
    # a folder amed made resumes without --force
    assert download_cli(amed_run, monkeypatch, fake, "--local-dir", d)[0] == 0


def test_download_quantize_never_deletes_a_checkpoint(monkeypatch, fake, my_ckpt, tmp_path):
    plan = hub.list_files(REPO, endpoint=fake.url)
    before = snapshot(my_ckpt)
    for force in (False, True):
        with pytest.raises(AmedError, match="holds a checkpoint"):
            stream.download_quantize(plan, tmp_path / "store", local_dir=my_ckpt, force=force, backoff=0.001)
    assert snapshot(my_ckpt) == before
    # a downloaded one (amed's own record) too
    dl = tmp_path / "downloaded"
    hub.download(plan, dl, backoff=0.001)
    before = snapshot(dl)
    with pytest.raises(AmedError, match="holds a checkpoint"):
        stream.download_quantize(plan, tmp_path / "store2", local_dir=dl, force=True, backoff=0.001)
    assert snapshot(dl) == before
    # a non-empty folder of the user's as --local-dir
    d = user_folder(tmp_path)
    (d / "config.json").unlink()
    before = snapshot(d)
    with pytest.raises(AmedError, match="not empty"):
        stream.download_quantize(plan, tmp_path / "store3", local_dir=d, force=True, backoff=0.001)
    assert snapshot(d) == before and not (tmp_path / "store3").exists()


def test_download_quantize_force_into_a_users_folder(monkeypatch, fake, tmp_path):
    plan = hub.list_files(REPO, endpoint=fake.url)
    d = user_folder(tmp_path)
    before = snapshot(d)
    with pytest.raises(AmedError, match="not an amed store"):
        stream.download_quantize(plan, d, force=True, backoff=0.001)
    assert snapshot(d) == before
    assert not (tmp_path / ".mine.download").exists()


# ---- one writer per output folder (issue 25 item 2) ------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from amed.hub import dir_lock
with dir_lock(Path(sys.argv[1]), sys.argv[2] if sys.argv[2] != "-" else None, remove=True):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(folder: Path, name: str | None):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), name or "-"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_is_refused_naming_the_pid(ckpt, tmp_path):
    st = tmp_path / "store"
    st.mkdir()
    holder = hold_lock(st, ".amed-lock")
    try:
        env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300"}
        for cmd in (["quantize", str(ckpt), "-o", str(st)], ["synth", str(st), "--bits", "4"]):
            r = subprocess.run([sys.executable, "-m", "amed", *cmd], capture_output=True, text=True, env=env,
                               timeout=120)
            msg = " ".join(r.stderr.split())
            assert r.returncode == 1 and f"pid {holder.pid}" in msg and "Traceback" not in msg, msg
        assert sorted(p.name for p in st.iterdir()) == [".amed-lock"]     # nothing written
    finally:
        holder.kill()
        holder.wait()
    quantize_model(ckpt, st, Settings())                 # the lock went with the process
    assert not (st / ".amed-lock").exists()              # and a finished writer leaves no lock file


def test_second_synth_checkpoint_into_one_folder_is_refused(amed_run, tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    holder = hold_lock(d, ".amed/lock")
    try:
        code, _, err = amed_run("synth", d, "--force")
        assert code == 1 and f"pid {holder.pid}" in one_sentence(err)
    finally:
        holder.kill()
        holder.wait()
    assert amed_run("synth", d, "--force", "--layers", "2")[0] == 0
    assert not (d / ".amed" / "lock").exists()


def test_second_download_into_one_folder_is_refused(fake, tmp_path):
    d = tmp_path / "dl"
    d.mkdir()
    holder = hold_lock(d, None)
    try:
        with pytest.raises(AmedError, match=f"pid {holder.pid}"):
            hub.download(hub.list_files(REPO, endpoint=fake.url), d, backoff=0.001)
    finally:
        holder.kill()
        holder.wait()


def test_two_quantize_runs_into_one_folder(ckpt, tmp_path):
    """Two real `amed quantize` processes started together: one writes, the other is refused; the store verifies."""
    st = tmp_path / "store"
    env = {**os.environ, "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "amed", "quantize", str(ckpt), "-o", str(st)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:                      # they overlapped: the loser says who holds the folder
        assert any("is already writing to" in e or "already holds a complete store" in e for c, e in results if c)
    r = subprocess.run([sys.executable, "-m", "amed", "verify", str(st)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
