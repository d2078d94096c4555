"""Routing measurements of a model on a text: what a trained router does that random ones do not.

    python bench/routing.py -m tests/data/trained -f tests/data/trained/held-out.txt [--json]

Runs amed's forward pass over the text in windows of -c tokens, records every MoE layer's input
(the post-attention RMSNorm output the router reads) and the experts its router chose, then reports
per layer:
  * skew of expert use: the share of all routed assignments taken by the top 10% of experts (25.6
    of 256; 10% if use were even), the normalized entropy of the use distribution (1 = even), and
    the busiest expert's use over the mean;
  * reuse: the share of a token's 8 experts that the previous token (same window) also used;
  * look-ahead recall: the share of layer L's 8 experts that amed's router look-ahead guesses
    (engine/experts/lookahead.py: layer L's router and expert bias applied to layer L-1's MoE
    input, through the same group-limited top-k), per token; not measurable for the first MoE
    layer, whose predecessor is the dense layer (no look-ahead runs there);
  * recall from L-1's output: the same router applied one step later, to layer L's attention
    input (layer L-1's MoE output added; only layer L's attention missing): how much of the miss
    that MoE output accounts for.
Random baselines: recall and reuse of independent uniform choices are 8/256 = 3.1%.

`--compare STORE` adds, per layer, the share of the 8 experts that STORE (e.g. a quantized copy)
chooses alike on the same text: where quantization moves the router's choice.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def lookahead_recall(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean over tokens of |pred_t ∩ actual_t| / k, for [T, k] arrays of expert ids (ids within a
    row are distinct)."""
    pred, actual = np.asarray(pred), np.asarray(actual)
    if pred.shape != actual.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and actual {actual.shape} must both be [T, k]")
    if len(pred) == 0:
        return float("nan")
    hits = (pred[:, :, None] == actual[:, None, :]).any(-1).sum(-1)
    return float(hits.mean() / pred.shape[1])


def reuse(idx: np.ndarray, window_starts) -> float:
    """Mean share of token t's experts that token t-1 also used (pairs within a window only)."""
    idx = np.asarray(idx)
    first = np.zeros(len(idx), bool)
    first[list(window_starts)] = True
    keep = ~first[1:]
    if not keep.any():
        return float("nan")
    return lookahead_recall(idx[1:][keep], idx[:-1][keep])


def skew(idx: np.ndarray, num_experts: int) -> dict:
    counts = np.bincount(np.asarray(idx).reshape(-1), minlength=num_experts).astype(np.float64)
    p = counts / counts.sum()
    top = np.sort(p)[::-1][: max(1, int(round(num_experts * 0.1)))].sum()
    nz = p[p > 0]
    return {"top10pct_share": float(top), "entropy": float(-(nz * np.log(nz)).sum() / math.log(num_experts)),
            "max_over_mean": float(p.max() * num_experts), "unused": int((counts == 0).sum())}


def route(model, L: int, h: np.ndarray) -> np.ndarray:
    """Layer L's router on h [T, H] (host float32), exactly as amed's MoE block and look-ahead
    run it: fp32 logits, sigmoid + expert bias, group-limited top-k. Returns idx [T, k]."""
    c, lw = model.config, model.weights.layers[L]
    T, k = h.shape[0], c.num_experts_per_tok
    logits = model.backend.to_host(lw.router.matmul(model.backend.to_device(h),
                                                    model.backend.empty((T, c.num_experts))))
    idx = np.empty((T, k), np.int64)
    wts = np.empty((T, k), np.float32)
    model.backend.route(np.ascontiguousarray(logits, np.float32), lw.expert_bias, c.n_group, c.topk_group, k,
                        c.routed_scaling_factor, idx, wts)
    return idx


