"""Synthetic BailingMoeV2 checkpoints: random weights in the exact Hugging Face layout.

`write_synthetic_checkpoint(out, preset="tiny")` writes config.json, generation_config.json, a
small byte-level BPE tokenizer.json with the Ling special tokens, tokenizer_config.json with the
Ling chat template, bf16 safetensors shards and model.safetensors.index.json. Tests and
benchmarks use it instead of downloading the real 200 GB checkpoint.

Streaming: the shard plan and every header are computed from the tensor table up front; tensor
data is then generated and written in chunks of at most a few MB (one expert matrix at a time for
the real widths), with the disk write of one chunk overlapping the generation of the next. Peak
memory stays in the tens of MB even for `--preset flash`. Each shard is written under a
`.partial` name and renamed when complete; the index is written last, so an interrupted run
never looks like a checkpoint.

Weights (chosen so a forward pass is sane: activations O(1) through all layers, varied routing):
  * matrices ~ N(0, 1/in_features), word embeddings ~ N(0, 1);
  * norm weights ~ 1 + 0.1 N(0, 1);
  * router `expert_bias` (F32) ~ 0.05 N(0, 1), so the bias shifts but does not fix the choice.
Large tensors are drawn fast: uniform 16-bit indices (PCG64 raw output) into a 65536-entry table
of bf16 normal quantiles, so values are exactly normally distributed at bf16 resolution. Each
tensor has its own stream seeded by (seed, tensor name): the bytes depend only on the seed.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from amed.formats.checkpoint import f32_to_bf16, hf_tensor_specs
from amed.config import ModelConfig
from amed.errors import AmedError

# ---- presets ---------------------------------------------------------------------------------

_COMMON = dict(
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
    partial_rotary_factor=0.5,
    rope_theta=600000.0,
    rope_scaling=None,
    max_position_embeddings=32768,
    torch_dtype="bfloat16",
)

PRESETS: dict[str, dict] = {
    # small but exercising everything: head_dim != hidden/heads, GQA with 2 kv heads, partial
    # RoPE, a dense first layer, group-limited routing, a shared expert of a different width,
    # a model vocab padded past the tokenizer's.
    "tiny": dict(
        _COMMON,
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=160, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, num_experts=32, num_experts_per_tok=4,
        n_group=4, topk_group=2, vocab_size=1024, max_position_embeddings=4096,
    ),
    # Ling-flash-2.0 == AntAngelMed (docs/architecture.md §1a)
    "flash": dict(
        _COMMON,
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, intermediate_size=9216, moe_intermediate_size=1024,
        moe_shared_expert_intermediate_size=1024, num_experts=256, num_experts_per_tok=8,
        n_group=8, topk_group=4, vocab_size=157184,
    ),
    # Ling-mini-2.0 (docs/architecture.md §1b)
    "mini": dict(
        _COMMON,
        hidden_size=2048, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4,
        head_dim=128, intermediate_size=5120, moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
        n_group=8, topk_group=4, vocab_size=157184,
    ),
}

# default shard size cap per preset (a checkpoint is always cut into at least two shards)
SHARD_BYTES = {"tiny": 512 << 10, "flash": 2 << 30, "mini": 2 << 30}

# ---- tokenizer -------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|role_end|>",
                  "<role>", "</role>"]
BOS, EOS, ROLE_END = "<|startoftext|>", "<|endoftext|>", "<|role_end|>"

# Ling-flash-2.0's chat turn format (docs/architecture.md §4), as in the golden tokenizer_config.json
CHAT_TEMPLATE = (
    "{% set sys = '' %}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] "
    "+ '\\n' %}{% endif %}<role>SYSTEM</role>{{ sys }}detailed thinking off<|role_end|>"
    "{% for m in messages %}{% if m['role'] == 'user' %}<role>HUMAN</role>{{ m['content'] }}"
    "<|role_end|>{% elif m['role'] == 'assistant' %}<role>ASSISTANT</role>{{ m['content'] }}"
    "<|role_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>"
    "{% endif %}"
)

TOKENIZER_VOCAB = 1000  # target size of the trained BPE vocabulary (specials included)

TRAINING_TEXT = """\
<role>SYSTEM</role>You are AntAngelMed, a helpful medical assistant.
detailed thinking off<role>HUMAN</role>What should I do if I have a headache?<role>ASSISTANT</role>
A tension headache usually improves with rest, water, and a mild pain reliever such as
paracetamol (acetaminophen) or ibuprofen. Seek urgent care if the headache is sudden and severe,
follows a head injury, or comes with fever, a stiff neck, confusion, weakness, or loss of vision.
The patient is a 54-year-old man with type 2 diabetes mellitus and hypertension. His blood
pressure is 150/95 mmHg, heart rate 88 beats per minute, temperature 37.8 °C, and oxygen
saturation 96% on room air. Fasting glucose is 9.4 mmol/L and HbA1c is 7.9%.
Metformin 500 mg twice daily is the usual first-line treatment for type 2 diabetes. The dose may
be increased gradually to reduce gastrointestinal side effects such as nausea and diarrhoea.
Hypertension increases the risk of stroke, heart attack, heart failure, and kidney disease.
Lifestyle changes include eating less salt, exercising regularly, limiting alcohol, losing
weight, and stopping smoking. ACE inhibitors, calcium channel blockers and thiazide diuretics are
common first choices for blood pressure control.
Symptoms of pneumonia include cough, fever, chills, shortness of breath, and chest pain that
worsens when breathing deeply. A chest X-ray can confirm the diagnosis. Antibiotics are used for
bacterial pneumonia; viral pneumonia usually needs supportive care, fluids and rest.
Asthma is a chronic inflammatory disease of the airways. Patients should use an inhaled
corticosteroid every day and a short-acting bronchodilator (salbutamol) when symptoms appear.
An allergic reaction can cause hives, swelling of the lips or tongue, wheezing, and a drop in
blood pressure. Anaphylaxis is an emergency: give intramuscular adrenaline (epinephrine) 0.5 mg
and call an ambulance.
Children with a fever above 38 °C who are younger than three months should always be seen by a
doctor. Keep the child hydrated and watch for a rash that does not fade under pressure.
The kidneys filter about 180 litres of blood plasma every day. The estimated glomerular
filtration rate (eGFR) is used to stage chronic kidney disease from stage 1 to stage 5.
Vitamin D deficiency is common in winter. Calcium and vitamin D support bone health and help
prevent osteoporosis, especially in older women after menopause.
Antibiotic resistance is a growing problem: take antibiotics only when prescribed, finish the
course, and never share them with other people.
Chest pain that spreads to the arm, jaw, or back, with sweating and nausea, may be a heart
attack. Call emergency services immediately; do not drive yourself to the hospital.
The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.
Please describe your symptoms: when did they start, how severe are they, and what makes them
better or worse? Do you take any medicines, and do you have any allergies?
def dose(weight_kg, mg_per_kg=15):
    return round(weight_kg * mg_per_kg, 1)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12.5 100 250 1000 2024 3.14159 1e-6 -40 +7 50% 1/2
