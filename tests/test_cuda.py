"""The CUDA backend (engine/backends/cuda): every kernel against NumPy, and the whole model against
the CPU, in Numba's CUDA simulator (conftest.py sets NUMBA_ENABLE_CUDASIM=1 unless the environment
says 0: then on a real GPU, as bench/gpu_check.sh runs them); every kernel compiled to PTX for
sm_75/86/89/120 in a subprocess (compile_ptx needs the real CUDA target, the simulator replaces it
for the whole process). The simulator runs each GPU thread as a Python thread: shapes stay tiny."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amed
from amed.engine.experts import ExpertOptions
from amed.errors import AmedError
from amed.quant.formats import dequantize, quantize

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
ROOT = Path(__file__).parent.parent
TOL = 1e-4


@pytest.fixture(scope="module")
def B():
    """The backend; in the simulator, with a short GIL switch interval: its block manager polls
    the block's threads, and at the default 5 ms most of a launch is spent waiting for the GIL."""
    pytest.importorskip("numba.cuda")
    from amed.engine.backends.cuda import CUDABackend

    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(1e-5)
    b = CUDABackend()
    b.nt = 32                 # 4 threads per row in the rows layout: the reductions run (the model: 8, 1 per row)
    yield b
    sys.setswitchinterval(old)


def _rng():
    return np.random.default_rng(18)


# ---- kernels ------------------------------------------------------------------------------------

MATRICES = [("q4", 32, "rows"), ("q4", 64, "rows"), ("q6", 32, "rows"), ("q6", 64, "rows"), ("q8", 32, "rows"),
            ("q4", 32, "r8"), ("q8", 64, "r8"), ("bf16", 0, ""), ("f32", 0, "")]


@pytest.mark.parametrize("fmt,group,layout", MATRICES, ids=[f"{f}-g{g}-{l}" for f, g, l in MATRICES])
def test_matmul_matches_numpy(B, fmt, group, layout):
    """out = x @ W.T for every format and layout, one token (decode) and 9 (two token blocks);
    20 rows in the rows layout (a partial block of 8), 16 in r8."""
    rng = _rng()
    N, K = (16 if layout == "r8" else 20), 128
    w = rng.standard_normal((N, K)).astype(np.float32)
    if fmt == "f32":
        m, ref = w, w
    elif fmt == "bf16":
        m = (w.view(np.uint32) >> 16).astype(np.uint16)
        ref = (m.astype(np.uint32) << 16).view(np.float32)
    else:
        m = quantize(w, fmt, group, layout=layout)
        ref = dequantize(m)
    lin = B.linear(m)
    for T in (1, 9):
        x = rng.standard_normal((T, K)).astype(np.float32)
        got = B.to_host(lin.matmul(B.to_device(x), B.empty((T, N))))
        want = x.astype(np.float64) @ ref.T.astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        host = lin.matmul(x, np.empty((T, N), np.float32))          # host arrays in and out
        np.testing.assert_array_equal(host, got)


