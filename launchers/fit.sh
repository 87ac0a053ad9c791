#!/usr/bin/env bash
# Slurm: scaling fits, one CPU task. For a sweep (its fit.yaml) it gathers every finished cell
# into one results table first; for a single experiment it fits that run's results.
#   bash launchers/fit.sh --config runs/sweeps/<name>/fit.yaml
#SBATCH --job-name=distillscale-fit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail
# The repository: next to this script in a checkout; a batch job runs a spooled copy, so there
# the exported DISTILLSCALE_REPO (set at submission) or the submit directory names it.
DS_REPO="${DISTILLSCALE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -f "${DS_REPO}/launchers/common.sh" ]] || DS_REPO="${SLURM_SUBMIT_DIR:-${PWD}}"
# shellcheck source=launchers/common.sh
source "${DS_REPO}/launchers/common.sh"

DS_LAUNCHER_NAME=fit.sh
DS_LAUNCH_KIND=fit
ds_task_cmd "${DS_LAUNCH_KIND}" python  # the container's Python
ds_main "$@"
