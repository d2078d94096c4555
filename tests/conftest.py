import sys
from pathlib import Path

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
