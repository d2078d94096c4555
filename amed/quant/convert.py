"""`amed quantize`: a Hugging Face checkpoint -> an amed store, streaming and resumable.

The pipeline validates the whole source, plans every output file (so sizes and offsets are known
before a byte is written), checks free disk space, then writes one file at a time: globals, then
one file per layer. Each file is written as `.partial`, fsynced, hashed and renamed, and only then
recorded in the manifest; the manifest says `complete` only after the last file. Rerunning the
same command skips recorded files, so an interrupted run (Ctrl-C, kill -9, power loss) resumes
and ends byte-identical to an uninterrupted one. Memory stays bounded: tensors are read with
pread in row chunks, never through a growing memory map.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from amed.formats.checkpoint import Checkpoint, TensorSpec, f32_to_bf16, tensor_table
from amed.formats.container import PAGE, ContainerWriter, Entry, plan, write_json_atomic
from amed.errors import AmedError
from amed.formats.store import COPIED_FILES, FORMAT, MANIFEST, VERSION, component_specs, read_manifest

# ---- the quantization policy: which tensor gets which format -----------------------------------
# "experts" and "dense" are the command's --bits and --dense choices. The router, expert bias and
# norms are tiny and precision-critical (routing decisions), so they are never quantized: norms and
# bias as float32, the router in its source precision (bf16 in the real checkpoint: lossless, and
# half the bytes per token of float32; the kernel computes the router in fp32 either way).
POLICY = {
    "expert": "experts",   # routed experts (97% of the weights)
    "shared": "dense",     # shared expert, runs for every token
    "attn": "dense",       # fused QKV and output projection
    "ffn": "dense",        # the dense SwiGLU of the first layer(s)
    "embed": "dense",      # token embeddings (only looked up by row)
    "output": "head",      # lm_head: the largest single read of a decoded token (see Settings.head)
    "router": "source",
    "bias": "f32",
    "norm": "f32",
}
ROW_CHUNK_ELEMS = 8 << 20  # quantize big matrices in row chunks of ~8M weights (32 MiB as f32)


@dataclass(frozen=True)
class Settings:
    bits: int = 4           # routed experts: 4 -> q4, 8 -> q8
    group_size: int | None = 64   # None: an INT4 source's own group, else 64 (prequant.resolve_group)
    dense: str = "q8"       # attention, shared expert, dense MLP, embeddings: q8 | q6 | q4 | bf16
    # lm_head: q8 | q6 | q4 | bf16, or "auto": q6, except q8 in an all-q8 store (--bits 8, dense q8)
    # and bf16 with --dense bf16. The lm_head is read whole for every decoded token (0.69 GB at q8 for
    # AntAngelMed's 157184 x 4096), while its error barely moves the output distribution
    # (bench/quality.py, int4 experts: mean KLD 8.1e-5 -> 1.1e-4 on the golden-like model, 0.0205
    # -> 0.0207 on the flash-like one), so q6 saves 23% of those bytes where memory bandwidth is the
    # limit. llama.cpp makes the same choice (Q6_K output in its 4-bit types, Q8_0 in Q8_0).
    head: str = "auto"
    # q4/q8 matrices with a multiple of 8 rows: "r8" (8 rows interleaved, quant/formats.py; prefill
    # 1.4-2x faster) or "rows" (the layout of store version 1). Embeddings stay "rows": they are
    # read one row per token, not multiplied.
    layout: str = "r8"

    @property
    def head_fmt(self) -> str:
        if self.head != "auto":
            return self.head
        if self.dense == "bf16":
            return "bf16"
        return "q8" if (self.bits, self.dense) == (8, "q8") else "q6"

    def fmt(self, kind: str) -> str:
        p = POLICY[kind]
        if p == "experts":
            return f"q{self.bits}"
        if p == "dense":
            return self.dense
        if p == "head":
            return self.head_fmt
        return p

    def choose(self, spec: TensorSpec) -> tuple[str, int | None]:
        """(format, group size) for one tensor. A width the group size does not divide takes the
        next smaller group that does; a width no group divides stays bf16."""
        fmt = self.fmt(spec.kind)
        if fmt == "source":
            return ("bf16" if spec.dtype == "BF16" else "f32"), None
        if fmt not in ("q4", "q6", "q8"):
            return fmt, None
        K = spec.shape[-1]
        for g in [self.group_size] + [g for g in (128, 64, 32) if g < self.group_size]:
            if K % g == 0:
                return fmt, g
        return "bf16", None

    def layout_of(self, spec: TensorSpec) -> str:
        from amed.quant.formats import r8_ok

        fmt, _ = self.choose(spec)
        return "r8" if self.layout == "r8" and spec.kind != "embed" and r8_ok(fmt, spec.shape) else "rows"

    def validate(self) -> None:
        if self.layout not in ("rows", "r8"):
            raise AmedError(f"--layout must be r8 or rows, not {self.layout!r}.")
        if self.bits not in (4, 8):
            raise AmedError(f"--bits must be 4 or 8, not {self.bits}.")
        if self.group_size not in (32, 64, 128):
            raise AmedError(f"--group-size must be 32, 64 or 128, not {self.group_size}.")
        if self.dense not in ("q8", "q6", "q4", "bf16"):
            raise AmedError(f"--dense must be q8, q6, q4 or bf16, not {self.dense!r}.")
        if self.head not in ("auto", "q8", "q6", "q4", "bf16"):
            raise AmedError(f"--head must be auto, q8, q6, q4 or bf16, not {self.head!r}.")


# ---- planning ---------------------------------------------------------------------------------

@dataclass
class FilePlan:
    name: str
    specs: list[TensorSpec]
    entries: list[Entry]
    size: int = 0
    data_start: int = 0


def plan_store(cfg, settings: Settings) -> list[FilePlan]:
    """Every output file with its tensors and byte offsets: globals, then one file per layer."""
    table = tensor_table(cfg)
    groups: dict[str, list[TensorSpec]] = {"globals.safetensors": []}
    for spec in table:
        fname = "globals.safetensors" if spec.layer < 0 else f"layer-{spec.layer:03d}.safetensors"
        groups.setdefault(fname, []).append(spec)
    plans = []
    for fname, specs in groups.items():
        # dense tensors first, then the routed experts, each expert starting on a fresh page
        specs = sorted(specs, key=lambda s: (s.expert >= 0, s.expert))
        entries, last_expert = [], -1
        for s in specs:
            fmt, group = settings.choose(s)
            for i, (suffix, dtype, shape) in enumerate(component_specs(fmt, s.shape, group, settings.layout_of(s))):
                new_expert = s.expert >= 0 and s.expert != last_expert and i == 0
                entries.append(Entry(s.name + suffix, dtype, tuple(shape), PAGE if new_expert else 64))
            last_expert = s.expert if s.expert >= 0 else last_expert
        _, data_start, size = plan(entries, {"format": "amed"})
        plans.append(FilePlan(fname, specs, entries, size, data_start))
    return plans


def manifest_skeleton(cfg, settings: Settings, plans: list[FilePlan], source: dict) -> dict:
    weights, experts = {}, {}
    for fp in plans:
        starts = {e.name: e.start for e in fp.entries}
        for s in fp.specs:
            fmt, group = settings.choose(s)
            layout = settings.layout_of(s)
            extra = {"layout": layout} if layout != "rows" else {}
            if s.expert < 0:
                weights[s.name] = {"format": fmt, "shape": list(s.shape), "group": group, "file": fp.name, **extra}
                continue
            base = s.name.rsplit(".", 1)[0]                 # blk.L.ffn_gate_exps
            which = base.split(".")[-1]
            first = component_specs(fmt, s.shape, group, layout)[0][0]
            info = experts.setdefault(str(s.layer), {"file": fp.name, "count": cfg.num_experts,
                                                     "matrices": {}})
            info["matrices"][which] = {"format": fmt, "group": group, "shape": list(s.shape), **extra}
            if s.expert == 0 and which == "ffn_gate_exps":
                # experts are laid out back to back with a fixed page-aligned stride
                e0 = starts[s.name + first]
                e1 = starts.get(f"{base}.1{first}")
                data_end = fp.size - fp.data_start
                info["offset"] = fp.data_start + e0
                info["stride"] = (e1 - e0) if e1 is not None else data_end - e0
    return {
        "format": FORMAT, "version": VERSION, "complete": False,
        "config": cfg.to_dict(), "source": source,
        "quantization": {**asdict(settings), "policy": {k: settings.fmt(k) for k in POLICY}},
        "weights": weights, "experts": experts, "files": {},
    }


def source_fingerprint(src: Path) -> dict:
    """What identifies the source: hashes of its config and index, and the hub commit if known."""
    from amed.hub import load_state

    def h(p):
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None

    fp = {"config_sha256": h(src / "config.json"), "index_sha256": h(src / "model.safetensors.index.json")}
    state = load_state(src)                        # written by `amed download`
    if state.get("commit"):
        fp.update(repo_id=state.get("repo_id"), revision=state["commit"])
    return fp


# ---- the pipeline -----------------------------------------------------------------------------

def quantize_model(src, dst, settings: Settings = Settings(), force: bool = False, progress=None) -> dict:
    """Quantize checkpoint `src` (a directory, or a source object such as synth.SyntheticSource)
    into store `dst`. `progress(bytes_done, tensors_done, total)` is called as source bytes are
    consumed. Returns a summary dict."""
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    if isinstance(src, (str, os.PathLike)):
        src = Path(src).expanduser()
        check_apart(src, dst)
    with store_lock(dst):
        return _quantize(src, dst, settings, force, progress, t0)


def _quantize(src, dst: Path, settings: Settings, force: bool, progress, t0: float) -> dict:
    if isinstance(src, Path):
        from amed.quant.prequant import open_checkpoint

        ckpt = open_checkpoint(src)              # validates config, headers, every tensor's shape
        source = source_fingerprint(src)
        from amed.formats.files import read_regular   # a FIFO in place of a file would block

        side = {n: read_regular(src / n, limit=1 << 29) for n in COPIED_FILES if (src / n).exists()}
    else:
        ckpt, source = src, src.fingerprint
        side = {n: t.encode() for n, t in src.files.items()}
    cfg = ckpt.config
    from amed.quant.prequant import resolve_group

    settings = resolve_group(settings, getattr(ckpt, "scheme", None))
    settings.validate()
    plans = plan_store(cfg, settings)
    man = manifest_skeleton(cfg, settings, plans, source)

    prepare_output(dst, man, force)
    todo = [fp for fp in plans if fp.name not in man["files"]]
    need = sum(fp.size for fp in todo) + (64 << 20)
    free = shutil.disk_usage(dst).free
    if free < need:
        raise AmedError(f"not enough disk space in {dst}: the store needs {need / 1e9:.1f} GB more but "
                        f"only {free / 1e9:.1f} GB is free; free some space or choose another -o "
                        f"(--bits 4 and --dense q8 give the smallest store).")
    write_json_atomic(dst / MANIFEST, man)

    total_src = sum(ckpt.tensors[s.hf].nbytes for fp in plans for s in fp.specs)
    done_src = sum(ckpt.tensors[s.hf].nbytes for fp in plans if fp.name in man["files"] for s in fp.specs)
    skipped_src = done_src                     # written by an earlier, interrupted run
    ntensors = sum(len(fp.specs) for fp in plans if fp.name in man["files"])
    if progress:
        progress(done_src, ntensors, total_src)
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers) as pool:   # NumPy releases the GIL: tensors quantize in parallel
        for fp in todo:
            writer = ContainerWriter(dst / fp.name, fp.entries, {"format": "amed"})
            try:
                jobs = [pool.submit(convert_tensor, ckpt, writer, s, settings) for s in fp.specs]
                for s, job in zip(fp.specs, jobs):
                    job.result()
                    done_src += ckpt.tensors[s.hf].nbytes
                    ntensors += 1
                    if progress:
                        progress(done_src, ntensors, total_src)
                sha = writer.finish()
            except BaseException:
                for job in jobs:
                    job.cancel()
                wait(jobs)
                writer.abort()
                raise
            man["files"][fp.name] = {"bytes": fp.size, "sha256": sha}
            write_json_atomic(dst / MANIFEST, man)

    for name, data in side.items():
        (dst / name).write_bytes(data)
    # config, tokenizer and generation files are hashed too: `amed verify` catches an edit that
    # would break chat (stores before this key exist: verify checks what they list)
    man["side_files"] = side_file_entries(side)
    man["files"] = {fp.name: man["files"][fp.name] for fp in plans}   # canonical order
    man["complete"] = True
    write_json_atomic(dst / MANIFEST, man)
    summary = summarize(cfg, settings, plans, ckpt, time.perf_counter() - t0, dst)
    summary.update(read_bytes=done_src - skipped_src, skipped_bytes=skipped_src,
                   files_written=len(todo), files_total=len(plans))
    if getattr(ckpt, "scheme", None) is not None:
        summary["prequant"] = {"source": ckpt.scheme.label, **ckpt.stats}
    return summary


LOCK = ".amed-lock"     # the advisory lock a writer holds on a store folder (removed when it ends)


def check_apart(src: Path, dst: Path, what: str = "the checkpoint", flag: str = "-o") -> None:
    """The output folder must be neither the source folder, nor inside it, nor around it (through
    symlinks too): writing there would delete or overwrite the source."""
    s, d = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if d == s:
        raise AmedError(f"the output {dst} is {what} {src} itself; choose an {flag} outside it.")
    if s in d.parents:
        raise AmedError(f"the output {dst} is inside {what} {src}; choose an {flag} outside it.")
    if d in s.parents:
        raise AmedError(f"the output {dst} contains {what} {src}; choose an {flag} that does not hold it.")


@contextlib.contextmanager
def store_lock(dst: Path, advice: str = "wait for it to finish or choose another -o"):
    """Hold the store folder's advisory lock (creating the folder) for one writer at a time; a
    second `amed quantize`/`synth --bits`/`download --quantize` into it is refused naming the pid.
    A folder this call created and that ends empty (the job was refused) is removed again."""
    from amed.hub import dir_lock

    if dst.exists() and not dst.is_dir():
        raise AmedError(f"{dst} exists and is not a directory; choose another -o.")
    created = not dst.exists()
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AmedError(f"cannot create {dst}: {(e.strerror or str(e)).lower()}; choose another -o.") from None
    if not os.access(dst, os.W_OK | os.X_OK):
        raise AmedError(f"cannot write into {dst}: permission denied; choose another -o.")
    try:
        with dir_lock(dst, LOCK, remove=True, advice=advice):
            yield
    except AmedError:
        if created:
            try:
                dst.rmdir()
            except OSError:
                pass
        raise


def owned_files(man: dict) -> set[str]:
    """The names a store manifest says amed wrote into its folder (the only ones --force and
    `amed rm` may replace or delete): tensor files, their .partial, side files, the manifest."""
    names = {MANIFEST, LOCK}
    planned = set(man.get("files") or {}) if isinstance(man.get("files"), dict) else set()
    for table in ("weights", "experts"):
        for info in (man.get(table) or {}).values() if isinstance(man.get(table), dict) else ():
            if isinstance(info, dict) and isinstance(info.get("file"), str):
                planned.add(info["file"])
    for f in planned:
        names |= {f, f + ".partial"}
    side = man.get("side_files")
    if isinstance(side, dict):
        names |= set(side)
    elif man.get("complete"):            # stores from before side files were hashed copied these
        names |= set(COPIED_FILES)
    return {n for n in names if isinstance(n, str) and n and "/" not in n and os.sep not in n
            and n not in (".", "..")}


def repair_advice(path: Path, man: dict | None) -> str:
    """What rewrites the missing or damaged files of store `path`: the command that made it, as
    far as the manifest tells (synth's exact command; quantize's with the settings)."""
    import shlex

    q = shlex.quote
    man = man if isinstance(man, dict) else {}
    src = man.get("source") if isinstance(man.get("source"), dict) else {}
    qz = man.get("quantization") if isinstance(man.get("quantization"), dict) else {}
    cfg = man.get("config") if isinstance(man.get("config"), dict) else {}
    flags = " ".join(f"{flag} {qz[k]}" for flag, k in (("--bits", "bits"), ("--group-size", "group_size"),
                                                         ("--dense", "dense"), ("--head", "head"),
                                                         ("--layout", "layout")) if k in qz)
    tail = "it rewrites only the missing files and those of the wrong size."
    if src.get("synthetic"):
        preset = str(src["synthetic"])
        extra = ""
        if "num_hidden_layers" in cfg:
            extra += f" --layers {cfg['num_hidden_layers']}"
        try:
            from amed.app.synth import PRESETS
            if "num_experts" in cfg and cfg["num_experts"] != PRESETS.get(preset, {}).get("num_experts"):
                extra += f" --experts {cfg['num_experts']}"
        except Exception:                   # pragma: no cover - advice only
            pass
        return (f"re-run `amed synth {q(str(path))} --preset {q(preset)}{extra} --seed {src.get('seed', 0)} "
                f"{flags}` (the command that made this random store): {tail}")
    if src.get("repo_id"):
        return (f"re-run the command that made it, `amed quantize CHECKPOINT -o {q(str(path))} {flags}` or "
                f"`amed download {q(str(src['repo_id']))} --quantize {qz.get('bits', 4)} -o {q(str(path))}`: {tail}")
    return (f"re-run `amed quantize CHECKPOINT -o {q(str(path))} {flags}` with the checkpoint it was made "
            f"from: {tail}")


def side_file_entries(side: dict[str, bytes]) -> dict:
    """The manifest's `side_files`: size and SHA-256 of each copied config/tokenizer file."""
    return {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in sorted(side.items())}


