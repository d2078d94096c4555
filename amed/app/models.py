"""`amed list`, `amed show`, `amed rm`: the models on this computer (stores and downloaded
checkpoints under $AMED_HOME, ollama-style), what one of them is, and removing one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from amed.errors import AmedError
from amed.formats.store import MANIFEST, read_manifest
from amed.hub import STATE_DIR, amed_home, fmt_bytes, load_state

KINDS = ("stores", "models", "bench", "demo")   # $AMED_HOME subfolders amed writes models into (demo: `make demo`)


@dataclass
class Entry:
    name: str
    path: Path
    kind: str            # store | checkpoint
    size: int
    quant: str           # q4/g64 (dense q8), bf16, ...
    status: str          # complete | incomplete (resume: ...) | damaged ...


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(path: Path) -> Entry | None:
    """What `path` holds: an amed store, a Hugging Face checkpoint, a GGUF file, or neither (None)."""
    if path.is_file():
        from amed.formats.gguf import is_gguf

        if not is_gguf(path):
            return None
        return Entry(path.name, path, "gguf", path.stat().st_size, "gguf", "complete")
    if (path / MANIFEST).is_file():
        try:
            man = read_manifest(path)
        except AmedError:
            return Entry(path.name, path, "store", dir_size(path), "?", "damaged (manifest unreadable)")
        q = man.get("quantization", {})
        quant = f"q{q.get('bits')}/g{q.get('group_size')} dense {q.get('dense')}" if q else "?"
        files = man.get("files", {})
        missing = [f for f, m in files.items()
                   if not (path / f).is_file() or (path / f).stat().st_size != m["bytes"]]
        status = ("incomplete (re-run the quantize command to finish)" if not man.get("complete")
                  else f"damaged ({len(missing)} file(s) missing)" if missing else "complete")
        return Entry(path.name, path, "store", dir_size(path), quant, status)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        status = "complete"
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
                have = [s for s in shards if (path / s).is_file()]
                if len(have) < len(shards):
                    status = f"incomplete ({len(have)} of {len(shards)} shards; re-run `amed download`)"
            except (OSError, ValueError, KeyError, AttributeError):
                status = "damaged (index unreadable)"
        return Entry(path.name, path, "checkpoint", dir_size(path), "bf16", status)
    return None


def list_models(home: Path | None = None) -> list[Entry]:
    """Every store and checkpoint under $AMED_HOME/{stores,models,bench}, by name."""
    home = home or amed_home()
    out = []
    for kind in KINDS:
        folder = home / kind
        for d in sorted(folder.iterdir()) if folder.is_dir() else ():
            if d.is_dir() and not d.name.startswith(".") and (e := describe(d)) is not None:
                out.append(e)
    return out


def is_name(arg: str) -> bool:
    """A name from `amed list` has no path separator, is not `.`/`..` and does not start with `~`:
    anything else is a path, taken as it is."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return bool(arg) and not any(c in arg for c in seps) and arg not in (".", "..") and not arg.startswith("~")


def find_name(name: str, home: Path | None = None) -> Path | None:
    """The folder of a listed model called `name` under $AMED_HOME/{stores,models,bench,demo}."""
    if not is_name(name):
        return None
    home = home or amed_home()
    for kind in KINDS:
        cand = home / kind / name
        if cand.is_dir():                    # (a name has no separator: it cannot leave home/kind)
            return cand
    return None


