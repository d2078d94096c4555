"""Mutation fuzzer over checkpoint and store files (issue 26: a file is untrusted input).

Each case copies the golden checkpoint (tests/data/bailing-tiny) or a q4 store of it, applies one
seeded random mutation (safetensors headers, header length, manifest fields, config, index,
tokenizer and chat template, truncation, byte flips, a FIFO / directory / empty file in place of
a file), then runs what a user would: `verify` (stores), the tokenizer and chat template, and
load + one forward pass (store experts through the mmap cache under a 1 MB budget, or the slot
cache). Every step's outcome is classified:

    ok          ran (the mutation did not matter, or only changed numbers)
    refused     an AmedError of one sentence (what the CLI prints), or `verify` found the damage
    traceback   any other exception                         -> a bug
    multiline   an AmedError whose message is not one line  -> a bug
    verify-ok   `verify` passed a store whose hashed files were changed  -> a bug
    crash       the process died of a signal (SIGSEGV, SIGBUS, ...)     -> a bug
    hang        a step ran past its time limit                          -> a bug

Cases run in a worker process (in-process per case, fast); a worker that dies or stops answering
marks the case it was on as crash or hang and a new worker goes on with the next case.

    python bench/fuzz_files.py -n 400 --seed 1        # prints counts per class (and any bugs)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "bailing-tiny"
BUGS = ("traceback", "multiline", "verify-ok", "crash", "hang")
ORDER = ("ok", "refused") + BUGS
CASE_SECONDS = 20          # per case, in the worker (alarm); the parent allows more per case

# ---- mutations ----------------------------------------------------------------------------------

EVIL = [None, -1, 0, 1, 2, 3, 7, 4096, 10**9, 10**30, -10**9, 1.5, -0.5, float("nan"), float("inf"),
        "x", "", "126976", "../x", "/etc/passwd", [], {}, True, False, [1, 2], [0, 10**12], {"a": 1}, 5]


def _json_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):
            yield prefix + (i,)
            yield from _json_paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json_value(rng: random.Random, obj, under=()) -> str:
    """Change one value (or delete one key) somewhere under `under` in a parsed JSON document."""
    paths = [p for p in _json_paths(_get(obj, under), under)]
    if not paths:
        return "nothing to mutate"
    path = rng.choice(paths)
    parent, key = _get(obj, path[:-1]), path[-1]
    old = parent[key]
    op = rng.random()
    if op < 0.12 and isinstance(parent, dict):
        del parent[key]
        return f"delete {'.'.join(map(str, path))}"
    if isinstance(old, (int, float)) and not isinstance(old, bool) and op < 0.6:
        new = rng.choice([old + 4096, old * 2, old - 1, old + 1, old // 2 if isinstance(old, int) else old / 2,
                          -old, old * 1000, 0])
    elif isinstance(old, str) and op < 0.4:
        new = rng.choice([old + "x", old[:-1], "", old.upper(), old * 3])
    else:
        new = rng.choice(EVIL)
    parent[key] = new
    return f"{'.'.join(map(str, path))} = {new!r:.40}"


def _json_file(d: Path, name: str):
    return json.loads((d / name).read_text())


def _write_json(d: Path, name: str, obj) -> None:
    (d / name).write_text(json.dumps(obj))


def _tensor_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors")


def _read_st(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def m_manifest(rng, d):
    man = _json_file(d, "amed-manifest.json")
    under = rng.choice([(), ("experts",), ("files",), ("weights",), ("config",), ("side_files",)])
    if under and under[0] not in man:
        under = ()
    what = mutate_json_value(rng, man, under)
    _write_json(d, "amed-manifest.json", man)
    return what


def m_manifest_named(rng, d):
    """The cases issue 26 names, one at random."""
    man = _json_file(d, "amed-manifest.json")
    ex = man["experts"][rng.choice(sorted(man["experts"]))]
    f = rng.choice(sorted(man["files"]))
    choices = {
        "stride=10**9": lambda: ex.__setitem__("stride", 10**9),
        "count=64": lambda: ex.__setitem__("count", 64),
        "offset+=4096": lambda: ex.__setitem__("offset", ex["offset"] + 4096),
        "offset-=4096": lambda: ex.__setitem__("offset", ex["offset"] - 4096),
        "no files": lambda: man.pop("files"),
        "files=[]": lambda: man.__setitem__("files", []),
        "bytes str": lambda: man["files"][f].__setitem__("bytes", str(man["files"][f]["bytes"])),
        "bytes -1": lambda: man["files"][f].__setitem__("bytes", -1),
        "bytes 0": lambda: man["files"][f].__setitem__("bytes", 0),
        "weight missing": lambda: man["weights"].pop(rng.choice(sorted(man["weights"]))),
        "matrix missing": lambda: ex["matrices"].pop(rng.choice(sorted(ex["matrices"]))),
        "layers-1": lambda: man["config"].__setitem__("num_hidden_layers", man["config"]["num_hidden_layers"] - 1),
        "qk_norm off": lambda: man["config"].__setitem__("use_qk_norm", False),
        "hidden 32": lambda: man["config"].__setitem__("hidden_size", 32),
        "rope_theta null": lambda: man["config"].__setitem__("rope_theta", None),
        "prf x": lambda: man["config"].__setitem__("partial_rotary_factor", "x"),
        "rsf x": lambda: man["config"].__setitem__("routed_scaling_factor", "x"),
        "rope_scaling 1.5": lambda: man["config"].__setitem__("rope_scaling", 1.5),
        "experts 8": lambda: man["config"].__setitem__("num_experts", 8),
    }
    name = rng.choice(sorted(choices))
    choices[name]()
    _write_json(d, "amed-manifest.json", man)
    return name


def m_config(rng, d):
    cfg = _json_file(d, "config.json")
    if rng.random() < 0.4:
        key, val = rng.choice([("rope_theta", None), ("partial_rotary_factor", "x"), ("routed_scaling_factor", "x"),
                               ("rope_scaling", 1.5), ("num_hidden_layers", 2), ("use_qk_norm", False),
                               ("hidden_size", 32), ("num_experts", 32), ("vocab_size", 10**9),
                               ("num_hidden_layers", 10**6), ("head_dim", 8), ("rms_norm_eps", -1)])
        cfg[key] = val
        what = f"{key} = {val!r}"
    else:
        what = mutate_json_value(rng, cfg)
    _write_json(d, "config.json", cfg)
    return what


def m_index(rng, d):
    idx = _json_file(d, "model.safetensors.index.json")
    wm = idx["weight_map"]
    key = rng.choice(sorted(wm))
    op = rng.randrange(5)
    if op == 0:
        wm[key] = 5
        what = f"weight_map[{key}] = 5"
    elif op == 1:
        del wm[key]
        what = f"delete weight_map[{key}]"
    elif op == 2:
        wm[key] = rng.choice(["../x.safetensors", "missing.safetensors", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors", ".hidden.safetensors"])
        what = f"weight_map[{key}] = {wm[key]}"
    else:
        what = mutate_json_value(rng, idx)
    _write_json(d, "model.safetensors.index.json", idx)
    return what


def m_header_entry(rng, d):
    path = rng.choice(_tensor_files(d))
    header, data = _read_st(path)
    names = [k for k in header if k != "__metadata__"]
    key = rng.choice(names)
    op = rng.randrange(6)
    if op == 0:
        del header[key]
        what = f"{path.name}: delete {key}"
    elif op == 1:
        header[key + "x"] = header.pop(key)
        what = f"{path.name}: rename {key}"
    elif op == 2:
        header[key]["dtype"] = rng.choice(["F32", "BF16", "F16", "U8", "I8", "F64", "Q4", 5])
        what = f"{path.name}: {key}.dtype = {header[key]['dtype']}"
    else:
        what = f"{path.name}: " + mutate_json_value(rng, header, (key,))
    _write_st(path, header, data)
    return what


def m_header_shift(rng, d):
    """Every data offset moved by k bytes, or the header length prefix changed by k."""
    path = rng.choice(_tensor_files(d))
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    k = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 64])
    if rng.random() < 0.5:
        raw[:8] = max(0, n + k).to_bytes(8, "little")
        path.write_bytes(bytes(raw))
        return f"{path.name}: header length {n} -> {n + k}"
    header, data = _read_st(path)
    for name, ent in header.items():
        if name != "__metadata__":
            ent["data_offsets"] = [max(0, o + k) for o in ent["data_offsets"]]
    _write_st(path, header, data)
    return f"{path.name}: data offsets {k:+d}"


def m_truncate(rng, d):
    files = [p for p in d.iterdir() if p.is_file()]
    path = rng.choice(files)
    size = path.stat().st_size
    new = rng.choice([0, 1, 7, 8, 9, size // 2, max(0, size - 1), max(0, size - 4096), rng.randrange(size + 1)])
    os.truncate(path, new)
    return f"{path.name}: truncated {size} -> {new}"


def m_byteflip(rng, d):
    files = [p for p in d.iterdir() if p.is_file()]
    path = rng.choice(files)
    raw = bytearray(path.read_bytes())
    if not raw:
        return "empty file"
    n = rng.choice([1, 1, 2, 8, 64])
    head = rng.random() < 0.6 and path.suffix == ".safetensors"
    hi = min(len(raw), 8 + int.from_bytes(raw[:8], "little")) if head else len(raw)
    for _ in range(n):
        i = rng.randrange(max(1, hi))
        raw[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return f"{path.name}: {n} bit flip(s){' in the header' if head else ''}"


HOSTILE_TEMPLATES = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'a' * 1000000000 }}",
    "{% set ns = namespace(x='ab') %}{% for i in range(100) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
    "{{ ''.__class__.__mro__ }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'x'|center(1000000000) }}",
    "{% for m in messages %}{{ m.content }}",
    "{{ messages[0].content.ljust(10**9) }}",
]


def m_tokenizer(rng, d):
    op = rng.randrange(5)
    if op == 0:
        tok = _json_file(d, "tokenizer.json")
        tok["model"]["vocab"] = {}
        tok["model"]["merges"] = []
        tok["added_tokens"] = []
        _write_json(d, "tokenizer.json", tok)
        return "empty tokenizer vocabulary"
    if op == 1:
        tok = _json_file(d, "tokenizer.json")
        what = mutate_json_value(rng, tok, rng.choice([(), ("model",), ("added_tokens",), ("pre_tokenizer",)]))
        _write_json(d, "tokenizer.json", tok)
        return "tokenizer.json: " + what
    if op == 2:
        cfg = _json_file(d, "tokenizer_config.json")
        cfg["chat_template"] = rng.choice(HOSTILE_TEMPLATES)
        _write_json(d, "tokenizer_config.json", cfg)
        return f"chat_template = {cfg['chat_template']:.50}"
    if op == 3:
        (d / "tokenizer.json").write_text("")
        return "empty tokenizer.json"
    cfg = _json_file(d, "tokenizer_config.json")
    what = mutate_json_value(rng, cfg)
    _write_json(d, "tokenizer_config.json", cfg)
    return "tokenizer_config.json: " + what


def m_special(rng, d):
    """A FIFO, a directory, an empty file or a link to a device in place of a file."""
    names = [p.name for p in d.iterdir() if p.is_file()]
    name = rng.choice(sorted(names))
    path = d / name
    path.unlink()
    kind = rng.choice(["fifo", "dir", "empty", "devzero"])
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.symlink_to("/dev/zero")
    return f"{name} is {kind}"


def m_combo(rng, d):
    """Two or three mutations of the kinds above, one after the other."""
    kinds = [k for k, (_, targets, _) in MUTATORS.items()
             if k not in ("combo", "special") and _target_of(d) in targets]
    done = []
    for k in rng.sample(kinds, rng.choice([2, 3])):
        try:
            done.append(MUTATORS[k][0](rng, d))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError, json.JSONDecodeError,
                UnicodeDecodeError):
            pass                      # an earlier mutation broke what this one edits
    return " + ".join(done)


def _target_of(d: Path) -> str:
    return "store" if (d / "amed-manifest.json").exists() else "ckpt"


MUTATORS = {
    # name: (function, targets, weight)
    "manifest": (m_manifest, ("store",), 3),
    "manifest-named": (m_manifest_named, ("store",), 3),
    "config": (m_config, ("ckpt",), 3),
    "index": (m_index, ("ckpt",), 2),
    "header": (m_header_entry, ("store", "ckpt"), 3),
    "header-shift": (m_header_shift, ("store", "ckpt"), 2),
    "truncate": (m_truncate, ("store", "ckpt"), 2),
    "byteflip": (m_byteflip, ("store", "ckpt"), 3),
    "tokenizer": (m_tokenizer, ("store", "ckpt"), 2),
    "special": (m_special, ("store", "ckpt"), 1),
    "combo": (m_combo, ("store", "ckpt"), 2),
}


def plan_cases(seed: int, n: int, kinds=None) -> list[tuple[int, str, str]]:
    """(case seed, mutator, target) for n cases: deterministic in `seed`."""
    rng = random.Random(seed)
    names = [k for k in MUTATORS if kinds is None or k in kinds]
    weights = [MUTATORS[k][2] for k in names]
    out = []
    for _ in range(n):
        k = rng.choices(names, weights)[0]
        out.append((rng.randrange(1 << 30), k, rng.choice(MUTATORS[k][1])))
    return out


# ---- running one case ---------------------------------------------------------------------------

class Hang(BaseException):
    pass


def _on_alarm(signo, frame):
    raise Hang()


def classify(fn) -> tuple[str, str]:
    from amed.errors import AmedError

    signal.alarm(CASE_SECONDS)
    try:
        r = fn()
        return ("verify-ok", r) if r == "verify-ok" else ("ok", "")
    except AmedError as e:
        msg = str(e)
        return ("refused" if msg and "\n" not in msg.strip() else "multiline"), msg
    except Hang:
        return "hang", "in-process alarm"
    except BaseException as e:      # noqa: BLE001 - every other exception is the bug we look for
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
        return "traceback", f"{type(e).__name__}: {' '.join(str(e).split())[:200]} at {where}"
    finally:
        signal.alarm(0)


def run_steps(d: Path, target: str, changed_hashed: bool, io: str) -> dict:
    """verify (stores), tokenizer + chat template, load + one forward: each step's class."""
    import amed
    from amed.errors import AmedError
    from amed.formats.store import read_manifest, verify_files
    from amed.text.tokenizer import Tokenizer

    steps = {}
    ids = [3, 4, 5]
    if target == "store":
        def verify():
            man = read_manifest(d)
            bad = verify_files(d, man)
            if bad:
                raise AmedError(f"verify: {len(bad)} damaged file(s).")   # what `amed verify` says
            return "verify-ok" if changed_hashed else None
        steps["verify"] = classify(verify)

    def tokenize():
        nonlocal ids
        tok = Tokenizer.from_dir(d)
        ids = tok.encode_chat([{"role": "user", "content": "What helps a headache?"}])[:8] or ids
    steps["tokenizer"] = classify(tokenize)

    def forward():
        os.environ["AMED_EXPERT_IO"] = io
        m = amed.load(d, max_ram="1M", ctx_size=64)
        try:
            m.forward([i for i in ids if 0 <= i < m.config.vocab_size] or [3])
        finally:
            m.experts.close()
    steps["forward"] = classify(forward)
    return steps


