"""amed quantize + the store: quality, layout, laziness, crash-safety, bad input."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import amed
from amed.app.bench import kl_divergence as kld
from amed.errors import AmedError
from amed.quant.convert import Settings, quantize_model
from amed.formats.store import MANIFEST, open_store
from amed.app.synth import write_synthetic_checkpoint

PAGE = 4096


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A flash-like checkpoint at small widths: 64 experts, top-8 of 8 groups."""
    d = tmp_path_factory.mktemp("medium") / "ckpt"
    write_synthetic_checkpoint(d, preset="flash", layers=3, hidden_size=256, num_attention_heads=4,
                               head_dim=64, intermediate_size=512, moe_intermediate_size=128,
                               moe_shared_expert_intermediate_size=128, num_experts=64, vocab_size=2048)
    return d


@pytest.fixture(scope="module")
def medium_q4(medium, tmp_path_factory):
    dst = tmp_path_factory.mktemp("medium_q4") / "store"
    quantize_model(medium, dst, Settings(bits=4))
    return dst


@pytest.mark.parametrize("bits,limit", [(8, 0.0015), (4, 0.02)])
def test_quality_on_golden_like_model(golden_dir, golden_store, bits, limit):
    """Teacher-forced over 300 positions against the unquantized forward pass."""
    ids = np.random.default_rng(0).integers(7, 512, 300)
    ref = amed.load(golden_dir).logits(ids)
    out = amed.load(golden_store(bits=bits)).logits(ids)
    k = kld(ref, out)
    top1 = (ref.argmax(-1) == out.argmax(-1)).mean()
    print(f"q{bits}: mean KLD {k.mean():.2e}, top-1 agreement {top1:.3f}")
    assert k.mean() <= limit
    # this random model's logits are nearly flat, so a small change flips its top-1 easily:
    # int4 (q6 lm_head) measured 0.947, int8 (q8 lm_head) 0.987
    assert top1 >= (0.93 if bits == 4 else 0.97)


def test_r8_store_equals_rows_store_and_version_1_still_opens(golden_dir, golden_store, tmp_path):
    """The r8 layout changes only the float32 summation order: logits of an r8 store and of a
    rows store of the same weights agree to float32 noise. A rows store labelled version 1 (what
    amed wrote before r8) still opens."""
    r8_path = golden_store(bits=4)
    quantize_model(golden_dir, tmp_path / "rows", Settings(bits=4, layout="rows"))
    man = json.loads((tmp_path / "rows" / MANIFEST).read_text())
    assert not any("layout" in w for w in man["weights"].values())
    (tmp_path / "rows" / MANIFEST).write_text(json.dumps({**man, "version": 1}))
    ids = np.random.default_rng(1).integers(7, 512, 40)
    a = amed.load(r8_path).logits(ids)
    b = amed.load(tmp_path / "rows").logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    r8 = open_store(r8_path)
    assert r8.matrix("blk.1.ffn_gate_exps.3").layout == "r8"
    assert r8.matrix("token_embd").layout == "rows"


