"""`amed download --quantize`: fetch a checkpoint shard by shard straight into an amed store.

    download config.json + index -> validate -> plan the store -> for each shard:
        download it (the next one downloads meanwhile) -> validate its header -> convert its tensors
        into the store's `.partial` files -> fsync them -> record the tensors in the manifest ->
        finish every store file that is now whole -> delete the shard

so the disk holds the store plus about two shards, never the whole checkpoint. The store is the
one `amed quantize` writes for the same source and settings, byte for byte (same planner, same
converter, same manifest): only the order of writing differs.

Crash safety. HF shards cut across layers, so a store file can get tensors from several shards and
its `.partial` stays open across them. Progress is durable at tensor granularity: after a shard is
converted, the partial files it touched are fsynced, and only then does the manifest (written
atomically) list its tensors under `"stream": {"written": {file: [tensor, ...]}}`; the shard is
deleted after that. A file is finished (fsync, hash, rename, recorded in `files`) once all its
tensors are written. Rerunning the same command reopens the recorded `.partial` files without
truncating them, skips recorded tensors, re-downloads only shards that still hold unconverted
tensors, and ends with the same bytes as an uninterrupted run. The manifest says `complete` only
at the very end (and then drops the `stream` key), so an interrupted store never opens.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from amed import hub
from amed.quant import prequant
from amed.formats.checkpoint import DTYPES, ShardedCheckpoint, TensorSpec, read_index, tensor_table
from amed.config import ModelConfig
from amed.formats.container import ContainerWriter, sha256_file, write_json_atomic
from amed.errors import AmedError
from amed.quant.convert import (Settings, check_apart, convert_tensor, manifest_skeleton, plan_store,
                                prepare_output, side_file_entries, source_fingerprint, store_lock, summarize)
from amed.formats.store import COPIED_FILES, MANIFEST

INDEX = "model.safetensors.index.json"
STREAM_KEY = "stream"
SLACK = 64 << 20  # beyond the store and the shards in flight (manifest, small files, file-system overhead)


class StreamProgress:
    """Hooks for a caller's display (this base does nothing). `downloaded` is called from the
    download thread; the others from the calling thread."""

    def start(self, download_total: int, download_done: int, convert_total: int, convert_done: int,
              tensors_done: int) -> None: ...
    def downloaded(self, nbytes: int) -> None: ...           # byte delta (negative if a file restarts)
    def converted(self, done: int, tensors: int) -> None: ...  # source bytes and tensors converted so far
    def shard(self, name: str, event: str) -> None: ...      # "downloaded" | "converted" | "deleted"
    def note(self, msg: str) -> None:
        print(msg, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def default_download_dir(dst: Path) -> Path:
    """Scratch space next to the store (same file system): `<parent>/.<store name>.download`."""
    dst = Path(dst).expanduser()
    return dst.parent / f".{dst.name}.download"


def download_quantize(plan: hub.Plan, dst, settings: Settings = Settings(), *, local_dir=None,
                      token: str | bool | None = None, force: bool = False,
                      progress: StreamProgress | None = None, overlap: bool = True, retries: int = 8,
                      backoff: float = 1.0) -> dict:
    """Download the checkpoint listed in `plan` (from hub.list_files) into store `dst`, one shard at
    a time, deleting each shard once converted. `local_dir` holds the shards in flight (default:
    default_download_dir(dst)); it is emptied and removed at the end. `overlap` downloads the next
    shard while the current one is converted. Returns the summary of quantize.summarize."""
    t0 = time.perf_counter()
    dst = Path(dst).expanduser()
    dl = Path(local_dir).expanduser() if local_dir else default_download_dir(dst)
    progress = progress or StreamProgress()
    import dataclasses

    dataclasses.replace(settings, group_size=settings.group_size or 64).validate()   # None: resolved in _run
    remote = {f.path: f for f in plan.files}
    for name in ("config.json", INDEX):
        if name not in remote:
            raise AmedError(f"{plan.repo_id}@{plan.revision} has no {name}: amed can only stream a sharded "
                            f"safetensors checkpoint; use `amed download` then `amed quantize`.")
    check_apart(dl, dst, what="the download folder", flag="-o and --local-dir")
    check_scratch(dl, explicit=local_dir is not None)
    created = not dl.exists()
    dl.mkdir(parents=True, exist_ok=True)
    try:
        with store_lock(dst), hub.dir_lock(dl):
            (dl / hub.STATE_DIR / SCRATCH_MARK).write_text(str(dst.resolve()) + "\n")
            return _run(plan, remote, dst, dl, settings, token, force, progress, overlap, retries, backoff, t0)
    except AmedError:
        if created and not any(p.suffix == ".safetensors" or p.name.endswith(".part") for p in dl.iterdir()):
            shutil.rmtree(dl, ignore_errors=True)   # refused before any shard came: leave no litter
        raise


SCRATCH_MARK = "stream-scratch"   # in <local dir>/.amed: this folder holds shards in flight, deleted when converted


def check_scratch(dl: Path, explicit: bool) -> None:
    """`download --quantize` deletes every shard once converted, so its --local-dir must be a folder
    for shards in flight: new, empty, or one an earlier run of it used. Never a checkpoint."""
    if not dl.exists():
        return
    if not dl.is_dir():
        raise AmedError(f"{dl} exists and is not a directory; choose another --local-dir.")
    if (dl / hub.STATE_DIR / SCRATCH_MARK).is_file() or not explicit:
        return                   # ours (the default scratch folder is always named by amed)
    if (dl / "config.json").is_file() and any(dl.glob("*.safetensors")):
        raise AmedError(f"{dl} holds a checkpoint, and `download --quantize` deletes each shard it converts; "
                        f"quantize it with `amed quantize {dl} -o STORE`, or choose an empty --local-dir.")
    if any(p.name != hub.STATE_DIR for p in dl.iterdir()):
        raise AmedError(f"{dl} is not empty and is not a folder `download --quantize` made: its shards are "
                        f"deleted once converted, so it only writes into an empty or new --local-dir.")


def _run(plan, remote, dst, dl, settings, token, force, progress, overlap, retries, backoff, t0) -> dict:
    fetch_kw = dict(token=token, note=progress.note, retries=retries, backoff=backoff)

    # ---- the small files, then everything that can be checked before a shard is fetched
    hub.record_plan(plan, dl)                     # also what source_fingerprint reads (repo, commit)
    small = [n for n in dict.fromkeys(("config.json", INDEX) + COPIED_FILES) if n in remote]
    for name in small:
        hub.download_file(remote[name], dl, **fetch_kw)
    cfg = ModelConfig.from_file(dl)
    scheme = prequant.read_config_scheme(dl)     # a pre-quantized checkpoint (INT4, FP8): quant/prequant.py
    settings = prequant.resolve_group(settings, scheme)
    settings.validate()
    if scheme is None:
        weight_map = read_index(dl / INDEX, cfg)
        needs = {s.hf: {weight_map[s.hf]} for s in tensor_table(cfg)}
    else:
        from amed.formats.checkpoint import _weight_map

        weight_map = _weight_map(dl / INDEX)
        needs = prequant.index_needs(weight_map, cfg, scheme)
    table = tensor_table(cfg)
    # a tensor converts once the last shard holding a part of it is here (a pre-quantized weight's
    # packed levels and scales may sit in two shards; a shard stays until nothing pending needs it)
    by_shard: dict[str, list[TensorSpec]] = {sh: [] for sh in set().union(*needs.values())}
    for s in table:
        by_shard[max(needs[s.hf])].append(s)
    by_shard = dict(sorted(by_shard.items()))
    for shard in by_shard:
        if shard not in remote:
            raise AmedError(f"{INDEX} lists shard {shard}, but {plan.repo_id}@{plan.commit[:12]} has no such file.")

    plans = plan_store(cfg, settings)
    man = manifest_skeleton(cfg, settings, plans, source_fingerprint(dl))
    old = prepare_output(dst, man, force)
    fplan = {fp.name: fp for fp in plans}
    file_of = {s.name: fp.name for fp in plans for s in fp.specs}

    # ---- what an interrupted run of this job left: recorded tensors in intact .partial files
    written: dict[str, set[str]] = {}
    for fname, names in ((old or {}).get(STREAM_KEY) or {}).get("written", {}).items():
        fp = fplan.get(fname)
        if fp is None or fname in man["files"]:
            continue
        names = set(names) & {s.name for s in fp.specs}
        part, final = dst / (fname + ".partial"), dst / fname
        if part.exists() and part.stat().st_size == fp.size:
            written[fname] = names
        elif len(names) == len(fp.specs) and final.exists() and final.stat().st_size == fp.size:
            written[fname] = names                # renamed into place, then stopped before recording

    writers: dict[str, ContainerWriter] = {}

    def save() -> None:
        m = dict(man)
        m[STREAM_KEY] = {"written": {f: sorted(n) for f, n in written.items() if n}}
        write_json_atomic(dst / MANIFEST, m)

    def finish_whole_files(names) -> bool:
        done = [f for f in sorted(names) if f in written and len(written[f]) == len(fplan[f].specs)]
        for f in done:
            w = writers.pop(f, None)
            if w is None and (dst / (f + ".partial")).exists():
                w = ContainerWriter(dst / f, fplan[f].entries, {"format": "amed"}, resume=True)
            sha = w.finish() if w is not None else sha256_file(dst / f)
            man["files"][f] = {"bytes": fplan[f].size, "sha256": sha}
            del written[f]
        return bool(done)

    finish_whole_files(list(written))

    def pending(shard: str) -> list[TensorSpec]:
        return [s for s in by_shard[shard]
                if file_of[s.name] not in man["files"] and s.name not in written.get(file_of[s.name], ())]

    def pending_all() -> list[TensorSpec]:
        return [s for sh in by_shard for s in pending(sh)]

    todo = sorted(set().union(*(needs[s.hf] for s in pending_all())))
    for sh in sorted(set(by_shard) - set(todo)):  # converted, then stopped before it was deleted
        if hub.local_path(remote[sh], dl).exists() or hub.part_path(remote[sh], dl).exists():
            hub.remove_file(remote[sh], dl)

    # ---- disk: the rest of the store, plus the shards in flight
    def allocated(p: Path) -> int:
        try:
            return p.stat().st_blocks * 512       # .partial files are sparse
        except OSError:
            return 0

    store_need = sum(fp.size - allocated(dst / (fp.name + ".partial")) for fp in plans if fp.name not in man["files"])
    state = hub.load_state(dl)
    sizes = sorted((remote[sh].size for sh in todo), reverse=True)
    inflight = sum(sizes[:2 if overlap else 1])
    shard_need = max(0, inflight - sum(hub.bytes_on_disk(remote[sh], dl, state) for sh in todo))
    _check_disk(dst, dl, max(store_need, 0), shard_need, sizes[0] if sizes else 0, overlap)
    save()

    # ---- progress totals
    src_nbytes = {s.hf: math.prod(s.shape) * np.dtype(DTYPES[s.dtype]).itemsize for s in table}   # refined per shard
    done_specs = {s.name for s in table if file_of[s.name] in man["files"] or s.name in written.get(file_of[s.name], ())}
    total_src = sum(src_nbytes.values())
    done_src = sum(src_nbytes[s.hf] for s in table if s.name in done_specs)
    ntensors = len(done_specs)
    progress.start(sum(remote[sh].size for sh in todo), sum(hub.bytes_on_disk(remote[sh], dl, state) for sh in todo),
                   total_src, done_src, ntensors)

    # ---- the loop: download (one ahead), validate, convert, sync, record, finish files, delete
    reader = (ShardedCheckpoint(dl, cfg, weight_map) if scheme is None
              else prequant.PrequantShardedCheckpoint(dl, cfg, weight_map, scheme))
    on_disk: list[str] = []                       # added to the reader, not yet deleted
    cancel = threading.Event()

    def fetch(sh: str) -> None:
        hub.download_file(remote[sh], dl, progress=progress.downloaded, cancel=cancel, **fetch_kw)
        progress.shard(sh, "downloaded")

    workers = max(1, min(os.cpu_count() or 1, 8))
    dlpool = ThreadPoolExecutor(1, thread_name_prefix="amed-download")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="amed-quantize")
    jobs: list = []
    try:
        nxt = dlpool.submit(fetch, todo[0]) if todo else None
        for i, sh in enumerate(todo):
            _result(nxt)
            if overlap and i + 1 < len(todo):
                nxt = dlpool.submit(fetch, todo[i + 1])
            reader.add_shard(sh)                  # validates the header against the tensor table
            on_disk.append(sh)
            specs = pending(sh)
            for s in specs:
                f = file_of[s.name]
                if f not in writers:
                    writers[f] = ContainerWriter(dst / f, fplan[f].entries, {"format": "amed"}, resume=f in written)
                src_nbytes[s.hf] = reader.tensors[s.hf].nbytes
            total_src = sum(src_nbytes.values())
            jobs = [pool.submit(convert_tensor, reader, writers[file_of[s.name]], s, settings) for s in specs]
            for s, job in zip(specs, jobs):
                job.result()
                done_src += src_nbytes[s.hf]
                ntensors += 1
                progress.converted(done_src, ntensors)
            touched = {file_of[s.name] for s in specs}
            for f in touched:
                writers[f].sync()                 # the bytes are durable before the manifest says so
            for s in specs:
                written.setdefault(file_of[s.name], set()).add(s.name)
            save()
            progress.shard(sh, "converted")
            if finish_whole_files(touched):
                save()
            still = set().union(*(needs[s.hf] for s in pending_all())) if scheme is not None else set()
            for old in [x for x in on_disk if x not in still]:
                reader.drop_shard(old)
                hub.remove_file(remote[old], dl)
                on_disk.remove(old)
                progress.shard(old, "deleted")
            if not overlap and i + 1 < len(todo):
                nxt = dlpool.submit(fetch, todo[i + 1])
    except BaseException:
        cancel.set()
        for job in jobs:
            job.cancel()
        wait(jobs)
        raise
    finally:
        dlpool.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.close()                             # the .partial files stay, for the next run
        reader.close()

    missing = [fp.name for fp in plans if fp.name not in man["files"]]
    if missing:                                    # cannot happen: read_index checked the table
        raise AmedError(f"internal error: store files {', '.join(missing)} were not completed.")

    # ---- the end: exactly what quantize_model writes
    side = {name: (dl / name).read_bytes() for name in COPIED_FILES if (dl / name).exists()}
    for name, data in side.items():
        (dst / name).write_bytes(data)
    man["side_files"] = side_file_entries(side)
    man["files"] = {fp.name: man["files"][fp.name] for fp in plans}
    man["complete"] = True
    write_json_atomic(dst / MANIFEST, man)

    for name in small:
        hub.remove_file(remote[name], dl)
    shutil.rmtree(dl / hub.STATE_DIR, ignore_errors=True)
    try:
        dl.rmdir()
    except OSError:
        pass                                       # --local-dir held other files: leave them
    ckpt = SimpleNamespace(tensors={k: SimpleNamespace(nbytes=v) for k, v in src_nbytes.items()})
    summary = summarize(cfg, settings, plans, ckpt, time.perf_counter() - t0, dst)
    if scheme is not None:
        summary["prequant"] = {"source": scheme.label, **reader.stats}
    return summary


def _result(fut):
    """fut.result(), in short waits so Ctrl-C reaches the main thread promptly."""
    while True:
        done, _ = wait([fut], timeout=0.2, return_when=FIRST_EXCEPTION)
        if done:
            return fut.result()


def _device(p: Path) -> int:
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.stat().st_dev


def _check_disk(dst: Path, dl: Path, store_need: int, shard_need: int, largest: int, overlap: bool) -> None:
    fmt = hub.fmt_bytes
    what = f"{'two shards' if overlap else 'one shard'} in flight (the largest is {fmt(largest)})"
    if _device(dst) == _device(dl):
        need, free = store_need + shard_need + SLACK, hub.free_bytes(dst)
        if need > free:
            raise AmedError(f"not enough disk space in {dst.parent}: the store needs {fmt(store_need)} more and "
                            f"the download {fmt(shard_need)} for {what}, {fmt(need)} in all with some slack, "
                            f"but only {fmt(free)} is free; free some space, or choose another -o or --local-dir.")
        return
    for where, need, label in ((dst, store_need + SLACK, "the store"), (dl, shard_need + SLACK, what)):
        free = hub.free_bytes(where)
        if need > free:
            raise AmedError(f"not enough disk space in {where}: {label} needs {fmt(need)} but only {fmt(free)} "
                            f"is free; free some space, or choose another -o or --local-dir.")
