"""A fake Hugging Face hub on 127.0.0.1 for tests: the real `huggingface_hub` client talks to it end to end.

It speaks the few routes the client uses, with the real hub's status codes and `X-Error-Code` headers:

* `GET /api/models/{repo}[/revision/{rev}]` -> `{id, sha, gated, private, siblings: [{rfilename, size, blobId, lfs}]}`
* `GET /api/models/{repo}/tree/{rev}` -> `[{type, path, size, oid, lfs}]` (so `snapshot_download` works too)
* `HEAD|GET /{repo}/resolve/{rev}/{path}`: small files are served directly; LFS files answer 302 to
  `/cdn/{repo}/{sha256}` like the real hub's CDN redirect. Both honour `Range: bytes=N-[M]` (206 + Content-Range).
* unknown repo -> 404 `RepoNotFound`; unknown revision -> 404 `RevisionNotFound`; missing file -> 404
  `EntryNotFound`; gated repo without a valid `Authorization: Bearer` -> 401 `GatedRepo`.

Fault injection for the file bytes (`cut`, `fail`, `corrupt`, `throttle`) and a request log (`hub.log`,
`hub.ranges(path)`, `hub.bytes_served[path]`) let tests check what the client actually fetched.

Use the `fake_hub` fixture (`from hubserver import fake_hub`), or `with FakeHub() as hub:`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".gguf")


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    sha: str
    revisions: tuple[str, ...] = ("main",)
    gated: bool = False
    lfs: set[str] = field(default_factory=set)

    def is_lfs(self, path: str) -> bool:
        return path in self.lfs

    def sibling(self, path: str) -> dict:
        data = self.files[path]
        d = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        if self.is_lfs(path):
            d["blobId"] = hashlib.sha1(path.encode()).hexdigest()  # sha1 of the pointer file, not of the content
            d["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return d


@dataclass
class Request:
    method: str
    path: str  # URL path as received
    file: str | None  # repo file it concerns (resolve or cdn), if any
    headers: dict[str, str]
    sent: int = 0  # body bytes actually written for this request


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def safetensors_bytes(tensors: dict[str, bytes]) -> bytes:
    """A valid safetensors file of U8 tensors (name -> raw bytes)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, raw in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(raw)], "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(tensors.values())