Le patient présente une céphalée depuis trois jours, sans fièvre. Der Patient hat Kopfschmerzen
und Übelkeit; die Behandlung erfolgt mit Ibuprofen. El paciente tiene dolor de cabeza y náuseas.
Пациент жалуется на головную боль и слабость. Ο ασθενής έχει πυρετό. Δόση: 5 μg/kg.
患者主诉头痛三天，伴有恶心和呕吐。建议多休息，多喝水，必要时服用布洛芬。
高血压是一种常见的慢性疾病，需要长期控制血压。糖尿病患者应定期监测血糖。
頭痛がある場合は、十分に休息を取り、水分を補給してください。두통이 있으면 휴식을 취하세요.
Temperature 38.5 °C → 101.3 °F; dose ≤ 4 g/day; ± 5%; naïve café résumé — “quoted” ‘text’ … ✓ ❤️ 🙂
"""


def build_tokenizer():
    """The synthetic byte-level BPE tokenizer (deterministic): a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = TRAINING_TEXT.splitlines(keepends=True)
    tok.train_from_iterator(lines * 3, trainer=trainer)
    return tok


FILL_MIN = 256   # a model vocab at most this far past the trained tokenizer stays padding (tiny keeps 24 ids)
_CONSONANTS, _VOWELS = "bdfghklmnprstvz", "aeiou"


def _pseudo_words():
    """Pronounceable filler words (ba, be, ..., zu, bab, ...), shortest first, deterministic."""
    syll = [c + v for c in _CONSONANTS for v in _VOWELS]
    n = 1
    while True:
        for i in range(len(syll) ** n):
            word, k = "", i
            for _ in range(n):
                word, k = syll[k % len(syll)] + word, k // len(syll)
            yield word
        n += 1


