#!/usr/bin/env bash
# Slurm: the prune_distill recipe inside the NGC NeMo container (pyxis/enroot), one task per GPU.
#   sbatch launchers/prune_distill.sh --config conf/experiments/quickstart.yaml [key=value ...]
#   bash launchers/prune_distill.sh --dry-run --config conf/experiments/quickstart.yaml --nodes 2
#SBATCH --job-name=distillscale-prune-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
#SBATCH --exclusive
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail

CONFIG=""
DRY_RUN=0
NODES="${SLURM_JOB_NUM_NODES:-${NODES:-1}}"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-8}}"
IMAGE="${DISTILLSCALE_IMAGE:-nvcr.io/nvidia/nemo:26.04}"
REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
MOUNTS="${DISTILLSCALE_MOUNTS:-${REPO}:/workspace/distillscale}"
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS_PER_NODE="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -z "${CONFIG}" ]]; then
  echo "error: --config is required" >&2
  exit 2
fi

MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n1 || echo localhost)}"
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
WORLD_SIZE=$((NODES * GPUS_PER_NODE))

# srun-native ranks: one task per GPU; RANK / LOCAL_RANK / WORLD_SIZE come from Slurm inside
# each task (never torchrun with several tasks per node).
SRUN=(srun --nodes="${NODES}" --ntasks-per-node="${GPUS_PER_NODE}" --gpus-per-node="${GPUS_PER_NODE}"
      --container-image="${IMAGE}" --container-mounts="${MOUNTS}"
      --container-workdir=/workspace/distillscale --export=ALL
      bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS;
               exec python recipes/prune_distill.py "$@"' _ "${CONFIG}" "${ARGS[@]}")

export MASTER_ADDR MASTER_PORT HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NEMO_TELEMETRY_ENABLED=false
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "MASTER_ADDR=${MASTER_ADDR} MASTER_PORT=${MASTER_PORT} WORLD_SIZE=${WORLD_SIZE}"
  printf '%q ' "${SRUN[@]}"; echo
  exit 0
fi
exec "${SRUN[@]}"
