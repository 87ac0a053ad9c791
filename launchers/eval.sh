#!/usr/bin/env bash
# Slurm: evaluation of the teacher and every student (in-domain scoring, MMLU / MMLU-Pro / the
# knowledge probe through lm-eval with its vLLM backend), then the run's fit and report; marks
# the run done for sweeps.
# One task per node; vLLM spans launch.vllm_tensor_parallel GPUs.
#   bash launchers/eval.sh --config conf/experiments/quickstart.yaml --gpus-per-node 1
#SBATCH --job-name=distillscale-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=02:00:00
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

DS_LAUNCHER_NAME=eval.sh
DS_LAUNCH_KIND="eval"
ds_task_cmd "${DS_LAUNCH_KIND}" python  # the container's Python
ds_main "$@"
