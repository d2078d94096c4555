"""The `amed` command line. Each command parses flags and calls into the library; heavy imports
(numpy, numba) happen inside command bodies so `amed --help` stays instant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="amed",
    help="Run AntAngelMed (a 103B medical MoE) on your own computer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)

# store formats, shared by quantize, download --quantize and synth --bits
DENSE_HELP = "Attention, shared expert, dense MLP and embeddings: q8, q6, q4 or bf16."
LAYOUT_HELP = "q4/q8 row order: r8 (8 rows interleaved: faster prefill) or rows (store format 1; for A/B runs)."
HEAD_HELP = ("lm_head (the output layer, read whole for every token): q8, q6, q4, bf16 or auto "
             "(q6; q8 with --bits 8 --dense q8; bf16 with --dense bf16).")


def fail(message: str, code: int = 1):
    """Print one clear sentence on stderr and exit (no traceback)."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------
from enum import Enum  # noqa: E402  (kept inside the download block)


class Source(str, Enum):
    hf = "hf"
    modelscope = "modelscope"


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Repository id on the hub.")] = "MedAIBase/AntAngelMed",
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit (default: main).")] = None,
    local_dir: Annotated[Optional[Path], typer.Option(
        "--local-dir", metavar="DIR", help="Where the files go (default: ~/.cache/amed/models/ORG--NAME, or "
                                           "$AMED_HOME/models/ORG--NAME).")] = None,
    include: Annotated[Optional[list[str]], typer.Option(
        "--include", metavar="GLOB", help="Glob of repo files to fetch; repeatable; replaces the default "
                          "(*.json *.safetensors *.jinja tokenizer* LICENSE* README.md).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        "--exclude", metavar="GLOB", help="Glob of repo files to skip; repeatable. *.py and pickle formats "
                          "(*.bin *.pt *.pth *.pkl *.ckpt) are never fetched.")] = None,
    token: Annotated[Optional[str], typer.Option(
        help="Hub token for gated/private repos (default: $HF_TOKEN or the `hf auth login` token).")] = None,
    source: Annotated[Source, typer.Option(
        help="hf: Hugging Face hub ($HF_ENDPOINT honoured). modelscope: needs `pip install 'amed\\[modelscope]'`.")
    ] = Source.hf,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and disk needs; fetch nothing.")] = False,
    max_workers: Annotated[int, typer.Option(help="Files downloaded in parallel.", min=1, max=32)] = 4,
    quantize_bits: Annotated[Optional[int], typer.Option(
        "--quantize", "--bits", metavar="4|8", rich_help_panel="Quantize while downloading",
        help="Quantize shard by shard into an amed store (routed experts int4 or int8), deleting each shard "
             "once converted: needs the store plus ~2 shards of disk, not the whole checkpoint.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", metavar="STORE", rich_help_panel="Quantize while downloading",
        help="Store directory (default: ~/.cache/amed/stores/NAME-qBITS). Shards go to --local-dir "
             "(default: .STORE.download next to it), which is emptied and removed at the end.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", "-g", rich_help_panel="Quantize while downloading",
                                            help="Weights per scale: 32, 64 or 128.")] = 64,
    dense: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=DENSE_HELP)] = "q8",
    head: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=HEAD_HELP)] = "auto",
    layout: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=LAYOUT_HELP)] = "r8",
    force: Annotated[bool, typer.Option("--force", rich_help_panel="Quantize while downloading",
                                        help="Overwrite an existing store or unfinished job.")] = False,
):
    """Download the AntAngelMed checkpoint from the Hugging Face hub (resumable, verified).

    Lists the files and checks free disk space first.
    Interrupted (network drop, Ctrl-C, kill)? Run it again: it resumes from the bytes on disk.
    Every file is checked against the hub's SHA-256; verified files are skipped next time.
    With --quantize 4 -o STORE it writes the quantized store directly, one shard at a time
    (the same bytes as `amed download` then `amed quantize`; rerun the same command to resume).
    """
    import shlex

    from amed import hub
    from amed.app.progress import DownloadBars

    if quantize_bits is not None:
        _download_quantize(repo_id, revision, local_dir, include, exclude, token, source, dry_run,
                           quantize_bits, output, group_size, dense, head, layout, force)
        return
    if output is not None or force:
        fail("-o/--output and --force go with --quantize 4|8 (download and quantize in one go).")
    dest = local_dir or hub.default_local_dir(repo_id)
    q = shlex.quote

    def finished(path: Path) -> None:
        print(f"Downloaded {repo_id} to {path}")
        print(f"Next: amed quantize {q(str(path))} -o {q(str(path) + '-q4')} --bits 4")

    if source == Source.modelscope:
        if dry_run:
            fail("--dry-run is only supported with --source hf")
        finished(hub.download_modelscope(repo_id, dest, revision=revision, include=include, exclude=exclude,
                                         token=token, max_workers=max_workers))
        return

    try:
        plan = hub.list_files(repo_id, revision=revision, include=include, exclude=exclude, token=token)
    except hub.HubUnreachable as e:
        if not (have := hub.offline_snapshot(repo_id, dest, include, exclude)):
            raise
        err.print(f"{e}; using the verified files already in {have} (not checked for updates)", markup=False)
        finished(have)
        return
    hub.check_access(plan, token)
    needed = hub.bytes_needed(plan, dest)
    fmt = hub.fmt_bytes

    if dry_run:
        state = hub.load_state(dest)
        for f in plan.files:
            have = hub.bytes_on_disk(f, dest, state)
            status = ("verified" if hub.is_verified(f, dest, state) else "on disk, to verify" if have == f.size
                      else f"partial {100 * have // max(f.size, 1)}%" if have else "to fetch")
            print(f"{fmt(f.size):>10}  {status:<18}  {f.path}")
        free = hub.free_bytes(dest)
        print(f"{len(plan.files)} files, {fmt(plan.total_bytes)} in {repo_id}@{plan.commit[:12]}; "
              f"{fmt(needed)} to fetch into {dest}; {fmt(free)} free"
              + ("" if needed + hub.DISK_HEADROOM <= free else " (NOT ENOUGH)"))
        return

    hub.check_disk_space(needed, dest)
    err.print(f"{repo_id}@{plan.commit[:12]}: {len(plan.files)} files, {fmt(plan.total_bytes)}, "
              f"{fmt(needed)} to fetch into {dest}", markup=False)
    try:
        hub.download(plan, dest, token=token, max_workers=max_workers, progress=DownloadBars(err))
    except KeyboardInterrupt:
        err.print("[yellow]stopped: run the same command again to resume[/]")
        raise
    finished(dest)


