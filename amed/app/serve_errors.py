"""`amed serve`'s errors: OpenAI's error shape, and what a client is told about an exception."""

from __future__ import annotations

import sys

from amed.errors import AmedError


class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def client_message(e: Exception) -> str:
    """What a client is told about an exception: an AmedError's sentence; for anything else only
    its kind (the details go to the server's log, never into an answer)."""
    if isinstance(e, AmedError):
        return str(e)
    print(f"amed serve: internal error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return f"internal error ({type(e).__name__}); the server's log has the details."


def show_value(v) -> str:
    """A short description of a wrong value for an error message (never a megabyte of it)."""
    text = repr(v)
    return text if len(text) <= 40 else f"a {type(v).__name__}"