def test_dense_q6_store_round_trip(golden_dir, tmp_path):
    """--dense q6: every dense weight (attention, dense and shared SwiGLU, embeddings, lm_head)
    stored as q6 and run through the q6 kernels (expert_q6 for the SwiGLUs); experts q8 so the
    dense error dominates. Measured: mean KLD 1.6e-4 (dense q8: 2.3e-5, dense q4: 1.5e-3)."""
    quantize_model(golden_dir, tmp_path / "s", Settings(bits=8, dense="q6"))
    st = open_store(tmp_path / "s")
    assert st.manifest["quantization"]["dense"] == "q6"
    for name in ("output", "token_embd", "blk.0.attn_qkv", "blk.0.ffn_gate", "blk.1.ffn_down_shexp"):
        w = st.weights_info[name]
        assert w["format"] == "q6", name
        N, K = w["shape"]
        G = w["group"]
        assert tuple(st.tensors[name + ".q"].shape) == (N, K // G, 3 * G // 4) and st.tensors[name + ".q"].dtype == "U8"
        assert st.tensors[name + ".m"].dtype == "F16"
    assert st.weights_info["blk.1.ffn_gate_inp"]["format"] == "bf16"      # router never quantized
    ids = np.random.default_rng(0).integers(7, 512, 100)
    ref = amed.load(golden_dir).logits(ids)
    out = amed.load(tmp_path / "s").logits(ids)
    k = kld(ref, out)
    assert k.mean() <= 5e-4
    assert (ref.argmax(-1) == out.argmax(-1)).mean() >= 0.9


def test_store_is_exact_to_its_own_weights_and_consistent(medium_q4):
    m = amed.load(medium_q4)
    ids = list(range(20, 60))
    full = m.logits(ids)
    m.reset()
    part = np.concatenate([m.forward(ids[:25], all_logits=True), np.stack([m.forward([t]) for t in ids[25:]])])
    assert np.abs(part - full).max() <= 1e-4


def test_layout_experts_are_page_aligned_contiguous_ranges(medium_q4):
    st = open_store(medium_q4)
    man = st.manifest
    assert man["complete"] and man["version"] == 2
    assert man["quantization"]["policy"]["router"] == "source" and man["quantization"]["policy"]["expert"] == "q4"
    # q4/q8 matrices are interleaved by 8 rows; the embeddings (read by row) and q6 are not
    assert all(m.get("layout") == "r8" for i in man["experts"].values() for m in i["matrices"].values())
    assert man["weights"]["blk.0.attn_qkv"]["layout"] == "r8" and "layout" not in man["weights"]["token_embd"]
    assert "layout" not in man["weights"]["output"]                                 # q6 lm_head
    for L, info in man["experts"].items():
        assert info["offset"] % PAGE == 0 and info["stride"] % PAGE == 0
        for e in (0, 1, info["count"] - 1):
            lo = info["offset"] + e * info["stride"]
            for which in ("gate", "up", "down"):
                for suffix in (".q", ".s", ".m"):
                    t = st.tensors[f"blk.{L}.ffn_{which}_exps.{e}{suffix}"]
                    assert lo <= t.start and t.end <= lo + info["stride"]
    # self-contained: tokenizer and config copied in
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (medium_q4 / f).exists()


def test_only_routed_experts_become_resident(medium_q4):
    """mincore after dropping the store from the page cache: one token pages in ~k/E experts."""
    from amed.engine.experts.memory import resident_fraction

    for f in medium_q4.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    m = amed.load(medium_q4)
    st = m.source
    before = [resident_fraction(st.maps[i["file"]], i["offset"], i["stride"] * i["count"])
              for i in st.experts_info.values()]
    m.forward([42])
    cfg = m.config
    for (L, info), b in zip(st.experts_info.items(), before):
        got = resident_fraction(st.maps[info["file"]], info["offset"], info["stride"] * info["count"])
        expect = cfg.num_experts_per_tok / cfg.num_experts
        assert b < 0.02
        assert got <= 1.5 * expect, f"layer {L}: {got:.3f} of expert bytes resident, expected ~{expect:.3f}"
        assert got >= 0.9 * expect


def test_quantize_refuses_existing_store_and_resumes_incomplete(medium, medium_q4, tmp_path):
    with pytest.raises(AmedError, match="already holds a complete store.*--force"):
        quantize_model(medium, medium_q4, Settings(bits=4))
    dst = tmp_path / "s"
    shutil.copytree(medium_q4, dst)
    man = json.loads((dst / MANIFEST).read_text())
    man["complete"] = False
    del man["files"]["layer-002.safetensors"]
    (dst / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(AmedError, match="incomplete store.*re-run"):
        amed.load(dst)
    with pytest.raises(AmedError, match="other settings"):
        quantize_model(medium, dst, Settings(bits=8))
    quantize_model(medium, dst, Settings(bits=4))
    for f in medium_q4.iterdir():
        assert f.read_bytes() == (dst / f.name).read_bytes(), f.name


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(medium, medium_q4, tmp_path):
    dst = tmp_path / "killed"
    cmd = [sys.executable, "-m", "amed", "quantize", str(medium), "-o", str(dst), "--bits", "4"]
    full = float("inf")                             # how long a whole run takes here: the faster of
    for _ in range(2):                              # two, so a slow first run (cold caches) cannot
        t = time.perf_counter()                     # make every kill come after the end
        subprocess.run(cmd + ["--force"], capture_output=True, check=True)
        full = min(full, time.perf_counter() - t)
    shutil.rmtree(dst)
    n_files = len(json.loads((medium_q4 / MANIFEST).read_text())["files"])

    def left() -> float:
        """Time a resumed run still needs: files already written are skipped."""
        try:
            done = len(json.loads((dst / MANIFEST).read_text())["files"])
        except (OSError, ValueError):
            done = 0
        return full * (1 - done / n_files)

    rng = random.Random(0)
    kills = 0
    for frac in sorted(rng.uniform(0.35, 0.95) for _ in range(4)):
        wait = frac * left()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(wait)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if (dst / MANIFEST).exists() and not json.loads((dst / MANIFEST).read_text())["complete"]:
            with pytest.raises(AmedError, match="incomplete"):
                amed.load(dst)
    assert kills >= 2
    if not (dst / MANIFEST).exists() or not json.loads((dst / MANIFEST).read_text())["complete"]:
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in medium_q4.iterdir())
    assert sorted(p.name for p in dst.iterdir()) == names
    for n in names:
        assert (medium_q4 / n).read_bytes() == (dst / n).read_bytes(), n


def test_bad_stores(medium_q4, tmp_path):
    dst = tmp_path / "s"
    shutil.copytree(medium_q4, dst)
    # corrupted byte: loads (cheap checks) but `verify` finds it
    f = dst / "layer-001.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert open_store(dst).verify() == ["layer-001.safetensors"]
    # truncated file
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 4096)
    with pytest.raises(AmedError, match="layer-001.safetensors.*bytes but the manifest"):
        amed.load(dst)
    # wrong format version
    man = json.loads((medium_q4 / MANIFEST).read_text())
    (dst / MANIFEST).write_text(json.dumps({**man, "version": 99}))
    with pytest.raises(AmedError, match="format version 99"):
        amed.load(dst)
    (dst / MANIFEST).write_text("{not json")
    with pytest.raises(AmedError, match="corrupt"):
        amed.load(dst)


