#!/usr/bin/env bash
# Slurm: the prune_distill recipe inside the NGC NeMo container (pyxis/enroot), one task per GPU.
#   bash launchers/prune_distill.sh --config conf/experiments/quickstart.yaml --nodes 2 [key=value ...]
#   sbatch launchers/prune_distill.sh --config ...     (uses the #SBATCH defaults below)
#   bash launchers/prune_distill.sh --dry-run --config conf/experiments/quickstart.yaml --nodes 2
# TP / PP come from the config's launch section; DP = world / (TP x PP), checked before any GPU
# work. On USR1 / TERM the training loop checkpoints and the job requeues itself.
#SBATCH --job-name=distillscale-prune-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --exclusive
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

DS_LAUNCHER_NAME=prune_distill.sh
DS_LAUNCH_KIND=prune_distill
ds_task_cmd "${DS_LAUNCH_KIND}" python  # the container's Python
ds_main "$@"
