#!/usr/bin/env bash
# A grid of experiments (dataset sizes x compression ratios x method x supervision x schedule)
# as Slurm job arrays chained by dependencies:
#   data[u] -> teacher[u] (aftercorr) -> prune_distill[c] (afterok) -> eval[c] (aftercorr) -> fit
# u runs over the distinct data + teacher setups, c over the cells still to do: cells whose
# results exist for the same config are skipped, and so are finished data / teacher setups.
#   bash launchers/sweep.sh --sweep conf/sweeps/quickstart_grid.yaml [--dry-run] [key=value ...]
#   bash launchers/sweep.sh --sweep ... --local          (the same chain, in turn, on this machine)
# --nodes / --gpus-per-node size the prune_distill jobs; --partition, --account, --time,
# --image and --mount go to every job. --dry-run writes the plan (cell configs and lists under
# the sweep's folder) and prints every sbatch / srun command instead of submitting.
set -euo pipefail
DS_REPO="${DISTILLSCALE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launchers/common.sh
source "${DS_REPO}/launchers/common.sh"
DS_LAUNCHER_NAME=sweep.sh

SWEEP="" LOCAL=0 DRY_RUN=0
COMMON=() TRAIN=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sweep) SWEEP="${2:?--sweep needs a file}"; shift 2 ;;
    --local) LOCAL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --nodes|--gpus-per-node) TRAIN+=("$1" "${2:?$1 needs a number}"); shift 2 ;;
    --partition|--account|--time|--image|--mount) COMMON+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) ds_die "sweep.sh: unknown option $1 (see --help)" ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) ds_die "sweep.sh: unexpected argument '$1' (overrides look like key.sub=value)" ;;
  esac
done
[[ -n "${SWEEP}" ]] || ds_die "sweep.sh: --sweep is required"

PY="$(ds_host_python)"
if [[ "${LOCAL}" == 1 && "${DRY_RUN}" == 0 ]]; then
  # The same chain on this machine, in one process: every pending data/teacher setup, every
  # cell, then the sweep's fit and report (the stack's start-up is paid once, not per cell).
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NEMO_TELEMETRY_ENABLED=false TOKENIZERS_PARALLELISM=false
  cd "${DS_REPO}"
  # --run-here before the positionals: argparse matches the sweep path and the (possibly empty)
  # overrides in one go, and a lone `--` after an option between them was "unrecognized".
  exec "${PY}" -m distillscale.cli launch sweep --run-here "${SWEEP}" -- "${OVERRIDES[@]}"
fi
if ! PLAN="$(cd "${DS_REPO}" && "${PY}" -m distillscale.cli launch sweep "${SWEEP}" -- "${OVERRIDES[@]}")"; then
  echo "error: sweep.sh: the sweep was refused (message above); nothing was submitted" >&2
  exit 2
fi
eval "${PLAN}"  # DS_ROOT DS_CELL_LIST DS_UPSTREAM_LIST DS_FIT_CONFIG DS_PENDING_* DS_TOTAL_CELLS
echo "sweep ${DS_ROOT}: ${DS_PENDING_CELLS} of ${DS_TOTAL_CELLS} cell(s) to run," \
     "${DS_PENDING_UPSTREAMS} data/teacher setup(s) to build" >&2
if [[ "${DS_PENDING_CELLS}" == 0 ]]; then
  echo "sweep.sh: every cell has its results; nothing to submit" >&2
  exit 0
fi
DRY=()
[[ "${DRY_RUN}" == 1 ]] && DRY=(--dry-run)

if [[ "${LOCAL}" == 1 ]]; then
  run_local() { bash "${DS_REPO}/launchers/local.sh" "${DRY[@]}" "$@"; }
  if [[ "${DS_PENDING_UPSTREAMS}" -gt 0 ]]; then
    run_local --kind data --config-list "${DS_UPSTREAM_LIST}"
    run_local --kind teacher --config-list "${DS_UPSTREAM_LIST}"
  fi
  run_local --kind prune_distill --config-list "${DS_CELL_LIST}"
  run_local --kind eval --config-list "${DS_CELL_LIST}"
  run_local --kind fit --config "${DS_FIT_CONFIG}"
  exit 0
fi

# Submit one stage (the sweep's overrides are already in every cell's config.yaml); prints its
# job id (a placeholder under --dry-run, whose commands go to stderr).
submit() {
  local name="$1"
  shift
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# ---- ${name}" >&2
    bash "${DS_REPO}/launchers/${name}.sh" --dry-run "$@" >&2
    echo "<${name}-job>"
  else
    bash "${DS_REPO}/launchers/${name}.sh" "$@"
  fi
}

DEP=()
if [[ "${DS_PENDING_UPSTREAMS}" -gt 0 ]]; then
  U="0-$((DS_PENDING_UPSTREAMS - 1))"
  DATA_JOB="$(submit data --config-list "${DS_UPSTREAM_LIST}" --array "${U}" "${COMMON[@]}")"
  TEACHER_JOB="$(submit teacher --config-list "${DS_UPSTREAM_LIST}" --array "${U}" \
                 --dependency "aftercorr:${DATA_JOB}" "${COMMON[@]}")"
  # A cell needs one particular teacher; waiting for all of them keeps the chain simple.
  DEP=(--dependency "afterok:${TEACHER_JOB}")
fi
C="0-$((DS_PENDING_CELLS - 1))"
TRAIN_JOB="$(submit prune_distill --config-list "${DS_CELL_LIST}" --array "${C}" \
             "${DEP[@]}" "${TRAIN[@]}" "${COMMON[@]}")"
EVAL_JOB="$(submit eval --config-list "${DS_CELL_LIST}" --array "${C}" \
            --dependency "aftercorr:${TRAIN_JOB}" "${COMMON[@]}")"
FIT_JOB="$(submit fit --config "${DS_FIT_CONFIG}" --dependency "afterok:${EVAL_JOB}" "${COMMON[@]}")"
echo "data=${DATA_JOB:-none} teacher=${TEACHER_JOB:-none} prune_distill=${TRAIN_JOB} eval=${EVAL_JOB} fit=${FIT_JOB}"