def prepare_output(dst: Path, man: dict, force: bool) -> dict | None:
    """Look at what `dst` already holds: a finished store (refused without force, unless files
    are missing or damaged: then they are rewritten), an interrupted run of this same job (its
    finished files go into man["files"]; the old manifest is returned), or something else (refused).
    --force replaces only what amed wrote there (the files the old manifest lists); a folder that
    is not an amed store, or a file of the user's where the store would write, is refused even with
    --force. Runs under store_lock(dst), which made `dst` and checked it is writable."""
    old = None
    present = {p.name for p in dst.iterdir() if p.name != LOCK}
    if present:
        if MANIFEST not in present:
            raise AmedError(f"{dst} is not empty and is not an amed store"
                            + ("; --force replaces only a store amed wrote, so choose an empty or new -o."
                               if force else "; choose another -o (an empty or new folder)."))
        try:
            old = read_manifest(dst)
        except AmedError:
            old = None
        if not isinstance(old, dict) or not isinstance(old.get("files"), dict):
            raise AmedError(f"{dst} has an {MANIFEST} amed cannot read, so what amed wrote there is unknown; "
                            f"choose another -o (or remove that folder yourself).")
        owned = owned_files(old)
        ours = owned_files(man) | set(COPIED_FILES)
        foreign = sorted(n for n in present & ours if n not in owned)
        if foreign:
            raise AmedError(f"{dst} holds {', '.join(foreign[:3])} that the store's manifest does not list "
                            f"(a file amed did not write); move it away or choose another -o.")
        same_job = all(old.get(k) == man[k] for k in ("config", "source", "quantization"))
        intact = {f: m for f, m in old["files"].items()
                  if isinstance(m, dict) and (dst / f).is_file() and (dst / f).stat().st_size == m.get("bytes")}
        whole = (len(intact) == len(old["files"])
                 and all((dst / f).is_file() for f in old.get("side_files", {}) or {}))
        if old.get("complete") and not force and (whole or not same_job):
            raise AmedError(f"{dst} already holds a complete store; pass --force to overwrite it "
                            f"(`amed verify {dst}` checks it).")
        if not same_job and not force:
            raise AmedError(f"{dst} holds an unfinished store made with other settings or another "
                            f"source; pass --force to start over, or choose another -o.")
        if force:
            _clear_store(dst, owned)
            old = None
        else:                 # resume, or repair a complete store: rewrite what is missing or damaged
            man["files"] = intact
    return old