def worst(steps: dict) -> str:
    return max((c for c, _ in steps.values()), key=ORDER.index)


def hashed_files(d: Path, names=None) -> dict:
    """name -> bytes of the files a store manifest hashes (to see what a mutation changed)."""
    if names is None:
        try:
            man = json.loads((d / "amed-manifest.json").read_text())
            names = list(man.get("files", {})) + list(man.get("side_files", {}))
        except Exception:     # noqa: BLE001
            return {}
    out = {}
    for n in names:
        p = d / str(n)
        try:
            out[n] = p.read_bytes() if p.is_file() else None
        except OSError:
            out[n] = None
    return out


def prepare_case(bases: dict, work: Path, case) -> tuple[Path, str, bool]:
    seed, kind, target = case
    d = work / "case"
    if d.exists() or d.is_symlink():
        _rmtree(d)
    shutil.copytree(bases["store8" if target == "store" and seed % 3 == 0 else target], d)
    before = hashed_files(d) if target == "store" else {}
    what = MUTATORS[kind][0](random.Random(seed), d)
    after = hashed_files(d, list(before)) if target == "store" else {}
    changed = any(after.get(n, None) != b for n, b in before.items())
    return d, what, changed


def _rmtree(d: Path) -> None:
    for p in d.iterdir() if d.is_dir() and not d.is_symlink() else ():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if d.is_dir() and not d.is_symlink():
        d.rmdir()
    elif d.exists() or d.is_symlink():
        d.unlink()