@lru_cache(maxsize=4)
def tokenizer_json(vocab_size: int | None = None) -> str:
    """tokenizer.json of the synthetic tokenizer. Given the model's vocab_size (flash and mini:
    157,184), ids past the ~1000 trained tokens get filler words (" bako", " zetu", ...), so every
    id a random model samples decodes to visible text; encoding never produces them (no merges)."""
    tok = build_tokenizer()
    if vocab_size is None:
        return tok.to_str(pretty=True)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n = max(vocab.values()) + 1
    if vocab_size - n > FILL_MIN:
        words = _pseudo_words()
        while n < vocab_size:
            t = "\u0120" + next(words)            # byte-level "Ġ" = a leading space
            if t not in vocab:
                vocab[t] = n
                n += 1
    return json.dumps(data, ensure_ascii=False)


def special_token_ids() -> dict[str, int]:
    data = json.loads(tokenizer_json())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


# ---- configuration ---------------------------------------------------------------------------


def synthetic_config(preset: str = "tiny", layers: int | None = None, experts: int | None = None,
                     **overrides) -> dict:
    """The config.json dict for a preset, with `layers`, `experts` (routed experts per layer) and
    any config keys overridden. Fewer experts keep the per-token shape (the same top-k of experts
    of the same width, the same groups) in a smaller pool: `--preset flash --layers 32 --experts 32`
    reads per token what AntAngelMed reads, in ~10 GB of int4 instead of ~60."""
    if preset not in PRESETS:
        raise AmedError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    cfg = dict(PRESETS[preset])
    cfg.update(overrides)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise AmedError(f"--layers must be a positive integer, not {layers!r}.")
        cfg["num_hidden_layers"] = layers
        cfg["first_k_dense_replace"] = min(cfg.get("first_k_dense_replace", 1), layers)
    if experts is not None:
        groups, k, kg = cfg["n_group"], cfg["num_experts_per_tok"], cfg["topk_group"]
        if (isinstance(experts, bool) or not isinstance(experts, int) or experts % groups
                or experts // groups * kg < k):
            raise AmedError(f"--experts must be a multiple of the {groups} expert groups with at least "
                            f"{k} experts in the {kg} groups a token may use (e.g. {max(groups, -(-k // kg) * groups)}, "
                            f"{4 * groups}), not {experts!r}.")
        cfg["num_experts"] = experts
    ids = special_token_ids()
    cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"] = ids[BOS], ids[EOS], ids[EOS]
    mc = ModelConfig.from_dict(cfg)  # validates (raises AmedError)
    n_tok = max(ids.values()) + 1
    vocab = json.loads(tokenizer_json())["model"]["vocab"]
    n_tok = max(n_tok, max(vocab.values()) + 1)
    if mc.vocab_size < n_tok:
        raise AmedError(f"vocab_size {mc.vocab_size} is smaller than the synthetic tokenizer "
                        f"({n_tok} tokens).")
    return cfg


# ---- random bf16 data ------------------------------------------------------------------------

CHUNK_ELEMS = 4 << 20  # elements generated per step (8 MB of bf16)


@lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    from statistics import NormalDist

    inv = NormalDist().inv_cdf
    n = 1 << 16
    return np.array([inv((i + 0.5) / n) for i in range(n)], dtype=np.float64)


@lru_cache(maxsize=64)
def _bf16_normal_table(std: float) -> np.ndarray:
    """65536 bf16 values: the quantiles of N(0, std^2); a uniform index into it is a normal draw."""
    return f32_to_bf16((_normal_quantiles() * std).astype(np.float32))


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))


def _init_kind(name: str, shape: tuple[int, ...]) -> tuple[str, float, float]:
    """(kind, mean, std) of a tensor's initial values."""
    if name.endswith("expert_bias"):
        return "small", 0.0, 0.05
    if len(shape) == 1:  # the RMSNorm weights
        return "small", 1.0, 0.1
    if name == "model.word_embeddings.weight":
        return "table", 0.0, 1.0
    return "table", 0.0, 1.0 / math.sqrt(shape[-1])


