"""Fetch a checkpoint from the Hugging Face hub: list, check disk space, download with ranged resume, verify.

huggingface_hub (2.4) never resumes across calls (each attempt writes a fresh `<name>.<uuid>.incomplete`), which
is no good for 206 GB. So the library supplies the metadata (`HfApi.model_info(files_metadata=True)`: sizes and
LFS sha256), the URLs (`hf_hub_url`, pinned to the commit), the auth/user-agent headers (`build_hf_headers`) and
the HTTP client (`get_session`, which also enforces HF_HUB_OFFLINE); this module moves the bytes itself:

    GET /resolve/<commit>/<file>  with  Range: bytes=<size of file.part>-   ->  <file>.part  ->  fsync, rename

hashing while streaming, with bounded exponential-backoff retries on transient errors. A verified file is
recorded (size, mtime, checksum) in `<local_dir>/.amed/download.json`, so a re-run skips it without re-hashing.

Library use, one file at a time (what a download-while-quantize loop needs):

    plan = list_files("MedAIBase/AntAngelMed")          # Plan: commit + RemoteFile(path, size, sha256, url)
    check_disk_space(bytes_needed(plan, d), d)          # or any byte count the caller needs
    for f in plan.files:
        path = download_file(f, d, progress=bar.advance)    # resumes, verifies, skips verified files
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from amed.errors import AmedError

DEFAULT_REPO = "MedAIBase/AntAngelMed"
# Only what amed reads: configs, the safetensors index and shards, tokenizer files, chat templates, licence.
DEFAULT_INCLUDE = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "LICENSE*", "README.md")
# Never fetched, whatever --include says: repo code (amed never runs it) and pickle-based weight formats.
NEVER_FETCH = ("*.py", "*.pyc", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib")

# The AntAngelMed checkpoints on the hub, smallest first: (repo, weights, approximate download bytes, what for).
# Sizes: bf16 from the repo's file list (205.8 GB); INT4 and FP8 estimated from the parameter counts
# (shared/docs/prequantized.md §1.4, §2.3). `amed download` prints this before it starts.
CHECKPOINTS = (
    ("MedAIBase/AntAngelMed-INT4", "INT4", "~56 GB", "smallest; copied losslessly into an int4 store"),
    ("MedAIBase/AntAngelMed-FP8", "FP8", "~104 GB", "for an int8 store (--bits 8)"),
    ("MedAIBase/AntAngelMed", "bf16", "206 GB", "the original; the reference for perplexity --kld-base"),
)


def checkpoint_menu(current: str | None = None) -> str:
    """The lines `amed download` prints before it starts: which AntAngelMed checkpoints exist, their
    sizes, and which is being fetched (so a slow line can pick the small one)."""
    width = max(len(r) for r, *_ in CHECKPOINTS)
    lines = ["AntAngelMed checkpoints (each makes an amed store; on a slow line take the smallest):"]
    for repo, kind, size, why in CHECKPOINTS:
        mark = "  <- this one" if current == repo else ""
        lines.append(f"  {repo:<{width}} {kind:>4} {size:>8}  {why}{mark}")
    return "\n".join(lines)


STATE_DIR = ".amed"
STATE_FILE = "download.json"
PART_SUFFIX = ".part"
DISK_HEADROOM = 1 << 30  # keep 1 GiB free
CHUNK = 1 << 20  # read size when hashing files on disk
SLOW_HASH = 1 << 30  # say so before hashing this much from disk

# Called with byte deltas as a file downloads (negative if a server ignored a Range and the file restarts).
ProgressFn = Callable[[int], None]


# ---------------------------------------------------------------------------------------------
# plan: what the hub has
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    path: str  # path in the repo, "/"-separated
    size: int
    sha256: str | None  # LFS files (the shards): the hub's content hash
    git_oid: str | None  # small files: git blob sha1 of the content
    url: str  # /resolve/ URL pinned to the commit

    @property
    def checksum(self) -> str | None:
        if self.sha256:
            return "sha256:" + self.sha256
        return "git-sha1:" + self.git_oid if self.git_oid else None


@dataclass(frozen=True)
class Plan:
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    files: tuple[RemoteFile, ...]
    gated: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def amed_home() -> Path:
    """Where amed keeps models, stores and measurements: $AMED_HOME, else $XDG_CACHE_HOME/amed or ~/.cache/amed."""
    home = os.environ.get("AMED_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "amed")
    return Path(home)


def default_local_dir(repo_id: str = DEFAULT_REPO) -> Path:
    """$AMED_HOME/models/<org>--<name>."""
    return amed_home() / "models" / repo_id.replace("/", "--")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT read now (the library reads it once at import), else the library's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def select(paths: Iterable[str], include: Iterable[str] | None = None,
           exclude: Iterable[str] | None = None) -> list[str]:
    """Filter repo paths as `hf download` does (fnmatch; `*` crosses `/`), then drop NEVER_FETCH."""
    from huggingface_hub.utils import filter_repo_objects

    allow = list(include) if include else list(DEFAULT_INCLUDE)
    ignore = list(NEVER_FETCH) + list(exclude or ())
    return list(filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=ignore))


def list_files(repo_id: str = DEFAULT_REPO, *, revision: str | None = None, include: Iterable[str] | None = None,
               exclude: Iterable[str] | None = None, token: str | bool | None = None,
               endpoint: str | None = None) -> Plan:
    """One API call: the repo's files at `revision` (default "main") with sizes and checksums, filtered."""
    from huggingface_hub import HfApi, constants, hf_hub_url

    endpoint = resolve_endpoint(endpoint)
    revision = revision or "main"
    if is_offline():
        raise HubUnreachable(f"cannot list {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    with _hub_errors(repo_id, revision, endpoint, token):
        info = HfApi(endpoint=endpoint, library_name="amed", library_version=_version()).model_info(
            repo_id, revision=revision, files_metadata=True, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT * 3)
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = []
    for path in select(sorted(siblings), include, exclude):
        s = siblings[path]
        _check_repo_path(path, repo_id)
        if s.size is None:
            raise AmedError(f"the hub at {endpoint} did not report the size of {path} in {repo_id}")
        files.append(RemoteFile(
            repo_id=repo_id, path=path, size=int(s.size), sha256=s.lfs.sha256 if s.lfs else None,
            git_oid=None if s.lfs else s.blob_id,
            url=hf_hub_url(repo_id, path, revision=info.sha, endpoint=endpoint)))
    if not files:
        raise AmedError(f"no file in {repo_id}@{revision} matches the include/exclude patterns "
                        f"(include: {' '.join(include or DEFAULT_INCLUDE)})")
    return Plan(repo_id, revision, info.sha, endpoint, tuple(files), gated=bool(info.gated))


def check_access(plan: Plan, token: str | bool | None = None) -> None:
    """For a gated repo, one HEAD on the smallest file so a missing licence/token fails before any download."""
    if not plan.gated:
        return
    from huggingface_hub import get_hf_file_metadata

    f = min(plan.files, key=lambda f: f.size)
    with _hub_errors(plan.repo_id, plan.revision, plan.endpoint, token, f.path):
        get_hf_file_metadata(f.url, token=token, endpoint=plan.endpoint)


# ---------------------------------------------------------------------------------------------
# local state: what is already on disk
# ---------------------------------------------------------------------------------------------
_state_lock = threading.Lock()


def _state_path(local_dir: Path) -> Path:
    return Path(local_dir) / STATE_DIR / STATE_FILE


def load_state(local_dir: Path) -> dict:
    try:
        state = json.loads(_state_path(local_dir).read_text())
        if isinstance(state, dict) and state.get("version") == 1:
            return state
    except (OSError, ValueError):
        pass
    return {"version": 1, "files": {}, "partial": {}}


def _update_state(local_dir: Path, fn: Callable[[dict], None]) -> None:
    with _state_lock:
        state = load_state(local_dir)
        fn(state)
        p = _state_path(local_dir)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, p)


