"""The checkpoint reader: zero-copy views, and one clear sentence for every kind of bad input."""

import json
import shutil

import numpy as np
import pytest

import helpers
from amed.formats.checkpoint import Checkpoint, read_safetensors_header
from amed.config import ModelConfig
from amed.errors import AmedError


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    path, tensors = tiny_ckpt
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst, tensors


def raw_file(path, header: dict, data: bytes, pad_len=None):
    h = json.dumps(header).encode()
    n = len(h) if pad_len is None else pad_len
    path.write_bytes(n.to_bytes(8, "little") + h + data)
    return path


def test_views_are_zero_copy_and_exact(tiny_ckpt):
    path, tensors = tiny_ckpt
    ck = Checkpoint(path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    v = ck.get(name)
    assert v.dtype == np.uint16 and not v.flags.writeable and not v.flags.owndata
    assert np.array_equal((v.astype(np.uint32) << 16).view(np.float32), tensors[name])
    assert ck.get("model.layers.1.mlp.gate.expert_bias").dtype == np.float32


def test_single_file_checkpoint(tiny_ckpt, tmp_path):
    path, tensors = tiny_ckpt
    helpers.write_checkpoint(tmp_path / "one", helpers.TINY, tensors, shards=1)
    (tmp_path / "one" / "model.safetensors.index.json").unlink()
    (tmp_path / "one" / "model-00001-of-00001.safetensors").rename(tmp_path / "one" / "model.safetensors")
    ck = Checkpoint(tmp_path / "one")
    assert len(ck.tensors) == len(tensors)


def test_missing_shard(ckpt_copy):
    path, _ = ckpt_copy
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(AmedError, match=r"shard model-00002-of-00002.safetensors is missing.*amed download"):
        Checkpoint(path)


def test_missing_tensor(tiny_ckpt, tmp_path):
    _, tensors = tiny_ckpt
    t = dict(tensors)
    del t["model.layers.2.mlp.experts.7.down_proj.weight"]
    helpers.write_checkpoint(tmp_path / "m", helpers.TINY, t)
    with pytest.raises(AmedError, match=r"'model.layers.2.mlp.experts.7.down_proj.weight' is missing"):
        Checkpoint(tmp_path / "m")


def test_index_lists_tensor_the_shard_lacks(ckpt_copy):
    path, _ = ckpt_copy
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.1.extra.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AmedError, match="listed in the index.*does not contain it"):
        Checkpoint(path)


def test_wrong_shape(tiny_ckpt, tmp_path):
    _, tensors = tiny_ckpt
    t = dict(tensors)
    t["model.layers.0.attention.dense.weight"] = t["model.layers.0.attention.dense.weight"][:, :-1]
    helpers.write_checkpoint(tmp_path / "m", helpers.TINY, t)
    with pytest.raises(AmedError, match=r"'model.layers.0.attention.dense.weight'.*shape \[48, 71\].*\[48, 72\]"):
        Checkpoint(tmp_path / "m")


def test_wrong_dtype(tmp_path):
    raw_file(tmp_path / "a.safetensors", {"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))
    assert read_safetensors_header(tmp_path / "a.safetensors")["x"].dtype == "I32"
    cfg = ModelConfig.from_dict(helpers.TINY)
    from amed.formats.checkpoint import hf_tensor_specs
    specs = hf_tensor_specs(cfg)
    header, off = {}, 0
    for name, (shape, dt) in specs.items():
        dt = "I16" if name == "model.norm.weight" else dt
        n = int(np.prod(shape)) * (4 if dt == "F32" else 2)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(helpers.TINY))
    raw_file(d / "model.safetensors", header, bytes(off))
    with pytest.raises(AmedError, match=r"'model.norm.weight'.*dtype I16; expected BF16"):
        Checkpoint(d)


@pytest.mark.parametrize("header,data,pad,match", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), 10**6, "header length"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(12), None, "truncated"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), None, "overlap"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16), None, "invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(16), None, "need 16"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16), None, "invalid shape"),
    ({"x": {"dtype": "Q99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), None, "unsupported dtype"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}}, bytes(16), None, "invalid data_offsets"),
    ({"x": "hello"}, bytes(16), None, "malformed"),
])
def test_hostile_headers(tmp_path, header, data, pad, match):
    p = raw_file(tmp_path / "bad.safetensors", header, data, pad)
    with pytest.raises(AmedError, match=match):
        read_safetensors_header(p)


def test_not_json_and_tiny_files(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes((5).to_bytes(8, "little") + b"{{{{{")
    with pytest.raises(AmedError, match="not valid JSON"):
        read_safetensors_header(p)
    p.write_bytes(b"abc")
    with pytest.raises(AmedError, match="truncated"):
        read_safetensors_header(p)


def test_truncated_shard(ckpt_copy):
    path, _ = ckpt_copy
    shard = path / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(AmedError, match="model-00001-of-00002.safetensors.*truncated"):
        Checkpoint(path)


def test_shard_outside_directory(ckpt_copy):
    path, _ = ckpt_copy
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AmedError, match="outside the model directory"):
        Checkpoint(path)


def test_mtp_layers_are_skipped(tiny_ckpt, tmp_path):
    _, tensors = tiny_ckpt
    t = dict(tensors)
    t["model.layers.3.eh_proj.weight"] = np.zeros((48, 96), np.float32)
    t["model.layers.3.enorm.weight"] = np.ones(48, np.float32)
    cfg = {**helpers.TINY, "num_nextn_predict_layers": 1}
    helpers.write_checkpoint(tmp_path / "m", cfg, t)
    ck = Checkpoint(tmp_path / "m")
    import amed
    m = amed.load(tmp_path / "m")
    assert len(m.weights.layers) == 3
    assert "model.layers.3.eh_proj.weight" in ck.tensors  # present, but never used


def test_no_checkpoint_here(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(helpers.TINY))
    with pytest.raises(AmedError, match="not a checkpoint directory"):
        Checkpoint(tmp_path)


# ---- issue 26: a checkpoint is untrusted input --------------------------------------------------

def _config(path, **change):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))


