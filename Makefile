PY ?= python3

# install amed and its development dependencies (editable)
install:
	$(PY) -m pip install -q -e ".[dev]"

# compile the CPU kernels ahead (about a minute, once), so the first chat starts at once
warmup: install
	$(PY) -m amed warmup

# run the test suite (the command CI runs)
test: install
	$(PY) -m pytest

# the main job on a built-in default: a small random model, quantized, chatted with, benchmarked
demo: install
	bash bench/demo.sh

# retrain the committed small BailingMoeV2 (tests/data/trained) on ICD-10-CM text: torch CPU, ~20 min on 2 cores
trained:
	$(PY) -m pip install -q -e ".[train]"
	$(PY) tools/train_tiny.py -o tests/data/trained

# remove build leftovers and the compiled-kernel cache
clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf "$${XDG_CACHE_HOME:-$$HOME/.cache}/amed/numba"

.PHONY: install warmup test demo trained clean