def synthetic_checkpoint(shards: int = 2, shard_bytes: int = 400_000, seed: int = 0) -> dict[str, bytes]:
    """A small repo shaped like AntAngelMed's: configs, tokenizer, index, safetensors shards, and decoys
    (`*.py`, `*.bin`, an image, a README) that a default download must not fetch."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        t = {f"model.layers.{i}.w{j}": rng.randbytes(shard_bytes // 4) for j in range(4)}
        files[name] = safetensors_bytes(t)
        weight_map.update({k: name for k in t})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1).encode()
    files["config.json"] = json.dumps({"architectures": ["BailingMoeV2ForCausalLM"], "hidden_size": 64}).encode()
    files["generation_config.json"] = b'{"eos_token_id": [156892, 156895]}'
    files["tokenizer.json"] = json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}).encode()
    files["tokenizer_config.json"] = b'{"chat_template": "{{ messages }}"}'
    files["modeling_bailing_moe_v2.py"] = b"raise SystemExit('remote code must never run')\n"
    files["pytorch_model.bin"] = rng.randbytes(1000)
    files["figures/architecture.png"] = rng.randbytes(2000)
    files["README.md"] = b"# synthetic\n"
    return files


class FakeHub:
    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[Request] = []
        self.bytes_served: dict[str, int] = {}
        self.valid_tokens = {"hf_good_token"}
        self.throttle: float | None = None  # bytes per second for file bodies
        self._cuts: dict[str, list] = {}  # path -> [after_bytes, times, mode]
        self._fails: dict[str, list] = {}  # path -> [status, times]
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()  # open client connections, closed by stop()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- setup -----------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, *, revisions=("main",),
                 sha: str | None = None, gated: bool = False) -> FakeRepo:
        files = synthetic_checkpoint() if files is None else files
        sha = sha or hashlib.sha1(repo_id.encode() + b"".join(files[p] for p in sorted(files))).hexdigest()
        lfs = {p for p in files if p.endswith(LFS_SUFFIXES)}
        repo = FakeRepo(repo_id, dict(files), sha, tuple(revisions), gated, lfs)
        self.repos[repo_id] = repo
        return repo

    def cut(self, path: str, after: int, times: int = 1, mode: str = "close"):
        """Drop the connection after `after` body bytes of the next `times` GETs of `path`.
        mode "close": clean FIN (client sees an incomplete body); "reset": TCP RST."""
        self._cuts[path] = [after, times, mode]

    def fail(self, path: str, status: int = 503, times: int = 1):
        """Answer the next `times` GETs of `path`'s bytes with HTTP `status`."""
        self._fails[path] = [status, times]

    def corrupt(self, path: str, on: bool = True):
        """Serve `path` with one byte flipped (its listed sha256 stays the true one)."""
        (self._corrupt.add if on else self._corrupt.discard)(path)

    # ---- inspection ------------------------------------------------------------------------
    def gets(self, path: str) -> list[Request]:
        """GET requests that carried the bytes of `path` (the CDN hop for LFS files, resolve otherwise)."""
        return [r for r in self.log if r.method == "GET" and r.file == path
                and (r.path.startswith("/cdn/") or path not in self._repo_of(path).lfs)]

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of every body GET of `path`, in order (None = whole file)."""
        return [r.headers.get("range") for r in self.gets(path)]

    def file_gets(self) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and r.file is not None]

    def _repo_of(self, path: str) -> FakeRepo:
        return next(r for r in self.repos.values() if path in r.files)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        """Stop listening and drop open keep-alive connections: clients then see a hub that is gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._conns.add(self.connection)

    def finish(self):
        with self.hub._lock:
            self.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # ---- helpers ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200):
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str):
        h = {"X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), h)

    def _record(self, file: str | None):
        self.req = Request(self.command, self.path, file, {k.lower(): v for k, v in self.headers.items()})
        with self.hub._lock:
            self.hub.log.append(self.req)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _check_rev(self, repo: FakeRepo, rev: str) -> bool:
        if rev in repo.revisions or rev == repo.sha:
            return True
        self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
        return False

    def _authorized(self, repo: FakeRepo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.hub.valid_tokens:
            return True
        self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access to it "
                                      "and be authenticated to access it. Please log in.")
        return False

    # ---- routes ----------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = urlsplit(self.path).path
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(m[1], unquote(m[2] or "main"))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self._tree(m[1], unquote(m[2]), m[3] or "")
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], unquote(m[2]), unquote(m[3]))
        if m := re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{64})", path):
            return self._cdn(m[1], m[2])
        self._record(None)
        self._error(404, None, "Not Found")

    def _model_info(self, repo_id: str, rev: str):
        self._record(None)
        if (repo := self._repo(repo_id)) is None or not self._check_rev(repo, rev):
            return
        siblings = [repo.sibling(p) for p in sorted(repo.files)]
        self._json({"_id": "x", "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                    "siblings": siblings})

    def _tree(self, repo_id: str, rev: str, sub: str):
        self._record(None)
        if (repo := self._repo(repo_id)) is None or not self._check_rev(repo, rev):
            return
        out = []
        for p in sorted(repo.files):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            s = repo.sibling(p)
            e = {"type": "file", "oid": s["blobId"], "size": s["size"], "path": p}
            if "lfs" in s:
                e["lfs"] = {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134}
            out.append(e)
        self._json(out)

    def _resolve(self, repo_id: str, rev: str, file: str):
        self._record(file)
        if (repo := self._repo(repo_id)) is None or not self._check_rev(repo, rev) or not self._authorized(repo):
            return
        if file not in repo.files:
            return self._error(404, "EntryNotFound", f"{file} does not exist on \"{rev}\"")
        data = repo.files[file]
        etag = git_blob_sha1(data)
        common = {"X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if repo.is_lfs(file):
            sha = hashlib.sha256(data).hexdigest()
            common.update({"Location": f"/cdn/{repo_id}/{sha}", "X-Linked-Size": str(len(data)),
                           "X-Linked-Etag": f'"{sha}"', "ETag": f'"{etag}"'})
            return self._send(302, b"", common)
        self._body(file, data, {**common, "ETag": f'"{etag}"'})

    def _cdn(self, repo_id: str, sha: str):
        repo = self.hub.repos.get(repo_id)
        file = next((p for p, d in (repo.files.items() if repo else ()) if hashlib.sha256(d).hexdigest() == sha), None)
        self._record(file)
        if file is None:
            return self._error(404, None, "NoSuchKey")
        # The real CDN is another host, where the client's HEAD stops at the 302; here it is the same origin, so
        # the client follows the redirect and needs the hub's headers on this hop too.
        self._body(file, repo.files[file], {"ETag": f'"{sha}"', "Accept-Ranges": "bytes", "X-Repo-Commit": repo.sha})

    def _body(self, file: str, data: bytes, headers: dict):
        hub = self.hub
        if self.command == "GET":
            with hub._lock:
                fail = hub._fails.get(file)
                if fail and fail[1] > 0:
                    fail[1] -= 1
                    status = fail[0]
                else:
                    status = None
            if status is not None:
                return self._error(status, None, "injected failure")
            if file in hub._corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, end = 0, len(data) - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m[1])
            end = min(int(m[2]), len(data) - 1) if m[2] else len(data) - 1
            if start >= len(data):
                return self._error(416, None, "Requested Range Not Satisfiable")
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with hub._lock:
            cut = hub._cuts.get(file)
            if cut and cut[1] > 0:
                cut[1] -= 1
                limit, mode = cut[0], cut[2]
            else:
                limit, mode = None, None
        to_send = body if limit is None else body[:limit]
        step = 65536
        try:
            for i in range(0, len(to_send), step):
                piece = to_send[i:i + step]
                self.wfile.write(piece)
                with hub._lock:
                    hub.bytes_served[file] = hub.bytes_served.get(file, 0) + len(piece)
                    self.req.sent += len(piece)
                if hub.throttle:
                    self.wfile.flush()
                    time.sleep(len(piece) / hub.throttle)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if limit is not None:
            self.wfile.flush()
            self.close_connection = True
            if mode == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def fake_hub():
    """A started FakeHub holding `MedAIBase/AntAngelMed` (a synthetic checkpoint); stopped afterwards."""
    hub = FakeHub()
    hub.add_repo("MedAIBase/AntAngelMed")
    with hub:
        yield hub
