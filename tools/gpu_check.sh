#!/usr/bin/env bash
# The GPU path at small scale on one GPU, in at most 8 minutes (tools/gpu_check.py says what runs):
#   bash tools/gpu_check.sh                 # GPU: installs the carried wheels, then runs the check
#   bash tools/gpu_check.sh --cpu           # the same script on CPU, tiny model (GPU_CHECK_CPU=1)
#   bash tools/gpu_check.sh --distill-steps 100 ...   (extra flags go to tools/gpu_check.py)
# A GPU machine without a package registry gets megatron-core, ModelOpt, Megatron-Bridge and the
# HF stack from the wheels `make gpu-wheels` put in build/gpu-wheels (GPU_WHEELS overrides),
# installed with --no-deps next to the image's own torch into build/gpu-check-site.
# Python: GPU_CHECK_PYTHON, else DISTILLSCALE_PYTHON, else python3. The last line printed is
#   tokens_per_s=... mfu=... peak_mem_gib=... kd_loss_drop=... hf_logit_diff=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"
py="${GPU_CHECK_PYTHON:-${DISTILLSCALE_PYTHON:-python3}}"
wheels="${GPU_WHEELS:-${root}/build/gpu-wheels}"
site="${GPU_CHECK_SITE:-${root}/build/gpu-check-site}"
cpu="${GPU_CHECK_CPU:-0}"
for a in "$@"; do [[ "${a}" == --cpu ]] && cpu=1; done

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NEMO_TELEMETRY_ENABLED=false
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ "${cpu}" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" GPU_CHECK_CPU=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

"${py}" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else
  "gpu_check: needs Python 3.12 (the project and the carried megatron-core wheel are cp312), "
  "this is " + sys.version.split()[0])'
"${py}" -c 'import torch' || { echo "gpu_check: ${py} has no torch" >&2; exit 2; }

if [[ -d "${wheels}" ]]; then
  "${py}" tools/gpu_wheels.py install --wheels "${wheels}" --target "${site}"
fi
export PYTHONPATH="${site}:${root}${PYTHONPATH:+:${PYTHONPATH}}"
if ! "${py}" tools/gpu_wheels.py missing; then
  echo "gpu_check: imports missing (above); add their wheels to GPU_EXTRA_WHEELS in the Makefile" \
       "and re-run 'make gpu-wheels'" >&2
  exit 2
fi
exec "${py}" tools/gpu_check.py "$@"
