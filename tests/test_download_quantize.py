"""`amed download --quantize`: shard-by-shard download into a store, against the loopback fake hub
(tests/hubserver.py). The store must be byte-identical to `amed download` then `amed quantize`, the disk
must hold no more than the store plus two shards, and any interruption must resume to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  (read once, at import)
import pytest

import amed
from amed import hub
from amed.quant import stream
from amed.errors import AmedError
from amed.quant.convert import Settings, quantize_model
from amed.formats.store import MANIFEST
from amed.app.synth import write_synthetic_checkpoint
from hubserver import FakeHub

REPO = "MedAIBase/AntAngelMed"
FAST = dict(backoff=0.001)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "AMED_HOME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny random checkpoint cut into many small shards (they cut across layers)."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", preset="tiny", layers=4,
                                      shard_bytes=120_000)


@pytest.fixture(scope="module")
def fake(src):
    h = FakeHub()
    h.add_repo(REPO, {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
    with h:
        yield h


@pytest.fixture(autouse=True)
def _reset_hub(fake):
    fake.throttle = None
    fake.log.clear()
    yield


@pytest.fixture(scope="module")
def reference(fake, tmp_path_factory) -> Path:
    """What the two-step route writes: `amed download` then `amed quantize`."""
    d = tmp_path_factory.mktemp("ref")
    hub.download(hub.list_files(REPO, endpoint=fake.url), d / "dl", **FAST)
    quantize_model(d / "dl", d / "store", Settings(bits=4))
    return d / "store"


def shards(fake) -> dict[str, int]:
    return {p: len(b) for p, b in fake.repos[REPO].files.items() if p.endswith(".safetensors")}


def assert_identical(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def disk_used(*dirs: Path) -> int:
    """Bytes allocated on disk (st_blocks: sparse .partial files count only what is written)."""
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def run(fake, dst, progress=None, **kw):
    return stream.download_quantize(hub.list_files(REPO, endpoint=fake.url), dst, Settings(bits=4),
                                    progress=progress, **FAST, **kw)


# ---------------------------------------------------------------------------------------------
def test_byte_identical_to_download_then_quantize_and_peak_disk(fake, reference, tmp_path):
    dst = tmp_path / "store"
    dl = stream.default_download_dir(dst)
    peak = [0]

    def sample():
        peak[0] = max(peak[0], disk_used(dst, dl))

    class Probe(stream.StreamProgress):
        def downloaded(self, n): sample()
        def converted(self, done, tensors): sample()
        def shard(self, name, event): sample()

    stop = threading.Event()

    def poll():
        while not stop.is_set():
            sample()
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        summary = run(fake, dst, Probe())
    finally:
        stop.set()
        t.join()

    assert_identical(reference, dst)
    assert not dl.exists()                                   # scratch space removed
    sizes = shards(fake)
    assert len(sizes) >= 4
    for s in sizes:                                          # each shard fetched once, whole
        assert fake.ranges(s) == [None]
    store = sum(p.stat().st_size for p in dst.iterdir())
    largest, source = max(sizes.values()), sum(sizes.values())
    bound = store + 2 * largest + 192_000                   # small files (tokenizer, index) + fs blocks
    print(f"peak {peak[0]} B; store {store} B, largest shard {largest} B, bound {bound} B; "
          f"two-step route: {store + source} B")
    assert peak[0] <= bound
    assert peak[0] < 0.7 * (store + source)
    assert summary["store_bytes"] == sum(p.stat().st_size for p in dst.glob("*.safetensors"))

    with pytest.raises(AmedError, match="already holds a complete store"):
        run(fake, dst)
    assert not dl.exists()


class Boom(Exception):
    pass


def test_injected_failures_anywhere_resume_to_the_same_bytes(fake, reference, tmp_path, monkeypatch):
    """An exception at each kind of step (mid-conversion, mid-download, after a file's rename but before
    the manifest records it, before a converted shard is deleted, in a manifest write); each rerun continues."""
    dst = tmp_path / "store"
    counts: dict[str, int] = {}
    fail_at: list = [None]

    def tick(kind):
        counts[kind] = counts.get(kind, 0) + 1
        if fail_at[0] == (kind, counts[kind]):
            raise Boom(kind)

    class Chaos(stream.StreamProgress):
        def downloaded(self, n): tick("download")
        def converted(self, done, tensors): tick("convert")

    real_finish, real_save, real_remove = stream.ContainerWriter.finish, stream.write_json_atomic, hub.remove_file

    def finish(self):
        sha = real_finish(self)                                # renamed into place...
        tick("finished")                                       # ...but not yet in the manifest
        return sha

    def save(path, obj):
        tick("save")
        real_save(path, obj)

    def remove(f, d):
        if f.path.endswith(".safetensors"):
            tick("remove")
        real_remove(f, d)

    monkeypatch.setattr(stream.ContainerWriter, "finish", finish)
    monkeypatch.setattr(stream, "write_json_atomic", save)
    monkeypatch.setattr(hub, "remove_file", remove)

    for point in [("convert", 7), ("download", 2), ("finished", 1), ("remove", 2), ("save", 3), ("convert", 40)]:
        counts.clear()
        fail_at[0] = point
        fake.log.clear()
        with pytest.raises(Boom):
            run(fake, dst, Chaos())
        man = json.loads((dst / MANIFEST).read_text())
        assert not man["complete"]
        with pytest.raises(AmedError, match="incomplete"):
            amed.load(dst)
    # a shard recorded as converted but not yet deleted is not fetched again
    fail_at[0] = ("remove", 1)
    counts.clear()
    with pytest.raises(Boom):
        run(fake, dst, Chaos())
    left = [p.name for p in stream.default_download_dir(dst).glob("*.safetensors")]
    fail_at[0] = None
    fake.log.clear()
    run(fake, dst, Chaos())
    assert left and not any(fake.gets(s) for s in left)
    assert_identical(reference, dst)
    assert not stream.default_download_dir(dst).exists()


@pytest.mark.slow
def test_kill_9_then_rerun_the_same_command(fake, reference, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "store"
    fake.throttle = 600_000                                    # bytes/s: the run takes a few seconds
    env = {**os.environ, "HF_ENDPOINT": fake.url, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "amed", "download", "--quantize", "4", "-o", str(dst)]

    def written():
        try:
            man = json.loads((dst / MANIFEST).read_text())
        except (OSError, ValueError):
            return -1
        return len(man.get("files", {})) * 1000 + sum(map(len, man.get("stream", {}).get("written", {}).values()))

    for _ in range(2):
        before = written()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        try:
            while time.time() < deadline and written() <= before:  # kill once it has made some progress
                time.sleep(0.01)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert written() > before
        with pytest.raises(AmedError, match="incomplete"):
            amed.load(dst)

    fake.throttle = None
    from amed.app import cli

    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(sys, "argv", cmd[2:])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main()
    errtext = " ".join(capsys.readouterr().err.split())
    assert (e.value.code or 0) == 0, errtext
    assert f"store written to {dst}" in errtext and "Next: amed chat" in errtext
    assert_identical(reference, dst)
    assert not stream.default_download_dir(dst).exists()


def test_shard_with_a_wrong_shape_is_one_clear_error(fake, src, tmp_path):
    files = dict(fake.repos[REPO].files)
    index = json.loads(files["model.safetensors.index.json"])["weight_map"]
    name = "model.layers.2.attention.dense.weight"               # [64, 128] -> [128, 64]: same bytes
    shard = index[name]
    raw = files[shard]
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[name]["shape"] = header[name]["shape"][::-1]
    h = json.dumps(header, separators=(",", ":")).encode()
    files[shard] = len(h.ljust(n)).to_bytes(8, "little") + h.ljust(n) + raw[8 + n:]
    fake.add_repo("org/bad", files)
    with pytest.raises(AmedError) as e:
        stream.download_quantize(hub.list_files("org/bad", endpoint=fake.url), tmp_path / "s", **FAST)
    want = header[name]["shape"]
    assert str(e.value) == (f"tensor '{name}' in {shard} has shape {want}, but config.json implies "
                            f"{want[::-1]}.")
    assert not json.loads((tmp_path / "s" / MANIFEST).read_text())["complete"]


def test_checked_before_any_shard_is_fetched(fake, tmp_path, monkeypatch):
    files = dict(fake.repos[REPO].files)
    index = json.loads(files["model.safetensors.index.json"])
    del index["weight_map"]["model.layers.1.mlp.gate.weight"]
    fake.add_repo("org/noindex", {**files, "model.safetensors.index.json": json.dumps(index).encode()})
    with pytest.raises(AmedError, match="'model.layers.1.mlp.gate.weight' is missing from model.safetensors.index"):
        stream.download_quantize(hub.list_files("org/noindex", endpoint=fake.url), tmp_path / "a", **FAST)
    assert not (tmp_path / "a").exists() and not stream.default_download_dir(tmp_path / "a").exists()

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 300_000, 300_000))
    with pytest.raises(AmedError, match=r"not enough disk space .* the store needs .* two shards in flight"):
        run(fake, tmp_path / "b")
    assert not any(f.endswith(".safetensors") for f in {r.file for r in fake.file_gets()})
    with pytest.raises(AmedError, match="--bits must be 4 or 8"):
        stream.download_quantize(hub.list_files(REPO, endpoint=fake.url), tmp_path / "c", Settings(bits=3))
