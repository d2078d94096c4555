"""`amed serve`'s requests: a body parsed as hostile input, checked field by field, turned into a Job
(prompt ids, sampling parameters, budget, stop strings), each refusal an ApiError in OpenAI's shape.
"""

from __future__ import annotations

import dataclasses
import json
import math

from amed.app.serve_errors import ApiError, show_value as _show
from amed.app.serve_scheduler import Job
from amed.errors import AmedError

MAX_STOPS = 16             # stop strings per request, and characters in each
MAX_STOP_CHARS = 1000


def _number(body: dict, key: str, *, integer: bool = False, minimum=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, not {_show(v)}.",
                       param=key)
    if isinstance(v, int) and abs(v) >= 2 ** 63 or isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"'{key}' is out of range.", param=key)
    if integer and not float(v).is_integer():
        raise ApiError(400, f"'{key}' must be an integer, not {v!r}.", param=key)
    if minimum is not None and v < minimum:
        raise ApiError(400, f"'{key}' must be at least {minimum}, not {v!r}.", param=key)
    return int(v) if integer else float(v)


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object; 400 for anything else: invalid JSON or UTF-8, NaN or
    Infinity, nesting too deep for the parser, an integer of thousands of digits, a lone
    surrogate (\\ud800) in any string."""
    def constant(name):
        raise ValueError(name)
    try:
        body = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError):     # JSONDecodeError, NaN/Infinity, 4300+ digit integers
        raise ApiError(400, "the request body is not valid JSON (UTF-8, no NaN or Infinity, numbers of "
                            "normal size).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    todo = [body]                                # every string, without recursion
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo.extend(v)
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request holds text that is not valid Unicode (a lone surrogate "
                                    "such as \\ud800).") from None
    return body


def message_text(content, i: int) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, not {_show(kind)}.",
                               param=f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts.",
                   param=f"messages[{i}].content")


# Fields amed does not implement: a request may send them only with a value that asks for nothing
# (so an answer never silently lacks what was asked for).
UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "logit_bias": (None, {}), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "response_format": (None, {"type": "text"}),
}


class Api:
    """Turns request bodies into Jobs for one loaded model (validation, defaults, prompt ids)."""

    def __init__(self, model_id: str, tokenizer, defaults, ctx_size: int, vocab_size: int):
        self.model_id, self.tok, self.defaults = model_id, tokenizer, defaults
        self.ctx_size, self.vocab_size = ctx_size, vocab_size
        self.max_token_bytes = self._max_token_bytes(tokenizer)

    @staticmethod
    def _max_token_bytes(tok) -> int | None:
        """The most UTF-8 bytes any token's text has (an upper bound on the bytes one token covers),
        so that a text that cannot fit the context is refused without tokenizing megabytes."""
        try:
            return max(len(t.encode("utf-8")) for t in tok._tok.get_vocab(with_added_tokens=True))
        except Exception:                # another tokenizer: no shortcut
            return None

    def check_too_long(self, nbytes: int, param: str) -> None:
        if self.max_token_bytes and nbytes > 4 * self.max_token_bytes * self.ctx_size:   # 4x: normalizers
            raise ApiError(400, f"the prompt is longer than this server's context of {self.ctx_size - 1} "
                                f"tokens (raise -c/--ctx-size or shorten the prompt).",
                           param=param, code="context_length_exceeded")

    def check_model(self, body: dict) -> None:
        """One model is served, so any name selects it (as llama-server does); it must be a string."""
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise ApiError(400, "'model' must be a string.", param="model")

    def check_unsupported(self, body: dict) -> None:
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        for key, fine in UNSUPPORTED.items():
            v = body.get(key)
            if not any(v is f or (number(v) and number(f) or type(v) is type(f)) and v == f for f in fine):
                raise ApiError(400, f"'{key}' is not supported by amed serve.", param=key,
                               code="unsupported_parameter")

    def job(self, body: dict, prompt: list[int], param: str) -> Job:
        self.check_unsupported(body)
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or n != 1):
            raise ApiError(400, "only n=1 is supported.", param="n")
        if len(prompt) >= self.ctx_size:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than this server's context of "
                                f"{self.ctx_size - 1} (raise -c/--ctx-size or shorten the prompt).",
                           param=param, code="context_length_exceeded")
        max_tokens = _number(body, "max_completion_tokens", integer=True, minimum=1)
        if max_tokens is None:
            max_tokens = _number(body, "max_tokens", integer=True, minimum=1)
        seed = body.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, (int, float, type(None))) or (
                isinstance(seed, float) and not (math.isfinite(seed) and seed.is_integer())):
            raise ApiError(400, f"'seed' must be an integer (-1 for a random one), not {_show(seed)}.", param="seed")
        if seed is not None and seed >= 2 ** 64:
            raise ApiError(400, "'seed' must be below 2**64 (or -1 for a random one).", param="seed")
        seed = None if seed is None or seed < 0 else int(seed)   # -1 (any negative): random, as llama.cpp's
        overrides = dict(temperature=_number(body, "temperature", minimum=0),
                         top_p=_number(body, "top_p"), top_k=_number(body, "top_k", integer=True),
                         min_p=_number(body, "min_p"), seed=seed,
                         repetition_penalty=_number(body, "repetition_penalty")
                         or _number(body, "repeat_penalty"))
        if overrides["top_k"] is not None and overrides["top_k"] < 0:   # OpenAI-style clients send -1 for "off"
            overrides["top_k"] = 0
        try:
            params = dataclasses.replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})
        except AmedError as e:
            raise ApiError(400, str(e)) from None
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = stop
        else:
            raise ApiError(400, "'stop' must be a string or a list of strings.", param="stop")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(400, f"'stop' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                                f"characters each.", param="stop")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be true or false.", param="ignore_eos")
        return Job(prompt=prompt, params=params, max_tokens=max_tokens or self.ctx_size, stops=stops,
                   ignore_eos=ignore_eos)

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.", param="messages")
        if len(msgs) >= self.ctx_size:               # each message takes a token at least
            raise ApiError(400, f"{len(msgs)} messages cannot fit this server's context of {self.ctx_size - 1} "
                                f"tokens.", param="messages", code="context_length_exceeded")
        out, nbytes = [], 0
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a 'role'.", param=f"messages[{i}]")
            if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
                raise ApiError(400, f"messages[{i}].role {_show(m['role'])} is not one of system, user, "
                                    f"assistant, tool.", param=f"messages[{i}].role")
            if m.get("content") is None and m["role"] != "assistant":
                raise ApiError(400, f"messages[{i}] ({m['role']}) has no 'content'.",
                               param=f"messages[{i}].content")
            msg = {k: v for k, v in m.items() if k in ("role", "reasoning_content", "tool_calls")}
            msg["role"] = "system" if m["role"] == "developer" else m["role"]
            msg["content"] = message_text(m.get("content"), i)
            nbytes += len(msg["content"].encode("utf-8"))
            out.append(msg)
        self.check_too_long(nbytes, "messages")
        try:
            return self.tok.encode_chat(out)
        except AmedError as e:
            raise ApiError(400, str(e), param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]                                    # a batch of one prompt
        if isinstance(p, str) and p:
            self.check_too_long(len(p.encode("utf-8")), "prompt")
            return self.tok.encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab_size}).", param="prompt")
            return list(p)
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per "
                            "request).", param="prompt")