def test_source_with_missing_shard_writes_nothing(medium, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(medium, src)
    next(src.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(AmedError, match="missing"):
        quantize_model(src, tmp_path / "out", Settings())
    assert not (tmp_path / "out").exists()


def test_not_enough_disk(medium, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(AmedError, match="not enough disk space"):
        quantize_model(medium, tmp_path / "out", Settings())
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_group_size_fallback_and_bad_settings(golden_dir, tmp_path):
    # widths 32 and 64 with --group-size 128: each matrix takes the largest group that divides it
    quantize_model(golden_dir, tmp_path / "s", Settings(bits=4, group_size=128))
    man = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert man["experts"]["1"]["matrices"]["ffn_down_exps"]["group"] == 32
    assert man["weights"]["blk.0.attn_qkv"]["group"] == 64
    with pytest.raises(AmedError, match="--bits"):
        quantize_model(golden_dir, tmp_path / "x", Settings(bits=3))
    with pytest.raises(AmedError, match="--dense must be q8, q6, q4 or bf16"):
        quantize_model(golden_dir, tmp_path / "x", Settings(dense="q5"))
    with pytest.raises(AmedError, match="--head must be auto, q8, q6, q4 or bf16"):
        quantize_model(golden_dir, tmp_path / "x", Settings(head="q2"))


def test_lm_head_format_follows_the_store_unless_given():
    """--head auto: q6 (the bytes of every decoded token, little quality cost), q8 in an all-q8
    store, bf16 when the dense weights are kept bf16; an explicit --head wins."""
    assert Settings(bits=4).fmt("output") == "q6" and Settings(bits=4).fmt("attn") == "q8"
    assert Settings(bits=8).fmt("output") == "q8"
    assert Settings(bits=8, dense="q6").fmt("output") == "q6"
    assert Settings(bits=4, dense="bf16").fmt("output") == "bf16"
    assert Settings(bits=4, head="q8").fmt("output") == "q8"
    assert Settings(bits=4, dense="q4", head="q4").fmt("output") == "q4"


def test_synth_store_directly_equals_synth_then_quantize(tmp_path):
    from amed.app.synth import SyntheticSource

    kw = dict(preset="flash", layers=2, hidden_size=256, num_attention_heads=4, head_dim=64,
              intermediate_size=512, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
              num_experts=16, vocab_size=20000)       # embeddings span several generation chunks
    write_synthetic_checkpoint(tmp_path / "bf16", **kw)
    quantize_model(tmp_path / "bf16", tmp_path / "a", Settings(bits=4))
    quantize_model(SyntheticSource(**kw), tmp_path / "b", Settings(bits=4))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        if n != MANIFEST:                               # the manifests differ only in "source"
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    ma, mb = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in "ab")
    assert {k: v for k, v in ma.items() if k != "source"} == {k: v for k, v in mb.items() if k != "source"}


def test_row_chunks_are_recut_into_whole_r8_blocks():
    from amed.quant.convert import _whole_blocks

    rows = np.arange(43 * 2).reshape(43, 2)
    chunks = [(0, rows[:5]), (5, rows[5:6]), (6, rows[6:30]), (30, rows[30:])]
    out = list(_whole_blocks(iter(chunks), 8))
    assert all(len(w) % 8 == 0 for _, w in out[:-1]) and all(r0 % 8 == 0 for r0, _ in out)
    np.testing.assert_array_equal(np.concatenate([w for _, w in out]), rows)
    assert [r0 for r0, _ in out] == [0, 24, 40]


def test_hostile_layout_in_manifest_is_a_clear_error(golden_dir, tmp_path):
    quantize_model(golden_dir, tmp_path / "s", Settings(bits=4))
    man = json.loads((tmp_path / "s" / MANIFEST).read_text())
    for name, bad in (("blk.0.attn_qkv", "cols"), ("output", "r8"), ("blk.0.attn_output", "rows")):
        w = {**man["weights"], name: {**man["weights"][name], "layout": bad}}
        (tmp_path / "s" / MANIFEST).write_text(json.dumps({**man, "weights": w}))
        with pytest.raises(AmedError, match=name.replace(".", r"\.")):
            amed.load(tmp_path / "s")


# ---- a store is untrusted input (issue 26): every manifest field checked before mapping -------

def _store_with(golden_store, tmp_path, change):
    dst = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), dst)
    man = json.loads((dst / MANIFEST).read_text())
    change(man)
    (dst / MANIFEST).write_text(json.dumps(man))
    return dst


