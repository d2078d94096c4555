"""`amed serve`'s Guard: what every request passes first (Host, Origin, Content-Type, body size)."""

from __future__ import annotations

import fnmatch
import ipaddress

from amed.app.serve_errors import ApiError, show_value as _show

IDLE_TIMEOUT = 30.0        # seconds a connection may take to send a request's headers (or a body chunk)


def split_host(value: str) -> tuple[str, int | None]:
    """A Host header (or an origin's netloc) -> (lowercase name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[1:end], value[end + 1:]) if end > 0 else (value, "")
    else:
        name, _, rest = value.partition(":")
        rest = ":" + rest if rest else ""
    port = rest[1:] if rest.startswith(":") else ""
    return name.rstrip("."), int(port) if port.isdigit() else (None if not port else -1)


def is_loopback(name: str) -> bool:
    name = name.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware in front of every route (the OpenAI API, the page, and any added later):

    - bound to a loopback address, a request must name this computer in `Host` (localhost, a
      loopback address, or the bound address): a web page whose domain was re-bound to 127.0.0.1
      (DNS rebinding) gets 403;
    - a browser's cross-origin request (an `Origin` that is not this server's) gets 403 unless the
      origin is allowed (`--cors-origin`, $AMED_ORIGINS; `*` and other glob patterns as ollama's
      OLLAMA_ORIGINS); allowed ones get CORS headers and their preflights an answer;
    - a POST from a browser (it carries `Origin`, as every browser POST does) must say
      `Content-Type: application/json` (415): a form or text/plain POST, which a page may send
      anywhere without a preflight, is never read; other clients (curl -d) may omit the type;
    - a body is at most `max_body` bytes (413), each chunk arriving within IDLE_TIMEOUT (408);
    - once a shutdown began, new requests get 503.
    Each refusal is OpenAI's JSON error shape."""

    def __init__(self, app, *, host: str, max_body: int, origins=(), state=None):
        self.app, self.max_body, self.state = app, max_body, state if state is not None else {}
        self.origins = [o.strip().lower().rstrip("/") for o in origins if o and o.strip()]
        bound = host.strip("[]").lower()
        self.check_host = is_loopback(bound)
        self.bound = bound

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            cors = self.check(scope, headers)
            if cors is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                return await self.preflight(cors, headers, send)
            if self.state.get("draining") and scope["path"] != "/health":
                raise ApiError(503, "the server is shutting down.", "server_error", code="shutting_down")
            if scope["method"] in ("POST", "PUT", "PATCH"):
                media = headers.get("content-type", "").split(";")[0].strip().lower()
                # only a browser can be tricked into posting, and a browser names the Origin of every
                # POST: there, require JSON; curl -d (ollama's docs) sends a form type and is welcome
                if media != "application/json" and "origin" in headers:
                    raise ApiError(415, "send the request body as JSON, with 'Content-Type: application/json'.",
                                   code="unsupported_media_type")
                raw = await self.read(receive, headers)
                if raw is None:              # the client went away
                    return
                receive = self.replay(raw, receive)
        except ApiError as e:
            return await self.refuse(e, scope, receive, send)
        if cors is not None:
            send = self.with_cors(cors, send)
        await self.app(scope, receive, send)

    def check(self, scope, headers) -> str | None:
        """Host and Origin; returns the origin to answer with CORS headers (None: same-origin or none)."""
        host = headers.get("host")
        if self.check_host and host is not None:
            name, _ = split_host(host)
            if not (is_loopback(name) or name == self.bound):
                raise ApiError(403, f"this server answers only to this computer's names (localhost, "
                                    f"127.0.0.1), not {_show(host)}: a guard against DNS rebinding.",
                               "permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is None:
            return None
        if self.same_origin(origin, host, scope):
            return None
        o = origin.strip().lower().rstrip("/")
        if any(fnmatch.fnmatchcase(o, pattern) for pattern in self.origins):
            return origin
        raise ApiError(403, f"requests from the web page at {_show(origin)} are refused; allow its origin with "
                            f"amed serve --cors-origin ORIGIN (or $AMED_ORIGINS).", "permission_error",
                       code="origin_not_allowed")

    @staticmethod
    def same_origin(origin: str, host: str | None, scope) -> bool:
        scheme, sep, netloc = origin.strip().lower().partition("://")
        if not sep or "/" in netloc:
            return False
        default = {"http": 80, "https": 443}.get(scheme)
        o_name, o_port = split_host(netloc)
        if host is not None:
            h_name, h_port = split_host(host)
        else:
            h_name, h_port = (str(scope["server"][0]).lower(), scope["server"][1]) if scope.get("server") else ("", 0)
        return (scheme == scope.get("scheme", "http") and o_name == h_name
                and (o_port or default) == (h_port or default))

    async def read(self, receive, headers) -> bytes | None:
        import asyncio

        length = headers.get("content-length", "")
        too_big = ApiError(413, f"the request body is larger than this server's limit of {self.max_body} bytes "
                                f"(amed serve --max-body).", code="request_too_large")
        if length.isdigit() and int(length) > self.max_body:
            raise too_big
        parts, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), IDLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise ApiError(408, "the request body stopped arriving.", code="request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    def replay(raw: bytes, receive):
        """A receive() that gives the app the body already read, then the connection's messages."""
        pending = [{"type": "http.request", "body": raw, "more_body": False}]

        async def replayed():
            return pending.pop() if pending else await receive()
        return replayed

    @staticmethod
    def with_cors(origin: str, send):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"access-control-allow-origin", origin.encode("latin-1")),
                                                  (b"vary", b"Origin")]}
            await send(message)
        return sending

    async def preflight(self, origin: str, headers, send) -> None:
        asked = headers.get("access-control-request-headers", "authorization, content-type")
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", asked.encode("latin-1")), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    async def refuse(self, e: ApiError, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        body = {"error": e.message} if scope["path"].startswith("/api/") else e.body()   # ollama's shape there
        await JSONResponse(body, status_code=e.status)(scope, receive, send)

