"""The model's tokenizer: tokenizer.json through the `tokenizers` library, the chat template
rendered in a Jinja2 sandbox, stop ids, and an incremental UTF-8-safe detokenizer.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from amed.errors import AmedError

# The Ling chat format (docs/architecture.md §4), used when tokenizer_config.json has no template.
# No newlines between turns; a leading system message goes into the always-present SYSTEM block;
# past assistant turns lose their <think> block (only turns after the last real user query keep it).
FALLBACK_CHAT_TEMPLATE = r"""
{%- set ns = namespace(last_query=messages|length - 1, found=false) -%}
{%- for m in messages|reverse -%}
  {%- if not ns.found and m.role == 'user' and m.content is string
        and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
    {%- set ns.found = true -%}
    {%- set ns.last_query = messages|length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{{- '<role>SYSTEM</role>' -}}
{%- if messages and messages[0].role == 'system' -%}
  {{- (messages[0].content if messages[0].content is string else '') + '\n' -}}
{%- endif -%}
{{- 'detailed thinking off<|role_end|>' -}}
{%- for m in messages -%}
  {%- set content = m.content if m.content is string else '' -%}
  {%- if m.role == 'user' -%}
    {{- '<role>HUMAN</role>' + content + '<|role_end|>' -}}
  {%- elif m.role == 'system' -%}
    {%- if not loop.first -%}{{- '<role>SYSTEM</role>' + content + '<|role_end|>' -}}{%- endif -%}
  {%- elif m.role == 'assistant' -%}
    {%- set reasoning = '' -%}
    {%- if m.reasoning_content is string -%}
      {%- set reasoning = m.reasoning_content -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_query and reasoning -%}
      {{- '<role>ASSISTANT</role>\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
    {%- else -%}
      {{- '<role>ASSISTANT</role>' + content -}}
    {%- endif -%}
    {%- for call in (m.tool_calls or []) -%}
      {%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}
      {%- set f = call.function if call.function else call -%}
      {{- '<tool_call>\n{"name": "' + f.name + '", "arguments": ' -}}
      {{- f.arguments if f.arguments is string else f.arguments|tojson -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|role_end|>' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<role>OBSERVATION</role>' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|role_end|>' -}}{%- endif -%}
  {%- else -%}
    {{- raise_exception('unsupported chat message role ' ~ m.role|tojson) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}
"""

STOP_TOKENS = ("<|role_end|>", "<|endoftext|>")


def restore_advice(path: Path) -> str:
    """How to get a damaged tokenizer/config file back: from a checkpoint, download it again; in an
    amed store, delete it and re-run the command that made the store (it copies the file again from
    its source)."""
    folder = Path(path).parent
    if (folder / "amed-manifest.json").is_file():
        try:
            from amed.formats.store import read_manifest
            from amed.quant.convert import repair_advice

            how = repair_advice(folder, read_manifest(folder))
        except Exception:                # pragma: no cover - advice only
            how = "re-run the `amed quantize` command that made the store"
        return f"it is a copy in the store {folder}: delete it and {how}"
    return "re-download it (`amed download` fetches what is missing or damaged)."


MAX_TOKENIZER_BYTES = 1 << 29        # the real tokenizer.json is ~10 MB
MAX_SIDE_FILE_BYTES = 1 << 26        # tokenizer_config.json, generation_config.json, a template


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def read_json(path: Path, *, required: bool) -> dict:
    from amed.formats.files import read_regular

    if not _exists(path):
        if required:
            raise AmedError(f"{path} is missing; the model directory needs its tokenizer files.")
        return {}
    try:        # a regular file only: a FIFO in its place would block forever
        data = json.loads(read_regular(path, limit=MAX_SIDE_FILE_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AmedError(f"{path} is not valid JSON ({_one_line(e)}); {restore_advice(path)}") from None
    if not isinstance(data, dict):
        raise AmedError(f"{path} should hold a JSON object; {restore_advice(path)}")
    return data


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _token_str(v: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _model_vocab_size(d: Path) -> int | None:
    """The model's vocabulary size from its store manifest or config.json (None if unreadable:
    loading the model reports that)."""
    from amed.formats.files import read_regular

    for name, key in (("amed-manifest.json", "config"), ("config.json", None)):
        if not _exists(d / name):
            continue
        try:
            data = json.loads(read_regular(d / name, limit=1 << 26))
            v = (data.get(key) if key else data).get("vocab_size")
        except (AmedError, ValueError, AttributeError, RecursionError):
            return None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    return None


PROBE_TEXT = "Hello, how are you? 123"


def _check_vocabulary(tok: tokenizers.Tokenizer, path: Path, model_vocab: int | None) -> None:
    """An empty tokenizer (or one that turns text into no tokens) would make every answer empty;
    ids past the model's vocabulary would fail at the first forward pass: refuse both now."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n == 0:
        raise AmedError(f"{path} has an empty vocabulary: it is damaged; {restore_advice(path)}")
    try:
        probe = tok.encode(PROBE_TEXT, add_special_tokens=False).ids
    except Exception as e:
        raise AmedError(f"{path} cannot encode text ({_one_line(e)[:200]}): it is damaged; "
                        f"{restore_advice(path)}") from None
    if not probe:
        raise AmedError(f"{path} turns text into no tokens at all: it is damaged; {restore_advice(path)}")
    if model_vocab is not None:
        top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= model_vocab:
            raise AmedError(f"{path} has token id {top}, but the model's vocabulary has {model_vocab} "
                            f"entries: the tokenizer belongs to another model.")


# ---- chat template sandbox ----------------------------------------------------------------


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _unsafe_names(ast: jinja2.nodes.Template) -> list[str]:
    """Dunder attribute names a template spells out (`x.__class__`, `x['__globals__']`, `attr(...)`)."""
    names = [n.attr for n in ast.find_all(jinja2.nodes.Getattr)]
    names += [n.arg.value for n in ast.find_all(jinja2.nodes.Getitem) if isinstance(n.arg, jinja2.nodes.Const)]
    for f in ast.find_all(jinja2.nodes.Filter):
        if f.name == "attr":
            names += [a.value for a in f.args if isinstance(a, jinja2.nodes.Const)]
    return [n for n in names if isinstance(n, str) and n.startswith("__")]


# ---- limits: a template is a program from a stranger; it gets bounded work, memory and time ----
TEMPLATE_MAX_RANGE = 100_000          # items in one range()
TEMPLATE_MAX_STEPS = 2_000_000        # loop iterations plus calls, per render
TEMPLATE_MAX_CHARS = 1 << 24          # characters of output, and of any string or list it builds
TEMPLATE_MAX_SECONDS = 5.0            # per render
TEMPLATE_MAX_INT_ARG = 1 << 24        # an integer argument larger than this (a width, a count) is refused


class TemplateLimit(Exception):
    """A chat template went past one of the sandbox's limits."""


class _Budget:
    __slots__ = ("steps", "deadline")

    def __init__(self, seconds: float):
        self.steps = 0
        self.deadline = time.monotonic() + seconds


_budget: contextvars.ContextVar = contextvars.ContextVar("amed_template_budget", default=None)


def _tick() -> None:
    b = _budget.get()
    if b is None:
        return
    b.steps += 1
    if b.steps > TEMPLATE_MAX_STEPS:
        raise TemplateLimit(f"it runs more than {TEMPLATE_MAX_STEPS} loop iterations")
    if not b.steps & 1023 and time.monotonic() > b.deadline:
        raise TemplateLimit(f"it runs longer than {TEMPLATE_MAX_SECONDS:g} s")


def _check_size(v):
    if isinstance(v, (str, list, tuple, dict)) and len(v) > TEMPLATE_MAX_CHARS:
        raise TemplateLimit(f"it builds a value of more than {TEMPLATE_MAX_CHARS} items")
    return v


_WIDE_FORMAT = re.compile(r"%[-+ #0]*\d{8,}|%[-+ #0]*\d*\.\d{8,}|\{[^{}]*:[^{}]*\d{8,}")


def _check_format(fmt) -> None:
    """A format string may not ask for a width or precision of 8 digits ('{:>999999999}')."""
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise TemplateLimit("it formats a value wider than the output may be")


def _guard_loop(it):
    """What every `{% for %}` of a compiled template iterates (see _add_guards)."""
    for x in it:
        _tick()
        yield x


def _guard_size(v):
    """What every `~` concatenation of a compiled template passes through."""
    return _check_size(v)


def _safe_range(*args):
    for a in args:
        if not isinstance(a, int) or abs(a) > 1 << 62:
            raise TemplateLimit("it calls range() with an argument that is not a small integer")
    r = range(*args)
    if len(r) > TEMPLATE_MAX_RANGE:
        raise TemplateLimit(f"it asks for a range of {len(r)} items (at most {TEMPLATE_MAX_RANGE})")
    return r


def _add_guards(ast: jinja2.nodes.Template) -> jinja2.nodes.Template:
    """Every loop's iterable wrapped in _guard_loop, every concatenation in _guard_size: the
    names are imported by the compiled code, so the template cannot shadow them."""
    n = jinja2.nodes
    for node in ast.find_all(n.For):
        node.iter = n.Call(n.ImportedName(f"{__name__}._guard_loop"), [node.iter], [], None, None,
                           lineno=node.lineno)
    for parent in list(ast.find_all(n.Node)):
        for field in parent.fields:
            v = getattr(parent, field, None)
            if isinstance(v, n.Concat):
                setattr(parent, field, n.Call(n.ImportedName(f"{__name__}._guard_size"), [v], [], None, None,
                                              lineno=v.lineno))
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, n.Concat):
                        v[i] = n.Call(n.ImportedName(f"{__name__}._guard_size"), [x], [], None, None,
                                      lineno=x.lineno)
    return ast


class _LimitedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The immutable sandbox plus bounds: each call costs a step and may not pass a huge integer
    (`'x'.ljust(10**9)`); `*`, `+` and `**` may not build huge values."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _tick()
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_MAX_INT_ARG:
                raise TemplateLimit(f"it passes {a} to a function (at most {TEMPLATE_MAX_INT_ARG})")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """`'{:>999999999}'.format(x)`: the format string is checked when the method is looked up."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 256:
                raise TemplateLimit("it raises a number to a power above 256")
        elif operator == "%":
            _check_format(left)
        elif operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(k, int) and len(seq) * k > TEMPLATE_MAX_CHARS:
                    raise TemplateLimit(f"it builds a value of more than {TEMPLATE_MAX_CHARS} items")
        return _check_size(super().call_binop(context, operator, left, right))


def _guarded_filter(f):
    skip = 2 if getattr(f, "jinja_pass_arg", None) is not None else 1   # (context,) value, then arguments

    @functools.wraps(f)                 # keeps jinja_pass_arg (pass_environment etc.)
    def g(*args, **kwargs):
        if len(args) > skip - 1:
            _check_format(args[skip - 1])      # the value: `'%999999999d'|format(1)`
        for a in (*args[skip:], *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_MAX_INT_ARG:
                raise TemplateLimit(f"it passes {a} to a filter (at most {TEMPLATE_MAX_INT_ARG})")
        _tick()
        return _check_size(f(*args, **kwargs))
    return g


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template the way transformers does, in an immutable sandbox with limits
    (range size, loop steps, value and output size, time)."""
    env = _LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name in list(env.filters):
        env.filters[name] = _guarded_filter(env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _safe_range
    if not isinstance(source, str):
        raise AmedError("the model's chat template is not a string.")
    if len(source) > TEMPLATE_MAX_CHARS:
        raise AmedError(f"refusing the model's chat template: it is longer than {TEMPLATE_MAX_CHARS} characters.")
    try:
        ast = env.parse(source)
        bad = _unsafe_names(ast)
        if bad:
            raise AmedError(
                f"refusing the model's chat template: it reaches for Python internals ({bad[0]})."
            )
        return env.from_string(_add_guards(ast))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise AmedError(f"the model's chat template does not compile: {_one_line(e)} (line {e.lineno}).") from None
    except RecursionError:
        raise AmedError("the model's chat template does not compile: it is nested too deeply.") from None


def render_chat_template(template: jinja2.Template, messages: Sequence[dict], **context: Any) -> str:
    """Render a compiled chat template; any failure becomes a one-line AmedError."""
    if not isinstance(messages, (list, tuple)) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise AmedError("chat messages must be a list of {'role': ..., 'content': ...} dicts.")
    token = _budget.set(_Budget(TEMPLATE_MAX_SECONDS))
    try:
        out, n = [], 0
        for chunk in template.generate(messages=list(messages), **context):
            n += len(chunk)
            if n > TEMPLATE_MAX_CHARS:
                raise TemplateLimit(f"it writes more than {TEMPLATE_MAX_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    except TemplateLimit as e:
        raise AmedError(f"refusing the model's chat template: {e} (the sandbox's limit).") from None
    except RecursionError:
        raise AmedError("refusing the model's chat template: it recurses too deeply.") from None
    except MemoryError:
        raise AmedError("refusing the model's chat template: it ran out of memory.") from None
    except jinja2.exceptions.SecurityError as e:
        raise AmedError(f"refusing the model's chat template: {_one_line(e).rstrip('.')}.") from None
    except jinja2.exceptions.TemplateError as e:
        raise AmedError(f"chat template error: {_one_line(e)}") from None
    except Exception as e:  # a template can raise anything Python can (TypeError, KeyError, ...)
        raise AmedError(f"chat template error: {type(e).__name__}: {_one_line(e)}") from None
    finally:
        _budget.reset(token)


# ---- incremental detokenizer ---------------------------------------------------------------


class StreamDecoder:
    """Turns token ids into text one at a time, never splitting a UTF-8 character.

    `step(id)` returns only newly completed text ('' while a character is still incomplete);
    the concatenation of all steps plus `flush()` equals `Tokenizer.decode(all_ids)`.
    """

    def __init__(self, tok: tokenizers.Tokenizer, skip_special_tokens: bool = False):
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is the last emitted window (starts on a char boundary)
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prev = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        # U+FFFD at the end means the bytes may still be an unfinished character: wait for more.
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character decodes to U+FFFD)."""
        prev = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prev) :]


# ---- the tokenizer -------------------------------------------------------------------------


class Tokenizer:
    """A model's tokenizer.json plus its chat template, special tokens and stop ids."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        eos_token_id: int | Iterable[int] | None = None,
    ):
        self._tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None
        self.add_bos_token = bool(add_bos_token) and self.bos_token_id is not None
        self.template_is_fallback = not chat_template
        self.chat_template = chat_template or FALLBACK_CHAT_TEMPLATE
        self._template = compile_chat_template(self.chat_template)

        if eos_token_id is None:
            eos = [] if self.eos_token_id is None else [self.eos_token_id]
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(i) for i in eos_token_id]
        eos += [i for i in map(tok.token_to_id, STOP_TOKENS) if i is not None]
        self.stop_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a model folder."""
        from amed.formats.files import read_regular

        d = Path(model_dir)
        if d.is_file():                          # a GGUF file carries its tokenizer and template
            from amed.formats.gguf import gguf_tokenizer, read_header

            tok, kw = gguf_tokenizer(read_header(d))
            return cls(tok, **kw)
        path = d / "tokenizer.json"
        if not _exists(path):
            raise AmedError(f"{path} is missing; the model directory needs its tokenizer files.")
        raw = read_regular(path, limit=MAX_TOKENIZER_BYTES)      # a regular file: a FIFO would block
        try:
            tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise AmedError(f"{path} could not be read as a tokenizer ({_one_line(e)[:200]}); "
                            f"{restore_advice(path)}") from None
        _check_vocabulary(tok, path, _model_vocab_size(d))
        cfg = read_json(d / "tokenizer_config.json", required=False)
        gen = read_json(d / "generation_config.json", required=False)

        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = d / "chat_template.jinja"  # newer transformers save it next to the config
        if _exists(jinja_file):
            try:
                template = read_regular(jinja_file, limit=MAX_SIDE_FILE_BYTES).decode("utf-8")
            except UnicodeDecodeError:
                raise AmedError(f"{jinja_file} is not UTF-8 text; {restore_advice(jinja_file)}") from None
        if template is not None and not isinstance(template, str):
            raise AmedError(f"{d / 'tokenizer_config.json'} has a chat_template that is not a string.")

        eos_id = gen.get("eos_token_id")
        if eos_id is not None and not (
            isinstance(eos_id, int) or (isinstance(eos_id, list) and all(isinstance(i, int) for i in eos_id))
        ):
            raise AmedError(f"{d / 'generation_config.json'} has an eos_token_id that is not an id or a list of ids.")
        return cls(
            tok,
            chat_template=template or None,
            bos_token=_token_str(cfg.get("bos_token")),
            eos_token=_token_str(cfg.get("eos_token")),
            pad_token=_token_str(cfg.get("pad_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            eos_token_id=eos_id,
        )

    def use_template(self, source: str) -> None:
        """Replace the chat template (`amed chat --chat-template FILE`); compiled in the same sandbox."""
        self._template = compile_chat_template(source)
        self.chat_template = source
        self.template_is_fallback = False

    # ---- text <-> ids ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text to ids; special tokens written in the text (`<role>`) become their single ids.

        BOS is prepended only when tokenizer_config's add_bos_token says so (or add_bos=True).
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokenizer (one per generated reply)."""
        return StreamDecoder(self._tok, skip_special_tokens)

    # ---- chat ----
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render [{'role': 'system'|'user'|'assistant'|'tool', 'content': str}, ...] to the prompt text."""
        return render_chat_template(
            self._template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            tools=None,
            documents=None,
        )

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered chat prompt as ids (no extra BOS: the template writes it if it wants one)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)