def test_rmsnorm_silu_add(B):
    rng = _rng()
    x = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    out = B.empty(x.shape)
    B.rmsnorm(B.to_device(x), B.vector(w), 1e-6, out)
    want = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(B.to_host(out), want, rtol=1e-5, atol=1e-6)
    g, u = rng.standard_normal((2, 3, 40)).astype(np.float32)
    d = B.empty(g.shape)
    B.silu_mul(B.to_device(g), B.to_device(u), d)
    np.testing.assert_allclose(B.to_host(d), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    a = B.to_device(x)
    B.add(a, x)                                                        # a host y is copied up
    np.testing.assert_array_equal(B.to_host(a), 2 * x)
    B.axpy(a, 0.25, B.to_device(g[:, :40]))
    np.testing.assert_allclose(B.to_host(a), 2 * x + np.float32(0.25) * g, rtol=1e-6, atol=1e-6)
    assert B.to_host(B.zeros((2, 3))).tolist() == [[0.0] * 3] * 2


def test_qk_norm_rope_and_attention_match_cpu(B):
    """QK-norm + partial RoPE into the KV cache, then causal GQA attention (3 new tokens after 2
    cached ones), against the CPU kernels (which tests/test_kernels.py holds to NumPy)."""
    from amed.engine.backends.cpu import kernels as C
    from amed.engine.state import rope_tables

    rng = _rng()
    T, nh, nkv, d, rot, S, pos = 3, 4, 2, 16, 8, 8, 2
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * d)).astype(np.float32)
    qn, kn = (1 + 0.1 * rng.standard_normal((2, d))).astype(np.float32)
    cos, sin = rope_tables(S, rot, 10000.0)
    kc0 = rng.standard_normal((nkv, S, d)).astype(np.float32)
    vc0 = rng.standard_normal((nkv, S, d)).astype(np.float32)
    q, kc, vc = np.empty((T, nh, d), np.float32), kc0.copy(), vc0.copy()
    C.qk_norm_rope_store(qkv, nh, nkv, d, rot, qn, kn, True, 1e-6, cos, sin, pos, q, kc, vc)
    att = np.empty((T, nh * d), np.float32)
    C.attention(q, kc, vc, pos, att)

    dq, dk, dv = B.empty((T, nh, d)), B.to_device(kc0), B.to_device(vc0)
    B.qk_norm_rope_store(B.to_device(qkv), nh, nkv, d, rot, B.vector(qn), B.vector(kn), True, 1e-6,
                         B.to_device(cos), B.to_device(sin), pos, dq, dk, dv)
    np.testing.assert_allclose(B.to_host(dq), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(B.to_host(dk)[:, :pos + T], kc[:, :pos + T], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(B.to_host(dv)[:, :pos + T], vc[:, :pos + T])
    datt = B.empty((T, nh * d))
    B.attention(dq, dk, dv, pos, datt)
    np.testing.assert_allclose(B.to_host(datt), att, rtol=1e-5, atol=1e-5)


# ---- the simulator itself -------------------------------------------------------------------------

@pytest.mark.skipif(not SIM, reason="the CUDA simulator's bookkeeping")
def test_simulator_gives_a_block_one_shared_array(B):
    """The simulator looks a block's shared array up by source line without a lock: threads that
    race there got arrays of their own (15 rounds in 200 here before the fix, and the whole-model
    test below failed now and then under load). The CUDA backend locks that lookup."""
    import threading

    from numba.cuda.simulator import kernelapi

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(100):
            shared, got, gate = kernelapi.FakeCUDAShared(0), [None] * 16, threading.Barrier(16)

            def thread(i):
                gate.wait()
                got[i] = shared.array(8, np.float32)

            ts = [threading.Thread(target=thread, args=(i,)) for i in range(16)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert len({id(a) for a in got}) == 1
    finally:
        sys.setswitchinterval(old)


# ---- the whole model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(golden_store):
    return golden_store(bits=4)          # q4 r8 experts, q8 r8 dense, q6 rows lm_head


def _prefill_then_decode(m, ids):
    full = m.logits(ids[:3])
    step = m.forward(ids[3:4])
    return full, step


@pytest.mark.parametrize("gpu_experts,prefill", [(0, "gpu"), (1, "auto"), ("auto", "auto")])
def test_model_on_cuda_equals_cpu(B, store, gpu_experts, prefill):
    """Prefill 3 tokens then decode 1 on the GPU: the logits equal the CPU's to 1e-4. Experts on
    the CPU but the prefill's copied up for its batch; one per layer in VRAM (decode sums on both
    sides); all in VRAM (the routed sum stays on the device)."""
    ids = [5, 17, 99, 3]
    want_full, want_step = _prefill_then_decode(amed.load(store), ids)
    lines = []
    if SIM:
        sys.setswitchinterval(1e-5)       # the B fixture restores it
    m = amed.load(store, device="cuda", gpu_experts=gpu_experts, log=lines.append,
                  experts=None if prefill == "auto" else ExpertOptions(gpu_experts=gpu_experts, gpu_prefill=prefill))
    m.experts.prefill.min_tokens = 2      # the 3-token prefill counts as a batch
    full, step = _prefill_then_decode(m, ids)
    assert np.abs(full - want_full).max() < TOL and np.abs(step - want_step).max() < TOL
    assert any(line.startswith("GPU: dense weights") for line in lines)
    layers = len(m.experts._by_layer)
    # admitted on first use: with room for all, every expert used so far is in VRAM
    assert m.experts.resident == {0: 0, 1: layers, "auto": len(m.experts.uses)}[gpu_experts]
    if gpu_experts:                       # r8 q4 experts: in ExpertSlots, decode runs them together
        assert m.experts._slots and all(v is not None for v in m.experts._slots.values())
    # copied up for the batch: when asked, and when auto times that way first (unless all are in VRAM)
    assert (m.experts.copied > 0) == (gpu_experts != "auto")


def test_serve_loads_on_cuda_and_batches_decode_steps(B, store):
    """`amed serve --device cuda`: the loader puts the model on the GPU, and a decode step of two
    sequences at once (forward_batch) equals each one's CPU logits."""
    from amed.app.serve import model_loader

    cpu = amed.load(store)
    want = []
    for prompt, nxt in (([5, 17], 99), ([42], 7)):
        cpu.reset()
        cpu.forward(prompt)
        want.append(cpu.forward([nxt]))
    if SIM:
        sys.setswitchinterval(1e-5)       # the B fixture restores it
    m, _, _ = model_loader(store, ctx_size=32, parallel=2, device="cuda", gpu_experts="1")()
    assert m.backend.name == "cuda" and m.experts.per_layer == 1
    states = [m.new_state(), m.new_state()]
    m.forward([5, 17], state=states[0])
    m.forward([42], state=states[1])
    got = m.forward_batch([99, 7], states)
    assert np.abs(got - np.stack(want)).max() < TOL


def test_prefill_choice_times_both_then_takes_the_faster():
    """auto: each way timed (its first timing dropped), then the faster, the slower again every
    RECHECK_EVERY batches; short batches never counted; gpu/cpu fixed."""
    from amed.engine.experts.gpu import RECHECK_EVERY, PrefillChoice

    now = [0.0]
    cost = {"gpu": 1.0, "cpu": 3.0}             # seconds per token, for the fake clock
    c = PrefillChoice("auto", min_tokens=16, clock=lambda: now[0])

    def batch(tokens=32):
        how = c.choose(tokens)
        now[0] += cost[how] * tokens
        c.done()
        return how

    assert [batch() for _ in range(4)] == ["gpu", "gpu", "cpu", "cpu"]
    assert c.cost == {"gpu": 1.0, "cpu": 3.0}
    ways = [batch() for _ in range(2 * RECHECK_EVERY)]
    assert ways.count("cpu") == 2 and ways.count("gpu") == 2 * RECHECK_EVERY - 2
    cost["gpu"] = 10.0                          # the GPU got slow (another program): it moves over
    ways = [batch() for _ in range(RECHECK_EVERY * 4)]
    assert ways[-RECHECK_EVERY:].count("cpu") == RECHECK_EVERY - 1
    assert c.choose(8) == "cpu" and c._timing is None
    assert PrefillChoice("gpu").choose(64) == "gpu" and PrefillChoice("cpu").choose(64) == "cpu"
    assert "batches copied to the GPU" in c.summary()


def test_full_vram_keeps_running_on_the_cpu():
    """An expert that does not fit (binding it runs out of VRAM, or free memory is below the
    margin): no more are admitted, one line says so, and those experts come from the host provider."""
    from amed.engine.experts import ExpertProvider
    from amed.engine.experts.gpu import VRAM_MARGIN, GPUExperts

    class FakeGPU:                       # binds experts one by one (a format without ExpertSlots)
        uploaded = 0
        free = 10 * VRAM_MARGIN
        placed = 0

        def free_vram(self):
            return self.free

        def expert_slots(self, count, expert):
            return None

        def swiglu(self, gate, up, down):
            if self.placed == 2:
                raise AmedError("the GPU ran out of memory")
            self.placed += 1
            return ("gpu", gate)

    host = ExpertProvider(lambda L, e: ("cpu", e))
    lines = []
    g = GPUExperts(host, FakeGPU(), lambda L, e: (e, e, e), per_layer=4, log=lines.append)
    h = np.zeros((2, 8), np.float32)
    assert g.start(0, [1, 2, 3], h) == [1, 2, 3] and g.vram_full
    assert [g.get(0, e) for e in (1, 2, 3)] == [("gpu", 1), ("gpu", 2), ("cpu", 3)]
    assert len(lines) == 1 and "GPU memory is full" in lines[0]
    gpu = FakeGPU()
    g = GPUExperts(host, gpu, lambda L, e: (e, e, e), per_layer=4)
    g.start(0, [1], h)
    gpu.free = VRAM_MARGIN // 2
    g.start(0, [2], h)
    assert g.resident == 1 and g.vram_full and g.get(0, 2) == ("cpu", 2)
    g = GPUExperts(host, FakeGPU(), lambda L, e: (e, e, e), per_layer=0, prefill="gpu")
    g.prefill.min_tokens = 2              # no grouped kernels: a batch's experts copied up one by one
    assert g.start(0, [4, 5], h) == [4, 5] and [g.get(0, e) for e in (4, 5)] == [("gpu", 4), ("gpu", 5)]
    assert g.copied == 2 and g.device_sum(0, np.array([[4, 5], [5, 4]]), np.ones((2, 2)), h, "dev") == "dev"


def test_expert_slots_run_a_layers_experts_together(B):
    """ExpertSlots (decode, all of a layer's chosen VRAM experts in two launches) against NumPy,
    q4 and q8; a lone r8 SwiGLU's decode through the same kernels; a slot reused by a swap; the
    slot's SwiGLU for batches."""
    def ref(expert, x):
        g, u, d = (dequantize(m).astype(np.float64) for m in expert)
        a = x @ g.T
        return (a / (1 + np.exp(-a)) * (x @ u.T)) @ d.T

    rng = _rng()
    H, I = 64, 32
    experts = [[quantize(rng.standard_normal(shape).astype(np.float32) * 0.3, fmt, 32, method="naive",
                         layout="r8") for shape in ((I, H), (I, H), (H, I))]
               for fmt in ("q4", "q4", "q4", "q8", "q8")]
    x = rng.standard_normal((1, H)).astype(np.float32)
    for group in (experts[:3], experts[3:]):
        slots = B.expert_slots(2, group[0])
        slots.put(0, group[0])
        slots.put(1, group[1])
        base = rng.standard_normal((1, H)).astype(np.float32)
        out = B.to_device(base)
        slots.run([1, 0], [0.5, 0.25], B.to_device(x), out)
        want = base + 0.5 * ref(group[1], x) + 0.25 * ref(group[0], x)
        np.testing.assert_allclose(B.to_host(out), want, rtol=1e-4, atol=1e-4)
        xs = rng.standard_normal((12, H)).astype(np.float32)         # prefill: (token, expert) pairs,
        base = rng.standard_normal((12, H)).astype(np.float32)       # one expert with more than TT
        out = B.to_device(base)
        toks = [np.array([0, 1, 2, 3, 4, 5, 6, 8, 9, 10]), np.array([2, 4, 11])]
        ws = [rng.random(10).astype(np.float32), rng.random(3).astype(np.float32)]
        slots.run_pairs(B.to_device(xs), [(1, toks[0], ws[0]), (0, toks[1], ws[1])], out)
        want = base.astype(np.float64)
        for slot, t, w in ((1, toks[0], ws[0]), (0, toks[1], ws[1])):
            want[t] += w[:, None] * ref(group[slot], xs[t])
        np.testing.assert_allclose(B.to_host(out), want, rtol=1e-4, atol=1e-4)
        lone = B.swiglu(*group[1])                  # a lone SwiGLU (shared expert): the same kernels
        np.testing.assert_allclose(B.to_host(lone(B.to_device(x))), ref(group[1], x), rtol=1e-4, atol=1e-4)
        if len(group) > 2:                          # a swap: slot 0 gets another expert
            slots.put(0, group[2])
            xs = rng.standard_normal((3, H)).astype(np.float32)
            np.testing.assert_allclose(slots.swiglu(0)(xs), ref(group[2], xs), rtol=1e-4, atol=1e-4)
    rows = quantize(rng.standard_normal((I, H)).astype(np.float32), "q4", 32, method="naive")
    assert B.expert_slots(2, (rows, rows, rows)) is None       # the rows layout: bound one by one


# ---- errors, and no CUDA import unless asked -------------------------------------------------------

def _run(code: str, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=e, timeout=300)


def test_no_gpu_is_one_clear_sentence(store):
    """Without a GPU (the real CUDA target, not the simulator): an AmedError that says how to run
    on the CPU; `amed chat --device cuda` prints it without a traceback."""
    r = subprocess.run([sys.executable, "-m", "amed", "chat", "-m", str(store), "--device", "cuda", "-p", "hi"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_VISIBLE_DEVICES=""))
    if r.returncode == 0:
        pytest.skip("this machine has a usable GPU")
    assert "Traceback" not in r.stderr, r.stderr
    assert "CPU" in r.stderr and ("no usable NVIDIA GPU" in r.stderr or "numba-cuda" in r.stderr), r.stderr


def test_cli_does_not_import_cuda():
    r = _run("import sys, amed.app.cli; from amed.engine.model import load; print('numba.cuda' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_bad_gpu_experts_value(store):
    with pytest.raises(AmedError, match="--gpu-experts"):
        amed.load(store, gpu_experts="many")


# ---- PTX for every supported compute capability -------------------------------------------------------

def test_every_kernel_compiles_to_ptx():
    """tests/cuda_ptx_check.py in its own process (exit 77: no NVVM here, skip)."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_ptx_check.py")], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
                                                      PYTHONPATH=str(ROOT)))
    if r.returncode == 77:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for cc in ("sm_75", "sm_86", "sm_89", "sm_120"):
        assert f"ok attention {cc}" in r.stdout and f"ok mm_q6_rows {cc}" in r.stdout
