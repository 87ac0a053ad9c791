#!/usr/bin/env bash
# Slurm: the data stage (Data Designer synthesis + NeMo-Curator curation) of an experiment, one
# task on one node: CPU nodes by default; on a GPU cluster (launch.gpus_per_node > 0) the GPUs
# of a served LLM generator (data.llm.serve_tensor_parallel), else one for Curator's dedup.
#   bash launchers/data.sh --config conf/experiments/quickstart.yaml [--partition cpu] [key=value ...]
#SBATCH --job-name=distillscale-data
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
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

DS_LAUNCHER_NAME=data.sh
DS_LAUNCH_KIND=data
ds_task_cmd "${DS_LAUNCH_KIND}" python  # the container's Python
ds_main "$@"
