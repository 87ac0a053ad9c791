# shellcheck shell=bash
# Shared by every launcher: argument parsing, the checked launch plan, sbatch submission,
# srun inside the NGC container (pyxis/enroot) with srun-native ranks, and requeue on preemption.
#
# A launcher sets DS_LAUNCH_KIND and DS_TASK_CMD (the command each task runs, CONFIG and
# overrides appended) and calls ds_main "$@". Outside a Slurm job it submits itself with sbatch;
# inside one it runs srun. `--dry-run` prints the exact commands and environment instead.
#
# Precedence for nodes / GPUs / time / partition / account / image / mounts:
#   command-line flag > DISTILLSCALE_* environment variable > the config's `launch:` section.
# Inside a job the allocation itself is authoritative; a flag that disagrees with it is an error.

DS_REQUEUE_EXIT_CODE=75  # distillscale/train/preemption.py REQUEUE_EXIT_CODE (EX_TEMPFAIL)

# What each kind of job runs (with CONFIG and overrides appended); PY is the task's Python.
ds_task_cmd() {
  local kind="$1" py="$2"
  case "${kind}" in
    # The config's recipe (`recipe:`, default prune_distill), as `distillscale run` runs it.
    prune_distill) DS_TASK_CMD=("${py}" -m distillscale.cli run) ;;
    data|teacher|eval|fit) DS_TASK_CMD=("${py}" -m distillscale.cli launch stage "${kind}") ;;
    *) ds_die "unknown kind ${kind} (prune_distill, data, teacher, eval, fit)" ;;
  esac
}

ds_die() {
  echo "error: $*" >&2
  exit 2
}

