"""`amed chat`: an interactive conversation, or one-shot answers for scripts.

Answer text goes to stdout as it is generated; everything else (notices, stats) to stderr.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rich.console import Console

from amed.errors import AmedError
from amed.generate import Generator, Step

NOTICE = ("AntAngelMed is a research model: its answers are not medical advice. "
          "Consult a qualified clinician for decisions about care.")
HELP = """commands:
  /help            this help
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt (and reset)
  /save FILE       save the conversation as JSON
  /stats           statistics of the last answer
  /quit            leave (Ctrl-D works too)
  \"\"\"             start/end a multi-line message
Ctrl-C stops an answer and keeps the conversation."""


@dataclass
class Conversation:
    system: str | None = None
    turns: list = field(default_factory=list)   # [{"role": "user"|"assistant", "content": str}]

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


class ChatSession:
    """A conversation bound to a model: fits the context, streams answers, keeps the cache."""

    def __init__(self, model, tokenizer, sampler, max_tokens: int, ctx_size: int,
                 system: str | None = None, err: Console | None = None):
        self.gen = Generator(model, tokenizer)
        self.tok = tokenizer
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.ctx_size = ctx_size
        self.conv = Conversation(system)
        self.err = err or Console(stderr=True, highlight=False)
        self.last: Step | None = None

    def _fit(self) -> list[int]:
        """Render the conversation; drop the oldest turns while it would overflow the context."""
        reserve = min(self.max_tokens, max(self.ctx_size // 4, 1))
        dropped = 0
        while True:
            ids = self.tok.encode_chat(self.conv.messages(), add_generation_prompt=True)
            if len(ids) + reserve <= self.ctx_size or len(self.conv.turns) <= 1:
                break
            # drop the oldest exchange (a user turn and the answer after it)
            del self.conv.turns[:2 if len(self.conv.turns) > 2 else 1]
            dropped += 1
        if dropped:
            self.err.print(f"[yellow]context full: dropped the {dropped} oldest exchange(s) "
                           f"(the system prompt is kept).[/]")
        if len(ids) >= self.ctx_size:
            self.conv.turns.pop()
            raise AmedError(f"that message is {len(ids)} tokens with the system prompt, more than the "
                            f"context of {self.ctx_size}; shorten it or raise -c/--ctx-size.")
        return ids

    def ask(self, text: str, out=None) -> Step:
        """Add a user message, stream the answer to `out` (stdout), return the final step."""
        out = out or sys.stdout
        self.conv.turns.append({"role": "user", "content": text})
        ids = self._fit()
        pieces = []
        stream = self.gen.stream(ids, self.sampler, self.max_tokens, self.tok.stop_ids, self.ctx_size)
        try:
            for step in stream:
                if step.text:
                    pieces.append(step.text)
                    out.write(step.text)
                    out.flush()
                self.last = step
        except KeyboardInterrupt:       # landed outside the generator's own handler
            stream.close()
            if self.last is not None:
                self.last.finish_reason = "interrupted"
        self.conv.turns.append({"role": "assistant", "content": "".join(pieces)})
        return self.last

    def reset(self) -> None:
        self.conv.turns.clear()

    def stats_line(self, step: Step) -> str:
        return (f"{step.prompt_tokens} prompt tokens ({step.prefill_tokens} new) at "
                f"{step.prefill_tps:.1f} tok/s, {step.generated_tokens} generated at "
                f"{step.decode_tps:.1f} tok/s, first token after {step.ttft:.2f} s"
                f" ({step.finish_reason})")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"messages": self.conv.messages()}, f, ensure_ascii=False, indent=1)


def read_message(err: Console) -> str | None:
    """One user message from the terminal; None on Ctrl-D. \"\"\" opens a multi-line block."""
    line = input("\n>>> ")
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        nxt = input("... ")
        if nxt.strip() == '"""':
            return "\n".join(lines)
        lines.append(nxt)