def record_plan(plan: Plan, local_dir: Path) -> None:
    """Remember which repo/commit/files this directory holds (used for the offline fallback)."""
    def fn(s):
        s.update(repo_id=plan.repo_id, revision=plan.revision, commit=plan.commit, endpoint=plan.endpoint,
                 plan=[asdict(f) for f in plan.files])
    _update_state(local_dir, fn)


def local_path(f: RemoteFile, local_dir: Path) -> Path:
    return Path(local_dir).joinpath(*PurePosixPath(f.path).parts)


def part_path(f: RemoteFile, local_dir: Path) -> Path:
    p = local_path(f, local_dir)
    return p.with_name(p.name + PART_SUFFIX)


def is_verified(f: RemoteFile, local_dir: Path, state: dict | None = None) -> bool:
    """The file is on disk, unchanged since amed verified it against the hub's checksum (no hashing)."""
    state = load_state(local_dir) if state is None else state
    rec = state["files"].get(f.path)
    try:
        st = local_path(f, local_dir).stat()
    except OSError:
        return False
    return bool(rec) and rec.get("checksum") == f.checksum and rec.get("size") == f.size == st.st_size \
        and rec.get("mtime_ns") == st.st_mtime_ns


def remove_file(f: RemoteFile, local_dir: Path) -> None:
    """Delete `f` (and any `.part` of it) from `local_dir` and forget it in the state file."""
    local_path(f, local_dir).unlink(missing_ok=True)
    part_path(f, local_dir).unlink(missing_ok=True)

    def fn(s):
        s["files"].pop(f.path, None)
        s["partial"].pop(f.path, None)
    _update_state(local_dir, fn)