def convert_tensor(ckpt: Checkpoint, writer: ContainerWriter, s: TensorSpec, settings: Settings) -> None:
    """Read one source tensor in row chunks, convert it to its policy format, write it."""
    from amed.quant import formats as quants

    direct = getattr(ckpt, "convert_direct", None)
    if direct is not None and direct(writer, s, settings):
        return                                   # an INT4 source's levels, copied (quant/prequant.py)
    fmt, group = settings.choose(s)
    r8 = settings.layout_of(s) == "r8"
    chunks = ckpt.read_rows_f32(s.hf, ROW_CHUNK_ELEMS)
    for row0, w in (_whole_blocks(chunks, quants.R8) if r8 else chunks):
        if fmt == "f32":
            writer.write(s.name, w, row0)
        elif fmt == "bf16":
            writer.write(s.name, f32_to_bf16(w), row0)            # exact for a bf16 source
        else:
            qt = quants.quantize(w, fmt, group, layout="r8" if r8 else "rows")
            if r8:                                 # r8 arrays are indexed by blocks of 8 rows
                row0 //= quants.R8
            for suffix, arr in quant_parts(qt, fmt):
                writer.write(s.name + suffix, arr, row0)


def _whole_blocks(chunks, n: int):
    """Re-cut (row0, rows) chunks so that each holds a multiple of n rows (except a last one
    that ends the tensor), carrying the remainder over to the next chunk."""
    carry = None
    for row0, w in chunks:
        if carry is not None:
            row0, w = row0 - len(carry), np.concatenate([carry, w])
        cut = len(w) - len(w) % n
        carry = w[cut:] if cut < len(w) else None
        if cut:
            yield row0, w[:cut]
    if carry is not None:
        yield row0 + cut, carry


