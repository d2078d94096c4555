import os
import sys
from pathlib import Path

# CUDA tests run in Numba's CUDA simulator unless told otherwise (NUMBA_ENABLE_CUDASIM=0 on a GPU
# machine: bench/gpu_check.sh). Numba reads this when numba.cuda is first imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# `amed bench` probes memory bandwidth (1 GiB, ~1 s) on every run; tests take a given figure instead
# (test_bench.py tests the probe itself)
os.environ.setdefault("AMED_MEMBW_GBS", "20")

import pytest

TESTS = Path(__file__).parent
DATA = TESTS / "data"
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return DATA / "bailing-tiny"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random checkpoint of the helpers.TINY shape (6 heads / 2 kv heads, 16 experts) and its tensors."""
    import helpers

    tensors = helpers.random_tensors(helpers.TINY, seed=0)
    path = helpers.write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", helpers.TINY, tensors)
    return path, tensors


@pytest.fixture(scope="session")
def golden_store(tmp_path_factory, golden_dir):
    """golden_store(bits=4, ...) -> a store of the golden checkpoint with those quantize Settings,
    built once per session and shared by every test file (read-only: copy it to change it)."""
    from amed.quant.convert import Settings, quantize_model

    root = tmp_path_factory.mktemp("golden-stores")
    built: dict = {}

    def get(**settings) -> Path:
        key = tuple(sorted(settings.items()))
        if key not in built:
            out = root / ("s" + "".join(f"-{k}{v}" for k, v in key))
            quantize_model(golden_dir, out, Settings(**settings))
            built[key] = out
        return built[key]
    return get


@pytest.fixture
def amed_cli(capsys, monkeypatch):
    """amed_cli(*args, stdin="", cwd=None, tty=False) -> (exit code, stdout, stderr): `amed ARGS` run in
    this process (stdin bytes: a piped byte stream, as a shell gives it; `tty`: what stdin.isatty()
    says). A traceback on stderr fails the test."""
    import io

    import numba

    from amed.app import cli

    threads = numba.get_num_threads()

    def run(*args, stdin="", cwd=None, tty=False):
        monkeypatch.setattr(sys, "argv", ["amed", *map(str, args)])
        fake = io.TextIOWrapper(io.BytesIO(stdin)) if isinstance(stdin, bytes) else io.StringIO(stdin)
        fake.isatty = lambda: tty
        monkeypatch.setattr(sys, "stdin", fake)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        finally:
            numba.set_num_threads(threads)
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err
    return run


@pytest.fixture
def amed_run(amed_cli):
    """As amed_cli, with stderr joined into one line (Rich may wrap a sentence)."""
    def run(*args, **kw):
        code, out, err = amed_cli(*args, **kw)
        return code, out, " ".join(err.split())
    return run
