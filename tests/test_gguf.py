"""GGUF files run in place (amed/formats/gguf.py, engine/backends/cpu/ggml.py).

Fixtures are written here with the `gguf` package (llama.cpp's own writer): the golden checkpoint
in BF16 (logits equal to the checkpoint's), in a mix of the block types gguf.quants can quantize,
and a 256-wide random model in K-quants (random valid blocks: gguf.quants has no K-quant
quantizer). References: the `gguf` package's NumPy dequantization, then tests/reference.py's
float64 forward on the dequantized weights.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

import amed  # noqa: E402
import reference  # noqa: E402
from amed.config import ModelConfig  # noqa: E402
from amed.errors import AmedError  # noqa: E402
from amed.formats.checkpoint import Checkpoint, tensor_table  # noqa: E402
from amed.formats.gguf import GGML_TYPES, GGUF, SUPPORTED, resolve_ollama  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "bailing-tiny"
QT = gguf.GGMLQuantizationType
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                 "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(rows: int, k: int, name: str, rng, std: float = 1.0) -> np.ndarray:
    """Random valid blocks of a ggml type (finite f16 scales) whose values have about `std`."""
    _, blk, size = GGML_TYPES[name]
    if name in ("F32", "F16", "BF16"):
        a = (std * rng.standard_normal((rows, k))).astype(np.float32)
        q = quantize(a, QT[name]) if name != "F32" else a
        return np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)
    nb = k // blk
    raw = rng.integers(0, 256, (rows, nb, size), dtype=np.uint8)

    def set_scales(mult):
        for o in SCALE_OFFSETS[name]:
            h = (mult * (0.5 + rng.random((rows, nb)))).astype(np.float16)
            raw[:, :, o:o + 2] = h.view(np.uint8).reshape(rows, nb, 2)
    set_scales(1.0)
    got = dequantize(raw.reshape(rows, -1), QT[name]).std()
    set_scales(std / max(got, 1e-6))          # every type's values are linear in d (and dmin)
    return raw.reshape(rows, nb * size)


def write_gguf(path: Path, cfg: dict, hf: dict, pick, rng=None, tokenizer_dir: Path | None = None):
    """A bailingmoe2 GGUF of the HF-named float tensors `hf`; `pick(gguf_name, shape)` gives each
    tensor's block type. Returns the dequantized HF-named tensors (what the file holds)."""
    c = ModelConfig.from_dict(cfg)
    w = gguf.GGUFWriter(str(path), "bailingmoe2")
    a = "bailingmoe2."
    for key, v in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                   ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                   ("attention.head_count", c.num_attention_heads),
                   ("attention.head_count_kv", c.num_key_value_heads), ("attention.key_length", c.head_size),
                   ("attention.value_length", c.head_size), ("rope.dimension_count", c.rot_dim),
                   ("leading_dense_block_count", c.first_k_dense_replace), ("vocab_size", c.vocab_size),
                   ("expert_feed_forward_length", c.moe_intermediate_size),
                   ("expert_shared_feed_forward_length", c.shared_intermediate_size),
                   ("expert_count", c.num_experts), ("expert_used_count", c.num_experts_per_tok),
                   ("expert_shared_count", c.num_shared_experts), ("expert_group_count", c.n_group),
                   ("expert_group_used_count", c.topk_group), ("expert_gating_func", 2),
                   ("nextn_predict_layers", 0)):
        w.add_uint32(a + key, v)
    w.add_float32(a + "rope.freq_base", c.rope_theta)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(a + "expert_weights_scale", c.routed_scaling_factor)
    w.add_bool(a + "expert_weights_norm", c.norm_topk_prob)
    w.add_string("rope.scaling.type", "none")
    if tokenizer_dir is not None:
        tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        tc = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        vocab = {**tj["model"]["vocab"], **{t["content"]: t["id"] for t in tj["added_tokens"]}}
        tokens = [None] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        special = {t["id"] for t in tj["added_tokens"] if t["special"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
        w.add_bos_token_id(vocab[tc["bos_token"]])
        w.add_eos_token_id(vocab[tc["eos_token"]])
        w.add_chat_template(tc["chat_template"])
    out = {}
    groups: dict = {}
    for s in tensor_table(c):
        if s.expert >= 0:
            groups.setdefault(s.name.rsplit(".", 1)[0], []).append(s)
            continue
        gname = s.name + (".bias" if s.name.endswith("exp_probs_b") else ".weight")
        arr = hf[s.hf].astype(np.float32)
        out[s.hf] = _add(w, gname, arr, pick(gname, arr.shape), rng)
    for stacked, specs in groups.items():
        arr = np.stack([hf[s.hf] for s in specs]).astype(np.float32)
        deq = _add(w, stacked + ".weight", arr, pick(stacked + ".weight", arr.shape), rng)
        for i, s in enumerate(specs):
            out[s.hf] = deq[i]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add(w, name, arr, typ, rng):
    """Add one tensor of type `typ` (quantized from arr, or random blocks: typ 'rand:Q4_K');
    returns what the file holds, dequantized, in arr's shape."""
    if typ.startswith("rand:"):
        typ = typ[5:]
        k = arr.shape[-1]
        q = random_blocks(arr.size // k, k, typ, rng, std=1.0 / np.sqrt(k)).reshape(arr.shape[:-1] + (-1,))
    elif typ == "F32":
        w.add_tensor(name, arr)
        return arr
    else:
        q = quantize(arr, QT[typ])
    w.add_tensor(name, q, raw_dtype=QT[typ])
    return dequantize(q, QT[typ]).reshape(arr.shape).astype(np.float32)


def golden_tensors() -> tuple[dict, dict]:
    cfg = json.loads((GOLDEN / "config.json").read_text())
    ck = Checkpoint(GOLDEN)
    return cfg, {name: ck.get_f32(name) for name in ck.tensors}


def small(name, shape):
    return "F32" if len(shape) == 1 or "ffn_gate_inp" in name else None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    cfg, hf = golden_tensors()
    rng = np.random.default_rng(0)
    built = {"cfg": cfg, "hf": hf}
    built["bf16"] = root / "golden-bf16.gguf"
    built["bf16_w"] = write_gguf(built["bf16"], cfg, hf, lambda n, s: small(n, s) or "BF16", tokenizer_dir=GOLDEN)
    mix = {"token_embd": "F16", "attn_qkv": "Q8_0", "attn_output": "Q4_0", "ffn_gate.": "Q5_0", "ffn_up.": "Q5_1",
           "ffn_down.": "Q4_1", "_exps": "Q4_0", "_shexp": "Q8_0", "output.": "Q8_0"}

    def pick_mix(n, s):
        return small(n, s) or next(t for k, t in mix.items() if k in n)
    built["mix"] = root / "golden-mix.gguf"
    built["mix_w"] = write_gguf(built["mix"], cfg, hf, pick_mix, tokenizer_dir=GOLDEN)
    # a 256-wide model in K-quants, a Q4_K_M-like mix (random blocks)
    kcfg = dict(cfg, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                intermediate_size=256, moe_intermediate_size=256, moe_shared_expert_intermediate_size=256,
                num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_hidden_layers=2, vocab_size=96)
    kc = ModelConfig.from_dict(kcfg)
    zeros = {s.hf: np.zeros(s.shape, np.float32) for s in tensor_table(kc)}
    for n in zeros:
        if n.endswith("norm.weight"):
            zeros[n] = (1 + 0.1 * rng.standard_normal(zeros[n].shape)).astype(np.float32)
        elif n.endswith(("expert_bias", "gate.weight")):
            zeros[n] = (0.1 * rng.standard_normal(zeros[n].shape)).astype(np.float32)
    kmix = {"token_embd": "Q2_K", "attn_qkv": "Q3_K", "attn_output": "Q5_K", "ffn_gate.": "Q4_K",
            "ffn_up.": "Q4_K", "ffn_down.": "Q6_K", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K",
            "ffn_down_exps": "Q6_K", "_shexp": "Q5_K", "output.": "Q6_K"}

    def pick_k(n, s):
        return small(n, s) or "rand:" + next(t for k, t in kmix.items() if k in n)
    built["kcfg"] = kcfg
    built["kq"] = root / "kquants.gguf"
    built["kq_w"] = write_gguf(built["kq"], kcfg, zeros, pick_k, rng=rng)
    return built


IDS = [0, 5, 17, 99, 3, 250, 42, 7, 11, 400, 2, 64]


def test_kernels_equal_gguf_dequantize():
    """Every block type: rows equal gguf's NumPy dequantization exactly; matmul within float32."""
    from amed.engine.backends.cpu import ggml

    rng = np.random.default_rng(1)
    for name in SUPPORTED:
        tid = GGML_TYPES[name][0]
        raw = np.ascontiguousarray(random_blocks(7, 512, name, rng))
        raw.flags.writeable = False          # as a file's map hands it out: one compiled signature
        ref = dequantize(raw, QT[name]).reshape(7, 512).astype(np.float32)
        out = np.empty((7, 512), np.float32)
        ggml.rows_ggml(raw, tid, 512, np.arange(7), ggml.H2F, out)
        np.testing.assert_array_equal(out, ref, err_msg=name)
        for T in (1, ggml.FUSED_T + 2):                 # fused row dots (decode), dequantize-then-dot
            x = rng.standard_normal((T, 512)).astype(np.float32)
            y = np.empty((T, 7), np.float32)
            ggml.matmul_ggml(x, raw, tid, ggml.H2F, y)
            np.testing.assert_allclose(y, x.astype(np.float64) @ ref.T.astype(np.float64), rtol=1e-5, atol=1e-5,
                                       err_msg=name)


def test_bf16_file_equals_checkpoint(files):
    """The golden checkpoint written as BF16 GGUF gives the checkpoint's logits (same kernels)."""
    want = amed.load(GOLDEN).logits(IDS)
    m = amed.load(files["bf16"])
    assert m.config.num_hidden_layers == 3 and m.config.rot_dim == 8 and m.config.n_group == 4
    np.testing.assert_allclose(m.logits(IDS), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["mix", "kq"])
def test_quantized_file_matches_reference(files, which):
    """A file's logits = the NumPy float64 forward on its dequantized weights, within 1e-4."""
    cfg = files["kcfg"] if which == "kq" else files["cfg"]
    ids = [i % cfg["vocab_size"] for i in IDS]
    m = amed.load(files[which])
    got = m.logits(ids)
    want = reference.forward(files[which + "_w"], cfg, ids)
    scale = max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() < 1e-4 * scale, np.abs(got - want).max()
    # lazy: only the experts the router chose were bound
    k = cfg["num_experts_per_tok"]
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert 0 < len(m.experts.touched) <= min(len(ids) * k, cfg["num_experts"]) * moe_layers
    # each expert is read ahead (its three byte ranges) once, when first chosen
    m.source.prefetch_experts(1, [0, cfg["num_experts"] - 1])
    calls = []
    m.source.prefetch_experts = lambda L, es: calls.extend((L, e) for e in es)
    m.use_experts()
    np.testing.assert_array_equal(m.logits(ids), got)
    assert sorted(calls) == sorted(m.experts.touched)
    # under a memory budget: the expert cache (own slots, or the file mapping) gives the same logits
    from amed.engine.experts import ExpertOptions

    stride = max(i["stride"] for i in m.source.experts_info.values())
    for io in ("slots", "mmap"):
        m.use_experts(ExpertOptions(expert_budget=2 * k * stride, io=io, lookahead="on"))
        assert m.experts.cache.bounded
        np.testing.assert_allclose(m.logits(ids), got, rtol=0, atol=1e-5, err_msg=io)
        assert m.experts.cache.stats.evictions > 0 or len(m.experts.touched) <= 2 * k
    m.experts.close()


def test_tokenizer_and_template_from_gguf(files):
    from amed.text.tokenizer import Tokenizer

    ref, tok = Tokenizer.from_dir(GOLDEN), Tokenizer.from_dir(files["mix"])
    text = "Hello world, how are you? <role>HUMAN</role> 123 ok<|role_end|>"
    assert tok.encode(text) == ref.encode(text)
    msgs = [{"role": "user", "content": "hi there"}]
    assert tok.encode_chat(msgs) == ref.encode_chat(msgs)
    assert tok.decode(ref.encode(text)) == text
    assert ref.stop_ids <= tok.stop_ids | {4} and tok.token_to_id("<|role_end|>") in tok.stop_ids


def test_ling_pretokenizer():
    """tokenizer.ggml.pre 'bailingmoe2' (Ling 2.0's split: digits one by one) round-trips text."""
    from amed.formats.gguf import Header, gguf_tokenizer

    tokens = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "<|role_end|>", "Ġw", "or"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "bailingmoe2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["Ġ w", "o r"], "tokenizer.ggml.eos_token_id": len(tokens) - 3,
            "tokenizer.ggml.token_type": np.array([1] * (len(tokens) - 3) + [3, 1, 1], np.int32)}
    tok, kw = gguf_tokenizer(Header(Path("x.gguf"), 0, 3, meta, {}, 0, 32))
    text = "Hi world's 123!\n<|role_end|>"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert ["1", "2", "3"] == [t for t in enc.tokens if t.isdigit()] and "Ġw" in enc.tokens
    assert enc.ids[-1] == len(tokens) - 3 and kw["eos_token"] == "<|role_end|>"
    meta["tokenizer.ggml.model"] = "llama"
    with pytest.raises(AmedError, match="tokenizer of kind"):
        gguf_tokenizer(Header(Path("x.gguf"), 0, 3, meta, {}, 0, 32))


def test_cli_chat_show_and_ollama(files, tmp_path, amed_cli, monkeypatch):
    code, out, err = amed_cli("chat", "-m", files["mix"], "-p", "hello", "-n", "4", "--temp", "0")
    assert code == 0 and out.strip(), err[-2000:]
    code, out, err = amed_cli("show", files["mix"])
    assert code == 0 and "GGUF version 3" in out and "Q4_0" in out, out + err
    code, out, err = amed_cli("rm", "-y", files["mix"])
    assert code != 0 and "GGUF file amed did not write" in " ".join(err.split()) and files["mix"].exists()
    # an ollama tree: manifests/registry.ollama.ai/NAMESPACE/NAME/TAG -> blobs/sha256-HEX
    root = tmp_path / "ollama"
    digest = "ab" * 32
    man = root / "manifests" / "registry.ollama.ai" / "MedAIBase" / "AntAngelMed" / "100b"
    man.parent.mkdir(parents=True)
    (root / "blobs").mkdir()
    os.link(files["mix"], root / "blobs" / f"sha256-{digest}")
    man.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + digest}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert resolve_ollama("ollama:MedAIBase/AntAngelMed:100b") == root / "blobs" / f"sha256-{digest}"
    assert amed.load("ollama:MedAIBase/AntAngelMed:100b").config.num_experts == 16
    for bad in ("ollama:MedAIBase/AntAngelMed:7b", "ollama:../x", "ollama:", "ollama:a/b/c/d"):
        with pytest.raises(AmedError):
            resolve_ollama(bad)
    code, out, err = amed_cli("show", "ollama:MedAIBase/AntAngelMed:100b")
    assert code == 0 and "gguf" in out, out + err
    code, out, err = amed_cli("chat", "-m", "ollama:MedAIBase/AntAngelMed:100b", "-p", "hi", "-n", "2")
    assert code == 0, err


def one_sentence(path):
    """Opening `path` either works or raises one AmedError sentence (never another exception)."""
    try:
        GGUF(path).close()
        return None
    except AmedError as e:
        msg = str(e)
        assert msg and "\n" not in msg and msg.endswith("."), msg
        return msg


def test_hostile_headers(files, tmp_path):
    good = files["mix"].read_bytes()
    bad = tmp_path / "bad.gguf"

    def try_bytes(b):
        bad.write_bytes(b)
        return one_sentence(bad)

    # named cases
    import struct
    assert "magic" in try_bytes(b"GGUX" + good[4:])
    assert "version 9" in try_bytes(good[:4] + struct.pack("<I", 9) + good[8:])
    assert "tensors" in try_bytes(good[:8] + struct.pack("<Q", 1 << 40) + good[16:])
    assert "metadata" in try_bytes(good[:16] + struct.pack("<Q", 1 << 40) + good[24:])
    assert "truncated" in try_bytes(good[:-100]) or "past the end" in try_bytes(good[:-100])
    assert try_bytes(good[:30]) is not None
    # the first key's length: huge
    assert "claims" in try_bytes(good[:24] + struct.pack("<Q", 1 << 62) + good[32:])
    # a tensor of an unsupported block type: rewrite one tensor's type number in the table
    from amed.formats.gguf import read_header
    h = read_header(files["mix"])
    name = "blk.1.ffn_gate_exps.weight"
    pos = good.index(name.encode()) + len(name)
    nd = struct.unpack_from("<I", good, pos)[0]
    tpos = pos + 4 + 8 * nd
    assert struct.unpack_from("<I", good, tpos)[0] == h.tensors[name].type_id
    msg = try_bytes(good[:tpos] + struct.pack("<I", 16) + good[tpos + 4:])       # IQ2_XXS
    assert msg is not None and ("IQ2_XXS" in msg or "multiple" in msg or "past" in msg or "overlap" in msg)
    assert "offset" in try_bytes(good[:tpos + 4] + struct.pack("<Q", 3) + good[tpos + 12:])
    # metadata that would describe a huge model: refused at once, from the tensor table of the file
    import time
    for key, value, words in (("bailingmoe2.expert_count", 4000, "shape"), ("bailingmoe2.block_count", 1000, "layers")):
        at = good.index(key.encode()) + len(key)
        assert struct.unpack_from("<I", good, at)[0] == 4                        # a uint32 value follows
        t0 = time.perf_counter()
        msg = try_bytes(good[:at + 4] + struct.pack("<I", value) + good[at + 8:])
        assert words in msg and time.perf_counter() - t0 < 2, msg
    # random mutations of the header bytes: one sentence or a working file, never a crash
    rng = np.random.default_rng(7)
    end = h.data_start
    for _ in range(150):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, end))
            b[i] = int(rng.integers(0, 256))
        try_bytes(bytes(b))