def resolve(name_or_path: str) -> Path:
    """The one resolver for a model argument (chat/serve/bench -m, verify, perplexity, show, rm,
    $AMED_MODEL), in this order:
      1. a path (it has a separator, or starts with `~` or `.`): that path, which must exist;
      2. a bare word that is a directory here: that directory;
      3. a name from `amed list` (a folder under $AMED_HOME/stores, models, bench or demo).
    A name never reaches outside those folders (no separators, no `..`).
    Later kinds of model reference (a `.gguf` file, `ollama:NAME`) are dispatched here, first."""
    arg = str(name_or_path)
    if not arg:
        raise AmedError("the model argument is empty; pass a store directory or a name from `amed list`.")
    # ---- other references: `ollama:NAME[:TAG]` (its GGUF blob), a `.gguf` file
    if arg.startswith("ollama:"):
        from amed.formats.gguf import resolve_ollama

        return resolve_ollama(arg)
    if arg.lower().endswith(".gguf"):
        p = Path(arg).expanduser()
        if not p.exists():
            raise AmedError(f"{arg} does not exist.")
        if not p.is_file():
            raise AmedError(f"{arg} is not a file; a .gguf model is one file.")
        return p
    p = Path(arg).expanduser()
    if not is_name(arg):
        if not p.exists():
            raise AmedError(f"{arg} does not exist.")
        return p
    if p.is_dir():
        return p
    if (found := find_name(arg)) is not None:
        return found
    if p.exists():
        return p                                     # a file here: the caller says what is wrong with it
    raise AmedError(f"no model {arg!r}: not a directory here, nor a name from `amed list` (under {amed_home()}).")


def resolve_model(arg: str | os.PathLike | None, default: Path | None = None) -> Path:
    """A command's model: `arg` (-m), else $AMED_MODEL, else `default` (the default store) if it
    holds a store; each through `resolve`. One sentence naming the fix when there is none."""
    if arg is not None and str(arg) != "":
        return resolve(str(arg))
    if arg is not None:
        raise AmedError("-m/--model is empty; pass a store directory or a name from `amed list`.")
    env = os.environ.get("AMED_MODEL")
    if env:
        try:
            return resolve(env)
        except AmedError as e:
            raise AmedError(f"AMED_MODEL={env}: {e}") from None
    if default is not None and (default / MANIFEST).exists():
        return default
    raise AmedError(f"no model given and none at the default location {default}. Pass -m DIR or a name from "
                    f"`amed list`, set AMED_MODEL, or create it with: amed download && amed quantize "
                    f"<download dir> -o {default} --bits 4")


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Plain text columns, padded to the widest cell: nothing truncated or wrapped (pipe-safe)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def entry_record(e: Entry) -> dict:
    return {"name": e.name, "kind": e.kind, "path": str(e.path), "size": e.size, "quant": e.quant, "status": e.status}


def show(path: Path) -> list[tuple[str, str]]:
    """(field, value) lines describing a store or checkpoint: config, quantization, sizes, source."""
    e = describe(path)
    if e is None:
        raise AmedError(f"{path} is neither an amed store nor a Hugging Face checkpoint.")
    lines = [("path", str(path)), ("kind", e.kind), ("status", e.status), ("size on disk", fmt_bytes(e.size))]
    if e.kind == "gguf":
        from amed.formats.gguf import describe_gguf

        more, cfg = describe_gguf(path)
        lines += more
    elif e.kind == "store":
        try:
            man = read_manifest(path)
        except AmedError as err:
            return lines + [("manifest", str(err))]
        cfg = man.get("config", {})
        q = man.get("quantization", {})
        src = man.get("source", {})
        expert_bytes = sum(x["stride"] * x["count"] for x in man.get("experts", {}).values())
        lines += [("format", f"amed store version {man.get('version')}"),
                  ("quantization", ", ".join(f"{k} {q[k]}" for k in ("bits", "group_size", "dense", "head", "layout")
                                             if k in q)),
                  ("routed experts", f"{fmt_bytes(expert_bytes)} (read on demand)"),
                  ("other weights", fmt_bytes(sum(m["bytes"] for m in man.get("files", {}).values()) - expert_bytes)),
                  ("source", f"{src.get('repo_id')}@{src.get('revision')}" if src.get("revision")
                   else f"local checkpoint (config sha256 {str(src.get('config_sha256'))[:12]})")]
    else:
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        state = load_state(path)
        if state.get("commit"):
            lines.append(("source", f"{state.get('repo_id')}@{state['commit']}"))
    lines += [(k, str(cfg[k])) for k in ("architectures", "num_hidden_layers", "hidden_size", "num_experts",
                                         "num_experts_per_tok", "vocab_size", "max_position_embeddings")
              if k in cfg]
    if isinstance(cfg.get("rope_scaling"), dict) and cfg["rope_scaling"]:      # YaRN: the longer context
        lines.append(("rope_scaling", json.dumps(cfg["rope_scaling"], sort_keys=True)))
    return lines