ds_usage() {
  cat <<EOF
usage: ${DS_LAUNCHER_NAME} (--config FILE | --config-list FILE) [options] [key.sub=value ...]
  --config FILE         experiment config (conf/experiments/*.yaml)
  --config-list FILE    one config per line; a job array task runs line SLURM_ARRAY_TASK_ID+1
  --nodes N             nodes                  (env DISTILLSCALE_NODES; config launch.nodes)
  --gpus-per-node G     GPUs per node, 0 = CPU (env DISTILLSCALE_GPUS_PER_NODE; launch.gpus_per_node)
  --time T              wall time              (env DISTILLSCALE_TIME; launch.time)
  --partition P         (env DISTILLSCALE_PARTITION; launch.partition)
  --account A           (env DISTILLSCALE_ACCOUNT; launch.account)
  --image I             container image or .sqsh (env DISTILLSCALE_IMAGE; launch.container, or
                        launch.vllm_container for the jobs that run vLLM: teacher, eval, serve)
  --mount SRC:DST[:ro]  extra container mount, repeatable (env DISTILLSCALE_MOUNTS, comma list)
  --job-name NAME       sbatch job name
  --dependency DEP      sbatch dependency, e.g. afterok:123
  --array SPEC          sbatch job array, e.g. 0-7 (with --config-list)
  --dry-run             print the sbatch / srun commands and environment; run nothing
EOF
}

ds_parse_args() {
  DS_CONFIG="" DS_CONFIG_LIST="" DS_DRY_RUN=0
  DS_NODES="${DISTILLSCALE_NODES:-}" DS_GPUS="${DISTILLSCALE_GPUS_PER_NODE:-}"
  DS_TIME_ARG="${DISTILLSCALE_TIME:-}" DS_PARTITION_ARG="${DISTILLSCALE_PARTITION:-}"
  DS_ACCOUNT_ARG="${DISTILLSCALE_ACCOUNT:-}" DS_IMAGE_ARG="${DISTILLSCALE_IMAGE:-}"
  DS_JOB_NAME="distillscale-${DS_LAUNCH_KIND//_/-}" DS_DEPENDENCY="" DS_ARRAY=""
  DS_MOUNT_ARGS=() DS_OVERRIDES=() DS_PASS_ARGS=()
  if [[ -n "${DISTILLSCALE_MOUNTS:-}" ]]; then
    local m
    IFS=',' read -r -a m <<<"${DISTILLSCALE_MOUNTS}"
    DS_MOUNT_ARGS+=("${m[@]}")
  fi
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config) DS_CONFIG="${2:?--config needs a file}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --config-list) DS_CONFIG_LIST="${2:?--config-list needs a file}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --nodes) DS_NODES="${2:?--nodes needs a number}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --gpus-per-node) DS_GPUS="${2:?--gpus-per-node needs a number}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --time) DS_TIME_ARG="${2:?--time needs a value}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --partition) DS_PARTITION_ARG="${2:?--partition needs a value}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --account) DS_ACCOUNT_ARG="${2:?--account needs a value}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --image) DS_IMAGE_ARG="${2:?--image needs a value}"; DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --mount) DS_MOUNT_ARGS+=("${2:?--mount needs SRC:DST}"); DS_PASS_ARGS+=("$1" "$2"); shift 2 ;;
      --job-name) DS_JOB_NAME="${2:?--job-name needs a value}"; shift 2 ;;
      --dependency) DS_DEPENDENCY="${2:?--dependency needs a value}"; shift 2 ;;
      --array) DS_ARRAY="${2:?--array needs a range}"; shift 2 ;;
      --dry-run) DS_DRY_RUN=1; shift ;;
      -h|--help) ds_usage; exit 0 ;;
      --) shift; DS_OVERRIDES+=("$@"); DS_PASS_ARGS+=("$@"); break ;;
      --*) ds_die "${DS_LAUNCHER_NAME}: unknown option $1 (see --help)" ;;
      *=*) DS_OVERRIDES+=("$1"); DS_PASS_ARGS+=("$1"); shift ;;
      *) ds_die "${DS_LAUNCHER_NAME}: unexpected argument '$1' (overrides look like key.sub=value)" ;;
    esac
  done
  if [[ -z "${DS_CONFIG}" && -z "${DS_CONFIG_LIST}" ]]; then
    ds_die "${DS_LAUNCHER_NAME}: --config (or --config-list) is required"
  fi
  if [[ -n "${DS_CONFIG}" && -n "${DS_CONFIG_LIST}" ]]; then
    ds_die "${DS_LAUNCHER_NAME}: give --config or --config-list, not both"
  fi
}

# The config of this task: --config, or line SLURM_ARRAY_TASK_ID+1 of --config-list (task 0
# when not inside an array task, e.g. for --dry-run).
ds_resolve_config() {
  if [[ -n "${DS_CONFIG_LIST}" ]]; then
    [[ -f "${DS_CONFIG_LIST}" ]] || ds_die "${DS_CONFIG_LIST}: config list not found"
    local index="${SLURM_ARRAY_TASK_ID:-0}"
    DS_CONFIG="$(sed -n "$((index + 1))p" "${DS_CONFIG_LIST}")"
    [[ -n "${DS_CONFIG}" ]] || ds_die "${DS_CONFIG_LIST}: no line $((index + 1)) for array task ${index}"
  fi
  [[ -f "${DS_CONFIG}" ]] || ds_die "${DS_CONFIG}: config file not found"
}

# The Python that reads the config on the submitting / batch host (it needs only pydantic and
# pyyaml: `distillscale.config` imports no torch).
ds_host_python() {
  if [[ -n "${DISTILLSCALE_PYTHON:-}" ]]; then
    echo "${DISTILLSCALE_PYTHON}"
  elif [[ -x "${DS_REPO}/.venv/bin/python" ]]; then
    echo "${DS_REPO}/.venv/bin/python"
  else
    echo python3
  fi
}

# GPUs per node of the running allocation (empty outside a job or for a CPU allocation).
ds_allocated_gpus() {
  local g="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  g="${g##*:}"  # "h100:8" -> "8"
  echo "${g}"
}

# Ask the library for the checked plan; sets the DS_* variables it prints.
ds_plan() {
  local nodes="$1" gpus="$2" py plan
  py="$(ds_host_python)"
  local args=(-m distillscale.cli launch plan "${DS_LAUNCH_KIND}" --repo "${DS_REPO}")
  [[ -n "${nodes}" ]] && args+=(--nodes "${nodes}")
  [[ -n "${gpus}" ]] && args+=(--gpus-per-node "${gpus}")
  [[ -n "${DS_TIME_ARG}" ]] && args+=(--time "${DS_TIME_ARG}")
  [[ -n "${DS_PARTITION_ARG}" ]] && args+=(--partition "${DS_PARTITION_ARG}")
  [[ -n "${DS_ACCOUNT_ARG}" ]] && args+=(--account "${DS_ACCOUNT_ARG}")
  [[ -n "${DS_IMAGE_ARG}" ]] && args+=(--image "${DS_IMAGE_ARG}")
  local m
  for m in "${DS_MOUNT_ARGS[@]}"; do args+=(--mount "${m}"); done
  if ! plan="$(cd "${DS_REPO}" && PYTHONPATH="${DS_REPO}${PYTHONPATH:+:${PYTHONPATH}}" \
      "${py}" "${args[@]}" -- "${DS_CONFIG}" "${DS_OVERRIDES[@]}")"; then
    echo "error: ${DS_LAUNCHER_NAME}: the launch plan was refused (message above); nothing was submitted" >&2
    exit 2
  fi
  # Lines are DS_KEY=<shell-quoted value>, produced by distillscale.launch.allocation.
  eval "${plan}"
}

ds_print_cmd() {
  printf '%q ' "$@"
  echo
}

# Outside a job: submit this launcher with sbatch (the same arguments run inside the job).
ds_submit() {
  ds_plan "${DS_NODES}" "${DS_GPUS}"
  local out="${DS_REPO}/runs/slurm/%x-%j.out"
  [[ -n "${DS_ARRAY}" ]] && out="${DS_REPO}/runs/slurm/%x-%A_%a.out"
  local sb=(sbatch --parsable --job-name="${DS_JOB_NAME}" --nodes="${DS_NODES}"
            --ntasks-per-node="${DS_TASKS_PER_NODE}" --time="${DS_TIME}"
            --signal=B:USR1@120 --requeue --open-mode=append --output="${out}"
            --chdir="${DS_REPO}" --export="ALL,DISTILLSCALE_REPO=${DS_REPO}")
  if [[ "${DS_GPUS_PER_NODE}" -gt 0 ]]; then
    sb+=(--gpus-per-node="${DS_GPUS_PER_NODE}")
    [[ "${DS_LAUNCH_KIND}" == prune_distill ]] && sb+=(--exclusive)
  fi
  [[ -n "${DS_PARTITION}" ]] && sb+=(--partition="${DS_PARTITION}")
  [[ -n "${DS_ACCOUNT}" ]] && sb+=(--account="${DS_ACCOUNT}")
  [[ -n "${DS_DEPENDENCY}" ]] && sb+=(--dependency="${DS_DEPENDENCY}" --kill-on-invalid-dep=yes)
  [[ -n "${DS_ARRAY}" ]] && sb+=(--array="${DS_ARRAY}")
  # --wrap rather than the script file: sbatch would otherwise add the file's #SBATCH defaults
  # (e.g. 8 GPUs) to what the plan asked for. `exec` keeps the launcher as the batch shell, the
  # process that --signal=B:USR1 reaches.
  local inner
  inner="$(printf '%q ' exec bash "${DS_REPO}/launchers/${DS_LAUNCHER_NAME}" "${DS_PASS_ARGS[@]}")"
  sb+=(--wrap="${inner% }")
  if [[ "${DS_DRY_RUN}" == 1 ]]; then
    echo "# plan: ${DS_LAUNCH_KIND} ${DS_NAME}: ${DS_NODES} node(s) x ${DS_GPUS_PER_NODE} GPU(s)," \
         "world ${DS_WORLD_SIZE} = TP ${DS_TENSOR_PARALLEL} x PP ${DS_PIPELINE_PARALLEL} x DP ${DS_DATA_PARALLEL}"
    if [[ "${DS_LAUNCH_KIND}" == prune_distill ]]; then
      echo "# prune: TP ${DS_PRUNE_TENSOR_PARALLEL} x PP ${DS_PRUNE_PIPELINE_PARALLEL} x DP ${DS_PRUNE_DATA_PARALLEL} (Minitron prunes an unsharded model)"
      echo "# distill: backend ${DS_DISTILL_BACKEND}, sequence parallel ${DS_SEQUENCE_PARALLEL}, every planned student fits TP ${DS_TENSOR_PARALLEL} x PP ${DS_PIPELINE_PARALLEL}"
    fi
    echo "# submit:"
    ds_print_cmd "${sb[@]}"
    echo "# then inside the job:"
    ds_build_srun "<first host of SLURM_JOB_NODELIST>" "<20000 + SLURM_JOB_ID % 20000>"
    ds_print_env
    ds_print_cmd "${DS_SRUN[@]}"
    return 0
  fi
  mkdir -p "${DS_REPO}/runs/slurm"
  local job
  job="$("${sb[@]}")"
  echo "${job%%;*}"
}

ds_build_srun() {
  local master_addr="$1" master_port="$2"
  export MASTER_ADDR="${master_addr}" MASTER_PORT="${master_port}"
  export WORLD_SIZE="${DS_WORLD_SIZE}" LOCAL_WORLD_SIZE="${DS_TASKS_PER_NODE}"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NEMO_TELEMETRY_ENABLED=false TOKENIZERS_PARALLELISM=false
  export PYTHONUNBUFFERED=1 DISTILLSCALE_REPO="${DS_REPO}"
  # srun-native ranks: one task per GPU, each exporting the torch.distributed variables from its
  # own Slurm ids. Never torchrun with several tasks per node (its agents collide on one port).
  # shellcheck disable=SC2016  # expanded by each task, not here
  local wrapper='export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"; exec "$@"'
  DS_SRUN=(srun --kill-on-bad-exit=1 --nodes="${DS_NODES}" --ntasks-per-node="${DS_TASKS_PER_NODE}"
           --container-image="${DS_IMAGE}" --container-mounts="${DS_MOUNTS}"
           --container-workdir="${DS_REPO}" --no-container-mount-home --export=ALL
           bash -c "${wrapper}" distillscale-task "${DS_TASK_CMD[@]}" "${DS_CONFIG}" "${DS_OVERRIDES[@]}")
}

ds_print_env() {
  local v
  for v in MASTER_ADDR MASTER_PORT WORLD_SIZE LOCAL_WORLD_SIZE HF_HUB_OFFLINE HF_DATASETS_OFFLINE \
           NEMO_TELEMETRY_ENABLED TOKENIZERS_PARALLELISM PYTHONUNBUFFERED DISTILLSCALE_REPO; do
    echo "export ${v}=$(printf '%q' "${!v}")"
  done
  echo "# each task: RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID WORLD_SIZE=\$SLURM_NTASKS"
}

DS_SRUN_PID=""
DS_SIGNALLED=""

ds_forward() {
  # Slurm sends USR1 (--signal=B:USR1@120) to this batch shell only; pass it to the tasks,
  # which checkpoint after their current step and exit with the requeue code.
  DS_SIGNALLED="$1"
  echo "distillscale: ${1} received, forwarding to the job step" >&2
  [[ -n "${DS_SRUN_PID}" ]] && kill -s "$1" "${DS_SRUN_PID}" 2>/dev/null
  return 0
}

# Inside a job: run the step, and requeue it when the tasks stopped at a checkpoint.
ds_run_in_job() {
  local alloc_nodes="${SLURM_JOB_NUM_NODES:-1}" alloc_gpus
  alloc_gpus="$(ds_allocated_gpus)"
  alloc_gpus="${alloc_gpus:-0}"
  if [[ -n "${DS_NODES}" && "${DS_NODES}" != "${alloc_nodes}" ]]; then
    ds_die "${DS_LAUNCHER_NAME}: --nodes ${DS_NODES} but the allocation has ${alloc_nodes} node(s); submit with 'bash launchers/${DS_LAUNCHER_NAME} --nodes ${DS_NODES} ...' (it sets sbatch --nodes)"
  fi
  if [[ -n "${DS_GPUS}" && "${DS_GPUS}" != "${alloc_gpus}" ]]; then
    ds_die "${DS_LAUNCHER_NAME}: --gpus-per-node ${DS_GPUS} but the allocation has ${alloc_gpus} GPU(s) per node"
  fi
  ds_plan "${alloc_nodes}" "${alloc_gpus}"
  local master_addr
  # The whole list, then its first line: `| head -n1` would end scontrol with SIGPIPE on long
  # node lists, which pipefail turns into a failed job.
  master_addr="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}")"
  master_addr="${master_addr%%$'\n'*}"
  ds_build_srun "${MASTER_ADDR:-${master_addr:-localhost}}" \
                "${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  if [[ "${DS_DRY_RUN}" == 1 ]]; then
    ds_print_env
    ds_print_cmd "${DS_SRUN[@]}"
    return 0
  fi
  echo "distillscale: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}:" \
       "${DS_LAUNCH_KIND} ${DS_CONFIG} on ${DS_NODES} node(s), world ${DS_WORLD_SIZE}" >&2
  trap 'ds_forward USR1' USR1
  trap 'ds_forward TERM' TERM
  "${DS_SRUN[@]}" &
  DS_SRUN_PID=$!
  local rc=0
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until the
  # step itself has ended, so its exit code is the tasks' and not the signal's.
  while true; do
    rc=0
    wait "${DS_SRUN_PID}" || rc=$?
    kill -0 "${DS_SRUN_PID}" 2>/dev/null || break
  done
  if [[ "${rc}" == "${DS_REQUEUE_EXIT_CODE}" ]]; then
    local job="${SLURM_JOB_ID}"
    [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    echo "distillscale: checkpoint written (${DS_SIGNALLED:-signal}); requeueing ${job}" >&2
    scontrol requeue "${job}"
    exit 0
  fi
  exit "${rc}"
}

ds_main() {
  ds_parse_args "$@"
  ds_resolve_config
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    ds_run_in_job
  else
    ds_submit
  fi
}