def _download_quantize(repo_id, revision, local_dir, include, exclude, token, source, dry_run, bits, output,
                       group_size, dense, head, layout, force) -> None:
    """`amed download --quantize`: see amed/quant/stream.py."""
    from amed import hub
    from amed.app.progress import StreamBars
    from amed.quant.convert import Settings
    from amed.quant.stream import default_download_dir, download_quantize

    if source != Source.hf:
        fail("--quantize needs --source hf.")
    if dry_run:
        fail("--dry-run cannot be combined with --quantize.")
    if include or exclude:
        fail("--include/--exclude cannot be combined with --quantize (it fetches exactly what the store needs).")
    settings = Settings(bits=bits, group_size=group_size, dense=dense, head=head, layout=layout)
    settings.validate()
    store = output or default_store_dir().parent / f"{repo_id.split('/')[-1]}-q{bits}"
    plan = hub.list_files(repo_id, revision=revision, token=token)
    hub.check_access(plan, token)
    scratch = local_dir or default_download_dir(store)
    err.print(f"{repo_id}@{plan.commit[:12]} -> {store} (q{bits}, shards pass through {scratch})", markup=False)
    try:
        with StreamBars(err) as bars:
            summary = download_quantize(plan, store, settings, local_dir=local_dir, token=token, force=force,
                                        progress=bars)
    except KeyboardInterrupt:
        err.print("[yellow]stopped: run the same command again to resume[/]")
        raise
    print_quantize_summary(summary)


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------
@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(help="Hugging Face checkpoint directory (from `amed download`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Store directory to write.")],
    bits: Annotated[int, typer.Option("--bits", "-b", help="Routed experts: 4 (int4) or 8 (int8).")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", "-g", help="Weights per scale: 32, 64 or 128.")] = 64,
    dense: Annotated[str, typer.Option(help=DENSE_HELP)] = "q8",
    head: Annotated[str, typer.Option(help=HEAD_HELP)] = "auto",
    layout: Annotated[str, typer.Option(help=LAYOUT_HELP)] = "r8",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing store or unfinished job.")] = False,
):
    """Convert a checkpoint into an int4/int8 amed store (streaming, resumable: rerun to continue)."""
    from amed.quant.convert import Settings

    run_quantize(src, output, Settings(bits=bits, group_size=group_size, dense=dense, head=head, layout=layout),
                 force)