def bytes_on_disk(f: RemoteFile, local_dir: Path, state: dict | None = None) -> int:
    """Bytes of `f` that need not be fetched again: all of it if verified, else the usable part of `.part`."""
    state = load_state(local_dir) if state is None else state
    if is_verified(f, local_dir, state):
        return f.size
    try:
        dest = local_path(f, local_dir).stat()
        if dest.st_size == f.size:  # present but not (yet) verified by amed: verified, not re-fetched, on the run
            return f.size
    except OSError:
        pass
    try:
        have = part_path(f, local_dir).stat().st_size
    except OSError:
        return 0
    return have if have <= f.size and state["partial"].get(f.path) == f.checksum else 0


def bytes_needed(plan: Plan, local_dir: Path) -> int:
    state = load_state(local_dir)
    return sum(f.size - bytes_on_disk(f, local_dir, state) for f in plan.files)


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk_space(needed: int, local_dir: Path, what: str = "the download") -> None:
    free = free_bytes(local_dir)
    if needed + DISK_HEADROOM > free:
        raise AmedError(
            f"not enough disk space in {local_dir}: {what} needs {fmt_bytes(needed)} more (plus "
            f"{fmt_bytes(DISK_HEADROOM)} headroom) but only {fmt_bytes(free)} is free; free up space, point "
            f"--local-dir at a bigger disk, or fetch fewer files with --include/--exclude")


def offline_snapshot(repo_id: str, local_dir: Path, include=None, exclude=None) -> Path | None:
    """With no hub: `local_dir` if an earlier run of amed fully downloaded and verified `repo_id` there."""
    state = load_state(local_dir)
    if state.get("repo_id") != repo_id or not state.get("plan"):
        return None
    files = [RemoteFile(**d) for d in state["plan"]]
    wanted = set(select([f.path for f in files], include, exclude))
    chosen = [f for f in files if f.path in wanted]
    if chosen and all(is_verified(f, local_dir, state) for f in chosen):
        return Path(local_dir)
    return None