def amed_files(path: Path) -> tuple[str, list[str]]:
    """(what, relative file names) that amed wrote into `path`, as its own records say: a store's
    manifest, the download record, or synth's marker. Refuses (one sentence) where a record is
    missing or unreadable: then nothing is known to be amed's."""
    from amed.quant.convert import LOCK, owned_files

    if path.is_file():
        raise AmedError(f"{path} is a GGUF file amed did not write; nothing removed (remove it yourself if you "
                        f"mean to).")
    if (path / MANIFEST).exists():
        try:
            man = read_manifest(path)
        except AmedError:
            man = None
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict) or man.get("format") != "amed-store":
            raise AmedError(f"{path}/{MANIFEST} cannot be read as an amed manifest, so what amed wrote there is "
                            f"unknown; nothing removed (delete the folder yourself if you mean to).")
        return "store", sorted(owned_files(man) | {LOCK})
    from amed.app.synth import SYNTH_MARK, synth_files

    if (path / SYNTH_MARK).exists():
        files = synth_files(path)
        if files is None:
            raise AmedError(f"{path}/{SYNTH_MARK} is unreadable, so what amed synth wrote there is unknown; "
                            f"nothing removed.")
        return "synth", files + [SYNTH_MARK]
    state_file = path / STATE_DIR / "download.json"
    if state_file.exists():
        try:
            state = json.loads(state_file.read_text())
            names = [f["path"] for f in state.get("plan", [])] + list(state.get("files", {}))
            names += list(state.get("partial", {}))
            if not all(isinstance(n, str) for n in names):
                raise TypeError
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise AmedError(f"{state_file} is unreadable, so what `amed download` wrote there is unknown; "
                            f"nothing removed.") from None
        from amed.hub import PART_SUFFIX

        names = sorted(set(names) | {n + PART_SUFFIX for n in names})
        return "download", names + [f"{STATE_DIR}/download.json", f"{STATE_DIR}/download.json.tmp",
                                    f"{STATE_DIR}/lock"]
    raise AmedError(f"{path} is a checkpoint amed did not download or write; nothing removed (remove it yourself "
                    f"if you mean to).")


def _inside(path: Path, rel: str) -> Path | None:
    """path/rel if rel is a plain relative name that stays inside path, else None."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in parts) or "\\" in rel:
        return None
    return path.joinpath(*parts)


def remove(path: Path) -> int:
    """Delete exactly the files amed's own record lists (a store's manifest, the download record,
    synth's marker), then the folders they leave empty, then `path` if empty. Other files stay.
    Returns the bytes freed."""
    from amed.hub import lock_holder
    from amed.quant.convert import LOCK

    path = Path(path)
    if describe(path) is None and not (path / MANIFEST).exists():
        raise AmedError(f"{path} is neither an amed store nor a Hugging Face checkpoint; nothing removed.")
    what, names = amed_files(path)
    for lock in (LOCK, f"{STATE_DIR}/lock"):
        if (pid := lock_holder(path, lock)) is not None:
            raise AmedError(f"amed process {pid if pid > 0 else '(unknown pid)'} is writing to {path}; "
                            f"nothing removed (stop it first).")
    freed = 0
    dirs = set()
    last = MANIFEST if what == "store" else None            # the record goes last: an interrupted rm can rerun
    for rel in sorted(names, key=lambda n: n == last):
        f = _inside(path, rel)
        if f is None:
            continue
        try:
            st = f.lstat()
        except OSError:
            continue
        import stat

        if not stat.S_ISREG(st.st_mode):                   # never follow a link or touch a folder or device
            continue
        f.unlink()
        freed += st.st_size
        dirs.update(p for p in f.parents if path in p.parents)
    for d in sorted(dirs, key=lambda p: -len(p.parts)):     # the folders those files leave empty
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass                     # other files remain: leave them
    return freed
