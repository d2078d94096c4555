"""Pre-quantized sources (amed/quant/prequant.py): compressed-tensors INT4 and block FP8 -> amed stores.

The fixtures in tests/data/prequant were written by the formats' own tools (compressed-tensors'
packer, torch's float8_e4m3fn; tools/make_prequant_fixtures.py), with what those tools decode in
reference.npz, so these tests need neither torch nor compressed-tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import amed
import reference
from amed.errors import AmedError
from amed.formats.checkpoint import Checkpoint
from amed.formats.store import MANIFEST, Store
from amed.quant import formats as Q
from amed.quant.convert import Settings, quantize_model
from amed.quant.prequant import E4M3, open_checkpoint, read_scheme

DATA = Path(__file__).parent / "data" / "prequant"
REF = np.load(DATA / "reference.npz")
IDS = [5, 99, 400, 7, 1000, 3, 250, 64, 901, 12, 77, 300]


def bf16_bits_to_f32(a):
    return (a.astype(np.uint32) << 16).view(np.float32)


def fp8_reference(ck, hf):
    """torch's dequantization: float8 -> float32, times weight_scale_inv per 128 x 128 block."""
    q = REF[f"fp8/{hf}"].astype(np.float32)
    s = ck.get_f32(hf + "_scale_inv") if hf + "_scale_inv" in ck.tensors else \
        ck._f32(ck.virtuals[hf].parts["_scale_inv"], 0, ck.virtuals[hf].parts["_scale_inv"].shape[0])
    return q * np.repeat(np.repeat(s, 128, 0), 128, 1)[:q.shape[0], :q.shape[1]]


def reference_weight(variant, ck, hf, kind="f32"):
    if variant == "fp8":
        return fp8_reference(ck, hf)
    if kind == "bf16":
        return bf16_bits_to_f32(REF[f"{variant}/bf16:{hf}"])
    return REF[f"{variant}/f32:{hf}"].astype(np.float32)


def store_weight(st: Store, name: str) -> np.ndarray:
    m = st.matrix(name)
    if isinstance(m, Q.QTensor):
        return Q.dequantize(m)
    return bf16_bits_to_f32(m) if m.dtype == np.uint16 else np.asarray(m, np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    built = {}

    def get(variant, **kw) -> tuple[Path, dict]:
        key = (variant, tuple(sorted(kw.items())))
        if key not in built:
            out = root / f"{variant}-{len(built)}"
            built[key] = (out, quantize_model(DATA / variant, out, Settings(**{"group_size": None, **kw})))
        return built[key]
    return get


# ---- decoding: equal to what compressed-tensors and torch decode --------------------------------

def test_e4m3_table_is_ieee_like_e4m3fn():
    assert E4M3[0x00] == 0 and E4M3[0x80] == 0 and E4M3[0x7E] == 448 and E4M3[0xFE] == -448
    assert E4M3[0x01] == 2.0 ** -9 and E4M3[0x08] == 2.0 ** -6 and E4M3[0x38] == 1.0
    assert np.isnan(E4M3[0x7F]) and np.isnan(E4M3[0xFF]) and np.isfinite(E4M3).sum() == 254


@pytest.mark.parametrize("variant", ["int4", "int4-gidx", "fp8"])
def test_dequantized_weights_equal_the_libraries_own(variant):
    ck = open_checkpoint(DATA / variant)
    assert ck.virtuals, "no quantized tensor found"
    for hf in ck.virtuals:
        w = np.concatenate([c for _, c in ck.read_rows_f32(hf, 5000)])       # small chunks: row blocks
        np.testing.assert_array_equal(w, reference_weight(variant, ck, hf), err_msg=hf)


def test_plain_checkpoint_reader_names_the_conversion():
    with pytest.raises(AmedError, match="pre-quantized"):
        Checkpoint(DATA / "int4")


# ---- INT4 -> amed store: lossless copies --------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=8), dict(bits=4, group_size=32, layout="rows"),
                                dict(bits=4, dense="q6")])