def test_index_value_that_is_not_a_file_name(ckpt_copy):
    path, _ = ckpt_copy
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = 5
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(AmedError, match="maps to 5, not a file name"):
        Checkpoint(path)


@pytest.mark.parametrize("change,match", [
    (dict(num_hidden_layers=2), "does not describe"),          # a 3-layer checkpoint run as 2
    (dict(use_qk_norm=False), "layernorm.weight.*does not describe"),
    (dict(hidden_size=96, head_dim=24), "config.json implies"),
    (dict(rope_theta=None), "'rope_theta'"),
    (dict(partial_rotary_factor="x"), "'partial_rotary_factor'"),
    (dict(routed_scaling_factor="x"), "'routed_scaling_factor'"),
    (dict(rope_scaling=1.5), "'rope_scaling'"),
    (dict(num_hidden_layers=1000), "config does not match the weights"),
])
def test_config_that_disagrees_with_the_weights(ckpt_copy, change, match):
    path, _ = ckpt_copy
    _config(path, **change)
    with pytest.raises(AmedError, match=match) as e:
        Checkpoint(path)
    assert "\n" not in str(e.value)


def _shard_parts(shard):
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("k", [-4, -1, 1, 8])
def test_shifted_header_is_refused(ckpt_copy, k):
    """Offsets all moved by k bytes (or the header length by k): every tensor would be read k
    bytes off, silently. The data section must be covered exactly, without holes."""
    path, _ = ckpt_copy
    shard = path / "model-00001-of-00002.safetensors"
    n, header, data = _shard_parts(shard)
    for name, ent in header.items():
        if name != "__metadata__":
            ent["data_offsets"] = [max(0, o + k) for o in ent["data_offsets"]]
    raw_file(shard, header, data)
    with pytest.raises(AmedError, match="model-00001-of-00002.safetensors"):
        Checkpoint(path)


def test_header_length_shifted_over_padding(tmp_path):
    """A header padded with spaces still parses when its length prefix is cut by a few bytes:
    the data would start early. The end of the last tensor must be the end of the file."""
    p = raw_file(tmp_path / "a.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                 bytes(16))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    p.write_bytes((n + 4).to_bytes(8, "little") + raw[8:8 + n] + b"    " + raw[8 + n:])
    assert read_safetensors_header(p)["x"].start == 8 + n + 4       # padded: fine
    p.write_bytes((n + 2).to_bytes(8, "little") + raw[8:8 + n] + b"    " + raw[8 + n:])
    with pytest.raises(AmedError, match="bytes after its last tensor|gap"):
        read_safetensors_header(p)


@pytest.mark.parametrize("kind", ["fifo", "dir", "devzero"])
def test_shard_that_is_not_a_regular_file(ckpt_copy, kind):
    """A FIFO (or a device) as a shard: one sentence, never a blocked read."""
    import os

    path, _ = ckpt_copy
    shard = path / "model-00002-of-00002.safetensors"
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "dir":
        shard.mkdir()
    else:
        shard.symlink_to("/dev/zero")
    with pytest.raises(AmedError, match="not a regular file"):
        Checkpoint(path)


def test_hugging_face_cache_layout_with_symlinked_shards(tmp_path, golden_dir):
    """`hf download` without --local-dir: snapshots/REV/FILE are links to ../../blobs/HASH."""
    import shutil

    import amed

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(golden_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    ids = [1, 2, 3]
    np.testing.assert_array_equal(amed.load(snap).logits(ids), amed.load(golden_dir).logits(ids))


def test_expert_tensor_missing_from_its_header(ckpt_copy):
    path, _ = ckpt_copy
    shard = path / "model-00002-of-00002.safetensors"
    n, header, data = _shard_parts(shard)
    key = next(k for k in header if ".experts." in k)
    header[key + ".moved"] = header.pop(key)
    raw_file(shard, header, data)
    with pytest.raises(AmedError, match=key.replace(".", r"\.")):
        Checkpoint(path)
