# Every target sets up what it needs: a fresh clone runs `make demo` and `make test` as they are.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch for tests and the demo where no GPU is present (override: make TORCH_SPEC=torch).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
STAMP := $(VENV)/.installed

.PHONY: venv demo test check lint imports format typecheck bench bench-7b clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(PY) -m safelora_cli.demo demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

format: $(STAMP)
	$(PY) -m ruff format src tests bench
	$(PY) -m ruff check --fix src tests bench

typecheck: $(STAMP)
	$(PY) -m mypy

# the layers of docs/architecture.md: imports only go down, the math stays pure, no cycles
imports: $(STAMP)
	$(VENV)/bin/lint-imports

check: lint imports typecheck test

bench: $(STAMP)
	$(PY) -m pip install -q py-spy || echo "py-spy not installed: the profile falls back to cProfile (main thread only)"
	$(PY) bench/run.py

# opt-in, never in CI: the Llama-2-7B shape (needs ~60 GB of disk, about an hour on 2 cores)
bench-7b: $(STAMP)
	$(PY) bench/bench_7b.py

clean:
	rm -rf $(VENV) demo bench/cache .pytest_cache .mypy_cache .ruff_cache