def test_int4_store_weights_equal_compressed_tensors(stores, kw):
    """q4/q6/q8 copies of INT4 matrices are exact (float32 q * s); bf16 tensors are untouched."""
    path, summary = stores("int4", **kw)
    ck = open_checkpoint(DATA / "int4")
    st = Store(path)
    from amed.formats.checkpoint import tensor_table

    for spec in tensor_table(ck.config):
        if spec.hf not in ck.virtuals:
            continue
        np.testing.assert_array_equal(store_weight(st, spec.name), reference_weight("int4", ck, spec.hf),
                                      err_msg=spec.hf)
    assert summary["prequant"]["lossless_tensors"] == len(ck.virtuals)
    assert summary["prequant"]["inexact_groups"] == 0 and summary["prequant"]["requantized_tensors"] == 0
    man = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else None
    if kw.get("group_size") is None and man is not None:
        assert man["quantization"]["group_size"] == 128     # the source's group: the smallest lossless store


def test_int4_to_bf16_equals_compressed_tensors_bf16_decompression(stores):
    path, _ = stores("int4", bits=4, dense="bf16")
    ck = open_checkpoint(DATA / "int4")
    st = Store(path)
    np.testing.assert_array_equal(store_weight(st, "blk.0.attn_qkv"),
                                  reference_weight("int4", ck, "model.layers.0.attention.query_key_value.weight", "bf16"))


def test_int4_logits_match_numpy_reference(stores):
    """Experts copied to q4, INT4 attention/MLP to bf16 (= compressed-tensors' bf16 output), the bf16
    rest kept: every weight is what the libraries decode, so the logits match the NumPy reference."""
    path, _ = stores("int4", bits=4, dense="bf16", head="bf16")
    ck = open_checkpoint(DATA / "int4")
    cfg = json.loads((DATA / "int4" / "config.json").read_text())
    st = Store(path)
    from amed.formats.checkpoint import tensor_table

    t = {}
    for spec in tensor_table(ck.config):
        if spec.hf in ck.virtuals:
            t[spec.hf] = (reference_weight("int4", ck, spec.hf) if spec.kind == "expert"
                          else reference_weight("int4", ck, spec.hf, "bf16"))
        else:
            t[spec.hf] = ck.get_f32(spec.hf)
    ref = reference.forward(t, cfg, IDS)
    out = amed.load(path).logits(IDS)
    # 1e-4 relative to the largest logit, as for GGUF files: the quantized kernels round activations
    # to int16 (the store's own weights through reference.forward differ by as much)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_group_permutation_is_honoured(stores):
    """actorder "group": a matrix whose g_idx really permutes is re-quantized from its exact
    dequantization (no contiguous-group copy exists); those whose g_idx is the plain order are copied."""
    path, summary = stores("int4-gidx", bits=8, dense="q8")
    ck = open_checkpoint(DATA / "int4-gidx")
    assert summary["prequant"]["requantized_tensors"] == 1            # layer 0 down_proj: 256 columns
    st = Store(path)
    w = store_weight(st, "blk.0.ffn_down")
    ref = reference_weight("int4-gidx", ck, "model.layers.0.mlp.down_proj.weight")
    assert np.sqrt(((w - ref) ** 2).mean() / (ref ** 2).mean()) < 0.01   # q8 of the exact weights
    np.testing.assert_array_equal(store_weight(st, "blk.1.ffn_gate_exps.2"),
                                  reference_weight("int4-gidx", ck, "model.layers.1.mlp.experts.2.gate_proj.weight"))


# ---- FP8 -> amed store ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_fp8_store_is_close_and_bf16_exact_where_representable(stores, bits):
    path, _ = stores("fp8", bits=bits, dense="bf16", head="bf16")
    ck = open_checkpoint(DATA / "fp8")
    st = Store(path)
    from amed.formats.checkpoint import f32_to_bf16, tensor_table

    for spec in tensor_table(ck.config):
        if spec.hf not in ck.virtuals:
            continue
        ref = reference_weight("fp8", ck, spec.hf)
        w = store_weight(st, spec.name)
        if spec.kind == "expert":
            rel = np.sqrt(((w - ref) ** 2).mean() / (ref ** 2).mean())
            assert rel < (0.01 if bits == 8 else 0.12), (spec.hf, rel)
        else:                                   # bf16: the nearest bf16 of torch's value
            np.testing.assert_array_equal(w, bf16_bits_to_f32(f32_to_bf16(ref)), err_msg=spec.hf)