def record(model, ids, ctx: int, decode: bool = False, attn_inputs: dict | None = None):
    """Run ids through the model in windows of ctx tokens (one token per forward with `decode`);
    returns ({layer: MoE input [N, H]}, window start offsets). `attn_inputs`, a dict, also gets
    each layer's attention input (the RMSNorm of the residual stream after the layer before)."""
    inputs: dict[int, list] = {}
    orig, orig_attn = model._moe, model._attention

    def moe(L, lw, h):
        inputs.setdefault(L, []).append(np.array(model.backend.to_host(h), np.float32))
        return orig(L, lw, h)

    def attention(s, L, lw, h):
        attn_inputs.setdefault(L, []).append(np.array(model.backend.to_host(h), np.float32))
        return orig_attn(s, L, lw, h)

    model._moe = moe
    if attn_inputs is not None:
        model._attention = attention
    starts = []
    try:
        for a in range(0, len(ids), ctx):
            starts.append(a)
            model.reset()
            if decode:
                for t in ids[a:a + ctx]:
                    model.forward([t])
            else:
                model.forward(ids[a:a + ctx], all_logits=False)
    finally:
        del model._moe
        if attn_inputs is not None:
            del model._attention
            for L, v in attn_inputs.items():
                attn_inputs[L] = np.concatenate(v)
    return {L: np.concatenate(v) for L, v in inputs.items()}, starts


def chosen_experts(model, ids, ctx: int, attn_inputs: dict | None = None):
    inputs, starts = record(model, ids, ctx, attn_inputs=attn_inputs)
    return inputs, {L: route(model, L, inputs[L]) for L in sorted(inputs)}, starts


def measure(model, ids, ctx: int = 256, other=None) -> dict:
    c = model.config
    attn: dict = {}
    inputs, chosen, starts = chosen_experts(model, ids, ctx, attn)
    layers = sorted(inputs)
    same = chosen_experts(other, ids, ctx)[1] if other is not None else None
    out = {"tokens": int(len(ids)), "ctx": ctx, "layers": {}}
    for L in layers:
        row = {**skew(chosen[L], c.num_experts), "reuse": reuse(chosen[L], starts)}
        if same is not None:
            row["same_choice"] = lookahead_recall(same[L], chosen[L])
        if L - 1 in inputs:           # look-ahead from the previous MoE layer's input
            row["lookahead_recall"] = lookahead_recall(route(model, L, inputs[L - 1]), chosen[L])
            # the same router on layer L-1's output (its MoE added; only layer L's attention
            # missing): how much of the miss the MoE output of L-1 accounts for
            row["recall_from_block_output"] = lookahead_recall(route(model, L, attn[L]), chosen[L])
        out["layers"][L] = row
    rec = [r["lookahead_recall"] for r in out["layers"].values() if "lookahead_recall" in r]
    out["mean_lookahead_recall"] = float(np.mean(rec)) if rec else float("nan")
    out["mean_reuse"] = float(np.mean([r["reuse"] for r in out["layers"].values()]))
    return out


def main(argv=None) -> int:
    import amed
    from amed.text.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--compare", metavar="STORE", help="also: how many of the experts STORE chooses alike")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tok = Tokenizer.from_dir(args.model)
    ids = tok.encode(Path(args.file).read_text())
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    model = amed.load(args.model, ctx_size=args.ctx_size)
    other = amed.load(args.compare, ctx_size=args.ctx_size) if args.compare else None
    res = measure(model, ids, args.ctx_size, other)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['tokens']} tokens, windows of {res['ctx']}; random baseline for recall and reuse: "
          f"{8 / 256:.1%}")
    print("| layer | top-10% experts' share | entropy | max/mean | unused | reuse | look-ahead recall "
          "| recall from L-1's output |")
    print("|---|---|---|---|---|---|---|---|")
    for L, r in res["layers"].items():
        la = f"{r['lookahead_recall']:.1%} | {r['recall_from_block_output']:.1%}" if "lookahead_recall" in r else "— | —"
        print(f"| {L} | {r['top10pct_share']:.1%} | {r['entropy']:.3f} | {r['max_over_mean']:.2f} | "
              f"{r['unused']} | {r['reuse']:.1%} | {la} |"
              + (f" same choice in {args.compare}: {r['same_choice']:.1%}" if "same_choice" in r else ""))
    print(f"mean look-ahead recall {res['mean_lookahead_recall']:.1%}, mean reuse {res['mean_reuse']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
