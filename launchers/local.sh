#!/usr/bin/env bash
# Run a recipe on this machine (CPU, or the GPUs of one node): the same arguments as the Slurm
# launchers, plus --kind to pick which one (default prune_distill).
#   bash launchers/local.sh --config conf/experiments/quickstart.yaml [--dry-run] [key=value ...]
#   bash launchers/local.sh --kind data --config conf/experiments/quickstart.yaml
#   bash launchers/local.sh --config-list runs/sweeps/<name>/plan/cells.txt   (every line in turn)
# With --gpus-per-node G > 1 it starts G ranks itself (RANK / LOCAL_RANK / WORLD_SIZE /
# MASTER_ADDR / MASTER_PORT, like srun's tasks); never torchrun. Slurm-only options (--time,
# --partition, --account, --image, --mount, --job-name, --dependency, --array) are accepted and
# have no effect here. A run stopped by SIGUSR1 / SIGTERM / Ctrl-C at a checkpoint exits with 75:
# run the same command again to resume.
set -euo pipefail
DS_REPO="${DISTILLSCALE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launchers/common.sh
source "${DS_REPO}/launchers/common.sh"

DS_LAUNCHER_NAME=local.sh
DS_LAUNCH_KIND=prune_distill
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kind) DS_LAUNCH_KIND="${2:?--kind needs a value}"; shift 2 ;;
    --) ARGS+=("$@"); break ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
ds_parse_args "${ARGS[@]}"
PY="$(ds_host_python)"
ds_task_cmd "${DS_LAUNCH_KIND}" "${PY}"
[[ -z "${DS_NODES}" || "${DS_NODES}" == 1 ]] || ds_die "local.sh runs on this machine only (got --nodes ${DS_NODES}); use the Slurm launchers"

PIDS=()
SIGNALLED=""
forward() {
  SIGNALLED="$1"
  echo "distillscale: ${1} received, asking the ranks to checkpoint and stop" >&2
  local pid
  for pid in "${PIDS[@]}"; do kill -s USR1 "${pid}" 2>/dev/null || true; done
}

run_one() {
  ds_plan 1 "${DS_GPUS}"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NEMO_TELEMETRY_ENABLED=false TOKENIZERS_PARALLELISM=false
  local cmd=("${DS_TASK_CMD[@]}" "${DS_CONFIG}" "${DS_OVERRIDES[@]}")
  local world="${DS_WORLD_SIZE}" port="${MASTER_PORT:-$((29500 + $$ % 1000))}"
  if [[ "${DS_DRY_RUN}" == 1 ]]; then
    if [[ "${world}" -gt 1 ]]; then
      echo "export MASTER_ADDR=127.0.0.1 MASTER_PORT=${port} WORLD_SIZE=${world} LOCAL_WORLD_SIZE=${world}"
      echo "# for RANK in 0..$((world - 1)): RANK=\$RANK LOCAL_RANK=\$RANK"
    fi
    ds_print_cmd "${cmd[@]}"
    return 0
  fi
  cd "${DS_REPO}"
  PIDS=()
  SIGNALLED=""
  if [[ "${world}" -le 1 ]]; then
    "${cmd[@]}" &
    PIDS+=($!)
  else
    local r
    for ((r = 0; r < world; r++)); do
      RANK="${r}" LOCAL_RANK="${r}" WORLD_SIZE="${world}" LOCAL_WORLD_SIZE="${world}" \
        MASTER_ADDR=127.0.0.1 MASTER_PORT="${port}" "${cmd[@]}" &
      PIDS+=($!)
    done
  fi
  local rc=0 pid prc
  for pid in "${PIDS[@]}"; do
    while true; do
      prc=0
      wait "${pid}" || prc=$?
      kill -0 "${pid}" 2>/dev/null || break  # woken by a trapped signal: wait again
    done
    [[ "${prc}" -gt "${rc}" ]] && rc="${prc}"
  done
  if [[ "${rc}" == "${DS_REQUEUE_EXIT_CODE}" ]]; then
    echo "distillscale: stopped at a checkpoint (${SIGNALLED:-signal}); run the same command again to resume" >&2
  fi
  return "${rc}"
}

trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
if [[ -n "${DS_CONFIG_LIST}" && -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  [[ -f "${DS_CONFIG_LIST}" ]] || ds_die "${DS_CONFIG_LIST}: config list not found"
  mapfile -t CONFIGS < "${DS_CONFIG_LIST}"
  for DS_CONFIG in "${CONFIGS[@]}"; do
    [[ -n "${DS_CONFIG}" ]] || continue
    [[ -f "${DS_CONFIG}" ]] || ds_die "${DS_CONFIG}: config file not found (listed in ${DS_CONFIG_LIST})"
    run_one
  done
else
  ds_resolve_config
  run_one
fi