def test_fp8_logits_close_to_numpy_reference(stores):
    path, _ = stores("fp8", bits=8, dense="bf16", head="bf16")
    ck = open_checkpoint(DATA / "fp8")
    cfg = json.loads((DATA / "fp8" / "config.json").read_text())
    t = {}
    from amed.formats.checkpoint import tensor_table

    for spec in tensor_table(ck.config):
        t[spec.hf] = fp8_reference(ck, spec.hf) if spec.hf in ck.virtuals else ck.get_f32(spec.hf)
    ref = reference.forward(t, cfg, IDS)
    out = amed.load(path).logits(IDS)
    assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# ---- the config: one sentence for what amed does not read ----------------------------------------

def _ct(**weights):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, **weights}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}}


@pytest.mark.parametrize("cfg, field", [
    (_ct(num_bits=8), "config_groups.group_0.weights.num_bits"),
    (_ct(symmetric=False), "config_groups.group_0.weights.symmetric"),
    (_ct(strategy="channel"), "config_groups.group_0.weights.strategy"),
    (_ct(actorder="dynamic"), "config_groups.group_0.weights.actorder"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}, "format"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}}, "fmt"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}, "weight_block_size"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                              "activation_scheme": "static"}}, "activation_scheme"),
])
def test_unsupported_fields_give_one_sentence(cfg, field):
    with pytest.raises(AmedError) as e:
        read_scheme(cfg)
    msg = str(e.value)
    assert f"quantization_config {field} = " in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_ignore_list_must_match_the_weights(tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(DATA / "int4", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = ["lm_head"]                  # shared experts are bf16 in the files
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AmedError, match="shared_experts.*ignore|shared_experts.*targets"):
        open_checkpoint(d)


# ---- resume and Ctrl-C: the ordinary quantize machinery -------------------------------------------

def test_interrupted_conversion_resumes_to_the_same_bytes(tmp_path, stores, monkeypatch):
    ref, _ = stores("int4", bits=4)
    from amed.quant import convert

    calls = {"n": 0}
    real = convert.convert_tensor

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(convert, "convert_tensor", flaky)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(DATA / "int4", out, Settings(bits=4, group_size=None))
    with pytest.raises(AmedError):
        Store(out)                                                       # unfinished: never opens
    monkeypatch.setattr(convert, "convert_tensor", real)
    s = quantize_model(DATA / "int4", out, Settings(bits=4, group_size=None))
    assert s["files_written"] < s["files_total"]
    for p in ref.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


# ---- amed download --quantize: shards come and go, parts of a weight may sit in two shards --------

def reshard(src: Path, dst: Path, n: int) -> Path:
    """The same checkpoint cut into n shards by sorted tensor name (raw bytes copied), so that some
    quantized weights have their packed levels and their scales in different shards."""
    from amed.formats.checkpoint import read_safetensors_header

    dst.mkdir(parents=True)
    infos = {}
    for f in sorted(src.glob("*.safetensors")):
        infos.update(read_safetensors_header(f))
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    names = sorted(infos)

    def splits_a_weight(i):                  # names[i - 1] and names[i] are two parts of one weight
        a, b = names[i - 1], names[i]
        return (a.endswith(".weight_packed") and b == a[:-len("_packed")] + "_scale"
                or a.endswith(".weight") and b == a + "_scale_inv")

    cuts = []
    for i in range(1, n):
        c = i * len(names) // n
        while c < len(names) and not splits_a_weight(c):
            c += 1
        cuts.append(c)
    bounds = [0] + sorted(set(cuts)) + [len(names)]
    weight_map = {}
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        keys = names[a:b]
        fname = f"model-{i + 1:05d}-of-{len(bounds) - 1:05d}.safetensors"
        header, blobs, off = {}, [], 0
        for k in keys:
            t = infos[k]
            with open(t.path, "rb") as fh:
                fh.seek(t.start)
                blobs.append(fh.read(t.nbytes))
            header[k] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
            off += t.nbytes
            weight_map[k] = fname
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        (dst / fname).write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(bounds) > 3 and all(splits_a_weight(c) for c in bounds[1:-1])
    return dst


@pytest.fixture(scope="module", params=["int4", "fp8"])
def hubbed(request, tmp_path_factory):
    """A pre-quantized checkpoint cut into shards that split weights, on the fake hub, and the store
    that `amed download` then `amed quantize` make of it: (variant, repo, shards, fake hub, store, summary)."""
    from amed import hub
    from hubserver import FakeHub

    variant = request.param
    tmp = tmp_path_factory.mktemp(f"hub-{variant}")
    src = reshard(DATA / variant, tmp / "src", 7)
    repo = f"MedAIBase/AntAngelMed-{variant.upper()}"
    fake = FakeHub()
    fake.add_repo(repo, {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
    with fake:
        plan = hub.list_files(repo, endpoint=fake.url)
        hub.download(plan, tmp / "dl", backoff=0.001)
        summary = quantize_model(tmp / "dl", tmp / "ref", Settings(bits=4, group_size=None))
        yield variant, repo, sorted(p.name for p in src.glob("*.safetensors")), fake, tmp / "ref", summary


@pytest.fixture
def _hub_env(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "AMED_HOME"):
        monkeypatch.delenv(var, raising=False)


def _stream(hubbed, dst, progress=None):
    from amed import hub
    from amed.quant import stream

    _, repo, _, fake, _, _ = hubbed
    return stream.download_quantize(hub.list_files(repo, endpoint=fake.url), dst, Settings(bits=4, group_size=None),
                                    progress=progress, backoff=0.001)


def _same_bytes(ref: Path, dst: Path):
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (dst / p.name).read_bytes() == p.read_bytes(), p.name


def test_download_quantize_streams_prequantized_checkpoints(hubbed, tmp_path, _hub_env):
    from amed.quant import stream

    _, _, shards, _, ref, ref_summary = hubbed
    deleted = []

    class Probe(stream.StreamProgress):
        def shard(self, name, event):
            if event == "deleted":
                deleted.append(name)

    summary = _stream(hubbed, tmp_path / "store", Probe())
    assert sorted(deleted) == shards                               # each shard deleted once
    assert not stream.default_download_dir(tmp_path / "store").exists()
    _same_bytes(ref, tmp_path / "store")
    assert summary["prequant"] == ref_summary["prequant"]


def test_download_quantize_interrupted_anywhere_resumes_to_the_same_bytes(hubbed, tmp_path, _hub_env):
    """Ctrl-C while a weight's first shard waits for its second, mid-conversion, before a shard is
    deleted: each rerun of the same command continues, and the end is the same store."""
    from amed.quant import stream

    _, _, shards, fake, ref, _ = hubbed
    dst = tmp_path / "store"
    counts: dict = {}
    stop: list = [None]

    class Chaos(stream.StreamProgress):
        def converted(self, done, tensors):
            self.tick("convert")

        def shard(self, name, event):
            self.tick(event)

        def tick(self, kind):
            counts[kind] = counts.get(kind, 0) + 1
            if stop[0] == (kind, counts[kind]):
                raise KeyboardInterrupt

    for point in [("downloaded", 2), ("convert", 9), ("deleted", 1), ("converted", 2), ("convert", 12)]:
        counts.clear()
        stop[0] = point
        with pytest.raises(KeyboardInterrupt):
            _stream(hubbed, dst, Chaos())
        with pytest.raises(AmedError, match="incomplete"):
            amed.load(dst)
    stop[0] = None
    _stream(hubbed, dst, Chaos())
    _same_bytes(ref, dst)
    assert not stream.default_download_dir(dst).exists()


def test_download_prints_the_checkpoints_and_sizes_first(hubbed, tmp_path, monkeypatch, capsys, _hub_env):
    import sys

    from amed.app import cli

    _, repo, _, fake, _, _ = hubbed
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(sys, "argv", ["amed", "download", repo, "--dry-run", "--local-dir", str(tmp_path / "d")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err
    lines = {ln.split()[0]: ln for ln in err.splitlines() if ln.startswith("  MedAIBase/")}
    assert set(lines) == {"MedAIBase/AntAngelMed", "MedAIBase/AntAngelMed-FP8", "MedAIBase/AntAngelMed-INT4"}
    assert "206 GB" in lines["MedAIBase/AntAngelMed"] and "~104 GB" in lines["MedAIBase/AntAngelMed-FP8"]
    assert "~56 GB" in lines["MedAIBase/AntAngelMed-INT4"] and "<- this one" in lines[repo]