def make_bases(root: Path) -> dict:
    """The golden checkpoint and a q4 store of it, under root (built once)."""
    from amed.quant.convert import Settings, quantize_model

    ckpt, store, store8 = root / "base-ckpt", root / "base-store", root / "base-store8"
    if not ckpt.exists():
        shutil.copytree(GOLDEN, ckpt)
    if not (store / "amed-manifest.json").exists():
        quantize_model(ckpt, store, Settings(bits=4))
    if not (store8 / "amed-manifest.json").exists():
        quantize_model(ckpt, store8, Settings(bits=8, layout="rows", dense="q6"))
    return {"ckpt": ckpt, "store": store, "store8": store8}


def worker(root: Path, cases: list) -> None:
    """Run cases in this process; one JSON line per case start and result on stdout."""
    signal.signal(signal.SIGALRM, _on_alarm)
    bases = make_bases(root)
    work = root / f"work-{os.getpid()}"
    work.mkdir(exist_ok=True)
    for i, case in enumerate(cases):
        print(json.dumps({"start": i}), flush=True)
        try:
            d, what, changed = prepare_case(bases, work, case)
        except Exception as e:     # noqa: BLE001 - a mutation that does not apply: skip the case
            print(json.dumps({"i": i, "skip": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        io = "mmap" if case[0] % 2 else "slots"
        steps = run_steps(d, case[2], changed, io)
        print(json.dumps({"i": i, "what": what, "io": io, "steps": steps, "class": worst(steps)}), flush=True)


# ---- through the CLI, in a subprocess ------------------------------------------------------------

def run_cli(cases: list, root: Path, timeout: float = 60.0, log=None) -> list[dict]:
    """Each case through `amed chat -p ... -n 2 --max-ram 1M` (and `amed verify` for stores) in a
    subprocess with a timeout: exit 0 ok; exit 1 with one `error:` line and no traceback refused;
    a traceback, a signal or a timeout is a bug."""
    bases = make_bases(root)
    work = root / "cli"
    work.mkdir(exist_ok=True)
    out = []
    for case in cases:
        try:
            d, what, _ = prepare_case(bases, work, case)
        except Exception as e:     # noqa: BLE001
            out.append({"class": "skip", "case": case, "what": f"{type(e).__name__}: {e}"})
            continue
        steps = {}
        cmds = {"chat": ["chat", "-m", str(d), "-p", "What helps a headache?", "-n", "2", "--max-ram", "1M"]}
        if case[2] == "store":
            cmds["verify"] = ["verify", str(d)]
        for step, args in cmds.items():
            env = dict(os.environ, AMED_EXPERT_IO="mmap" if case[0] % 2 else "slots", NO_COLOR="1")
            try:
                r = subprocess.run([sys.executable, "-m", "amed", *args], capture_output=True, text=True,
                                   timeout=timeout, env=env, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                steps[step] = ("hang", f"no exit in {timeout:g} s")
                continue
            errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            if r.returncode < 0 or r.returncode > 128:
                steps[step] = ("crash", f"rc {r.returncode}: {r.stderr.strip()[-300:]}")
            elif "Traceback" in r.stderr:
                steps[step] = ("traceback", r.stderr.strip()[-300:])
            elif r.returncode == 0:
                steps[step] = ("ok", "")
            elif r.returncode == 1 and len(errs) == 1:
                steps[step] = ("refused", errs[0])
            else:
                steps[step] = ("multiline", f"rc {r.returncode}: {r.stderr.strip()[-300:]}")
        rec = {"class": worst(steps), "case": case, "what": what, "steps": steps, "cli": True}
        out.append(rec)
        if log:
            log(rec)
    return out


# ---- the driver -----------------------------------------------------------------------------------

def run(cases: list, root: Path, timeout_per_case: float = 60.0, log=None) -> list[dict]:
    """Run `cases` in worker processes; returns one record per case (class, what, steps)."""
    results: list[dict | None] = [None] * len(cases)
    i0 = 0
    env = dict(os.environ, PYTHONFAULTHANDLER="")
    env.pop("PYTHONFAULTHANDLER")
    while i0 < len(cases):
        batch = cases[i0:]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root), json.dumps(batch)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        current = None
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_per_case + 60      # the first case also loads the kernels
        hung = False
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                hung = True
                break
            line = p.stdout.readline()
            if not line:
                break
            rec = json.loads(line)
            if "start" in rec:
                current = i0 + rec["start"]
                deadline = time.monotonic() + timeout_per_case
                continue
            j = i0 + rec["i"]
            rec["case"] = cases[j]
            if "skip" in rec:
                rec["class"] = "skip"
            results[j] = rec
            if log:
                log(rec)
        if hung:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        err = p.stderr.read()
        sel.close()
        p.stdout.close()
        p.stderr.close()
        if current is None:
            raise RuntimeError(f"fuzz worker failed before its first case: {err.strip()[-2000:]}")
        if results[current] is None:          # it died or stopped answering on this case
            cls = "hang" if hung else "crash"
            results[current] = {"class": cls, "case": cases[current], "what": "?",
                                "detail": f"rc {p.returncode}: {err.strip()[-300:]}"}
            if log:
                log(results[current])
        i0 = current + 1
    return [r for r in results if r is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=400, help="cases (default 400)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", default="", help="comma-separated mutators (default: all): " + ",".join(MUTATORS))
    ap.add_argument("--cli", type=int, default=0, metavar="K",
                    help="also run K of the cases through the CLI (amed chat / amed verify) in subprocesses")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("-v", action="store_true", help="print every case")
    a = ap.parse_args(argv)
    if a.worker:
        worker(Path(a.worker[0]), [tuple(c) for c in json.loads(a.worker[1])])
        return 0
    kinds = set(a.kinds.split(",")) if a.kinds else None
    cases = plan_cases(a.seed, a.n, kinds)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="amed-fuzz-") as tmp:
        def log(rec):
            if a.v or rec["class"] in BUGS:
                print(f"{rec['class']:10s} {rec['case'][1]:15s} {rec['case'][2]:5s} {rec.get('what', '')[:160]}"
                      + "".join(f"\n    {k}: {c}: {m[:200]}" for k, (c, m) in rec.get("steps", {}).items()
                                if c in BUGS) + (f"\n    {rec['detail']}" if "detail" in rec else ""), flush=True)
        results = run(cases, Path(tmp), log=log)
        cli = run_cli(plan_cases(a.seed + 1, a.cli, kinds), Path(tmp), log=log) if a.cli else []
    by_class = Counter(r["class"] for r in results)
    by_kind: dict[str, Counter] = {}
    for r in results:
        by_kind.setdefault(r["case"][1], Counter())[r["class"]] += 1
    print(f"\n{len(results)} cases in process + {len(cli)} through the CLI, {time.time() - t0:.0f} s (seed {a.seed}):")
    print("  in process: " + ", ".join(f"{c} {by_class.get(c, 0)}" for c in ORDER + ("skip",)))
    for k in sorted(by_kind):
        print(f"    {k:15s} " + ", ".join(f"{c} {n}" for c, n in sorted(by_kind[k].items(), key=lambda x: ORDER.index(x[0]) if x[0] in ORDER else 99)))
    cli_class = Counter(r["class"] for r in cli)
    if cli:
        print("  CLI: " + ", ".join(f"{c} {cli_class.get(c, 0)}" for c in ORDER + ("skip",)))
    return 1 if any(by_class.get(c) or cli_class.get(c) for c in BUGS) else 0


if __name__ == "__main__":
    sys.exit(main())