def _set(path, value):
    def change(man):
        obj = man
        for p in path[:-1]:
            obj = obj[p]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return change


BAD_MANIFESTS = [
    (("experts", "1", "stride"), 10**9, "would end at byte"),
    (("experts", "1", "count"), 64, "number 64"),
    (("experts", "1", "offset"), "+4096", "would end at byte"),
    (("experts", "2", "offset"), "-4096", "outside its expert's byte range"),
    (("experts", "1", "offset"), -1, "offset"),
    (("experts", "1", "stride"), "4096", "stride"),
    (("files",), KeyError, "'files' is missing"),
    (("files",), [], "'files' is not an object"),
    (("files", "layer-001.safetensors", "bytes"), "126976", "bytes"),
    (("files", "layer-001.safetensors", "bytes"), -1, "bytes"),
    (("files", "layer-001.safetensors", "bytes"), 0, "bytes"),
    (("weights", "blk.0.attn_qkv"), KeyError, "weight 'blk.0.attn_qkv' is missing"),
    (("experts", "1", "matrices", "ffn_up_exps"), KeyError, "matrices"),
    (("experts", "2"), KeyError, "routed experts of layer 2 are missing"),
    (("weights", "output", "file"), [1, 2], "file"),
    (("config", "hidden_size"), 32, "config implies"),
    (("config", "num_hidden_layers"), 2, "does not describe"),
    (("config", "use_qk_norm"), False, "does not describe"),
    (("config", "num_experts"), 8, "config implies"),
    (("config", "rope_theta"), None, "'rope_theta'"),
    (("config", "partial_rotary_factor"), "x", "'partial_rotary_factor'"),
    (("config", "routed_scaling_factor"), "x", "'routed_scaling_factor'"),
    (("config", "rope_scaling"), 1.5, "'rope_scaling'"),
    (("config",), KeyError, "'config'"),
]