def repl(session: ChatSession, verbose: bool = False) -> None:
    err = session.err
    try:
        import readline  # noqa: F401  (line editing and history within the session)
    except ImportError:
        pass
    err.print("[dim]Type a message, /help for commands, Ctrl-D to quit.[/]")
    while True:
        try:
            text = read_message(err)
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print("\n[dim](Ctrl-D or /quit to leave)[/]")
            continue
        if text is None or not text.strip():
            continue
        cmd, _, arg = text.strip().partition(" ")
        if cmd.startswith("/"):
            if cmd in ("/quit", "/exit", "/bye"):
                return
            elif cmd == "/help":
                err.print(HELP)
            elif cmd in ("/reset", "/clear"):
                session.reset()
                err.print("[dim]conversation cleared[/]")
            elif cmd == "/system":
                session.conv.system = arg or None
                session.reset()
                err.print("[dim]system prompt set; conversation cleared[/]")
            elif cmd == "/save":
                if not arg:
                    err.print("[red]usage: /save FILE[/]")
                else:
                    session.save(arg)
                    err.print(f"[dim]saved to {arg}[/]")
            elif cmd == "/stats":
                err.print(session.stats_line(session.last) if session.last else "no answer yet")
            else:
                err.print(f"[red]unknown command {cmd}[/]; /help lists them")
            continue
        try:
            step = session.ask(text)
        except AmedError as e:
            err.print(f"[red]{e}[/]")
            continue
        except KeyboardInterrupt:       # before the first token: nothing was said
            if session.conv.turns and session.conv.turns[-1]["role"] == "user":
                session.conv.turns.pop()
            err.print("\n[yellow](stopped)[/]")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if step.finish_reason == "interrupted":
            err.print("[yellow](answer stopped)[/]")
        err.print(f"[dim]{session.stats_line(step)}[/]")


def run_command(path, err: Console, *, prompt: str | None = None, system_prompt: str | None = None,
                max_tokens: int = 1024, ctx_size: int = 4096, sampling: dict | None = None,
                verbose: bool = False, max_ram=None, prefetch: bool = True, device: str = "cpu",
                gpu_experts: int | str = 0) -> None:
    """`amed chat`: load the model at `path`; answer `prompt` on stdout and return, or (no
    prompt) run the interactive loop. `sampling` overrides the model's generation_config."""
    import time

    from amed import load
    from amed.hub import fmt_bytes as human
    from amed.text.sampling import SamplingParams, make_sampler
    from amed.text.tokenizer import Tokenizer

    err.print(f"[dim]{NOTICE}[/]")

    t0 = time.perf_counter()
    m = load(path, ctx_size=ctx_size, max_ram=max_ram, prefetch=prefetch, device=device, gpu_experts=gpu_experts,
             log=lambda msg: err.print(f"[yellow]{msg}[/]"))
    tok = Tokenizer.from_dir(path)
    if tok.template_is_fallback:
        err.print("[yellow]no chat template in the model directory: using the built-in Ling format.[/]")
    params = SamplingParams.from_generation_config(path, **(sampling or {}))
    if verbose:
        err.print(f"[dim]model {path} loaded in {time.perf_counter() - t0:.2f} s; sampling: "
                  f"temp {params.temperature}, top-p {params.top_p}, top-k {params.top_k}, "
                  f"min-p {params.min_p}, repeat-penalty {params.repetition_penalty}, seed {params.seed}[/]")
    session = ChatSession(m, tok, make_sampler(params), max_tokens, ctx_size, system_prompt, err)
    if verbose:
        from amed.app.bench import MemoryReport

        memory = MemoryReport(m)
        cache = m.experts.cache
        if cache is not None:
            err.print(f"[dim]memory: dense weights {human(cache.dense_bytes)} resident, experts "
                      f"{human(cache.expert_total)} on disk, expert cache "
                      f"{human(cache.budget) if cache.bounded else 'unbounded (all fit)'}[/]")
        stats_line = session.stats_line
        session.stats_line = lambda step: f"{stats_line(step)}\n{memory.line(step.generated_tokens)}"
    if prompt is not None:
        step = session.ask(prompt.strip())
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            err.print(f"[dim]{session.stats_line(step)}[/]")
        return
    repl(session, verbose)
