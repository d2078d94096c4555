"""`amed chat`: an interactive conversation, or one-shot answers for scripts.

Answer text goes to stdout as it is generated; everything else (notices, stats) to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape

from amed.errors import AmedError
from amed.generate import Generator, Step

NOTICE = ("AntAngelMed is a research model: its answers are not medical advice. "
          "Consult a qualified clinician for decisions about care.")
HELP = """commands:
  /help            this help
  /reset           forget the conversation (keeps the system prompt)
  /system          show the system prompt
  /system TEXT     set the system prompt (and reset)
  /save FILE       save the conversation as JSON
  /load FILE       resume a conversation saved with /save
  /stats           statistics of the last answer
  /quit            leave (Ctrl-D works too)
  \"\"\"             start/end a multi-line message
Ctrl-C stops an answer and keeps the conversation."""


def load_conversation(path: str) -> "Conversation":
    """A conversation saved by /save ({"messages": [...]}); one clear sentence if it is not one."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise AmedError(f"cannot read {path}: {e.strerror or e}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AmedError(f"{path} is not JSON; /load takes a file written by /save.") from None
    msgs = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in msgs):
        raise AmedError(f"{path} is not a saved conversation ({{\"messages\": [{{\"role\": ..., "
                        f"\"content\": ...}}]}}, as /save writes).")
    system = "\n".join(m["content"] for m in msgs if m["role"] == "system") or None
    return Conversation(system, [dict(role=m["role"], content=m["content"]) for m in msgs if m["role"] != "system"])


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
                 system: str | None = None, err: Console | None = None, stops=(), raw: bool = False):
        self.stops = list(stops)          # --stop strings: the answer ends before the first one
        self.raw = raw                    # --no-template: the text is the whole prompt (completion)
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
        """Add a user message, stream the answer to `out` (stdout), return the final step (the
        answer's text is the last assistant turn)."""
        out = out or sys.stdout
        if self.raw:
            ids = self.tok.encode(text)
            if len(ids) >= self.ctx_size:
                raise AmedError(f"the prompt is {len(ids)} tokens, more than the context of {self.ctx_size}; "
                                f"shorten it or raise -c/--ctx-size.")
            self.conv.turns[:] = [{"role": "user", "content": text}]
        else:
            self.conv.turns.append({"role": "user", "content": text})
            ids = self._fit()
        pieces = []
        stream = self.gen.stream(ids, self.sampler, self.max_tokens, self.tok.stop_ids, self.ctx_size,
                                 stops=self.stops)
        try:
            for step in stream:
                self.last = step
                if step.text:
                    pieces.append(step.text)
                    out.write(step.text)
                    out.flush()
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

    def save(self, path: str) -> str:
        """Write the conversation as JSON to `path` (~ expanded; written whole, then renamed into
        place, so a failed save leaves an earlier file intact); returns the path written.
        One sentence (AmedError) when it cannot be written."""
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            raise AmedError(f"{path} is a directory; /save takes a file name, e.g. "
                            f"/save {os.path.join(path, 'chat.json')}.")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"messages": self.conv.messages()}, f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise AmedError(f"cannot save to {path}: {e.strerror or e}.") from None
        return path


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


