#!/usr/bin/env bash
# Slurm: the teacher stage (supervision: labels, reasoning traces, top-k logits) with vLLM.
# One task per node; the vLLM engine spans launch.vllm_tensor_parallel GPUs of it (a 32B
# teacher in bf16 needs 2 or more H100s).
#   bash launchers/teacher.sh --config conf/experiments/quickstart.yaml --gpus-per-node 4 launch.vllm_tensor_parallel=4
#SBATCH --job-name=distillscale-teacher
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
# The repository: next to this script in a checkout; a batch job runs a spooled copy, so there
# the exported DISTILLSCALE_REPO (set at submission) or the submit directory names it.
DS_REPO="${DISTILLSCALE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "${DS_REPO}/launchers/common.sh" ]] || DS_REPO="${SLURM_SUBMIT_DIR:-${PWD}}"
# shellcheck source=launchers/common.sh
source "${DS_REPO}/launchers/common.sh"

DS_LAUNCHER_NAME=teacher.sh
DS_LAUNCH_KIND=teacher
ds_task_cmd "${DS_LAUNCH_KIND}" python  # the container's Python
ds_main "$@"