def run_quantize(src, output: Path, settings, force: bool) -> None:
    """quantize_model with a progress bar that appears once validation has passed, then the summary."""
    from amed.app.progress import QuantizeBar
    from amed.quant.convert import quantize_model

    with QuantizeBar(err) as bar:
        summary = quantize_model(src, output, settings, force=force, progress=bar)
    print_quantize_summary(summary)


def human(n: float) -> str:
    from amed.hub import fmt_bytes

    return fmt_bytes(n)


def print_quantize_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"store written to {s['path']}", title_justify="left")
    for col in ("tensors", "format", "params", "size", "bits/weight"):
        t.add_column(col, justify="right" if col != "tensors" else "left")
    for kind, c in sorted(s["classes"].items(), key=lambda kv: -kv[1]["bytes"]):
        t.add_row(kind, c["format"], f"{c['params'] / 1e6:,.2f} M", human(c["bytes"]),
                  f"{8 * c['bytes'] / max(c['params'], 1):.2f}")
    t.add_row("total", "", f"{s['params'] / 1e6:,.2f} M", human(s["store_bytes"]),
              f"{8 * s['store_bytes'] / max(s['params'], 1):.2f}", style="bold")
    err.print(t)
    err.print(f"{human(s['source_bytes'])} read in {s['seconds']:.1f} s "
              f"({human(s['source_bytes'] / max(s['seconds'], 1e-9))}/s). Next: [bold]amed chat -m {s['path']}[/]")


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="Store directory to check.")],
):
    """Hash every file of a store against its manifest (a full read; loading checks only sizes)."""
    from amed.app.progress import ByteBar
    from amed.formats.store import open_store

    st = open_store(store)
    total = sum(m["bytes"] for m in st.manifest["files"].values())
    with ByteBar(err, "verify", total) as bar:
        bad = st.verify(progress=bar.advance)
    if bad:
        fail(f"{len(bad)} file(s) of {store} do not match their checksums ({', '.join(bad)}): the store is "
             f"damaged; re-create it with `amed quantize ... --force`.")
    err.print(f"[green]ok[/]: all {len(st.manifest['files'])} files of {store} match their SHA-256.")


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------
def default_store_dir() -> Path:
    from amed.hub import amed_home

    return amed_home() / "stores" / "AntAngelMed-q4"


def resolve_model(model: Optional[Path]) -> Path:
    """-m, else $AMED_MODEL, else the default store; a clear error naming the fix otherwise."""
    import os

    if model is not None:
        if not model.exists():
            fail(f"{model} does not exist.")
        return model
    if os.environ.get("AMED_MODEL"):
        return Path(os.environ["AMED_MODEL"])
    d = default_store_dir()
    if (d / "amed-manifest.json").exists():
        return d
    fail(f"no model given and none at the default location {d}. Pass -m DIR, set AMED_MODEL, or "
         f"create it with: amed download && amed quantize <download dir> -o {d} --bits 4")


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


ModelOpt = Annotated[Optional[Path], typer.Option("-m", "--model", help="Store or checkpoint directory "
                                                  "(default: $AMED_MODEL, then the default store).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads (default: all cores).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", rich_help_panel="Device",
    help="cpu, or cuda: dense weights on an NVIDIA GPU (needs pip install 'amed[cuda]'), routed experts on the CPU.")]
GpuExpertsOpt = Annotated[str, typer.Option(
    "--gpu-experts", metavar="N|auto", rich_help_panel="Device",
    help="With --device cuda: routed experts per layer cached in VRAM (the most used), or auto: as many as fit.")]
MaxRamOpt = Annotated[Optional[str], typer.Option(
    "--max-ram", metavar="SIZE", rich_help_panel="Memory",
    help="Bound on resident memory, e.g. 16G, 16GiB, 12000M (G = GiB, GB = 10^9). Dense weights stay "
         "resident; routed experts are cached in what is left. Default: 90% of available memory.")]