def failure(what: str, e: BaseException) -> str:
    """One sentence for an error inside the chat."""
    if isinstance(e, AmedError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{what} failed: {e.strerror}" + (f" ({e.filename})." if e.filename else ".")
    return f"{what} failed: {type(e).__name__}: {e}."


def command(session: ChatSession, cmd: str, arg: str) -> None:
    """Run one /command of the REPL (all but /quit); errors propagate to the caller."""
    err = session.err
    if cmd == "/help":
        err.print(HELP)
    elif cmd in ("/reset", "/clear"):
        session.reset()
        err.print("[dim]conversation cleared[/]")
    elif cmd == "/system":
        if not arg:                   # show it: clearing the conversation by accident loses it
            err.print(f"system prompt: {escape(session.conv.system)}" if session.conv.system
                      else "no system prompt; /system TEXT sets one (and clears the conversation)")
            return
        session.conv.system = arg
        session.reset()
        err.print("[dim]system prompt set; conversation cleared[/]")
    elif cmd == "/save":
        if not arg:
            err.print("[red]usage: /save FILE[/]")
            return
        err.print(f"[dim]saved to {escape(session.save(arg))}[/]")
    elif cmd == "/load":
        if not arg:
            err.print("[red]usage: /load FILE[/]")
            return
        conv = load_conversation(arg)
        session.conv = conv
        err.print(f"[dim]loaded {len(conv.turns)} messages from {escape(arg)}"
                  + (" (with its system prompt)" if conv.system else "") + "[/]")
    elif cmd == "/stats":
        err.print(session.stats_line(session.last) if session.last else "no answer yet")
    else:
        err.print(f"[red]unknown command {escape(cmd)}[/]; /help lists them")


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
            try:
                command(session, cmd, arg.strip())
            except KeyboardInterrupt:
                err.print("\n[yellow](stopped)[/]")
            except Exception as e:       # a failed command never ends the chat or loses the conversation
                err.print(f"[red]{escape(failure(cmd, e))}[/]")
            continue
        try:
            step = session.ask(text)
        except AmedError as e:
            err.print(f"[red]{escape(str(e))}[/]")
            continue
        except KeyboardInterrupt:       # before the first token: nothing was said
            if session.conv.turns and session.conv.turns[-1]["role"] == "user":
                session.conv.turns.pop()
            err.print("\n[yellow](stopped)[/]")
            continue
        except Exception as e:          # the conversation so far is kept; the cache is rebuilt next time
            if session.conv.turns and session.conv.turns[-1]["role"] == "user":
                session.conv.turns.pop()
            session.gen.reset()
            err.print(f"[red]{escape(failure('the answer', e))}[/] [dim](the conversation is kept: /save FILE)[/]")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if step.finish_reason == "interrupted":
            err.print("[yellow](answer stopped)[/]")
        err.print(f"[dim]{session.stats_line(step)}[/]")


COMPILE_NOTICE = "compiling kernels (first run only, ~1 min)..."


def warm_up(model, err: Console, always: bool = False) -> float | None:
    """On a cold kernel cache (or `always`), compile every kernel now, behind a notice on stderr,
    so the first answer's speed is the model's, not the compiler's; returns the seconds spent
    (None if the cache was warm)."""
    import time

    from amed import kernel_cache_cold

    cold = kernel_cache_cold()
    if not (cold or always):
        return None
    from amed.app.progress import compile_progress

    notice = COMPILE_NOTICE if cold else "loading the compiled kernels from the cache..."
    t0 = time.perf_counter()
    with err.status(notice) as status, compile_progress(err, status if err.is_terminal else None):
        if not err.is_terminal:         # a log: the notice, then a line per kernel compiled
            err.print(notice)
        model.reset()
        model.forward([1] * 8)       # the prompt kernels (several tokens)
        model.forward([1])           # the decode kernels (one token)
        model.reset()
    return time.perf_counter() - t0


def compile_ahead(err: Console) -> float:
    """`amed warmup`: compile the kernels of a default store (q4 experts, q8 dense, q6 lm_head, r8
    rows) on a tiny random one, so the first real run starts at once. Returns the seconds spent."""
    import tempfile

    from amed import load
    from amed.app.synth import SyntheticSource
    from amed.quant.convert import Settings, quantize_model

    with tempfile.TemporaryDirectory(prefix="amed-warmup-") as tmp:
        quantize_model(SyntheticSource("tiny"), tmp, Settings(bits=4))
        seconds = warm_up(load(tmp), err, always=True)
    return seconds


def run_command(path, err: Console, *, prompt: str | None = None, system_prompt: str | None = None,
                max_tokens: int = 1024, ctx_size: int = 4096, sampling: dict | None = None,
                verbose: bool = False, max_ram=None, prefetch: bool = True, threads: int | None = None,
                stops=(), as_json: bool = False, chat_template: str | None = None, raw: bool = False,
                device: str = "cpu", gpu_experts: int | str = 0) -> None:
    """`amed chat`: load the model at `path`; answer `prompt` on stdout and return, or (no
    prompt) run the interactive loop. `sampling` overrides the model's generation_config;
    `max_tokens` -1 means until a stop token or the context is full; `stops` end an answer before
    the first of them; `as_json` prints one JSON object (answer and stats) instead of the stream;
    `chat_template` replaces the model's template (its source text); `raw` sends the prompt as
    it is, with no template (text completion)."""
    import os
    import time

    from amed import load
    from amed.hub import fmt_bytes as human
    from amed.text.sampling import SamplingParams, make_sampler
    from amed.text.tokenizer import Tokenizer

    err.print(f"[dim]{NOTICE}[/]")

    t0 = time.perf_counter()
    m = load(path, ctx_size=ctx_size, max_ram=max_ram, prefetch=prefetch, device=device, gpu_experts=gpu_experts,
             log=lambda msg: err.print(f"[yellow]{msg}[/]"))
    load_s = time.perf_counter() - t0
    note = m.config.context_note(ctx_size)
    if note:
        err.print(f"[yellow]{note}[/]")
    tok = Tokenizer.from_dir(path)
    if chat_template is not None:
        tok.use_template(chat_template)
    if tok.template_is_fallback and not raw:
        err.print("[yellow]no chat template in the model directory: using the built-in Ling format.[/]")
    sampling = dict(sampling or {})
    if sampling.get("seed") is None:          # a fresh seed, but one we can print to repeat the run
        sampling["seed"] = int.from_bytes(os.urandom(4), "little")
    params = SamplingParams.from_generation_config(path, **sampling)
    compile_s = warm_up(m, err, always=verbose or as_json)     # stats then time the model, not the compiler
    if verbose:
        err.print(f"[dim]model {path} loaded in {load_s:.2f} s"
                  + (f", kernels compiled/loaded in {compile_s:.1f} s" if compile_s is not None else "")
                  + f"; {threads or 'all'} threads; context {ctx_size}; sampling: "
                  f"temp {params.temperature}, top-p {params.top_p}, top-k {params.top_k}, "
                  f"min-p {params.min_p}, repeat-penalty {params.repetition_penalty}, seed {params.seed}[/]")
    if max_tokens < 0:
        max_tokens = ctx_size
    session = ChatSession(m, tok, make_sampler(params), max_tokens, ctx_size, system_prompt, err, stops, raw)
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
    if prompt is not None and as_json:
        import io

        step = session.ask(prompt if raw else prompt.strip(), out=io.StringIO())
        print(json.dumps({"model": str(path), "answer": session.conv.turns[-1]["content"],
                          "finish_reason": step.finish_reason, "prompt_tokens": step.prompt_tokens,
                          "generated_tokens": step.generated_tokens, "ttft_s": round(step.ttft, 4),
                          "prefill_tps": round(step.prefill_tps, 3), "decode_tps": round(step.decode_tps, 3),
                          "seed": params.seed, "compile_s": compile_s}, ensure_ascii=False))
        if verbose:
            err.print(f"[dim]{session.stats_line(step)}[/]")
        stopped_by_user(step, err)
        return
    if prompt is not None:
        step = session.ask(prompt if raw else prompt.strip())
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose:
            err.print(f"[dim]{session.stats_line(step)}[/]")
        stopped_by_user(step, err)
        return
    repl(session, verbose)


def stopped_by_user(step: Step, err: Console) -> None:
    """A one-shot answer cut by Ctrl-C: say so and exit 130 (128 + SIGINT), as a shell expects of an
    interrupted command, so a script does not take the partial answer for a whole one."""
    if step is not None and step.finish_reason == "interrupted":
        err.print(f"[yellow]stopped (Ctrl-C) after {step.generated_tokens} tokens: the answer is incomplete.[/]")
        sys.stdout.flush()
        raise SystemExit(130)