@pytest.mark.parametrize("path,value,match", BAD_MANIFESTS, ids=lambda x: str(x)[:30])
def test_hostile_manifest_is_one_sentence(golden_store, tmp_path, path, value, match):
    if isinstance(value, str) and value[:1] in "+-" and value[1:].isdigit():
        change = lambda man: _set(path, _get(man, path) + int(value))(man)   # noqa: E731
    else:
        change = _set(path, value)
    dst = _store_with(golden_store, tmp_path, change)
    with pytest.raises(AmedError, match=match) as e:
        amed.load(dst, max_ram="1M")
    assert "\n" not in str(e.value)


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@pytest.mark.parametrize("field,value", [("stride", 10**9), ("count", 64), ("offset", "+4096")])
def test_manifest_that_segfaulted_is_refused_in_a_subprocess(golden_store, tmp_path, field, value):
    """The SIGSEGVs of issue 26 (mmap expert I/O under a 1 MB budget): refused before mapping."""
    ex = ("experts", "1", field)
    change = (lambda man: _set(ex, _get(man, ex) + 4096)(man)) if value == "+4096" else _set(ex, value)
    dst = _store_with(golden_store, tmp_path, change)
    code = (f"import amed; m = amed.load({str(dst)!r}, max_ram='1M'); print(m.forward([3, 4, 5, 6])[:2])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "AMED_EXPERT_IO": "mmap"})
    assert r.returncode == 1 and "AmedError" in r.stderr and "does not match its manifest" in r.stderr, r.stderr[-2000:]


def test_verify_refuses_bad_byte_counts_and_checks_sizes(golden_store, tmp_path):
    from amed.formats.store import read_manifest, verify_files

    for bad in (-1, 0, "126976"):
        dst = _store_with(golden_store, tmp_path, _set(("files", "globals.safetensors", "bytes"), bad))
        with pytest.raises(AmedError, match="bytes"):
            read_manifest(dst)
        shutil.rmtree(dst)
    # a wrong (positive) byte count: the hash may match, the size does not
    dst = _store_with(golden_store, tmp_path, _set(("files", "globals.safetensors", "bytes"), 4096))
    assert verify_files(dst, read_manifest(dst)) == ["globals.safetensors"]


def test_stray_tensor_and_fifo_in_store(golden_store, tmp_path):
    """A FIFO in place of a store file is one sentence, not a hang."""
    dst = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), dst)
    (dst / "layer-001.safetensors").unlink()
    os.mkfifo(dst / "layer-001.safetensors")
    with pytest.raises(AmedError, match="FIFO"):
        amed.load(dst)
    from amed.formats.store import read_manifest, verify_files
    assert verify_files(dst, read_manifest(dst)) == ["layer-001.safetensors"]


def test_file_truncated_under_a_running_model(golden_store, tmp_path):
    """A store file truncated after loading: the next forward pass refuses with one sentence
    instead of dying of SIGBUS (an fstat per file per forward)."""
    dst = tmp_path / "s"
    shutil.copytree(golden_store(bits=4), dst)
    m = amed.load(dst)
    m.forward([3, 4, 5])
    os.truncate(dst / "layer-002.safetensors", 8192)
    with pytest.raises(AmedError, match="layer-002.safetensors is truncated .cut short while this process"):
        m.forward([6])


def test_sigbus_is_one_sentence_and_exit_1(tmp_path):
    """The last resort for a file truncated between that check and a kernel's access."""
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 65536)
    code = ("import mmap, os, sys, numpy as np\n"
            "from amed.formats.files import install_sigbus_handler\n"
            "assert install_sigbus_handler()\n"
            f"fd = os.open({str(f)!r}, os.O_RDONLY); m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)\n"
            f"os.truncate({str(f)!r}, 0)\n"
            "print(int(np.frombuffer(m, np.uint8).sum()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "truncated or rewritten while this process" in r.stderr
