"""Train a small BailingMoeV2 with AntAngelMed's routing geometry on ICD-10-CM text (torch, CPU).

    pip install -e ".[train]"          # torch==2.13.0 (CPU) and simple-icd-10-cm
    python tools/train_tiny.py         # or: make trained   -> tests/data/trained/

Routing geometry as AntAngelMed (docs/architecture.md): 256 routed experts, top-8, 8 groups of
32 with the top-4 groups kept (group score = sum of the two largest biased scores), sigmoid scores,
an fp32 `expert_bias` used for selection only and updated without an auxiliary loss (DeepSeek-V3's
bias balancing: after each step, bias += gamma * sign(mean load - load) per expert), the selected
unbiased scores renormalized and scaled by routed_scaling_factor 2.5, one shared expert, layer 0
dense, per-head QK-norm before partial NeoX RoPE (0.5), GQA. Small elsewhere (hidden 64, expert
width 32, 5 layers, 4096-token byte-level BPE) so the bf16 checkpoint stays under 16 MB; widths
that are multiples of 32 so that amed's int4 store quantizes every expert matrix (a row shorter
than the group size would stay bf16).

Text: the ICD-10-CM tabular list inside the `simple-icd-10-cm` package (descriptions, inclusion
terms, includes/excludes notes) plus question/answer pairs built from it, rendered with Ling's
chat template. Categories (3-character codes) whose CRC32 falls in a fixed 2% are held out;
`held-out.txt` gets a sample of their text for `amed perplexity`.

Writes a Hugging Face layout checkpoint with AntAngelMed's tensor names (model.safetensors,
config.json, generation_config.json, tokenizer.json, tokenizer_config.json with the chat template)
plus `reference-logits.npy` / `reference-tokens.json`: this file's forward pass (float64, on the
bf16-rounded weights) for a fixed token sequence, which amed must reproduce (tests/test_trained.py).
Seeded and deterministic (torch.use_deterministic_algorithms): the same command gives the same
bytes on the same torch build and thread count (checked: two runs, equal sha256). The committed
checkpoint was trained just before that switch was added, when the CPU backward differed between
runs in the last bit of a few tensors; a rerun gives a checkpoint of the same quality, not those
exact bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # a shared machine: waiting threads yield the core
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "trained"

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|role_end|>",
                  "<role>", "</role>"]
EOS, ROLE_END = "<|endoftext|>", "<|role_end|>"
CHAT_TEMPLATE = (   # Ling-flash-2.0's turn format, as amed/app/synth.py and tests/data/bailing-tiny
    "{% set sys = '' %}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] "
    "+ '\\n' %}{% endif %}<role>SYSTEM</role>{{ sys }}detailed thinking off<|role_end|>"
    "{% for m in messages %}{% if m['role'] == 'user' %}<role>HUMAN</role>{{ m['content'] }}"
    "<|role_end|>{% elif m['role'] == 'assistant' %}<role>ASSISTANT</role>{{ m['content'] }}"
    "<|role_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>"
    "{% endif %}"
)
SYSTEM = "You are AntAngelMed, a helpful medical assistant."

CONFIG = dict(
    architectures=["BailingMoeV2ForCausalLM"],
    model_type="bailing_moe",
    hidden_act="silu",
    use_bias=False,
    use_qkv_bias=False,
    use_rmsnorm=True,
    use_qk_norm=True,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    score_function="sigmoid",
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    moe_router_enable_expert_bias=True,
    router_dtype="fp32",
    num_shared_experts=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=0,
    rope_scaling=None,
    torch_dtype="bfloat16",
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    vocab_size=4096,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_hidden_layers=5,
    intermediate_size=256,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    num_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    rope_theta=600000.0,
    partial_rotary_factor=0.5,
    max_position_embeddings=4096,
)

# ---- text ------------------------------------------------------------------------------------


def held_out(code: str) -> bool:
    """2% of the 3-character categories (by CRC32), with all their subcodes."""
    return zlib.crc32(code.split(".")[0][:3].encode()) % 50 == 0


def chat(user: str, answer: str, system: str | None) -> str:
    sys_ = (system + "\n") if system else ""
    return (f"<role>SYSTEM</role>{sys_}detailed thinking off<|role_end|><role>HUMAN</role>{user}"
            f"<|role_end|><role>ASSISTANT</role>{answer}<|role_end|>")


def _join(items) -> str:
    items = [i.strip().rstrip(".") for i in items if i and i.strip()]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def build_documents(seed: int):
    """(train, held) lists of documents (strings) from the ICD-10-CM tabular list."""
    import simple_icd_10_cm as cm

    rng = random.Random(seed)
    train, held = [], []
    for code in cm.get_all_codes():
        desc = cm.get_description(code).strip()
        if not desc:
            continue
        # 7th-character extensions (S72.001A, ...) repeat their parent with an encounter suffix:
        # keep a few so the text is not dominated by them
        ext = cm.is_extended_subcategory(code) if hasattr(cm, "is_extended_subcategory") else False
        if ext and rng.random() > 0.08:
            continue
        parent = cm.get_parent(code)
        pdesc = cm.get_description(parent).strip() if parent else ""
        incl = cm.get_inclusion_term(code)
        includes = cm.get_includes(code)
        excl1 = cm.get_excludes1(code)
        excl2 = cm.get_excludes2(code)
        notes = cm.get_notes(code).strip()
        also = cm.get_code_also(code).strip()
        addl = cm.get_use_additional_code(code).strip()
        first = cm.get_code_first(code).strip()

        parts = [f"{code} {desc}."]
        if pdesc:
            parts.append(f"{desc} is classified under {pdesc} ({parent}).")
        if incl:
            parts.append(f"Inclusion terms: {_join(incl)}.")
        if includes:
            parts.append(f"Includes: {_join(includes)}.")
        if excl1:
            parts.append(f"Excludes1: {_join(excl1)}.")
        if excl2:
            parts.append(f"Excludes2: {_join(excl2)}.")
        if notes:
            parts.append(notes.replace("\n", " ").rstrip(".") + ".")
        if first:
            parts.append("Code first " + first.replace("\n", "; ") + ".")
        if also:
            parts.append("Code also " + also.replace("\n", "; ") + ".")
        if addl:
            parts.append("Use additional " + addl.replace("\n", "; ") + ".")
        docs = [" ".join(parts)]

        system = SYSTEM if rng.random() < 0.5 else None
        about = desc
        if pdesc:
            about += f" is a condition classified under {_lower_first(pdesc)}"
            about += "." if cm.is_category_or_subcategory(code) else ""
        else:
            about += "."
        if cm.is_category_or_subcategory(code):
            a1 = f"The ICD-10-CM code for {_lower_first(desc)} is {code}."
            if pdesc:
                a1 += f" It belongs to {_lower_first(pdesc)} ({parent})."
            docs.append(chat(f"What is the ICD-10-CM code for {_lower_first(desc)}?", a1, system))
            a2 = f"{code} means {_lower_first(desc)}."
            if incl:
                a2 += f" It includes {_join(incl)}."
            if excl1:
                a2 += f" It excludes {_join(excl1[:3])}."
            docs.append(chat(f"What does ICD-10-CM code {code} mean?", a2, system))
            terms = list(incl) + list(includes)
            if terms:
                term = rng.choice(terms).strip().rstrip(".")
                a3 = f"{term[:1].upper() + term[1:]} is coded as {_lower_first(desc)} ({code})."
                if pdesc:
                    a3 += f" This is part of {_lower_first(pdesc)}."
                docs.append(chat(f"How is {term} coded?", a3, system))
            if not ext and rng.random() < 0.5:
                a4 = (f"{desc} ({code}) is {'a condition' if code[0] not in 'VWXYZ' else 'a code'} in the "
                      f"group of {_lower_first(pdesc) if pdesc else 'diseases'}.")
                if incl:
                    a4 += f" It is also called {_join(incl[:2])}."
                if excl1:
                    a4 += f" It does not include {_join(excl1[:2])}."
                docs.append(chat(f"Tell me about {_lower_first(desc)}.", a4, system))
        (held if held_out(code) else train).extend(docs)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def build_tokenizer(docs, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


# ---- model -----------------------------------------------------------------------------------


def rmsnorm(x, w, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def rope_cos_sin(T: int, rot: int, theta: float, dtype):
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin, rot):
    """NeoX half-split RoPE on the first `rot` dims of x [B, heads, T, d]."""
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, xp], -1)


def route(h2, gate_w, bias, c):
    """AntAngelMed's group-limited sigmoid top-k: (idx [N, k], weights [N, k]); gradient flows
    into the router through the unbiased scores only."""
    E, G, kg, k = c["num_experts"], c["n_group"], c["topk_group"], c["num_experts_per_tok"]
    s = torch.sigmoid(h2.to(gate_w.dtype) @ gate_w.t())                    # [N, E]
    with torch.no_grad():
        b = s + bias.to(s.dtype)
        gs = b.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)          # [N, G]
        gidx = gs.topk(kg, dim=-1).indices
        gmask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gidx, True)
        emask = gmask.repeat_interleave(E // G, dim=1)
        idx = b.masked_fill(~emask, float("-inf")).topk(k, dim=-1).indices
    w = s.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
    return idx, w


BLOCK = 32     # rows per expert block in the training MoE


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        H, nh, nkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.c, self.layer = c, layer
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.qkv = nn.Parameter(torch.empty((nh + 2 * nkv) * d, H))
        self.q_norm = nn.Parameter(torch.ones(d))
        self.k_norm = nn.Parameter(torch.ones(d))
        self.dense = nn.Parameter(torch.empty(H, nh * d))
        self.moe = layer >= c["first_k_dense_replace"]
        if not self.moe:
            I = c["intermediate_size"]
            self.gate_proj = nn.Parameter(torch.empty(I, H))
            self.up_proj = nn.Parameter(torch.empty(I, H))
            self.down_proj = nn.Parameter(torch.empty(H, I))
        else:
            E, I, Is = c["num_experts"], c["moe_intermediate_size"], c["moe_shared_expert_intermediate_size"]
            self.router = nn.Parameter(torch.empty(E, H))
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
            self.w_gate = nn.Parameter(torch.empty(E, H, I))     # stored transposed: x @ w
            self.w_up = nn.Parameter(torch.empty(E, H, I))
            self.w_down = nn.Parameter(torch.empty(E, I, H))
            self.s_gate = nn.Parameter(torch.empty(Is, H))
            self.s_up = nn.Parameter(torch.empty(Is, H))
            self.s_down = nn.Parameter(torch.empty(H, Is))
        self.load = None            # expert counts of the last forward (training)

    def attention(self, h, cos, sin):
        c = self.c
        B, T, _ = h.shape
        nh, nkv, d, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
        rot = int(d * c["partial_rotary_factor"])
        qkv = (h @ self.qkv.t()).view(B, T, nh + 2 * nkv, d)
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
        q = rmsnorm(q, self.q_norm, eps).transpose(1, 2)
        k = rmsnorm(k, self.k_norm, eps).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin, rot), apply_rope(k, cos, sin, rot)
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)                  # q head h uses kv head h // rep
        v = v.repeat_interleave(rep, dim=1)
        if q.dtype == torch.float64:
            sc = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            sc = sc.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            o = sc.softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, T, nh * d) @ self.dense.t()

    def mlp(self, h):
        if not self.moe:
            return (F.silu(h @ self.gate_proj.t()) * (h @ self.up_proj.t())) @ self.down_proj.t()
        c = self.c
        B, T, H = h.shape
        x = h.reshape(-1, H)
        N, k, E = x.shape[0], c["num_experts_per_tok"], c["num_experts"]
        idx, w = route(x, self.router, self.expert_bias, c)
        # tokens sorted by expert, cut into blocks of BLOCK rows (an expert's last block padded),
        # each block multiplied by its expert's weights: three bmm whose cost does not depend on
        # how unevenly the tokens spread over the experts
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        e_sorted = flat[order]
        counts = torch.bincount(flat, minlength=E)
        self.load = counts
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(N * k) - starts[e_sorted]
        nb = (counts + BLOCK - 1) // BLOCK
        blk = (torch.cumsum(nb, 0) - nb)[e_sorted] + rank // BLOCK
        pos = rank % BLOCK
        be = torch.repeat_interleave(torch.arange(E), nb)               # each block's expert
        tok = order // k
        xs = x.new_zeros(int(nb.sum()), BLOCK, H).index_put((blk, pos), x[tok])
        hs = F.silu(torch.bmm(xs, self.w_gate[be])) * torch.bmm(xs, self.w_up[be])
        ys = torch.bmm(hs, self.w_down[be])
        y = ys[blk, pos] * w.reshape(-1)[order, None].to(ys.dtype)
        out = x.new_zeros(N, H).index_add(0, tok, y)
        out = out + (F.silu(x @ self.s_gate.t()) * (x @ self.s_up.t())) @ self.s_down.t()
        return out.view(B, T, H)

    def forward(self, x, cos, sin):
        eps = self.c["rms_norm_eps"]
        x = x + self.attention(rmsnorm(x, self.input_layernorm, eps), cos, sin)
        return x + self.mlp(rmsnorm(x, self.post_attention_layernorm, eps))


class BailingMoeV2(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        V, H = c["vocab_size"], c["hidden_size"]
        self.embed = nn.Parameter(torch.empty(V, H))
        self.layers = nn.ModuleList(Block(c, i) for i in range(c["num_hidden_layers"]))
        self.norm = nn.Parameter(torch.ones(H))
        self.lm_head = nn.Parameter(torch.empty(V, H))

    def init_weights(self, gen):
        L = self.c["num_hidden_layers"]
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue
            fan_in = p.shape[-2] if name.endswith(("w_gate", "w_up", "w_down")) else p.shape[-1]
            std = 1.0 if name == "embed" else 1.0 / math.sqrt(fan_in)
            if name.endswith(("dense", "down_proj", "w_down", "s_down")):
                std /= math.sqrt(2 * L)
            if name == "lm_head":
                std = 0.5 / math.sqrt(fan_in)
            with torch.no_grad():
                p.normal_(0.0, std, generator=gen)

    def forward(self, ids):
        c = self.c
        T = ids.shape[1]
        dt = self.embed.dtype
        cos, sin = rope_cos_sin(T, int(c["head_dim"] * c["partial_rotary_factor"]), c["rope_theta"], dt)
        x = self.embed[ids]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return rmsnorm(x, self.norm, c["rms_norm_eps"]) @ self.lm_head.t()

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights under AntAngelMed's names: bf16, expert_bias fp32."""
        bf = lambda t: t.detach().to(torch.bfloat16).contiguous()
        out = {"model.word_embeddings.weight": bf(self.embed), "model.norm.weight": bf(self.norm),
               "lm_head.weight": bf(self.lm_head)}
        for i, l in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = bf(l.input_layernorm)
            out[p + "post_attention_layernorm.weight"] = bf(l.post_attention_layernorm)
            out[p + "attention.query_key_value.weight"] = bf(l.qkv)
            out[p + "attention.query_layernorm.weight"] = bf(l.q_norm)
            out[p + "attention.key_layernorm.weight"] = bf(l.k_norm)
            out[p + "attention.dense.weight"] = bf(l.dense)
            if not l.moe:
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[p + f"mlp.{n}.weight"] = bf(getattr(l, n))
                continue
            out[p + "mlp.gate.weight"] = bf(l.router)
            out[p + "mlp.gate.expert_bias"] = l.expert_bias.detach().float().contiguous()
            for e in range(l.w_gate.shape[0]):
                q = p + f"mlp.experts.{e}."
                out[q + "gate_proj.weight"] = bf(l.w_gate[e].t())
                out[q + "up_proj.weight"] = bf(l.w_up[e].t())
                out[q + "down_proj.weight"] = bf(l.w_down[e].t())
            out[p + "mlp.shared_experts.gate_proj.weight"] = bf(l.s_gate)
            out[p + "mlp.shared_experts.up_proj.weight"] = bf(l.s_up)
            out[p + "mlp.shared_experts.down_proj.weight"] = bf(l.s_down)
        return out


