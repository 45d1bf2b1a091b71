# resopt: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RESOPT := $(VENV)/bin/resopt
# Extra arguments for the benchmark scripts, e.g. make bench-quant ARGS="--checkpoint runs/bench-cpu/r18.pt"
ARGS ?=
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup demo test test-fast lint bench-cpu bench-prune bench-quant bench-gpu gpu-proof-prepare gpu-proof clean

# A virtual environment with resopt and its dev tools. torchvision is left unpinned in pyproject.toml so
# pip installs the torch it was built for.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# The main job: train -> export -> quantize -> bench on the CIFAR-10 subset shipped in examples/.
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

# Two pytest-xdist workers, each handed whole test files (a file's module fixtures are built once; the session
# fixtures once per run, under a file lock: tests/conftest.py), longest files first; then, alone, the tests
# marked serial (they time themselves, so they must not share the cores with the other worker).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q $(XDIST) -m "not serial" --durations=15
	$(PY) -m pytest -q -m serial

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow and not serial"
	$(PY) -m pytest -q -m "serial and not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy resopt

bench-cpu: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/bench_cpu.py $(ARGS)

bench-prune: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/bench_prune.py $(ARGS)

bench-quant: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/bench_quant.py $(ARGS)

bench-gpu: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/bench_gpu.py $(ARGS)

# The GPU proof (README "GPU proof"): fill .carry/ here (wheels for the GPU machine's Python, the CIFAR-10
# archive), then run the script there; no setup step, since the GPU machine has no network.
gpu-proof-prepare:
	bash scripts/gpu_proof_prepare.sh

gpu-proof:
	bash scripts/gpu_proof.sh

clean:
	rm -rf runs .pytest_cache .ruff_cache