@app.command()
def chat(
    model: ModelOpt = None,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="One-shot: answer this and exit.")] = None,
    system_prompt: Annotated[Optional[str], typer.Option("--system-prompt", "-sys", help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens per answer.")] = 1024,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context length in tokens.")] = 4096,
    temp: Annotated[Optional[float], typer.Option("--temp", help="Temperature; 0 = greedy.", rich_help_panel="Sampling")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", rich_help_panel="Sampling")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", rich_help_panel="Sampling")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", rich_help_panel="Sampling")] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option("--repeat-penalty", rich_help_panel="Sampling")] = None,
    seed: Annotated[Optional[int], typer.Option("-s", "--seed", rich_help_panel="Sampling")] = None,
    threads: ThreadsOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print settings and per-answer stats.")] = False,
    max_ram: MaxRamOpt = None,
    no_prefetch: Annotated[bool, typer.Option("--no-prefetch", rich_help_panel="Memory",
                                              help="Do not read chosen experts ahead (slower from disk).")] = False,
    device: DeviceOpt = "cpu",
    gpu_experts: GpuExpertsOpt = "0",
):
    """Talk to the model, with tokens streaming as they are generated.

    Interactive by default; with -p, or a prompt piped on stdin, prints only the answer on stdout."""
    path = resolve_model(model)
    one_shot = prompt is not None or not sys.stdin.isatty()
    if one_shot and prompt is None:
        prompt = sys.stdin.read()
        if not prompt.strip():
            fail("no prompt: pass -p TEXT or pipe a question on stdin.")
    set_threads(threads)
    from amed.app.chat import run_command

    run_command(path, err, prompt=prompt, system_prompt=system_prompt, max_tokens=max_tokens, ctx_size=ctx_size,
                sampling=dict(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repeat_penalty, seed=seed),
                verbose=verbose, max_ram=max_ram, prefetch=not no_prefetch, device=device, gpu_experts=gpu_experts)


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
@app.command()
def bench(
    model: ModelOpt = None,
    n_prompt: Annotated[int, typer.Option("-p", "--n-prompt", help="Prompt tokens for the ppN test (0 skips it).")] = 512,
    n_gen: Annotated[int, typer.Option("-n", "--n-gen", help="Generated tokens for the tgN test (0 skips it).")] = 128,
    reps: Annotated[int, typer.Option("-r", "--repetitions", help="Timed repetitions after a warm-up.")] = 5,
    depth: Annotated[int, typer.Option("-d", "--n-depth", help="Run each test after this many tokens of context "
                                       "(prefilled once, untimed): speed at a long context.")] = 0,
    threads: Annotated[str, typer.Option("-t", "--threads", help="Thread counts to sweep, comma-separated (default: all cores).")] = "",
    output: Annotated[str, typer.Option("-o", "--output", help="md, json or csv (on stdout).")] = "md",
    random_ids: Annotated[bool, typer.Option("--random-ids", help="Random token ids instead of real text "
                                            "(prompt and decode: the most varied routing).")] = False,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size")] = 4096,
    max_ram: MaxRamOpt = None,
    prefetch: Annotated[str, typer.Option("--prefetch", help="Expert prefetch: on, off, or on,off to compare "
                                          "them side by side.", rich_help_panel="Memory")] = "on",
    lookahead: Annotated[str, typer.Option("--lookahead", help="Router look-ahead (read the next layer's likely "
                                           "experts early): auto, on, off; comma-separated to compare.",
                                           rich_help_panel="Memory")] = "auto",
    cold: Annotated[bool, typer.Option("--cold", help="Drop the store's experts from the page cache before each "
                                       "run (decode from a cold disk).", rich_help_panel="Memory")] = False,
    synthetic: Annotated[Optional[str], typer.Option("--synthetic", help="Bench a random store of this preset "
                         "(tiny, flash, mini), built once and cached: no download needed.")] = None,
    layers: Annotated[int, typer.Option("--layers", help="With --synthetic: number of layers.")] = 4,
    bits: Annotated[int, typer.Option("--bits", help="With --synthetic: 4 or 8.")] = 4,
    device: DeviceOpt = "cpu",
    gpu_experts: GpuExpertsOpt = "0",
):
    """Measure prefill and decode speed, memory, and how close that is to the hardware.

    With a store larger than --max-ram it also reports the expert-cache hit rate, bytes read from
    disk per token and the disk-bound ceiling (those bytes / the disk's read speed for whole experts)."""
    if output not in ("md", "json", "csv"):
        fail(f"-o must be md, json or csv, not {output!r}.")
    try:
        counts = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        fail(f"-t takes comma-separated integers, not {threads!r}.")
    prefetches = [p.strip() for p in prefetch.split(",") if p.strip()]
    lookaheads = [p.strip() for p in lookahead.split(",") if p.strip()]
    if not prefetches or any(p not in ("on", "off") for p in prefetches):
        fail(f"--prefetch takes on, off or on,off, not {prefetch!r}.")
    if not lookaheads or any(p not in ("auto", "on", "off") for p in lookaheads):
        fail(f"--lookahead takes auto, on or off (comma-separated), not {lookahead!r}.")
    if depth < 0:
        fail("-d must be 0 or more tokens.")
    from amed.app.bench import BenchPlan, run_command, synthetic_store
    from amed.engine.experts.memory import parse_size

    ram = parse_size(max_ram) if max_ram is not None else None
    path = synthetic_store(synthetic, layers, bits, err) if synthetic else resolve_model(model)
    plan = BenchPlan(n_prompt=n_prompt, n_gen=n_gen, reps=reps, depth=depth, threads=counts, output=output,
                     random_ids=random_ids, ctx_size=ctx_size, max_ram=ram, prefetch=prefetches,
                     lookahead=lookaheads, cold=cold, device=device, gpu_experts=gpu_experts)
    run_command(path, plan, err, set_threads)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(
        "--preset", "-p", help="Model shape: tiny (a few MB), flash (real Ling-flash-2.0 / "
        "AntAngelMed widths; ~6.4 GB per MoE layer) or mini (Ling-mini-2.0 widths).")] = "tiny",
    layers: Annotated[Optional[int], typer.Option(
        "--layers", "-n", min=1, help="Number of layers (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same bytes).")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", "-f", help="Write into OUT even if it is a non-empty directory.")] = False,
    bits: Annotated[Optional[int], typer.Option(
        "--bits", "-b", help="Write a quantized amed store (4 or 8) directly, with no bf16 copy on "
        "disk: how a store larger than RAM is made.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", "-g", help="With --bits: weights per scale.")] = 64,
    dense: Annotated[str, typer.Option(help="With --bits: " + DENSE_HELP)] = "q8",
    head: Annotated[str, typer.Option(help="With --bits: " + HEAD_HELP)] = "auto",
    layout: Annotated[str, typer.Option(help="With --bits: " + LAYOUT_HELP)] = "r8",
):
    """Write a random BailingMoeV2 checkpoint (for tests and benchmarks; no download needed).

    With --bits, write a quantized store instead (same weights as synth + quantize)."""
    import time

    if bits is not None:
        from amed.quant.convert import Settings
        from amed.app.synth import SyntheticSource

        run_quantize(SyntheticSource(preset, layers, seed), out.expanduser(),
                     Settings(bits=bits, group_size=group_size, dense=dense, head=head, layout=layout), force)
        return

    from amed.app.progress import ByteBar
    from amed.errors import AmedError
    from amed.app.synth import PRESETS, write_synthetic_checkpoint

    out = out.expanduser()
    if preset not in PRESETS:
        fail(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        fail(f"{out} is not empty; pass --force to write the checkpoint into it anyway.")
    t0 = time.perf_counter()
    with ByteBar(err, f"synth {preset}", transient=True) as bar:
        try:
            path = write_synthetic_checkpoint(out, preset=preset, layers=layers, seed=seed,
                                              progress=bar.update)
        except AmedError as e:
            bar.stop()
            fail(str(e))
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    shards = len(list(path.glob("model-*-of-*.safetensors")))
    nl = layers or PRESETS[preset]["num_hidden_layers"]
    human = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    err.print(f"wrote a random {preset} checkpoint ({nl} layers, {shards} shards, {human}) "
              f"to {path} in {dt:.1f} s")


def main() -> None:
    from amed.errors import AmedError

    try:
        app()
    except AmedError as e:
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
