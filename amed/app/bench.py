"""`amed bench`: prefill (ppN) and decode (tgN) speed in the style of llama-bench, plus what
llama-bench does not show: time to first token, peak RSS, bytes read per decoded token, the
effective GB/s and its share of this machine's measured memory bandwidth, and the fraction of
expert bytes resident in RAM after the run.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from amed.errors import AmedError
from amed.app.quality import kl_divergence  # noqa: F401  (its old home; tests and bench/ import it here)
from amed.engine.experts.memory import current_rss_bytes, proc_field
from amed.generate import Batch, Sequence

SAMPLE_TEXT = (
    "A 58-year-old man presents to the emergency department with crushing substernal chest pain "
    "radiating to the left arm, diaphoresis and nausea that began two hours ago. He has a history of "
    "hypertension, type 2 diabetes mellitus and hyperlipidaemia, and smokes a pack a day. "
    "Electrocardiography shows ST-segment elevation in leads II, III and aVF. What is the most likely "
    "diagnosis, which artery is most likely occluded, and what are the immediate steps in management? "
    "Discuss reperfusion options, antiplatelet therapy, anticoagulation and the contraindications to "
    "thrombolysis, then outline secondary prevention after discharge, including statins, beta-blockers, "
    "ACE inhibitors, cardiac rehabilitation and smoking cessation. "
)


@dataclass
class Result:
    test: str                     # pp512 / tg128
    n_tokens: int
    seconds: list = field(default_factory=list)

    @property
    def tps(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.mean(self.tps)

    @property
    def median(self) -> float:
        return statistics.median(self.tps)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0


def prompt_ids(tokenizer, n: int, vocab: int, random_ids: bool, seed: int = 0) -> list[int]:
    """n prompt tokens: real text through the tokenizer (realistic routing) or random ids."""
    if random_ids or tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab, n).tolist()
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(SAMPLE_TEXT)
    return ids[:n]


def reset_peak_rss() -> None:
    """Restart the peak-RSS high-water mark (Linux), so probes before a run do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident set since the last reset (VmHWM), falling back to getrusage."""
    kib = proc_field("/proc/self/status", "VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---- page residency (mincore) ----------------------------------------------------------------

def expert_residency(source, cache=None) -> float | None:
    """Resident fraction of all routed-expert bytes of a store (None for checkpoints): what the
    slot cache holds, or else what the kernel has in RAM of the expert regions (mincore)."""
    info = getattr(source, "experts_info", None)
    if not info:
        return None
    if hasattr(cache, "loaded_bytes"):                 # a slot cache: its own copies
        return cache.loaded_bytes / sum(e["stride"] * e["count"] for e in info.values())
    from amed.engine.experts.memory import resident_fraction

    got = total = 0
    for e in info.values():
        n = e["stride"] * e["count"]
        got += resident_fraction(source.maps[e["file"]], e["offset"], n) * n
        total += n
    return got / total if total else None


# ---- memory bandwidth probe ------------------------------------------------------------------

def memory_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Read bandwidth of this machine now (GB/s): a parallel sum over `nbytes` (1 GiB: far past any
    cache), best of 5, about a second. Measured on every bench run, not cached: a VM's bandwidth
    drifts, and "% of bandwidth" is only true against today's figure."""
    from amed.engine.backends.cpu.kernels import sum_f32

    a = np.ones(nbytes // 4, np.float32)
    sum_f32(a[:1024])
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        sum_f32(a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    del a
    return best


def bandwidth_for_bench(console) -> tuple[float, str]:
    """(GB/s, where it came from): $AMED_MEMBW_GBS when set (a figure measured elsewhere, or tests),
    else a probe now."""
    fixed = os.environ.get("AMED_MEMBW_GBS", "").strip()
    if fixed:
        try:
            value = float(fixed)
        except ValueError:
            value = 0.0
        if not (0 < value < 1e5):
            raise AmedError(f"AMED_MEMBW_GBS must be a bandwidth in GB/s, such as 60; got {fixed!r}.")
        return value, "from AMED_MEMBW_GBS"
    console.print("[dim]measuring memory bandwidth (about a second)...[/]")
    return memory_bandwidth_gbs(), "measured now"


# ---- disk read bandwidth probe ---------------------------------------------------------------

def disk_read_gbs(store, cache_file: Path | None = None, refresh: bool = False, nbytes: int = 1 << 30,
                  threads: int = 4) -> float | None:
    """Read bandwidth (GB/s) of the disk that holds `store`, measured the way the expert cache
    reads (engine/experts/slots.py SlotCache): whole experts, one request each, by `threads` readers at once,
    with O_DIRECT where the filesystem allows it (else buffered, after dropping them from the page
    cache), `nbytes` in all at positions spread over every layer. Checked against /proc/self/io so
    that a read served by the page cache cannot pass for the disk. Cached per device unless
    `refresh`."""
    from concurrent.futures import ThreadPoolExecutor

    from amed.engine.experts.memory import disk_read_bytes

    info = getattr(store, "experts_info", None)
    if not info:
        return None
    layers = list(info.values())
    stride = max(i["stride"] for i in layers)
    nbytes = min(nbytes, sum(i["stride"] * i["count"] for i in layers))   # each expert at most once
    dev = str(os.stat(store.path / layers[0]["file"]).st_dev)
    cached = {}
    if cache_file and cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
        except (ValueError, OSError):
            cached = {}
    if dev in cached and not refresh:
        return float(cached[dev])
    plan = []                                  # (file, offset, length), spread evenly
    plen = max(4096, stride // 4096 * 4096)    # a store's stride: itself
    first = int.from_bytes(os.urandom(4), "little")    # new places each time: a VM host's cache
    for j in range(max(1, nbytes // stride)):          # of the last probe cannot serve this one
        i = layers[j % len(layers)]
        e = (first + (j // len(layers)) * 7919) % i["count"]
        pos = i["offset"] + e * i["stride"]   # O_DIRECT reads whole pages (a GGUF expert is not aligned)
        plan.append((i["file"], pos // 4096 * 4096, plen))
    fds = {}
    direct = getattr(os, "O_DIRECT", 0)
    for f in {f for f, _, _ in plan}:
        try:
            fds[f] = os.open(store.path / f, os.O_RDONLY | direct)
        except OSError:
            direct = 0
    if not direct:
        for fd in fds.values():
            os.close(fd)
        fds = {f: os.open(store.path / f, os.O_RDONLY) for f, _, _ in plan}
    bufs = [mmap.mmap(-1, plen, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) for _ in range(threads)]
    for b in bufs:
        b.write(b"\0" * plen)                  # fault the buffers in before timing

    def read(k):
        f, pos, length = plan[k]
        with memoryview(bufs[k % threads]) as mv:
            return os.preadv(fds[f], [mv[:length]], pos)

    try:
        for f, pos, length in plan:
            os.posix_fadvise(fds[f], pos, length, os.POSIX_FADV_DONTNEED)
        io0, t = disk_read_bytes(), time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:   # reader k % threads owns buffer k % threads
            done = 0
            for start in range(0, len(plan), threads):
                done += sum(ex.map(read, range(start, min(len(plan), start + threads))))
        dt = time.perf_counter() - t
        io1 = disk_read_bytes()
        for f, pos, length in plan:
            os.posix_fadvise(fds[f], pos, length, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds.values():
            os.close(fd)
        for b in bufs:
            b.close()
    from_disk = (io1 - io0) if io0 is not None and io1 is not None else done
    if from_disk < 0.5 * done:
        return None                   # the bytes would not leave the page cache: no honest number
    gbs = from_disk / dt / 1e9
    if cache_file:
        cached[dev] = gbs
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cached))
    return gbs


def drop_expert_pages(store) -> None:
    """Drop the store's routed-expert bytes from the page cache (cold-disk runs); mapped pages and
    dense weights stay."""
    for i in getattr(store, "experts_info", {}).values():
        fd = os.open(store.path / i["file"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, i["offset"], i["stride"] * i["count"], os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- bytes per token -------------------------------------------------------------------------

def bytes_per_token(model) -> int:
    """Weight bytes one decoded token reads: every dense weight, k experts per MoE layer, lm_head,
    one embedding row."""
    c, w = model.config, model.weights
    total = w.lm_head.nbytes + w.embed.nbytes // c.vocab_size
    for L, lw in enumerate(w.layers):
        total += lw.qkv.nbytes + lw.attn_out.nbytes
        if lw.router is None:
            total += lw.mlp.nbytes
        else:
            total += lw.router.nbytes
            if lw.shared:
                total += lw.shared.nbytes
            expert = model.backend.swiglu(*model.source.expert(L, 0))     # bound apart: no cache use
            total += c.num_experts_per_tok * expert.nbytes
    return total


# ---- the run ---------------------------------------------------------------------------------

def run_bench(model, tokenizer, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
              random_ids: bool = False, log=None, depth: int = 0, warm_prompt: bool = True,
              progress=None) -> dict:
    """Time ppN and tgN `reps` times after a warm-up; returns a record of everything measured.
    With `depth`, every test starts after that many tokens already in the KV cache (prefilled once,
    untimed, like llama-bench's -d), so attention over a long context is part of what is timed.
    The warm-up runs the whole prompt once, as llama-bench's does (`warm_prompt=False`: 8 tokens,
    for runs meant to start from a cold expert cache): a prompt's first run maps every expert it
    touches for the first time, which made the first repetition of pp64 1.5x slower than the rest.
    `progress(done, total)` follows the prefill of the `depth` tokens of context, 512 at a time."""
    vocab = model.config.vocab_size
    ids = prompt_ids(tokenizer, max(n_prompt, 1), vocab, random_ids)
    context = prompt_ids(tokenizer, depth, vocab, random_ids, seed=2) if depth else []

    def start():
        """An empty context, or the `depth` tokens of context (prefilled on first use)."""
        if not depth:
            model.reset()
            return
        if model.pos < depth:
            model.reset()
            for i in range(0, depth, 512):
                model.forward(context[i:i + 512])
                if progress:
                    progress(min(i + 512, depth), depth)
        model.truncate(depth)

    reset_peak_rss()
    # warm-up: compiles (or loads from cache) every kernel shape we time below
    t0 = time.perf_counter()
    model.reset()
    model.forward(ids[: min(8, len(ids))])
    model.forward([ids[0]])
    compile_s = time.perf_counter() - t0
    if warm_prompt and n_prompt > 8:
        start()
        model.forward(ids[:n_prompt])

    from amed.engine.experts.cache import CacheStats
    from amed.engine.experts.memory import disk_read_bytes

    cache = model.experts.cache
    rng = np.random.default_rng(1)

    def next_token(logits, history) -> int:
        """Greedy, or random ids: routing as varied as it gets (worst case for a cache)."""
        return int(rng.integers(vocab)) if random_ids else int(logits.argmax())
    at = f" @ d{depth}" if depth else ""
    pp = Result(f"pp{n_prompt}{at}", n_prompt)
    tg = Result(f"tg{n_gen}{at}", n_gen)
    tg_stats, tg_disk = CacheStats(), 0
    for r in range(reps):
        if n_prompt:
            start()
            t = time.perf_counter()
            model.forward(ids[:n_prompt])
            pp.seconds.append(time.perf_counter() - t)
        if n_gen:
            start()
            # the generation loop's own steps: the first token (untimed) comes from the prefill of
            # one token, then n_gen decode steps of one token each are timed
            seq = Sequence([*context, ids[0]], next_token, max_tokens=n_gen + 1, cached=context)
            batch = Batch(model, prefill_chunk=None)
            batch.add(seq)
            batch.step()
            st0 = cache.stats.copy() if cache is not None else None
            io0 = disk_read_bytes()
            t = time.perf_counter()
            while seq.finish_reason is None:
                batch.step()
            tg.seconds.append(time.perf_counter() - t)
            io1 = disk_read_bytes()
            tg_disk += (io1 - io0) if io0 is not None and io1 is not None else 0
            if cache is not None:
                tg_stats = tg_stats + (cache.stats - st0)
        if log:
            log(r + 1, reps)
    ntg = n_gen * reps
    return {"pp": pp if n_prompt else None, "tg": tg if n_gen else None, "compile_s": compile_s,
            "peak_rss": peak_rss_bytes(), "bytes_per_token": bytes_per_token(model),
            "expert_resident": expert_residency(model.source, cache),
            "disk_bytes_per_token": tg_disk / ntg if ntg else 0.0, "tg_cache": tg_stats,
            "rss": current_rss_bytes()}


class MemoryReport:
    """Per-answer memory line for `amed chat -v`: expert-cache hits, disk bytes per token, RSS."""

    def __init__(self, model):
        from amed.engine.experts.memory import disk_read_bytes

        self.model = model
        self.cache = model.experts.cache
        self._io = disk_read_bytes()
        self._st = self.cache.stats.copy() if self.cache is not None else None

    def line(self, tokens: int) -> str:
        from amed.engine.experts.memory import disk_read_bytes

        io = disk_read_bytes()
        parts = []
        if self.cache is not None:
            st = self.cache.stats - self._st
            self._st = self.cache.stats.copy()
            if st.uses:
                parts.append(f"expert cache hit rate {100 * st.hit_rate:.1f}% ({st.hits}/{st.uses}, "
                             f"{st.prefetched} prefetched, {st.guessed} looked ahead, {st.demand} faulted)")
        if io is not None and self._io is not None:
            parts.append(f"{(io - self._io) / max(tokens, 1) / 1e6:.1f} MB read from disk per token")
        self._io = io
        parts.append(f"RSS {current_rss_bytes() / 1e9:.2f} GB (peak {peak_rss_bytes() / 1e9:.2f} GB)")
        return "; ".join(parts)


def memory_table(rows: list[dict]) -> str:
    """The larger-than-RAM view of decode rows: cache, disk and the disk-bound ceiling."""
    lines = ["| prefetch | look-ahead | max RAM | expert cache | test | t/s | hit rate | look-ahead acc. | "
             "missed/token | disk read/token | read GB/s | disk GB/s | disk-bound ceiling | % of ceiling | peak RSS |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "disk_bytes_per_token" not in r:
            continue
        ceil = r.get("ceiling_tps")
        acc = r.get("lookahead_acc")
        cells = [r["prefetch"], r["lookahead"], r["max_ram"], r["cache_budget"], r["test"],
                 f"{r['tps_mean']:.2f}", "" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%",
                 "" if acc is None else f"{100 * acc:.0f}%",
                 f"{r.get('miss_bytes_per_token', 0) / 1e6:.1f} MB",
                 f"{r['disk_bytes_per_token'] / 1e6:.1f} MB",
                 f"{r['disk_bytes_per_token'] * r['tps_mean'] / 1e9:.2f}",
                 "" if r.get("disk_gbs") is None else f"{r['disk_gbs']:.2f}",
                 "—" if ceil is None else f"{ceil:.2f} t/s",
                 "—" if ceil is None else f"{100 * r['tps_mean'] / ceil:.0f}%",
                 f"{r['peak_rss_gb']:.2f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_rows(rows: list[dict], fmt: str) -> str:
    """Results as a Markdown table (llama-bench style), JSON or CSV."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    lines = ["| model | size | quant | threads | test | t/s | TTFT | peak RSS | B/token | GB/s | % mem BW | experts in RAM |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        decode = "bytes_per_token" in r
        er = r.get("experts_resident")
        from amed.hub import fmt_bytes

        device = r.get("device", "cpu")
        cells = [r["model"] + ("" if device == "cpu" else f" ({device})"), fmt_bytes(r["size_gb"] * 1e9), r["quant"], str(r["threads"]), r["test"],
                 f"{r['tps_mean']:.2f} ± {r['tps_sd']:.2f}",
                 "" if decode else f"{r['ttft_s']:.3f} s", f"{r['peak_rss_gb']:.2f} GB",
                 f"{r['bytes_per_token'] / 1e6:.1f} MB" if decode else "",
                 f"{r['gbs']:.1f}" if decode else "", f"{r['pct_bw']:.0f}%" if decode else "",
                 f"{100 * er:.1f}%" if decode and er is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the `amed bench` command (the CLI parses the flags into a BenchPlan and calls run_command)
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchPlan:
    n_prompt: int | list = 512       # ppN test(s): one value or a list (as llama-bench's -p 64,512)
    n_gen: int | list = 128          # tgN test(s)
    reps: int = 5
    depth: int = 0                   # tokens of context prefilled (untimed) before each test
    threads: list = field(default_factory=list)      # thread counts to sweep; empty: all cores
    output: str = "md"               # md, json or csv
    random_ids: bool = False
    ctx_size: int | None = None      # the context the tests must fit in (None: the model's trained one)
    max_ram: int | None = None
    prefetch: list = field(default_factory=lambda: ["on"])
    lookahead: list = field(default_factory=lambda: ["auto"])
    cold: bool = False
    device: str = "cpu"              # cpu | cuda
    gpu_experts: int | str = 0       # with cuda: experts per layer cached in VRAM (or "auto")


def bench_sizes(plan: BenchPlan) -> list[tuple[int, int]]:
    """The (ppN, tgN) pairs of the runs: each run times one prompt and one decode test, so
    -p 64,512 -n 32 gives pp64+tg32, then pp512."""
    from itertools import zip_longest

    n_prompts = plan.n_prompt if isinstance(plan.n_prompt, list) else [plan.n_prompt]
    n_gens = plan.n_gen if isinstance(plan.n_gen, list) else [plan.n_gen]
    return [(p, n) for p, n in zip_longest(n_prompts, n_gens, fillvalue=0) if p or n]


def context_needed(plan: BenchPlan) -> int:
    """Positions the largest test fills: -d of context, then the prompt (ppN), or one token and the
    N decoded after it (tgN); at least the 9 of the kernel warm-up."""
    return max([9] + [plan.depth + max(p, n + 1 if n else 0) for p, n in bench_sizes(plan)])


def check_context(plan: BenchPlan, config, available: int | None = None) -> int:
    """Refuse a plan whose tests do not fit the context (-c, else the model's trained context), or
    whose KV cache would not fit in `available` bytes of memory (default: what is available now),
    in one sentence, before anything is loaded; returns the tokens needed."""
    from amed.engine.experts.memory import fmt_size, mem_available

    need = context_needed(plan)
    trained = config.context_limit
    if need > (plan.ctx_size or trained):
        fix = ("lower -d, -p or -n, or raise -c" if plan.ctx_size else
               "lower -d, -p or -n (-c N benches past the trained context)")
        what = (f"-c {plan.ctx_size}" if plan.ctx_size else f"the {trained} tokens the model was trained on"
                if config.yarn is None else f"the {trained} tokens this config's YaRN allows")
        raise AmedError(f"these tests need {need} tokens of context (-d {plan.depth} plus the largest -p/-n), "
                        f"more than {what}; {fix}.")
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_size * 4 * need
    available = mem_available() if available is None else available
    if kv > available:
        raise AmedError(f"these tests need {need} tokens of context, a KV cache of {fmt_size(kv)}, more than the "
                        f"{fmt_size(available)} of memory available; lower -d, -p or -n.")
    return need


def model_config(path: Path):
    """The ModelConfig of a store or checkpoint, read without loading it."""
    from amed.config import ModelConfig
    from amed.formats.store import MANIFEST, read_manifest

    if (path / MANIFEST).is_file():
        return ModelConfig.from_dict(read_manifest(path)["config"])
    if path.is_file():                                    # a GGUF file
        from amed.formats.gguf import gguf_config, read_header

        return gguf_config(read_header(path))
    return ModelConfig.from_file(path)


def synthetic_store(preset: str, layers: int, bits: int, console, experts: int | None = None) -> Path:
    """A random quantized store for benchmarks, built on first use under $AMED_HOME/bench."""
    from amed.app.progress import QuantizeBar
    from amed.app.synth import SyntheticSource
    from amed.formats.store import MANIFEST
    from amed.hub import amed_home
    from amed.quant.convert import Settings, quantize_model

    name = f"synthetic-{preset}-{layers}" + (f"-e{experts}" if experts else "") + f"-q{bits}"
    path = amed_home() / "bench" / name
    try:
        done = json.loads((path / MANIFEST).read_text()).get("complete")
    except (OSError, ValueError):
        done = False
    if not done:
        source = SyntheticSource(preset, layers, 0, experts)       # an unknown preset: one sentence, first
        console.print(f"[dim]building a random {preset} store with {layers} layers at {path} (once)...[/]")
        with QuantizeBar(console) as bar:
            quantize_model(source, path, Settings(bits=bits), progress=bar)
    return path


def bench_rows(rec: dict, n_gen: int, reps: int, path: Path, size: int, qdesc: str, threads: int, bw: float,
               cache, pf: str, la: str, ram) -> list[dict]:
    """The table rows (ppN, tgN) of one run_bench record."""
    from amed.engine.experts.memory import fmt_size

    rows = []
    for res in (rec["pp"], rec["tg"]):
        if res is None:
            continue
        row = {"model": path.name, "size_gb": size / 1e9, "quant": qdesc, "threads": threads, "test": res.test,
               "tps_mean": res.mean, "tps_sd": res.sd,
               "tps_median": res.median, "tps_samples": res.tps, "peak_rss_gb": rec["peak_rss"] / 1e9,
               "compile_s": rec["compile_s"], "mem_bw_gbs": bw}
        if res.test.startswith("pp"):
            row["ttft_s"] = min(res.seconds)
        else:
            bpt = rec["bytes_per_token"]
            row.update(bytes_per_token=bpt, gbs=bpt * res.mean / 1e9, pct_bw=100 * bpt * res.mean / 1e9 / bw,
                       experts_resident=rec["expert_resident"])
            if cache is not None:
                st, dpt = rec["tg_cache"], rec["disk_bytes_per_token"]
                mpt = st.miss_bytes / (n_gen * reps) if cache.bounded else 0.0
                row.update(prefetch=pf, lookahead=la if cache.bounded else "off",
                           max_ram=fmt_size(ram) if ram else "auto",
                           cache_budget=fmt_size(cache.budget) if cache.bounded else "all",
                           hit_rate=st.hit_rate if st.uses else None,
                           lookahead_acc=st.lookahead_accuracy if st.predicted else None,
                           disk_bytes_per_token=dpt, miss_bytes_per_token=mpt,
                           disk_gbs=None, ceiling_tps=None, rss_gb=rec["rss"] / 1e9)
        rows.append(row)
    return rows


def run_command(path: Path, plan: BenchPlan, console, set_threads) -> None:
    """Load the model at `path`, run every variant of `plan` (thread counts x prefetch x
    look-ahead), print the table on stdout and a summary line on stderr."""
    import numba

    from amed import kernel_cache_cold, load
    from amed.engine.experts import ExpertOptions
    from amed.engine.experts.memory import fmt_size
    from amed.hub import amed_home
    from amed.text.tokenizer import Tokenizer

    from amed.app.progress import Counted, compile_progress

    reps, depth, output, cold = plan.reps, plan.depth, plan.output, plan.cold
    sizes = bench_sizes(plan)
    if not sizes:
        raise AmedError("nothing to measure: -p and -n are both 0.")
    config = model_config(path)
    trained = config.context_limit
    need = check_context(plan, config)           # before the load: -d 99999999 is one sentence, not a hang
    if need > trained:
        what = "the model was trained on" if config.yarn is None else "this config's YaRN allows"
        console.print(f"[yellow]-c {plan.ctx_size} is above the {trained} tokens {what}: "
                      f"speed is measured, but answers that long may degrade.[/]")
    random_ids, ram, prefetches, lookaheads = plan.random_ids, plan.max_ram, plan.prefetch, plan.lookahead
    counts = plan.threads or [numba.config.NUMBA_NUM_THREADS]
    compiling = contextlib.nullcontext()
    if kernel_cache_cold():
        console.print("[dim]compiling kernels (first run only, ~1 min; reported apart as compile time)...[/]")
        compiling = compile_progress(console)
    options = ExpertOptions.from_env(max_ram=ram, gpu_experts=plan.gpu_experts)
    home = amed_home()
    m = load(path, ctx_size=need + 16, experts=options, device=plan.device,
             log=lambda msg: console.print(f"[yellow]{msg}[/]"))
    tok = Tokenizer.from_dir(path) if path.is_file() or (path / "tokenizer.json").exists() else None
    bw, bw_from = bandwidth_for_bench(console)
    src = m.source
    size = sum((path / f).stat().st_size for f in getattr(src, "manifest", {}).get("files", {})) or \
        sum(t.nbytes for t in src.tensors.values())
    quant = getattr(src, "manifest", {}).get("quantization", {})
    qdesc = f"q{quant['bits']}/g{quant['group_size']}" if quant else getattr(src, "type_mix", "bf16")
    cache = m.experts.cache
    if cache is not None and hasattr(cache, "touch_memory"):
        console.print(f"[dim]touching {fmt_size(cache.capacity * cache.slot_size)} of memory for the expert "
                      f"cache once (untimed: a VM's first touch would slow only the first variant)...[/]")
        cache.touch_memory()
    disk_bw = None
    variants = [(p, la) for p in prefetches for la in (lookaheads if p == "on" else ["off"])]
    rows = []
    for pf, la in variants:
        if cache is not None and len(variants) > 1:       # a fresh cache per variant, same model
            budget = cache.budget if cache.bounded else cache.expert_total
            m.use_experts(options.replace(prefetch=pf == "on", lookahead=la, expert_budget=budget))
        cache = m.experts.cache
        if cache is not None and cache.bounded:      # each variant's ceiling from the disk of that moment
            console.print("[dim]measuring the disk's read speed for experts (1 GiB of the store)...[/]")
            disk_bw = disk_read_gbs(src, home / "diskbw.json", refresh=True)   # shared/virtual disks vary
        first_row = len(rows)
        for n in counts:
            n = set_threads(n)
            for n_prompt, n_gen in sizes:
                if cold:
                    drop_expert_pages(src)
                console.print(f"[dim]{path.name}: {n} threads, prefetch {pf}, look-ahead {la}, pp{n_prompt} "
                              f"tg{n_gen} x {reps}...[/]")
                with compiling, Counted(console, "context (-d) prefill", "tokens") as bar:
                    rec = run_bench(m, tok, n_prompt, n_gen, reps, random_ids, depth=depth, warm_prompt=not cold,
                                    progress=bar.update if depth > 512 else None)
                compiling = contextlib.nullcontext()     # the kernels are compiled after the first run
                new = bench_rows(rec, n_gen, reps, path, size, qdesc, n, bw, cache, pf, la, ram)
                for row in new:
                    row["device"] = plan.device if plan.device == "cpu" else f"{plan.device}, {plan.gpu_experts} gpu experts"
                rows += new
        if cache is not None and cache.bounded:
            # and again after it: the faster of the two probes sets the ceiling (the strictest;
            # this VM's disk swung 0.1-2.5 GB/s between one minute and the next)
            after = disk_read_gbs(src, home / "diskbw.json", refresh=True)
            disk_bw = max((b for b in (disk_bw, after) if b), default=None)
            for row in rows[first_row:]:
                if "miss_bytes_per_token" not in row:
                    continue
                # the ceiling: bytes of the expert misses per token at the disk's speed
                # (reads of wrong look-ahead guesses are extra work, not the ceiling)
                mpt = row["miss_bytes_per_token"]
                row["disk_gbs"] = disk_bw
                if disk_bw and mpt > 0.01 * row["bytes_per_token"]:
                    row["ceiling_tps"] = disk_bw * 1e9 / mpt
    print(format_rows(rows, output))
    from_disk = any(r.get("disk_bytes_per_token", 0) > 0.01 * r.get("bytes_per_token", 1) for r in rows)
    if output == "md" and cache is not None and (cache.bounded or len(variants) > 1 or from_disk):
        print()
        print(memory_table(rows))
    if rows:
        console.print(f"[dim]kernel compile/load before timing: {rows[0]['compile_s']:.2f} s; "
                      f"memory bandwidth {bw:.1f} GB/s ({bw_from})"
                      + (f"; disk {disk_bw:.2f} GB/s" if disk_bw else "")
                      + (f"; dense weights {fmt_size(cache.dense_bytes)} resident, experts "
                         f"{fmt_size(cache.expert_total)} on disk" if cache is not None else "") + "[/]")
    gpu = m.experts
    if hasattr(gpu, "prefill"):                   # --device cuda: where the routed experts ran
        console.print(f"[dim]GPU: {gpu.resident} routed experts in VRAM ({gpu.swaps} swaps); "
                      f"{gpu.prefill.summary()}; {gpu.copied} expert copies for prefill batches[/]")