# ---------------------------------------------------------------------------------------------
# one file: ranged resume, retries, verification
# ---------------------------------------------------------------------------------------------
class ChecksumMismatch(AmedError):
    """A downloaded file did not match the hub's checksum; it was deleted."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


class Cancelled(Exception):
    """Raised inside download_file when the `cancel` event is set (the .part file is kept for resuming)."""


def download_file(f: RemoteFile, local_dir: Path, *, token: str | bool | None = None,
                  progress: ProgressFn | None = None, note: Callable[[str], None] | None = None,
                  retries: int = 8, backoff: float = 1.0, max_backoff: float = 30.0,
                  cancel: threading.Event | None = None) -> Path:
    """Make `local_dir/f.path` a verified copy of `f` and return its path.

    Skips a file amed already verified; verifies (hashes) a same-size file it has no record of; otherwise
    resumes `<file>.part` from its current size with `Range: bytes=N-`, retrying transient errors (connection
    drop, timeout, 408/429/5xx) up to `retries` times in a row with exponential backoff (any progress resets the
    count). On a checksum mismatch the file is deleted and ChecksumMismatch is raised. Progress counts bytes
    fetched over the network only (bytes already on disk are the caller's `initial`, see bytes_on_disk)."""
    local_dir = Path(local_dir)
    note = note or _stderr_note
    progress = progress or (lambda n: None)
    dest, part = local_path(f, local_dir), part_path(f, local_dir)
    state = load_state(local_dir)
    if is_verified(f, local_dir, state):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    # A complete-looking file amed has no record of (earlier `hf download`, older revision, edited): hash it.
    if dest.exists() and dest.stat().st_size == f.size:
        if f.size >= SLOW_HASH:
            note(f"verifying {f.path} ({fmt_bytes(f.size)}), already on disk")
        if f.checksum is None or _checksum(f, _hash_file(dest, f)) == f.checksum:
            _record_verified(f, local_dir)
            return dest
        note(f"{f.path} on disk does not match the hub's checksum; downloading it again")

    # A .part is only resumed if it was started for this exact file version.
    have = part.stat().st_size if part.exists() else 0
    if have and (have > f.size or state["partial"].get(f.path) != f.checksum):
        part.unlink()
        have = 0
    if is_offline():
        raise AmedError(f"cannot download {f.path}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    _update_state(local_dir, lambda s: s["partial"].__setitem__(f.path, f.checksum))
    hasher = _new_hasher(f)
    if have:
        if have >= SLOW_HASH:
            note(f"resuming {f.path} at {fmt_bytes(have)} (hashing what is on disk first)")
        _hash_into(part, hasher, have)

    hasher = _fetch(f, part, have, hasher, token, progress, retries, backoff, max_backoff, cancel)

    got = _checksum(f, hasher)
    if f.checksum is not None and got != f.checksum:
        part.unlink(missing_ok=True)
        _update_state(local_dir, lambda s: s["partial"].pop(f.path, None))
        kind, want = f.checksum.split(":")
        raise ChecksumMismatch(f"{f.path} failed its {kind.upper()} check (expected {want[:16]}…, got "
                               f"{got.split(':')[1][:16]}…) and was deleted; re-run the download to fetch it again",
                               f.path)
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    _record_verified(f, local_dir)
    return dest


def _fetch(f: RemoteFile, part: Path, have: int, hasher, token, progress: ProgressFn, retries: int,
           backoff: float, max_backoff: float, cancel: threading.Event | None):
    """Stream f.url into `part` from byte `have` until f.size bytes are there; returns the updated hasher."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    from huggingface_hub import constants

    http = _http_module()
    transient = (http.TransportError, _Transient)
    failures, wait = 0, backoff
    mode = "r+b" if part.exists() else "wb"
    with open(part, mode) as out:
        out.truncate(have)
        out.seek(have)
        while have < f.size:
            headers = build_hf_headers(token=token, library_name="amed", library_version=_version())
            headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file itself
            if have:
                headers["Range"] = f"bytes={have}-"
            start = have
            try:
                with _hub_errors(f.repo_id, None, f.url.split("/" + f.repo_id + "/")[0], token, f.path,
                                 transient=transient):
                    with get_session().stream("GET", f.url, headers=headers,
                                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                        if r.status_code in (408, 429) or r.status_code >= 500:
                            raise _Transient(f"HTTP {r.status_code}")
                        hf_raise_for_status(r)
                        if have and r.status_code != 206:  # the server ignored the Range: start over
                            out.seek(0)
                            out.truncate()
                            hasher = _new_hasher(f)
                            progress(-have)
                            have = start = 0
                        elif have and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                            raise AmedError(f"the server sent the wrong byte range for {f.path} "
                                            f"({r.headers.get('Content-Range')!r} for bytes={have}-)")
                        for chunk in r.iter_bytes():  # as received: a drop loses nothing already read
                            if cancel is not None and cancel.is_set():
                                raise Cancelled(f.path)
                            chunk = chunk[: f.size - have]
                            out.write(chunk)
                            hasher.update(chunk)
                            have += len(chunk)
                            progress(len(chunk))
                if have < f.size:
                    raise _Transient(f"connection closed after {have} of {f.size} bytes")
            except transient as e:
                if have > start:
                    failures, wait = 0, backoff
                failures += 1
                if failures > retries:
                    out.flush()
                    raise AmedError(f"downloading {f.path} failed after {retries} retries ({_describe(e)}); "
                                    f"{have} of {f.size} bytes are kept in {part.name}: re-run to resume") from e
                if cancel is not None and cancel.wait(wait):
                    raise Cancelled(f.path)
                elif cancel is None:
                    time.sleep(wait)
                wait = min(max_backoff, wait * 2)
        out.flush()
        os.fsync(out.fileno())
    return hasher


class _Transient(Exception):
    pass


def _http_module():
    """The HTTP library huggingface_hub's session is built on (httpx in 1.x, its fork httpx2 in 2.x)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    if not hasattr(session, "stream"):  # huggingface_hub < 1.0 is built on requests
        import huggingface_hub

        raise AmedError(f"amed download needs huggingface_hub 1.0 or newer (found {huggingface_hub.__version__}); "
                        f"run `pip install -U huggingface_hub`")
    return sys.modules[type(session).__module__.split(".")[0]]


def _new_hasher(f: RemoteFile):
    if f.sha256 or not f.git_oid:
        return hashlib.sha256()
    h = hashlib.sha1()
    h.update(b"blob %d\0" % f.size)  # git blob id = sha1("blob <size>\0" + content)
    return h


def _checksum(f: RemoteFile, hasher) -> str:
    return ("git-sha1:" if hasher.name == "sha1" else "sha256:") + hasher.hexdigest()


def _hash_into(path: Path, hasher, n: int | None = None) -> None:
    with open(path, "rb") as fh:
        left = n if n is not None else os.fstat(fh.fileno()).st_size
        while left > 0 and (buf := fh.read(min(8 * CHUNK, left))):
            hasher.update(buf)
            left -= len(buf)


def _hash_file(path: Path, f: RemoteFile):
    h = _new_hasher(f)
    _hash_into(path, h)
    return h


def _record_verified(f: RemoteFile, local_dir: Path) -> None:
    st = local_path(f, local_dir).stat()

    def fn(s):
        s["files"][f.path] = {"size": f.size, "checksum": f.checksum, "mtime_ns": st.st_mtime_ns}
        s["partial"].pop(f.path, None)
    _update_state(local_dir, fn)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_repo_path(path: str, repo_id: str) -> None:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or not p.parts:
        raise AmedError(f"refusing to write {path!r} from {repo_id}: the path leaves the download directory")


# ---------------------------------------------------------------------------------------------
# the whole plan: parallel files, one progress display
# ---------------------------------------------------------------------------------------------
def download(plan: Plan, local_dir: Path, *, token: str | bool | None = None, max_workers: int = 4,
             progress: "DownloadHooks | None" = None, retries: int = 8, backoff: float = 1.0) -> Path:
    """Fetch every file of `plan` into `local_dir` (resuming, verifying, skipping verified files).
    Files that fail their checksum are deleted, the others still finish, then one AmedError names them."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or DownloadHooks()
    cancel = threading.Event()
    bad: list[ChecksumMismatch] = []

    def one(f: RemoteFile):
        with progress.file(f, bytes_on_disk(f, local_dir)) as advance:
            try:
                download_file(f, local_dir, token=token, progress=advance, note=progress.note, retries=retries,
                              backoff=backoff, cancel=cancel)
            except ChecksumMismatch as e:
                bad.append(e)

    with dir_lock(local_dir), progress:
        record_plan(plan, local_dir)
        state = load_state(local_dir)
        todo = [f for f in plan.files if not is_verified(f, local_dir, state)]
        progress.start(plan.total_bytes, sum(bytes_on_disk(f, local_dir, state) for f in plan.files))
        if max_workers <= 1:
            for f in todo:
                one(f)
        else:
            pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="amed-download")
            futures = [pool.submit(one, f) for f in todo]
            try:
                while True:  # short waits keep the main thread responsive to Ctrl-C
                    done, pending = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)
                    if not pending or any(d.exception() for d in done):
                        break
            except BaseException:
                cancel.set()
                raise
            finally:
                if any(fu.done() and fu.exception() for fu in futures):
                    cancel.set()
                pool.shutdown(wait=True, cancel_futures=True)
            for fu in futures:
                if fu.done() and not fu.cancelled() and (e := fu.exception()) and not isinstance(e, Cancelled):
                    raise e
    if len(bad) == 1:
        raise bad[0]
    if bad:
        raise ChecksumMismatch(f"{len(bad)} files did not match the hub's checksum and were deleted "
                               f"({', '.join(e.path for e in bad)}); re-run the download to fetch them again")
    return local_dir


@contextlib.contextmanager
def dir_lock(local_dir: Path, lock_name: str | None = None, *, remove: bool = False,
             advice: str = "wait for it to finish or pick another --local-dir") -> Iterator[None]:
    """One writer per directory: an advisory lock (fcntl.flock) on a file inside it that holds the
    writer's pid. A second amed process that wants the same directory is refused with one sentence
    naming that pid. `lock_name` is the lock file's path relative to the directory (default
    .amed/lock, the download state folder); `remove` deletes it again on release (a store keeps no
    lock file once written). The lock goes with the process: kill -9 releases it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    lock = Path(local_dir) / (lock_name or f"{STATE_DIR}/lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 64).decode(errors="replace").strip()
            except OSError:
                pid = ""
            os.close(fd)
            who = f"another amed process (pid {pid})" if pid.isdigit() else "another amed process"
            raise AmedError(f"{who} is already writing to {local_dir}; {advice}.") from None
        try:                      # the holder before us may have removed the file: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if remove:
            try:
                os.unlink(lock)
            except OSError:
                pass
        os.close(fd)


def lock_holder(local_dir: Path, lock_name: str | None = None) -> int | None:
    """The pid written in a directory's lock file while a process holds it, else None."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    lock = Path(local_dir) / (lock_name or f"{STATE_DIR}/lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None                # nobody holds it
    except OSError:
        text = os.read(fd, 64).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def check_download_target(local_dir: Path, force: bool) -> None:
    """`amed download` writes into a folder it made (one holding its .amed/download.json), an empty
    or new one, or, with --force, a folder the user chose knowing same-named files get replaced."""
    local_dir = Path(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise AmedError(f"{local_dir} exists and is not a directory; choose another --local-dir.")
    if not local_dir.is_dir() or force or _state_path(local_dir).is_file():
        return
    if any(p.name != STATE_DIR for p in local_dir.iterdir()):
        raise AmedError(f"{local_dir} is not empty and was not made by `amed download`: files with the same "
                        f"names as the repository's would be replaced; choose an empty --local-dir, or pass "
                        f"--force to write into it anyway.")


class DownloadHooks:
    """What `download` reports to a display (this base does nothing but print notes on stderr;
    the Rich bars of the command line are app/progress.DownloadBars)."""

    def start(self, total: int, done: int) -> None: ...
    def note(self, msg: str) -> None: _stderr_note(msg)
    def __enter__(self): return self
    def __exit__(self, *exc): return False

    @contextlib.contextmanager
    def file(self, f: RemoteFile, have: int = 0):
        yield lambda n: None


# ---------------------------------------------------------------------------------------------
# errors: one sentence each
# ---------------------------------------------------------------------------------------------
class HubUnreachable(AmedError):
    """No network answer from the hub (offline mode, DNS, refused, timeout): a complete local copy may do."""


@contextlib.contextmanager
def _hub_errors(repo_id, revision, endpoint, token, path=None, transient=()) -> Iterator[None]:
    """Turn huggingface_hub / HTTP exceptions into AmedError sentences; `transient` ones pass through."""
    from huggingface_hub import errors as E

    http = _http_module()
    try:
        yield
    except transient:
        raise
    except E.OfflineModeIsEnabled:
        raise HubUnreachable("offline mode is on (HF_HUB_OFFLINE); unset it to download") from None
    except E.GatedRepoError as e:
        repo = repo_id or _repo_of(e)
        if token or _have_token(token):
            msg = f"{repo} is gated and your token has no access yet: accept its terms at {_repo_page(e, repo)}"
        else:
            msg = (f"{repo} is gated: accept its terms at {_repo_page(e, repo)}, then pass --token "
                   f"(or set HF_TOKEN, or run `hf auth login`)")
        raise AmedError(msg) from None
    except E.RepositoryNotFoundError as e:
        repo = repo_id or _repo_of(e)
        raise AmedError(f"repository {repo} was not found on {endpoint or 'the hub'} (check the name; if it is "
                        f"private, pass --token)") from None
    except E.RevisionNotFoundError:
        raise AmedError(f"revision {revision!r} was not found in {repo_id}") from None
    except E.RemoteEntryNotFoundError:
        raise AmedError(f"the hub has no file {path} at this revision (the repository changed during the "
                        f"download?); re-run to list it again") from None
    except E.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status == 401:
            raise AmedError("the hub rejected the token (HTTP 401); check --token or HF_TOKEN") from None
        if status == 404:
            raise AmedError(f"{repo_id or path} was not found on {endpoint or 'the hub'} (HTTP 404)") from None
        raise AmedError(f"the hub answered HTTP {status} for {path or repo_id}; try again later") from None
    except http.TransportError as e:
        raise HubUnreachable(f"cannot reach the hub at {endpoint or 'its endpoint'} ({_describe(e)}); check the "
                        f"network, proxy or HF_ENDPOINT, then re-run (downloads resume)") from None


def _describe(e: BaseException) -> str:
    text = str(e).split("\n")[0].strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _repo_of(e) -> str:
    return getattr(e, "repo_id", None) or "the repository"


def _repo_page(e, repo: str) -> str:
    url = str(e.response.request.url) if getattr(e, "response", None) is not None else ""
    base = url.split("/" + repo + "/")[0] if repo in url else "https://huggingface.co"
    return f"{base}/{repo}"


def _have_token(token) -> bool:
    if token is False:
        return False
    from huggingface_hub import get_token

    return get_token() is not None


def _stderr_note(msg: str) -> None:
    print(msg, file=sys.stderr)


@functools.lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("amed")
    except Exception:
        return "0"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------------------------
# ModelScope (optional extra)
# ---------------------------------------------------------------------------------------------
def download_modelscope(repo_id: str, local_dir: Path, *, revision: str | None = None, include=None, exclude=None,
                        token: str | None = None, max_workers: int = 4) -> Path:
    """Download through the `modelscope` client (`pip install 'amed[modelscope]'`); it does its own resume."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise AmedError("ModelScope support is not installed: run `pip install 'amed[modelscope]'` "
                        "(or use the default --source hf)") from None
    allow = list(include) if include else list(DEFAULT_INCLUDE)
    ignore = list(NEVER_FETCH) + list(exclude or ())
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    try:
        out = snapshot_download(model_id=repo_id, revision=revision, local_dir=str(local_dir),
                                allow_patterns=allow, ignore_patterns=ignore, max_workers=max_workers, token=token)
    except (OSError, ValueError, RuntimeError) as e:
        raise AmedError(f"ModelScope download of {repo_id} failed ({_describe(e)})") from None
    return Path(out or local_dir)
