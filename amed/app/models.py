"""`amed list`, `amed show`, `amed rm`: the models on this computer (stores and downloaded
checkpoints under $AMED_HOME, ollama-style), what one of them is, and removing one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from amed.errors import AmedError
from amed.formats.store import COPIED_FILES, MANIFEST, read_manifest
from amed.hub import STATE_DIR, amed_home, fmt_bytes, load_state

KINDS = ("stores", "models", "bench")      # $AMED_HOME subfolders amed writes models into


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
    """What `path` holds: an amed store, a Hugging Face checkpoint, or neither (None)."""
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


def resolve(name_or_path: str) -> Path:
    """A path as given, else a name under $AMED_HOME/{stores,models,bench}; one sentence if neither."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    for kind in KINDS:
        if (cand := amed_home() / kind / name_or_path).is_dir():
            return cand
    raise AmedError(f"no model {name_or_path!r}: not a directory, nor a name under {amed_home()} "
                    f"(`amed list` shows them).")


def show(path: Path) -> list[tuple[str, str]]:
    """(field, value) lines describing a store or checkpoint: config, quantization, sizes, source."""
    e = describe(path)
    if e is None:
        raise AmedError(f"{path} is neither an amed store nor a Hugging Face checkpoint.")
    lines = [("path", str(path)), ("kind", e.kind), ("status", e.status), ("size on disk", fmt_bytes(e.size))]
    if e.kind == "store":
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
    return lines


def remove(path: Path) -> int:
    """Delete a store or a checkpoint amed downloaded: only the files amed writes there (other files
    and the folder, if not then empty, stay). Returns the bytes freed."""
    e = describe(path)
    if e is None:
        raise AmedError(f"{path} is neither an amed store nor a Hugging Face checkpoint; nothing removed.")
    if e.kind == "checkpoint" and not (path / STATE_DIR).is_dir():
        raise AmedError(f"{path} is a checkpoint amed did not download; remove it yourself if you mean to.")
    freed = 0

    def unlink(f: Path) -> None:
        nonlocal freed
        if f.is_file() and not f.is_symlink():
            freed += f.stat().st_size
            f.unlink()
    for f in list(path.iterdir()):
        if e.kind == "store":
            if f.name == MANIFEST or f.suffix in (".safetensors", ".partial") or f.name in COPIED_FILES:
                unlink(f)
        elif f.name == STATE_DIR:
            import shutil

            freed += dir_size(f)
            shutil.rmtree(f)
        elif (f.suffix in (".safetensors", ".json", ".jinja", ".part") or f.name.startswith(("tokenizer", "LICENSE"))
              or f.name == "README.md"):
            unlink(f)
    try:
        os.rmdir(path)
    except OSError:
        pass                     # other files remain: leave them
    return freed
