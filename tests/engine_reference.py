"""The logits the engine must keep: a fixed set of models (the golden checkpoint and
stores quantized from it in each format and layout) run on a fixed token schedule (one prefill
with every position's logits, then prefill + decode steps). `python tests/engine_reference.py`
wrote tests/data/engine-logits.npz from the engine as it was before the redesign, on one CPU;
test_engine.py checks that today's engine reproduces it within a cross-CPU tolerance (its docstring
says why), and bit for bit where two paths run side by side in one run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "bailing-tiny"
# (name, Settings keyword arguments); None: the bf16 checkpoint itself
CASES = {
    "ckpt": None,
    "q4_r8": dict(bits=4),
    "q4_rows": dict(bits=4, layout="rows"),
    "q8_dense_q6": dict(bits=8, dense="q6", head="q4"),
}
SLOT_CASE = "q4_r8"          # also run through a slot cache that holds only a few experts


def token_ids() -> list[int]:
    return json.loads((DATA / "bailing-tiny-tokens.json").read_text())["token_ids"]


def build_store(tmp: Path, name: str) -> Path:
    from amed.quant.convert import Settings, quantize_model

    out = tmp / name
    if not (out / "amed-manifest.json").exists():
        quantize_model(GOLDEN, out, Settings(**CASES[name]))
    return out


def schedule(model) -> dict[str, np.ndarray]:
    """Every position's logits in one prefill, then prefill 20 + 12 decode steps."""
    ids = token_ids()
    full = model.logits(ids)
    model.reset()
    steps = [model.forward(ids[:20])]
    for t in ids[20:32]:
        steps.append(model.forward([t]))
    return {"full": full, "steps": np.stack(steps)}


def slot_model(store: Path):
    """The store with a slot cache of 6 experts (look-ahead on): every path of the cache runs."""
    import amed
    from amed.engine.experts import ExpertOptions

    m = amed.load(store)
    stride = max(i["stride"] for i in m.source.experts_info.values())
    m.use_experts(ExpertOptions(expert_budget=6 * stride, lookahead="on", io="slots"))
    return m


def main(out: Path) -> None:
    import tempfile

    import amed

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            path = GOLDEN if CASES[name] is None else build_store(Path(tmp), name)
            for k, v in schedule(amed.load(path)).items():
                res[f"{name}/{k}"] = v
        for k, v in schedule(slot_model(build_store(Path(tmp), SLOT_CASE))).items():
            res[f"slots/{k}"] = v
    np.savez(out, **res)
    print(f"wrote {out}: {', '.join(res)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA / "engine-logits.npz")
