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
    add_completion=True,               # --install-completion / --show-completion (bash, zsh, fish, pwsh)
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _plain_help_names() -> None:
    """Help as click and llama.cpp write it: a flag shows no `<bool>` (it takes no value), and the
    usage line names an argument STORE (optional: [PROMPT]) instead of Typer's `{store}`."""
    from typer import core

    option, argument = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if option is not None and hasattr(option, "display_type_rich"):
        shown = option.display_type_rich

        def display_type_rich(self, ctx):
            return None if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)
        option.display_type_rich = display_type_rich
    if argument is not None and hasattr(argument, "display_type_rich"):
        typed = argument.display_type_rich

        def argument_type(self, ctx):         # an argument given a METAVAR is named by it (no `<list[str]>`)
            return None if self.metavar is not None else typed(self, ctx)
        argument.display_type_rich = argument_type
    if argument is not None and hasattr(argument, "_usage_display_name"):
        def _usage_display_name(self):
            name = self.metavar or (self.name or "").upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")
        argument._usage_display_name = _usage_display_name


_plain_help_names()


def show_version(value: bool) -> None:
    if value:
        from amed import __version__

        print(f"amed {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", "-V", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """Run AntAngelMed (a 103B medical MoE) on your own computer."""
    if ctx.invoked_subcommand is None:          # bare `amed`: the help, and success
        text = ctx.get_help()             # Rich prints it; plain click returns it
        if text:
            print(text)
        raise typer.Exit()

# store formats, shared by quantize, download --quantize and synth --bits
DENSE_HELP = "Attention, shared expert, dense MLP and embeddings: q8, q6, q4 or bf16."
LAYOUT_HELP = "q4/q8 row order: r8 (8 rows interleaved: faster prefill) or rows (store format 1; for A/B runs)."
GROUP_HELP = ("Weights per scale: 32, 64 or 128 (default: 64; for an INT4 checkpoint its own group, "
              "128, which copies its weights losslessly).")
HEAD_HELP = ("lm_head (the output layer, read whole for every token): q8, q6, q4, bf16 or auto "
             "(q6; q8 with --bits 8 --dense q8; bf16 with --dense bf16).")


def error_line(message) -> str:
    """'error: MESSAGE' for Rich, the message taken literally (a path or `pip install 'amed[cuda]'`
    keeps its brackets)."""
    from rich.markup import escape

    return f"[bold red]error:[/] {escape(str(message))}"


def fail(message: str, code: int = 1):
    """Print one clear sentence on stderr and exit (no traceback)."""
    err.print(error_line(message))
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
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", metavar="STORE", rich_help_panel="Quantize while downloading",
        help="Store directory (default: ~/.cache/amed/stores/NAME-qBITS). Shards go to --local-dir "
             "(default: .STORE.download next to it), which is emptied and removed at the end.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", rich_help_panel="Quantize while downloading",
                                                      help=GROUP_HELP, show_default=False)] = None,
    dense: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=DENSE_HELP)] = "q8",
    head: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=HEAD_HELP)] = "auto",
    layout: Annotated[str, typer.Option(rich_help_panel="Quantize while downloading", help=LAYOUT_HELP)] = "r8",
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --local-dir that amed did not make "
                                        "(same-named files are replaced); with --quantize: overwrite a store "
                                        "amed wrote.")] = False,
):
    """Download an AntAngelMed checkpoint from the Hugging Face hub (resumable, verified).

    Which checkpoint? All three make an amed store; pick by download size:
    MedAIBase/AntAngelMed-INT4, ~56 GB: the smallest, copied without loss into an int4 store (most machines; slow lines).
    MedAIBase/AntAngelMed-FP8, ~104 GB: for an int8 store (--bits 8), closer to the original, if RAM allows.
    MedAIBase/AntAngelMed, bf16, 206 GB (the default): any store; the reference for perplexity --kld-base.

    Lists the files, sizes and free disk space first.
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
    if output is not None:
        fail("-o/--output goes with --quantize 4|8 (download and quantize in one go).")
    dest = local_dir or hub.default_local_dir(repo_id)
    hub.check_download_target(dest, force)
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
    _checkpoint_menu(repo_id)                     # before the disk check: a smaller one may fit

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


def _checkpoint_menu(repo_id: str) -> None:
    """On stderr, before a download of an AntAngelMed repository starts: the checkpoints that
    exist and their sizes (a slow line should take the INT4 one)."""
    from amed import hub

    if repo_id.split("/")[-1].startswith("AntAngelMed"):
        err.print(hub.checkpoint_menu(repo_id), markup=False, highlight=False)


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
    import dataclasses

    dataclasses.replace(settings, group_size=group_size or 64).validate()   # None: set by the checkpoint
    store = (output_path(output) if output is not None
             else default_store_dir().parent / f"{repo_id.split('/')[-1]}-q{bits}")
    plan = hub.list_files(repo_id, revision=revision, token=token)
    hub.check_access(plan, token)
    _checkpoint_menu(repo_id)
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
    output: Annotated[str, typer.Option("-o", "--output", metavar="STORE", help="Store directory to write.")],
    bits: Annotated[int, typer.Option("--bits", "-b", help="Routed experts: 4 (int4) or 8 (int8).")] = 4,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help=GROUP_HELP, show_default=False)] = None,
    dense: Annotated[str, typer.Option(help=DENSE_HELP)] = "q8",
    head: Annotated[str, typer.Option(help=HEAD_HELP)] = "auto",
    layout: Annotated[str, typer.Option(help=LAYOUT_HELP)] = "r8",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a store or unfinished job amed wrote there "
                                        "(only the files its manifest lists).")] = False,
):
    """Convert a checkpoint into an int4/int8 amed store (streaming, resumable: rerun to continue)."""
    from amed.quant.convert import Settings

    if not src.exists():
        fail(f"{src} does not exist.")
    run_quantize(src, output_path(output), Settings(bits=bits, group_size=group_size, dense=dense, head=head, layout=layout),
                 force)


def output_path(text: str, flag: str = "-o") -> Path:
    """An output folder given as text: an empty one is refused (it would mean the current folder)."""
    if not text.strip():
        fail(f"{flag} is empty; give the folder to write, e.g. {flag} ./my-store.")
    return Path(text).expanduser()


def run_quantize(src, output: Path, settings, force: bool) -> None:
    """quantize_model with a progress bar that appears once validation has passed, then the summary."""
    from amed.app.progress import QuantizeBar
    from amed.quant.convert import quantize_model

    try:
        with QuantizeBar(err) as bar:
            summary = quantize_model(src, output, settings, force=force, progress=bar)
    except KeyboardInterrupt:
        err.print("[yellow]stopped: run the same command again to resume (finished files are kept).[/]")
        raise
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
    read = s.get("read_bytes", s["source_bytes"])
    earlier = ""
    if s.get("skipped_bytes"):
        earlier = (f"; {s['files_total'] - s['files_written']} of {s['files_total']} files "
                   f"({human(s['skipped_bytes'])} of source) were already done by an earlier run")
    pq = s.get("prequant")
    if pq and pq["source"].startswith("FP8"):
        err.print(f"source: {pq['source']}: dequantized block by block, then quantized as from bf16.",
                  markup=False, highlight=False)
    elif pq:
        inexact = f", {pq['inexact_groups']} groups with a scale float16 cannot hold" if pq["inexact_groups"] else ""
        again = (f"; {pq['requantized_tensors']} re-quantized from their exact dequantization (permuted groups "
                 f"or another group size)") if pq["requantized_tensors"] else ""
        err.print(f"source: {pq['source']}: {pq['lossless_tensors']} quantized matrices copied without loss"
                  f"{inexact}{again}.", markup=False, highlight=False)
    err.print(f"{human(read)} read in {s['seconds']:.1f} s ({human(read / max(s['seconds'], 1e-9))}/s){earlier}. "
              f"Next: [bold]amed chat -m {s['path']}[/]")


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Store directory, or a name from `amed list`.")],
):
    """Hash every file of a store against its manifest (a full read; loading checks only sizes)."""
    from amed.app.models import resolve
    from amed.app.progress import ByteBar
    from amed.formats.store import MANIFEST, read_manifest, verified_files, verify_files
    from amed.quant.convert import repair_advice

    store = resolve(store)
    if not store.is_dir():
        fail(f"{store} is a file, not a store directory; pass the folder that holds {MANIFEST}.")
    if not (store / MANIFEST).exists():
        fail(f"{store} is not an amed store (it has no {MANIFEST}); `amed quantize` makes one.")
    man = read_manifest(store)
    if not man.get("complete"):
        fail(f"{store} is an incomplete store (its writing was interrupted); to finish it, "
             f"{repair_advice(store, man)}")
    files = verified_files(man)
    with ByteBar(err, "verify", sum(m["bytes"] for m in files.values())) as bar:
        bad = verify_files(store, man, progress=bar.advance)
    if bad:
        fail(f"{len(bad)} file(s) of {store} are missing or do not match their checksums ({', '.join(bad)}): "
             f"the store is damaged; delete them and {repair_advice(store, man)}")
    unchecked = "" if "side_files" in man else " (config and tokenizer files are not hashed in this older store)"
    err.print(f"[green]ok[/]: all {len(files)} files of {store} match their SHA-256{unchecked}.")


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------
def default_store_dir() -> Path:
    from amed.hub import amed_home

    return amed_home() / "stores" / "AntAngelMed-q4"


def resolve_model(model: Optional[Path]) -> Path:
    """-m, else $AMED_MODEL, else the default store, each a path or a name from `amed list`
    (amed.app.models.resolve_model, the one resolver); a clear error naming the fix otherwise."""
    from amed.app.models import resolve_model as resolve_any
    from amed.errors import AmedError

    try:
        return resolve_any(model, default_store_dir())
    except AmedError as e:
        fail(str(e))


def max_threads() -> int:
    """The most threads a kernel can use here: the cores this process may run on (Numba's pool size)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


def check_threads(threads: Optional[int]) -> Optional[int]:
    """-t N must be 1..cores (0, -1 as in llama.cpp, or no -t: all cores, returned as None); a clear
    error otherwise. Every command with -t checks it here, before anything is loaded."""
    if threads is None or threads in (0, -1):
        return None
    most = max_threads()
    if not 1 <= threads <= most:
        fail(f"-t/--threads must be between 1 and {most} (the cores here), or 0 for all of them; got {threads}.")
    return threads


def check_seed(seed: Optional[int]) -> Optional[int]:
    """-s N: 0 or more; -1 (llama.cpp's convention) or no -s: a random seed, returned as None."""
    if seed is None or seed == -1:
        return None
    if seed < 0:
        fail(f"-s/--seed must be 0 or more, or -1 for a random seed; got {seed}.")
    return seed


def random_seed() -> int:
    """A fresh 32-bit seed (one that can be printed and passed back with -s to repeat a run)."""
    import os

    return int.from_bytes(os.urandom(4), "little")


def check_ctx_size(ctx_size: int, least: int = 16) -> int:
    """-c N: a context of at least `least` tokens; one sentence otherwise."""
    if ctx_size < least:
        fail(f"-c/--ctx-size must be {least} or more tokens; got {ctx_size}.")
    return ctx_size


def set_threads(threads: Optional[int]) -> int:
    """Use `threads` kernel threads (None: all cores); returns the count in effect."""
    import numba

    numba.set_num_threads(threads or max_threads())
    return numba.get_num_threads()


def check_max_tokens(n: int, flag: str = "-n/--max-tokens") -> int:
    """llama.cpp's convention: -1 = until a stop token or the context is full; other negatives are errors."""
    if n < -1:
        fail(f"{flag} must be 0 or more, or -1 for no limit (until a stop token or the context is full); got {n}.")
    return n


def read_stdin() -> str:
    """The prompt piped on stdin, as UTF-8 text (as -f reads a file); one sentence if it is not."""
    raw = getattr(sys.stdin, "buffer", None)
    try:
        return raw.read().decode("utf-8") if raw is not None else sys.stdin.read()
    except UnicodeDecodeError as e:
        fail(f"the text on stdin is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
             f"convert it first, e.g. with iconv -t UTF-8.")


def check_text(text: Optional[str], what: str) -> None:
    """A command-line argument with bytes that are not UTF-8 (Python keeps them as lone surrogates):
    one sentence instead of the tokenizer's TypeError."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            fail(f"{what} is not UTF-8 text; convert it first, e.g. with iconv -t UTF-8.")


ModelOpt = Annotated[Optional[Path], typer.Option("-m", "--model", help="Store or checkpoint: a directory, a "
                                                  "name from `amed list`, a .gguf file or ollama:NAME:TAG "
                                                  "(default: $AMED_MODEL, then the default store).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads, 1 to the number of cores "
                                                  "(default, 0 or -1: all cores).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", rich_help_panel="Device",
    help="cpu, or cuda: dense weights on an NVIDIA GPU (needs pip install 'amed\\[cuda]'), routed experts on the CPU.")]
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
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens per answer (-1: until a stop "
                                            "token or the context is full).")] = 1024,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context length in tokens.")] = 4096,
    temp: Annotated[Optional[float], typer.Option("--temp", rich_help_panel="Sampling", help="Temperature; 0 = "
                                                  "greedy (default: the model's generation_config.json).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", rich_help_panel="Sampling", help="Nucleus sampling: "
                                                   "keep the smallest set of tokens whose probability adds up to P "
                                                   "(1 = off).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", rich_help_panel="Sampling", help="Keep only the K most "
                                                 "likely tokens (0 = off).")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", rich_help_panel="Sampling", help="Drop tokens less "
                                                   "likely than P x the most likely one (0 = off).")] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option("--repeat-penalty", rich_help_panel="Sampling",
                                                            help="Penalize tokens already in the context "
                                                            "(1 = off, 1.1 = mild).")] = None,
    seed: Annotated[Optional[int], typer.Option("-s", "--seed", rich_help_panel="Sampling", help="Random seed "
                                                "(default or -1: a fresh one, printed with -v so a run can "
                                                "be repeated).")] = None,
    threads: ThreadsOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print settings and per-answer stats.")] = False,
    max_ram: MaxRamOpt = None,
    no_prefetch: Annotated[bool, typer.Option("--no-prefetch", rich_help_panel="Memory",
                                              help="Do not read chosen experts ahead (slower from disk).")] = False,
    file: Annotated[Optional[Path], typer.Option("-f", "--file", metavar="FILE", help="One-shot: answer the "
                                                 "prompt in this text file and exit.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", metavar="STR", help="End the answer before this "
                                                      "text (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One-shot: print one JSON object (answer, finish "
                                          "reason, token counts, speeds, seed) instead of the streamed text.")] = False,
    chat_template: Annotated[Optional[Path], typer.Option("--chat-template", metavar="FILE", help="Use this Jinja "
                                                          "chat template instead of the model's.")] = None,
    no_template: Annotated[bool, typer.Option("--no-template", help="One-shot raw completion: the prompt goes to "
                                              "the model as it is, with no chat template; prints the "
                                              "continuation.")] = False,
    device: DeviceOpt = "cpu",
    gpu_experts: GpuExpertsOpt = "0",
):
    """Talk to the model, with tokens streaming as they are generated.

    Interactive by default; with -p, -f, or a prompt piped on stdin, prints only the answer on stdout.
    In the chat, /help lists the commands (/save and /load keep a conversation)."""
    check_max_tokens(max_tokens)
    threads = check_threads(threads)
    seed = check_seed(seed)
    check_ctx_size(ctx_size)
    if prompt is not None and file is not None:
        fail("pass the prompt with -p or -f, not both.")
    if chat_template is not None and no_template:
        fail("--chat-template and --no-template contradict each other; pass one.")
    template_text = None
    if chat_template is not None:
        try:
            template_text = chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the chat template {chat_template}: {getattr(e, 'strerror', None) or e}.")
    if file is not None:
        try:
            prompt = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file {file}: {getattr(e, 'strerror', None) or e}.")
    path = resolve_model(model)
    one_shot = prompt is not None or not sys.stdin.isatty()
    if not one_shot and (as_json or no_template):
        fail(f"{'--json' if as_json else '--no-template'} is for one-shot runs: pass -p TEXT, -f FILE or pipe "
             f"the prompt on stdin.")
    if one_shot and prompt is None:
        prompt = read_stdin()
    if one_shot and not prompt.strip():
        fail("no prompt: pass -p TEXT or pipe a question on stdin.")
    check_text(prompt, "the prompt")
    check_text(system_prompt, "the system prompt")
    n_threads = set_threads(threads)
    from amed.app.chat import run_command

    run_command(path, err, prompt=prompt, system_prompt=system_prompt, max_tokens=max_tokens, ctx_size=ctx_size,
                sampling=dict(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repeat_penalty, seed=seed),
                verbose=verbose, max_ram=max_ram, prefetch=not no_prefetch, threads=n_threads,
                stops=stop or (), as_json=as_json, chat_template=template_text, raw=no_template,
                device=device, gpu_experts=gpu_experts)


@app.command("run")
def run_model(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A name from `amed list`, or a store or checkpoint "
                                        "directory.")],
    prompt: Annotated[Optional[list[str]], typer.Argument(
        metavar="PROMPT", help="Answer this and exit (the words are joined; text piped on stdin goes "
        "before it). Without it: an interactive chat, or the prompt piped on stdin.", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print settings and per-answer stats.")] = False,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens per answer (-1: until a stop "
                                            "token or the context is full).")] = 1024,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context length in tokens.")] = 4096,
    system_prompt: Annotated[Optional[str], typer.Option("--system-prompt", "-sys", help="System prompt.")] = None,
    temp: Annotated[Optional[float], typer.Option("--temp", help="Temperature; 0 = greedy (default: the model's "
                                                  "generation_config.json).")] = None,
    seed: Annotated[Optional[int], typer.Option("-s", "--seed", help="Random seed (default or -1: a fresh "
                                                "one).")] = None,
    threads: ThreadsOpt = None,
    max_ram: MaxRamOpt = None,
):
    """Chat with a model by name, as `ollama run` does: `amed run NAME` talks, `amed run NAME PROMPT`
    answers once. The same chat as `amed chat -m NAME` (its other flags are there)."""
    text = " ".join(prompt) if prompt else None
    if text is not None and not sys.stdin.isatty():     # `cat notes.txt | amed run NAME summarize this`
        piped = read_stdin()
        if piped.strip():
            text = f"{piped.rstrip()}\n\n{text}"
    chat(model=name, prompt=text, system_prompt=system_prompt, max_tokens=max_tokens, ctx_size=ctx_size,
         temp=temp, seed=seed, threads=threads, verbose=verbose, max_ram=max_ram)

# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------
@app.command()
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this computer only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8080,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context length in tokens, per sequence.",
                                          min=16)] = 4096,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Sequences decoded at once (each keeps "
                                          "its own KV cache); more requests wait in a queue.", min=1)] = 4,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="AMED_API_KEY", show_envvar=False,
                                                   help="Require 'Authorization: Bearer KEY' on the API; better "
                                                   "set $AMED_API_KEY or use --api-key-file (a flag shows in the "
                                                   "process list).")] = None,
    api_key_file: Annotated[Optional[str], typer.Option("--api-key-file", metavar="PATH",
                                                        help="Read the API key from this file.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option("--cors-origin", metavar="ORIGIN",
                           help="Let web pages from this origin use the API (repeatable; e.g. "
                           "http://localhost:3000, patterns such as http://localhost:*; also $AMED_ORIGINS, "
                           "comma-separated).")] = None,
    max_body: Annotated[str, typer.Option("--max-body", metavar="SIZE", help="Largest request body "
                                          "(e.g. 8M); larger ones get 413.")] = "8M",
    grace: Annotated[float, typer.Option("--grace", metavar="SECONDS", help="On SIGTERM / Ctrl-C, how long "
                                         "answers in progress may take to finish.")] = 10.0,
    threads: ThreadsOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
    max_ram: MaxRamOpt = None,
    no_prefetch: Annotated[bool, typer.Option("--no-prefetch", rich_help_panel="Memory",
                                              help="Do not read chosen experts ahead (slower from disk).")] = False,
    device: DeviceOpt = "cpu",
    gpu_experts: GpuExpertsOpt = "0",
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models), with a chat page at / ; several clients at once."""
    path = resolve_model(model)
    set_threads(check_threads(threads))
    from amed.app.serve import run_command

    run_command(path, err, host=host, port=port, ctx_size=ctx_size, parallel=parallel, api_key=api_key,
                api_key_file=api_key_file, max_ram=max_ram, prefetch=not no_prefetch, verbose=verbose,
                device=device, gpu_experts=gpu_experts, max_body=max_body, cors_origins=cors_origin, grace=grace)



# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
def int_list(text: str, flag: str) -> list[int]:
    """`64,512` -> [64, 512] (llama-bench's list values); a clear error for anything else."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        fail(f"{flag} takes comma-separated integers (e.g. 64,512), not {text!r}.")


@app.command()
def bench(
    model: ModelOpt = None,
    n_prompt: Annotated[str, typer.Option("-p", "--n-prompt", metavar="N[,N...]", help="Prompt tokens for the ppN "
                                          "test; comma-separated for several (0 skips it).")] = "512",
    n_gen: Annotated[str, typer.Option("-n", "--n-gen", metavar="N[,N...]", help="Generated tokens for the tgN "
                                       "test; comma-separated for several (0 skips it).")] = "128",
    reps: Annotated[int, typer.Option("-r", "--repetitions", help="Timed repetitions after a warm-up.")] = 5,
    depth: Annotated[int, typer.Option("-d", "--n-depth", help="Run each test after this many tokens of context "
                                       "(prefilled once, untimed): speed at a long context.")] = 0,
    threads: Annotated[str, typer.Option("-t", "--threads", help="Thread counts to sweep, comma-separated, each "
                                         "1 to the number of cores (default or 0: all cores).")] = "",
    output: Annotated[str, typer.Option("-o", "--output", help="md, json or csv (on stdout).")] = "md",
    random_ids: Annotated[bool, typer.Option("--random-ids", help="Random token ids instead of real text "
                                            "(prompt and decode: the most varied routing).")] = False,
    ctx_size: Annotated[Optional[int], typer.Option(
        "-c", "--ctx-size", help="The context every test must fit in: -d plus the largest -p or -n (default: the "
        "model's trained context, max_position_embeddings, or factor x original with YaRN). Raise it to bench "
        "past the trained context.")] = None,
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
    layers: Annotated[Optional[int], typer.Option("--layers", help="With --synthetic: number of layers "
                                                  "(default 4).")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="With --synthetic: routed experts per "
                                                   "layer (default: the preset's).")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="With --synthetic: 4 or 8 (default 4).")] = None,
    device: DeviceOpt = "cpu",
    gpu_experts: GpuExpertsOpt = "0",
):
    """Measure prefill and decode speed, memory, and how close that is to the hardware.

    With a store larger than --max-ram it also reports the expert-cache hit rate, bytes read from
    disk per token and the disk-bound ceiling (those bytes / the disk's read speed for whole experts)."""
    if output not in ("md", "json", "csv"):
        fail(f"-o must be md, json or csv, not {output!r}.")
    if reps < 1:
        fail(f"-r/--repetitions must be 1 or more; got {reps}.")
    n_prompts, n_gens = int_list(n_prompt, "-p"), int_list(n_gen, "-n")
    if min(n_prompts + n_gens, default=0) < 0:
        fail("-p and -n must be 0 (skip the test) or more tokens.")
    if max(n_prompts + n_gens, default=0) == 0:
        fail("nothing to measure: -p and -n are both 0 (give -p N for prefill, -n N for decode, or both).")
    counts = int_list(threads, "-t")
    counts = [check_threads(t) or max_threads() for t in counts]
    prefetches = [p.strip() for p in prefetch.split(",") if p.strip()]
    lookaheads = [p.strip() for p in lookahead.split(",") if p.strip()]
    if not prefetches or any(p not in ("on", "off") for p in prefetches):
        fail(f"--prefetch takes on, off or on,off, not {prefetch!r}.")
    if not lookaheads or any(p not in ("auto", "on", "off") for p in lookaheads):
        fail(f"--lookahead takes auto, on or off (comma-separated), not {lookahead!r}.")
    if depth < 0:
        fail("-d must be 0 or more tokens.")
    if ctx_size is not None and ctx_size < 1:
        fail(f"-c/--ctx-size must be 1 or more tokens; got {ctx_size}.")
    if synthetic is None:
        given = [flag for flag, v in (("--bits", bits), ("--layers", layers), ("--experts", experts)) if v is not None]
        if given:
            fail(f"{', '.join(given)} go{'es' if len(given) == 1 else ''} with --synthetic PRESET (a random store); "
                 f"a real store's quantization is fixed when it is made.")
    elif (bits := 4 if bits is None else bits) not in (4, 8):
        fail(f"--bits must be 4 or 8; got {bits}.")
    elif (layers := 4 if layers is None else layers) < 1:
        fail(f"--layers must be 1 or more; got {layers}.")
    from amed.app.bench import BenchPlan, run_command, synthetic_store
    from amed.engine.experts.memory import parse_size

    ram = parse_size(max_ram) if max_ram is not None else None
    path = synthetic_store(synthetic, layers, bits, err, experts) if synthetic else resolve_model(model)
    plan = BenchPlan(n_prompt=n_prompts, n_gen=n_gens, reps=reps, depth=depth, threads=counts, output=output,
                     random_ids=random_ids, ctx_size=ctx_size, max_ram=ram, prefetch=prefetches,
                     lookahead=lookaheads, cold=cold, device=device, gpu_experts=gpu_experts)
    run_command(path, plan, err, set_threads)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
@app.command()
def synth(
    out: Annotated[str, typer.Argument(metavar="OUT", help="Directory to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(
        "--preset", help="Model shape: tiny (a few MB), flash (real Ling-flash-2.0 / "
        "AntAngelMed widths; ~6.4 GB per MoE layer) or mini (Ling-mini-2.0 widths).")] = "tiny",
    layers: Annotated[Optional[int], typer.Option(
        "--layers", "-L", min=1, help="Number of layers (default: the preset's).")] = None,
    experts: Annotated[Optional[int], typer.Option(
        "--experts", help="Routed experts per layer (default: the preset's). `--preset flash --layers 32 "
        "--experts 32` has AntAngelMed's per-token shape (top-8, same widths) in a pool that fits in RAM.")] = None,
    seed: Annotated[int, typer.Option("-s", "--seed", help="Random seed (same seed, same bytes; -1: a random "
                                      "one, printed).")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into OUT even if it is a non-empty directory (replacing only files amed wrote "
        "there).")] = False,
    # the letters synth used before they were made to agree with chat/bench (-p prompt, -n tokens,
    # -f file): hidden, and answered with the new spelling
    old_p: Annotated[Optional[str], typer.Option("-p", hidden=True)] = None,
    old_n: Annotated[Optional[str], typer.Option("-n", hidden=True)] = None,
    old_f: Annotated[bool, typer.Option("-f", hidden=True)] = False,
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

    for value, letter, new in ((old_p, "-p", "--preset"), (old_n, "-n", "-L/--layers"),
                               (old_f or None, "-f", "--force")):
        if value is not None:
            fail(f"amed synth {letter} is now {new} ({letter} means prompt, tokens or file in chat and bench).")
    if (seed := check_seed(seed)) is None:          # -1: a random seed, as in llama.cpp; printed to repeat
        seed = random_seed()
        err.print(f"random seed {seed} (-s {seed} writes the same bytes again)", markup=False)
    out = output_path(out, "OUT")

    if bits is not None:
        from amed.quant.convert import Settings
        from amed.app.synth import SyntheticSource

        run_quantize(SyntheticSource(preset, layers, seed, experts), out,
                     Settings(bits=bits, group_size=group_size, dense=dense, head=head, layout=layout), force)
        return

    from amed.app.progress import ByteBar
    from amed.errors import AmedError
    from amed.app.synth import PRESETS, check_synth_target, write_synthetic_checkpoint

    if preset not in PRESETS:
        fail(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a directory.")
    if (out / "amed-manifest.json").exists():
        fail(f"{out} holds an amed store: writing a checkpoint there would replace its config and tokenizer; "
             f"choose another directory (or remove the store first with `amed rm {out}`).")
    if out.is_dir() and any(out.iterdir()) and not force:
        fail(f"{out} is not empty; pass --force to write the checkpoint into it anyway.")
    check_synth_target(out)
    t0 = time.perf_counter()
    with ByteBar(err, f"synth {preset}", transient=True) as bar:
        try:
            path = write_synthetic_checkpoint(out, preset=preset, layers=layers, seed=seed,
                                              experts=experts, progress=bar.update)
        except AmedError as e:
            bar.stop()
            fail(str(e))
    dt = time.perf_counter() - t0
    written = [*path.glob("model-*-of-*.safetensors"), path / "model.safetensors.index.json",
               *(path / n for n in ("config.json", "generation_config.json", "tokenizer.json",
                                    "tokenizer_config.json"))]
    size = sum(f.stat().st_size for f in written if f.is_file())      # this checkpoint, not other files
    shards = len(list(path.glob("model-*-of-*.safetensors")))
    nl = layers or PRESETS[preset]["num_hidden_layers"]
    human = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    err.print(f"wrote a random {preset} checkpoint ({nl} layers, {shards} shards, {human}) "
              f"to {path} in {dt:.1f} s")


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------
@app.command()
def perplexity(
    file: Annotated[Path, typer.Option("-f", "--file", metavar="FILE", help="Text file to score.")],
    model: ModelOpt = None,
    kld_base: Annotated[Optional[Path], typer.Option("--kld-base", metavar="MODEL", help="Another version of the "
                        "model (e.g. the bf16 checkpoint): also report the KL divergence from it and top-1 "
                        "agreement, the measure of what quantization costs.")] = None,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Tokens per window (each window starts "
                                          "from an empty context).")] = 512,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Score at most this many tokens "
                                                      "of the text (default: all).")] = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as one JSON object.")] = False,
):
    """Perplexity of a model on a text; with --kld-base, KL divergence and top-1 agreement against another."""
    import json

    threads = check_threads(threads)
    check_ctx_size(ctx_size, least=2)
    if max_tokens is not None and max_tokens < 2:
        fail(f"--max-tokens must be 2 or more (the first token of a window is not scored); got {max_tokens}.")
    path = resolve_model(model)
    if kld_base is not None:                   # a path or a name from `amed list`, as -m
        kld_base = resolve_model(kld_base)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {file}: {getattr(e, 'strerror', None) or e}.")
    set_threads(threads)
    import contextlib

    from amed import kernel_cache_cold, load
    from amed.app.progress import Counted, compile_progress
    from amed.app.quality import score
    from amed.text.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(path).encode(text)[:max_tokens]
    m = load(path, ctx_size=ctx_size, log=lambda msg: err.print(f"[yellow]{msg}[/]"))
    base = load(kld_base, ctx_size=ctx_size) if kld_base is not None else None
    compiling = contextlib.nullcontext()
    if kernel_cache_cold():
        err.print("[dim]compiling kernels (first run only, ~1 min)...[/]")
        compiling = compile_progress(err)
    # a bar on a terminal; in a log, a line every few seconds (a long text takes a while)
    with compiling, Counted(err, "perplexity", "windows") as bar:
        rec = score(m, ids, ctx_size, base, progress=bar.update).record()
    rec = {"model": str(path), "base": str(kld_base) if kld_base else None, "ctx_size": ctx_size, **rec}
    if as_json:
        print(json.dumps(rec))
        return
    print(f"perplexity       {rec['perplexity']:.4f}  ({rec['tokens']} tokens scored, windows of {ctx_size})")
    if base is not None:
        print(f"base perplexity  {rec['base_perplexity']:.4f}  ({kld_base})")
        print(f"mean KLD         {rec['mean_kld']:.6f} nats  (p99 {rec['p99_kld']:.6f}, max {rec['max_kld']:.6f})")
        print(f"top-1 agreement  {100 * rec['top1_agreement']:.2f}%")


# ---------------------------------------------------------------------------------------------
# model management: list, show, rm
# ---------------------------------------------------------------------------------------------
@app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (name, kind, path, size in bytes, "
                                          "quant, status) for scripts.")] = False,
):
    """The stores and checkpoints under $AMED_HOME (name, size, quantization, complete or not)."""
    import json

    from amed.app.models import entry_record, format_table, list_models
    from amed.hub import amed_home, fmt_bytes

    entries = list_models()
    if as_json:
        print(json.dumps([entry_record(e) for e in entries], indent=1))
        return
    if not entries:
        err.print(f"no stores or checkpoints under {amed_home()} yet: `amed download` fetches one, "
                  f"`amed synth OUT --bits 4` makes a random one.", markup=False)
        return
    rows = [[e.name, e.kind, fmt_bytes(e.size), e.quant, e.status, str(e.path)] for e in entries]
    print(format_table(["NAME", "KIND", "SIZE", "QUANT", "STATUS", "PATH"], rows, right={2}))


