#!/usr/bin/env bash
# Run a recipe on this machine (CPU, or one GPU when CUDA is present).
#   bash launchers/local.sh --config conf/experiments/quickstart.yaml [--dry-run] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=""
DRY_RUN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -z "${CONFIG}" ]]; then
  echo "error: --config is required" >&2
  exit 2
fi
PYTHON="${PYTHON:-.venv/bin/python}"
CMD=("${PYTHON}" recipes/prune_distill.py "${CONFIG}" "${ARGS[@]}")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ "${DRY_RUN}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
