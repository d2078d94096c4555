"""Quantization quality: mean KL divergence and top-1 agreement of amed stores against the
unquantized forward pass, teacher-forced over real text, on synthetic models: a sweep of quantize
settings. For one model against another, use `amed perplexity -m STORE -f TEXT --kld-base CKPT`
(amed/app/quality.py, which this script's measures come from).

    python bench/quality.py                       # golden-like tiny + a flash-like medium model
    python bench/quality.py --ckpt DIR            # any checkpoint you have
    python bench/quality.py --dense q8,q6 --groups  # which dense formats / group sizes
    python bench/quality.py --head q8,q6,q4       # which lm_head formats (dense q8)
Prints a Markdown table; the targets (issue: int8 <= 0.0015, int4 <= 0.02 mean KLD) are marked.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import amed
from amed.app.bench import SAMPLE_TEXT
from amed.app.quality import kl_divergence
from amed.quant.convert import Settings, quantize_model
from amed.app.synth import write_synthetic_checkpoint
from amed.text.tokenizer import Tokenizer

TARGET = {4: 0.02, 8: 0.0015}
GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "bailing-tiny"


def evaluate(ckpt: Path, work: Path, n_pos: int, settings_list) -> list[dict]:
    tok = Tokenizer.from_dir(ckpt)
    ids = (tok.encode(SAMPLE_TEXT) * (1 + n_pos // 50))[:n_pos]
    ref = amed.load(ckpt).logits(ids)
    rows = []
    for st in settings_list:
        dst = work / f"{ckpt.name}-q{st.bits}-g{st.group_size}-{st.dense}-{st.head_fmt}"
        t = time.perf_counter()
        quantize_model(ckpt, dst, st, force=True)
        qt = time.perf_counter() - t
        out = amed.load(dst).logits(ids)
        k = kl_divergence(ref, out)
        rows.append(dict(model=ckpt.name, bits=st.bits, group=st.group_size, dense=st.dense, head=st.head_fmt,
                         kld=k.mean(), kld_p99=np.percentile(k, 99), top1=(ref.argmax(-1) == out.argmax(-1)).mean(),
                         quant_s=qt))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, action="append", help="checkpoint(s) to measure")
    ap.add_argument("--positions", type=int, default=300)
    ap.add_argument("--dense", default="q8,q6,q4",
                    help="formats of the non-expert weights to compare for int4 experts (group 64)")
    ap.add_argument("--head", default="",
                    help="lm_head formats to compare for int4 experts and dense q8 (default: only the default)")
    ap.add_argument("--groups", action="store_true", help="also sweep group sizes 32/64/128 (dense q8)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpts = a.ckpt
        if not ckpts:
            medium = work / "flash-like-medium"
            write_synthetic_checkpoint(medium, preset="flash", layers=4, hidden_size=512, num_attention_heads=8,
                                       head_dim=64, intermediate_size=1024, moe_intermediate_size=128,
                                       moe_shared_expert_intermediate_size=128, num_experts=64, vocab_size=4096)
            ckpts = [GOLDEN, medium]
        groups = (32, 64, 128) if a.groups else (64,)
        settings = [Settings(bits=8, group_size=g, dense="q8") for g in groups] + \
                   [Settings(bits=4, group_size=g, dense="q8") for g in groups if g != 64] + \
                   [Settings(bits=4, group_size=64, dense=d) for d in a.dense.split(",")] + \
                   [Settings(bits=4, group_size=64, dense="q8", head=h) for h in a.head.split(",") if h]
        print("| model | experts | group | dense | lm_head | mean KLD | p99 KLD | top-1 | target | quantize s |")
        print("|---|---|---:|---|---|---:|---:|---:|---|---:|")
        for ck in ckpts:
            for r in evaluate(ck, work, a.positions, settings):
                ok = "ok" if r["kld"] <= TARGET[r["bits"]] else "MISSED"
                print(f"| {r['model']} | q{r['bits']} | {r['group']} | {r['dense']} | {r['head']} | {r['kld']:.2e} | "
                      f"{r['kld_p99']:.2e} | {r['top1']:.3f} | {ok} (<= {TARGET[r['bits']]}) | {r['quant_s']:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