@app.command()
def show(
    store: Annotated[str, typer.Argument(help="Store or checkpoint: a directory, or a name from `amed list`.")],
):
    """What a store or checkpoint is: config, quantization, sizes, source and hub commit."""
    from amed.app.models import resolve, show as describe

    lines = describe(resolve(store))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")


@app.command()
def rm(
    store: Annotated[str, typer.Argument(help="Store or checkpoint amed wrote: a directory, or a name from "
                                              "`amed list`.")],
    yes: Annotated[bool, typer.Option("-y", "--yes", help="Do not ask for confirmation.")] = False,
):
    """Delete a store (or a checkpoint amed downloaded or made): exactly the files amed's own record
    lists (a store's manifest, the download record, synth's marker); the folder only if then empty."""
    from amed.app.models import amed_files, describe, remove, resolve
    from amed.hub import fmt_bytes

    path = resolve(store)
    e = describe(path)
    if e is None:
        fail(f"{path} is neither an amed store nor a Hugging Face checkpoint; nothing removed.")
    amed_files(path)                          # refuses before asking when amed's record is missing or garbage
    if not yes:
        if not sys.stdin.isatty():
            fail(f"not removing {path} without confirmation: pass -y/--yes.")
        if not typer.confirm(f"remove the {e.kind} {path} ({fmt_bytes(e.size)})?", err=True):
            err.print("nothing removed.")
            return
    freed = remove(path)
    err.print(f"removed {path} ({fmt_bytes(freed)} freed)" + (" (other files in it were left)" if path.exists() else ""),
              markup=False)


