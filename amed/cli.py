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
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1):
    """Print one clear sentence on stderr and exit (no traceback)."""
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------
@app.command()
def download():
    """Download the AntAngelMed checkpoint from the Hugging Face hub (resumable, verified)."""
    fail("`amed download` is not built yet.")


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------
@app.command()
def quantize():
    """Convert a checkpoint into an int4/int8 amed store (streaming, resumable)."""
    fail("`amed quantize` is not built yet.")


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------
@app.command()
def chat():
    """Talk to the model, with tokens streaming as they are generated."""
    fail("`amed chat` is not built yet.")


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
@app.command()
def bench():
    """Measure prefill and decode speed, memory, and how close that is to the hardware."""
    fail("`amed bench` is not built yet.")


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------
@app.command()
def synth():
    """Write a random BailingMoeV2 checkpoint (for tests and benchmarks; no download needed)."""
    fail("`amed synth` is not built yet.")


def main() -> None:
    from .errors import AmedError

    try:
        app()
    except AmedError as e:
        err.print(f"[bold red]error:[/] {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
