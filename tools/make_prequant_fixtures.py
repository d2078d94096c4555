"""Write tests/data/prequant/: small pre-quantized checkpoints made by the formats' own tools.

    pip install -e ".[fixtures]"        # torch==2.13.0 and compressed-tensors==0.12.2
    python tools/make_prequant_fixtures.py [OUT]   # default tests/data/prequant

From one random bf16 checkpoint (`amed synth`, hidden 128 so that INT4 group 128 fits), it writes:

* int4/       compressed-tensors `pack-quantized` W4A16 (4-bit symmetric, group 128, actorder static):
              every Linear packed by compressed-tensors' PackedQuantizationCompressor.compress_weight,
              scales from its calculate_qparams; `lm_head` and the shared experts in `ignore` (bf16);
              config.json's quantization_config written by compressed-tensors' ModelCompressor.update_config.
* int4-gidx/  the same with `actorder: "group"`: a random column order (standing in for GPTQ's
              activation order) assigns each column its group, saved as `weight_g_idx`.
* fp8/        block FP8 as in inclusionAI's converter: float8_e4m3fn weights (torch's own cast) with
              float32 `weight_scale_inv` per 128x128 block (amax / 448; the routed experts' gate/up
              and attention.dense scales rounded up to powers of two, ue8m0), quantization_config
              {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}.
* reference.npz: what each library decodes, for the tests (which need neither torch nor
              compressed-tensors): "<variant>/<HF name>" ->
              int4: compressed-tensors' decompress_weight output with the bf16 scales (the model
              dtype, as vLLM/transformers run it; bf16 bits as uint16; int4/ only) under "bf16:", and with the
              scales in float32 (the exact q * s; stored as float16, checked exact) under "f32:";
              fp8: torch's float8_e4m3fn -> float32 cast (float16, checked exact), to be multiplied
              by the block's weight_scale_inv.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import compressed_tensors
from compressed_tensors.compressors import ModelCompressor, PackedQuantizationCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus)
from compressed_tensors.quantization.utils import calculate_qparams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amed.app.synth import write_synthetic_checkpoint  # noqa: E402

GROUP = 128
BLOCK = 128
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
             moe_intermediate_size=128, moe_shared_expert_intermediate_size=64, vocab_size=1024,
             n_group=2, topk_group=1, num_experts_per_tok=2)
IGNORE = ["lm_head", "re:.*shared_experts.*"]
COPY = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def linear_names(tensors) -> list[str]:
    """Every Linear module's weight (2-D, not the router `mlp.gate`, not the embeddings)."""
    return [k for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2
            and not k.endswith("mlp.gate.weight") and "word_embeddings" not in k]


def ignored(name: str) -> bool:
    import re

    mod = name[:-len(".weight")]
    return any(re.match(p[3:], mod) if p.startswith("re:") else p == mod for p in IGNORE)


