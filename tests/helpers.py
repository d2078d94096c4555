"""Small random checkpoints written directly with the safetensors library (independent of
amed.app.synth), for tests that need a model of a particular shape."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from amed.formats.checkpoint import hf_tensor_specs
from amed.config import ModelConfig

TINY = dict(
    architectures=["BailingMoeV2ForCausalLM"], model_type="bailing_moe", vocab_size=300,
    hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
    num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=80, moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24, num_experts=16, num_experts_per_tok=3, n_group=4,
    topk_group=2, num_shared_experts=1, score_function="sigmoid", routed_scaling_factor=2.5,
    norm_topk_prob=True, moe_router_enable_expert_bias=True, use_qk_norm=True,
    partial_rotary_factor=0.5, rope_theta=600000.0, max_position_embeddings=2048,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 tensors (already rounded to bf16 values) for every name in the spec table."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in hf_tensor_specs(ModelConfig.from_dict(cfg)).items():
        if name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("expert_bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        a = a.astype(np.float32)
        if dtype == "BF16":
            a = a.astype(ml_dtypes.bfloat16).astype(np.float32)
        out[name] = a
    return out


def write_checkpoint(path: Path, cfg: dict, tensors: dict[str, np.ndarray], shards: int = 2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: (tensors[n] if n.endswith("expert_bias") else tensors[n].astype(ml_dtypes.bfloat16))
                   for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def start_amed_serve(model, *args, env=None, stdout=None, ready_within: float = 120.0):
    """(process, port): `amed serve -m MODEL --port P ARGS...` started on a free loopback port and
    waited for until /health answers 200 (the process is killed if it dies or never gets there).
    stdout: a pipe unless given (subprocess.DEVNULL); stderr is always a pipe; text mode."""
    import http.client
    import socket
    import subprocess
    import sys
    import time

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    p = subprocess.Popen([sys.executable, "-m", "amed", "serve", "-m", str(model), "--port", str(port),
                          *map(str, args)], env=env,
                         stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE, text=True)
    t0, status = time.time(), None
    try:
        while status != 200:
            assert p.poll() is None, p.communicate()[1]
            assert time.time() - t0 < ready_within, "amed serve did not become ready"
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                status = c.getresponse().status
                c.close()
            except OSError:
                pass
            time.sleep(0.1)
    except BaseException:
        if p.poll() is None:
            p.kill()
            p.communicate()
        raise
    return p, port