def quant_parts(qt, fmt: str):
    """(suffix, array) pairs of a QTensor in the store's component order."""
    if fmt == "q8":
        return [(".q", qt.q), (".s", qt.scale)]
    if fmt in ("q4", "q6"):
        return [(".q", qt.q), (".s", qt.scale), (".m", qt.zero)]
    raise ValueError(f"unknown quantized format {fmt!r}")


def _clear_store(dst: Path, owned: set[str]) -> None:
    """Delete what a store's manifest says amed wrote (the manifest last); nothing else."""
    for name in sorted(owned - {MANIFEST, LOCK}) + [MANIFEST]:
        p = dst / name
        if p.is_file() and not p.is_symlink():
            p.unlink()


def summarize(cfg, settings, plans, ckpt, seconds, dst) -> dict:
    classes: dict[str, dict] = {}
    for fp in plans:
        sizes = {e.name: e.nbytes for e in fp.entries}
        for s in fp.specs:
            fmt, group = settings.choose(s)
            c = classes.setdefault(s.kind, {"format": fmt, "params": 0, "bytes": 0, "source_bytes": 0})
            c["params"] += int(np.prod(s.shape))
            c["bytes"] += sum(sizes[s.name + suf] for suf, _, _ in component_specs(fmt, s.shape, group, settings.layout_of(s)))
            c["source_bytes"] += ckpt.tensors[s.hf].nbytes
    total = sum(fp.size for fp in plans)
    src_bytes = sum(c["source_bytes"] for c in classes.values())
    return {"path": str(dst), "classes": classes, "store_bytes": total, "source_bytes": src_bytes,
            "seconds": seconds, "params": sum(c["params"] for c in classes.values()),
            "source_gb_per_s": src_bytes / 1e9 / max(seconds, 1e-9)}