@app.command()
def ps(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list of the servers instead of a table.")] = False,
):
    """The running `amed serve` servers: model, address, memory, slots (busy/total) and queue."""
    import json
    import time

    from rich.table import Table

    from amed.app.serve_extras import ps_rows
    from amed.hub import fmt_bytes

    rows = ps_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        err.print("no amed server is running (`amed serve` starts one).")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("PID", "MODEL", "URL", "STATUS", "MEMORY", "KV CACHE", "SLOTS", "QUEUED", "UP"):
        t.add_column(col, justify="right" if col in ("PID", "MEMORY", "KV CACHE", "QUEUED", "UP") else "left")
    for r in rows:
        mem = r.get("memory") or {}
        up = int(time.time() - r["started"])
        t.add_row(str(r["pid"]), r["model"], r["url"], r["status"],
                  fmt_bytes(mem["rss_bytes"]) if mem.get("rss_bytes") is not None else "-",
                  fmt_bytes(mem["kv_cache_bytes"]) if mem.get("kv_cache_bytes") is not None else "-",
                  f"{r['slots_busy']}/{r['total_slots']}" if r.get("total_slots") is not None else f"-/{r['parallel']}",
                  str(r["queued"]) if r.get("queued") is not None else "-",
                  f"{up // 3600}h{up % 3600 // 60:02d}m" if up >= 3600 else f"{up // 60}m{up % 60:02d}s")
    Console(highlight=False, soft_wrap=True).print(t)


@app.command()
def warmup():
    """Compile the CPU kernels now (about a minute, once), so the first chat or bench starts at once.

    The first run of any command does this by itself; `make warmup` calls this after install."""
    from amed import kernel_cache_cold
    from amed.app.chat import compile_ahead

    cold = kernel_cache_cold()
    seconds = compile_ahead(err)
    err.print(f"[green]kernels ready[/] ({'compiled' if cold else 'already cached; checked'} in {seconds:.1f} s).")


def main() -> None:
    from amed.errors import AmedError

    try:
        app(prog_name="amed")
    except AmedError as e:
        err.print(error_line(e))
        sys.exit(1)
    except OSError as e:          # a disk or permission problem we did not foresee: one sentence, no traceback
        where = f" ({e.filename})" if e.filename else ""
        err.print(error_line(f"{e.strerror or e}{where}."))
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