def f16_exact(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor as float16, asserting that no value changes (keeps reference.npz small):
    q * s of a 4-bit q and a bf16 s has at most 11 significant bits, as has every e4m3 value."""
    a = t.float().numpy()
    h = a.astype(np.float16)
    assert np.array_equal(h.astype(np.float32), a), "not exact in float16"
    return h


def save_ckpt(out: Path, src: Path, tensors: dict, config: dict) -> None:
    out.mkdir(parents=True)
    for n in COPY:
        shutil.copy(src / n, out / n)
    # two shards, a module's parts together (as save_pretrained writes them), cutting across layer 1
    names = sorted(tensors)
    cut = len(names) // 2
    while cut < len(names) and names[cut].rsplit(".", 1)[0] == names[cut - 1].rsplit(".", 1)[0]:
        cut += 1
    shards = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))


def make_int4(src: Path, out: Path, base: dict, config: dict, actorder: str, ref: dict, tag: str, seed: int):
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP,
                            actorder=actorder)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    comp = PackedQuantizationCompressor(config=None)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in base.items():
        if name not in linear_names(base) or ignored(name):
            tensors[name] = w
            continue
        out_f, in_f = w.shape
        if actorder == "group":              # GPTQ's activation order: groups of 128 in a permuted column order
            perm = torch.randperm(in_f, generator=gen)
            g_idx = torch.empty(in_f, dtype=torch.int32)
            g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // GROUP
        else:
            g_idx = None
        cols = g_idx if g_idx is not None else torch.arange(in_f) // GROUP
        ng = in_f // GROUP
        mins = torch.stack([w[:, cols == g].amin(dim=1) for g in range(ng)], dim=1)
        maxs = torch.stack([w[:, cols == g].amax(dim=1) for g in range(ng)], dim=1)
        scale, zp = calculate_qparams(mins, maxs, args)
        scale = scale.to(torch.bfloat16)
        packed = comp.compress_weight(weight=w, scale=scale, quantization_args=args, zero_point=zp, g_idx=g_idx)
        mod = name[:-len(".weight")]
        tensors[mod + ".weight_packed"] = packed["weight_packed"]
        tensors[mod + ".weight_shape"] = packed["weight_shape"]
        tensors[mod + ".weight_scale"] = scale
        data = {"weight_packed": packed["weight_packed"], "weight_scale": scale,
                "weight_shape": packed["weight_shape"]}
        if g_idx is not None:
            tensors[mod + ".weight_g_idx"] = g_idx
            data["weight_g_idx"] = g_idx
        w_bf16 = comp.decompress_weight(data, quantization_args=args)
        w_f32 = comp.decompress_weight({**data, "weight_scale": scale.float()}, quantization_args=args)
        if tag == "int4":
            ref[f"{tag}/bf16:{name}"] = w_bf16.view(torch.int16).numpy().view(np.uint16)   # bf16 bits
        ref[f"{tag}/f32:{name}"] = f16_exact(w_f32)
    save_ckpt(out, src, tensors, config)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status=QuantizationStatus.COMPRESSED, ignore=IGNORE)
    ModelCompressor(quantization_config=qc).update_config(str(out))


def make_fp8(src: Path, out: Path, base: dict, config: dict, ref: dict) -> None:
    tensors = {}
    for name, w in base.items():
        if name not in linear_names(base) or name == "lm_head.weight":
            tensors[name] = w
            continue
        ue8m0 = name.endswith(("gate_proj.weight", "up_proj.weight")) and ".experts." in name \
            or name.endswith("attention.dense.weight")
        R, C = w.shape
        nb, kb = -(-R // BLOCK), -(-C // BLOCK)
        wf = torch.nn.functional.pad(w.float(), (0, kb * BLOCK - C, 0, nb * BLOCK - R))
        blocks = wf.view(nb, BLOCK, kb, BLOCK)
        scale = (blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-4)
        if ue8m0:
            scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
        q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * BLOCK, kb * BLOCK)[:R, :C]
        tensors[name] = q.contiguous()
        tensors[name + "_scale_inv"] = scale.float().contiguous()
        ref[f"fp8/{name}"] = f16_exact(q.float())     # torch's e4m3 decoding; times scale_inv per block
    cfg = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [BLOCK, BLOCK]})
    save_ckpt(out, src, tensors, cfg)


def main(out: Path) -> None:
    if not compressed_tensors.__version__.startswith("0.12."):
        sys.exit(f"needs compressed-tensors 0.12.x (0.20 no longer packs weight_g_idx); "
                 f"found {compressed_tensors.__version__}: pip install -e '.[fixtures]'")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = write_synthetic_checkpoint(out / "_bf16", preset="tiny", layers=2, experts=4, seed=7, **SHAPE)
    base = {}
    for f in sorted(src.glob("*.safetensors")):
        base.update(load_file(str(f)))
    config = json.loads((src / "config.json").read_text())
    ref: dict[str, np.ndarray] = {}
    make_int4(src, out / "int4", base, config, "static", ref, "int4", 1)
    make_int4(src, out / "int4-gidx", base, config, "group", ref, "int4-gidx", 2)
    make_fp8(src, out / "fp8", base, config, ref)
    np.savez_compressed(out / "reference.npz", **ref)
    shutil.rmtree(src)
    (out / "README.md").write_text(
        "Made by tools/make_prequant_fixtures.py (torch " + torch.__version__ + ", compressed-tensors "
        + compressed_tensors.__version__ + "); see its docstring. Regenerate with\n"
        "`pip install -e '.[fixtures]' && python tools/make_prequant_fixtures.py`.\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "data" / "prequant")