def tensor_chunks(name: str, shape: tuple[int, ...], dtype: str, seed: int):
    """Yield the tensor's data as contiguous little-endian byte arrays, in order."""
    n = math.prod(shape)
    rng = _stream(seed, name)
    kind, mean, std = _init_kind(name, shape)
    if kind == "small" or n <= 4096:
        a = mean + std * rng.standard_normal(n, dtype=np.float32)
        yield a.astype("<f4") if dtype == "F32" else f32_to_bf16(a)
        return
    if dtype != "BF16":  # pragma: no cover - every large tensor of the table is bf16
        raise AmedError(f"tensor '{name}' has unexpected dtype {dtype}.")
    table = _bf16_normal_table(std)
    bits = rng.bit_generator
    done = 0
    while done < n:
        m = min(CHUNK_ELEMS, n - done)
        idx = bits.random_raw(-(-m // 4)).view(np.uint16)[:m]
        yield table[idx]
        done += m


# ---- safetensors writing ---------------------------------------------------------------------

ITEMSIZE = {"BF16": 2, "F32": 4}


def _shard_plan(specs: dict, shard_bytes: int) -> list[list[str]]:
    """Cut the tensor table, in order, into shards of at most shard_bytes (one tensor may exceed)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nb = math.prod(shape) * ITEMSIZE[dtype]
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nb
    return shards


def safetensors_header(names: list[str], specs: dict) -> bytes:
    """8-byte little-endian length + JSON header (space-padded to 8 bytes); data has no holes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name in names:
        shape, dtype = specs[name]
        nb = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_synthetic_checkpoint(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    layers: int | None = None,
    seed: int = 0,
    shard_bytes: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    experts: int | None = None,
    **config_overrides,
) -> Path:
    """Write a random BailingMoeV2 checkpoint in the Hugging Face layout; return its directory.

    preset: "tiny", "flash" or "mini" (see PRESETS); layers overrides num_hidden_layers, experts
    num_experts (see synthetic_config); config_overrides replace any config.json key (e.g. num_experts=16, n_group=4).
    shard_bytes caps the shard size (default: the preset's, and at most half the total, so
    there are always at least two shards). progress(done_bytes, total_bytes) is called as
    data is written. Files this function writes are replaced; nothing else in out_dir is
    touched except stale model-*.safetensors shards.
    """
    from amed.hub import dir_lock

    out = Path(out_dir).expanduser()
    cfg = synthetic_config(preset, layers, experts, **config_overrides)
    specs = hf_tensor_specs(ModelConfig.from_dict(cfg))
    total_data = sum(math.prod(s) * ITEMSIZE[d] for s, d in specs.values())
    if shard_bytes is None:
        shard_bytes = min(SHARD_BYTES.get(preset, 2 << 30), -(-total_data // 2))
    if shard_bytes <= 0:
        raise AmedError(f"shard_bytes must be positive, not {shard_bytes}.")
    plan = _shard_plan(specs, shard_bytes)
    n = len(plan)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    headers = [safetensors_header(names, specs) for names in plan]
    total = total_data + sum(len(h) for h in headers)

    if out.exists() and not out.is_dir():
        raise AmedError(f"{out} exists and is not a directory.")
    check_synth_target(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with dir_lock(out, ".amed/lock", remove=True, advice="wait for it to finish or choose another folder"):
            check_synth_target(out)             # again, now that no other amed process writes here
            mark_synth_files(out, [*side_files(cfg), "model.safetensors.index.json", "model.safetensors.index.json.partial",
                                   *(f + sfx for f in files for sfx in ("", ".partial"))])
            free = _free_bytes(out)
            if free is not None and free < total + (64 << 20):
                raise AmedError(f"{out} has {free / 1e9:.1f} GB free but the checkpoint needs "
                                f"{total / 1e9:.1f} GB; free some space or choose fewer --layers.")
            # never leave an old index pointing at shards we are about to replace
            (out / "model.safetensors.index.json").unlink(missing_ok=True)
            for old in out.glob("model-*-of-*.safetensors*"):
                old.unlink()
            for fname, text in side_files(cfg).items():
                _write_text(out / fname, text)
            done = 0
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="amed-synth") as pool:
                for fname, names, head in zip(files, plan, headers):
                    done = _write_shard(out / fname, names, specs, head, seed, pool, done, total, progress)
            _write_text(out / "model.safetensors.index.json", _json({
                "metadata": {"total_size": total_data},
                "weight_map": {name: fname for fname, names in zip(files, plan) for name in names},
            }))
    except OSError as e:
        raise AmedError(f"cannot write the checkpoint to {out}: {e.strerror or e}.") from None
    return out


SYNTH_MARK = ".amed/synth.json"   # the files `amed synth` wrote into a checkpoint folder (for --force and rm)


def synth_files(out: Path) -> list[str] | None:
    """The files a synth marker lists (None: no marker or an unreadable one)."""
    try:
        data = json.loads((Path(out) / SYNTH_MARK).read_text())
        files = data["files"]
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def mark_synth_files(out: Path, names) -> None:
    """Record (before writing them) the files synth writes into `out`, with any recorded earlier."""
    mark = Path(out) / SYNTH_MARK
    mark.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(set(synth_files(out) or ()) | set(names))
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "written_by": "amed synth", "files": files}, indent=1) + "\n")
    os.replace(tmp, mark)


def check_synth_target(out: Path) -> None:
    """synth replaces only files it wrote itself (listed in its marker): a config, tokenizer, index
    or shard of anyone else's in `out` is refused, --force or not."""
    out = Path(out)
    if not out.is_dir():
        return
    if (out / "amed-manifest.json").exists():
        raise AmedError(f"{out} holds an amed store: writing a checkpoint there would replace its config and "
                        f"tokenizer; choose another directory.")
    ours = set(synth_files(out) or ())
    would = {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json"}
    clash = sorted(p.name for p in out.iterdir()
                   if (p.name in would or p.name.startswith("model-") and ".safetensors" in p.name)
                   and p.name not in ours)
    if clash:
        raise AmedError(f"{out} holds {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''} that amed synth did "
                        f"not write; it replaces only its own files, so choose an empty or new folder.")


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # pragma: no cover
        return None
    return st.f_bavail * st.f_frsize


def _write_shard(path: Path, names, specs, head: bytes, seed: int, pool, done: int, total: int,
                 progress) -> int:
    """Write one shard under a .partial name (generation overlaps the previous chunk's write)."""
    tmp = path.with_name(path.name + ".partial")
    expected = len(head) + sum(math.prod(specs[k][0]) * ITEMSIZE[specs[k][1]] for k in names)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pending = None

    def write_all(buf) -> None:
        mv = memoryview(buf).cast("B")
        while mv:
            mv = mv[os.write(fd, mv):]

    try:
        write_all(head)
        done += len(head)
        for name in names:
            shape, dtype = specs[name]
            for chunk in tensor_chunks(name, shape, dtype, seed):
                if pending is not None:
                    pending.result()
                pending = pool.submit(write_all, chunk)
                done += chunk.nbytes
                if progress is not None:
                    progress(done, total)
        if pending is not None:
            pending.result()
            pending = None
        size = os.fstat(fd).st_size
        if size != expected:  # pragma: no cover - defensive
            raise AmedError(f"{path.name}: wrote {size} bytes, expected {expected}.")
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # the data is on disk: do not crowd the page cache
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                pass
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return done


def side_files(cfg: dict) -> dict[str, str]:
    """The small files of a checkpoint besides the weights: config, generation config, tokenizer."""
    ids = special_token_ids()
    return {
        "config.json": _json(cfg),
        "generation_config.json": _json({"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[ROLE_END]],
                                         "pad_token_id": ids[EOS]}),
        "tokenizer.json": tokenizer_json(cfg.get("vocab_size")),
        "tokenizer_config.json": _json({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False, "add_eos_token": False,
            "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": cfg["max_position_embeddings"],
        }),
    }


class SyntheticSource:
    """A random checkpoint that is generated on the fly instead of read: it stands in for
    `Checkpoint` in `quantize_model`, so `amed synth --bits 4` writes a store with no bf16 copy on
    disk (how a store larger than RAM is made here). Same seed, same weights as
    `write_synthetic_checkpoint`."""

    def __init__(self, preset: str = "tiny", layers: int | None = None, seed: int = 0,
                 experts: int | None = None, **overrides):
        import hashlib

        cfg = synthetic_config(preset, layers, experts, **overrides)
        self.config = ModelConfig.from_dict(cfg)
        self.seed = seed
        self.specs = hf_tensor_specs(self.config)
        self.tensors = {n: _Sized(math.prod(shape) * ITEMSIZE[dt]) for n, (shape, dt) in self.specs.items()}
        self.files = side_files(cfg)
        self.fingerprint = {"synthetic": preset, "seed": seed,
                            "config_sha256": hashlib.sha256(self.files["config.json"].encode()).hexdigest()}

    def read_rows_f32(self, name: str, chunk_elems: int):
        """Yield (row0, float32 rows) of about chunk_elems elements, like Checkpoint.read_rows_f32."""
        shape, dtype = self.specs[name]
        per_row = max(1, math.prod(shape[1:]))
        step = max(1, chunk_elems // per_row) * per_row
        pending, row0 = [], 0
        have = 0
        for chunk in tensor_chunks(name, shape, dtype, self.seed):
            a = chunk.view("<f4") if dtype == "F32" else (chunk.astype(np.uint32) << 16).view(np.float32)
            pending.append(a)
            have += a.size
            while have >= step or (have and row0 * per_row + have == math.prod(shape)):
                flat = np.concatenate(pending)
                take = min(step, flat.size)
                rows = flat[:take].reshape((-1,) + tuple(shape[1:]))
                yield row0, rows
                row0 += rows.shape[0]
                pending, have = [flat[take:]], flat.size - take


class _Sized:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