def reference_copy(model: BailingMoeV2) -> BailingMoeV2:
    """A float64 copy with the weights rounded to bf16 as saved (expert_bias kept fp32)."""
    ref = BailingMoeV2(model.c)
    sd = {k: (v.to(torch.bfloat16).to(torch.float64) if not k.endswith("expert_bias") else v.double())
          for k, v in model.state_dict().items()}
    ref = ref.double()
    ref.load_state_dict(sd)
    return ref.eval()


# ---- training --------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bias-rate", type=float, default=5e-3, help="expert-bias update speed (gamma)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-chars", type=int, default=40000, help="size of held-out.txt")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()
    c = dict(CONFIG)

    train_docs, held_docs = build_documents(args.seed)
    tok = build_tokenizer(train_docs, c["vocab_size"])
    assert tok.get_vocab_size() <= c["vocab_size"]
    eos = tok.token_to_id(EOS)
    enc = tok.encode_batch(train_docs)
    stream = np.fromiter((t for e in enc for t in (*e.ids, eos)), dtype=np.int64)
    print(f"text: {len(train_docs)} train docs, {len(stream):,} tokens; {len(held_docs)} held-out docs; "
          f"tokenizer {tok.get_vocab_size()} tokens ({time.time() - t0:.0f} s)", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    model = BailingMoeV2(c)
    model.init_weights(gen)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    rng = np.random.default_rng(args.seed)
    B, S = args.batch, args.seq
    moe_layers = [l for l in model.layers if l.moe]
    ema = None
    for step in range(args.steps):
        starts = rng.integers(0, len(stream) - S - 1, B)
        batch = torch.from_numpy(np.stack([stream[s:s + S + 1] for s in starts]))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():           # DeepSeek-V3 aux-loss-free balancing
            for l in moe_layers:
                load = l.load.float()
                l.expert_bias += args.bias_rate * torch.sign(load.mean() - load)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            imb = max(float(l.load.max()) / float(l.load.float().mean()) for l in moe_layers)
            print(f"step {step:5d}  loss {loss.item():.3f}  ema {ema:.3f}  max-load/mean {imb:.2f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f} s", flush=True)
    train_time = time.time() - t0

    model.eval()
    # held-out loss (torch, fp32) on the same text as held-out.txt
    held_text = ""
    for d in held_docs:
        if len(held_text) + len(d) > args.held_chars:
            break
        held_text += d + "\n"
    held_ids = torch.tensor(tok.encode(held_text).ids)
    with torch.no_grad():
        nll, n = 0.0, 0
        for a in range(0, len(held_ids) - 1, S):
            chunk = held_ids[a:a + S + 1]
            if len(chunk) < 2:
                break
            lg = model(chunk[None, :-1])[0]
            nll += F.cross_entropy(lg, chunk[1:], reduction="sum").item()
            n += len(chunk) - 1
    print(f"held-out: {n} tokens, loss {nll / n:.3f}, perplexity {math.exp(nll / n):.2f} (torch fp32, windows of {S})")

    write_checkpoint(args.out, model, tok, c, held_text)
    # the reference forward: a chat prompt and some held-out text
    ref_text = chat("What is the ICD-10-CM code for essential (primary) hypertension?",
                    "The ICD-10-CM code for", SYSTEM)[:-len("<|role_end|>")]
    ref_ids = tok.encode(ref_text).ids
    with torch.no_grad():
        ref = reference_copy(model)(torch.tensor(ref_ids)[None])[0].float().numpy()
    np.save(args.out / "reference-logits.npy", ref)
    (args.out / "reference-tokens.json").write_text(json.dumps({"ids": ref_ids, "text": ref_text}) + "\n")
    info = {"train_seconds": round(train_time, 1), "steps": args.steps, "batch": B, "seq": S,
            "final_loss_ema": round(ema, 4), "held_out_loss": round(nll / n, 4),
            "held_out_ppl": round(math.exp(nll / n), 3), "train_tokens": int(len(stream)),
            "torch": torch.__version__, "threads": args.threads, "seed": args.seed}
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info), flush=True)
    return 0


def write_checkpoint(out: Path, model: BailingMoeV2, tok, c: dict, held_text: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(model.hf_tensors(), str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    c = dict(c, bos_token_id=ids["<|startoftext|>"], eos_token_id=ids[EOS], pad_token_id=ids[EOS])
    dump = lambda o: json.dumps(o, indent=1, ensure_ascii=False) + "\n"
    (out / "config.json").write_text(dump(c))
    (out / "generation_config.json").write_text(dump({
        "bos_token_id": ids["<|startoftext|>"], "eos_token_id": [ids[EOS], ids[ROLE_END]],
        "pad_token_id": ids[EOS]}))
    (out / "tokenizer.json").write_text(tok.to_str())
    (out / "tokenizer_config.json").write_text(dump({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": "<|startoftext|>", "eos_token": EOS, "pad_token": EOS,
        "chat_template": CHAT_TEMPLATE, "model_max_length": c["max_position_embeddings"]}))
    (out / "held-out.txt").write_text(held_text)


if __name__ == "__main__":
    sys.exit(main())
