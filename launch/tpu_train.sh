#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM slice, installs var-jax on every worker and starts
# `var-jax train` on all workers at once, detached, with one log file per worker.
# Run `bash launch/tpu_train.sh --help` for the flags.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_train.sh --tpu NAME --zone ZONE [options] [-- extra train args]

Creates or reuses a Cloud TPU VM slice, installs var-jax on every worker (idempotent: the venv is
made once), starts `var-jax train --config CONFIG --workdir WORKDIR [extra args]` on all workers
at once under nohup (one log per worker in ~/var_jax_logs/), then follows worker 0's log.

Required:
  --tpu NAME                 TPU VM (and queued resource) name.
  --zone ZONE                e.g. us-central2-b, us-east5-a.
  --config PATH[:ARGS]       experiment config, e.g. configs/var_imagenet.py:depth=16. A local file
                             is copied to the workers; other values are passed on unchanged.
  --workdir DIR              checkpoints and logs, usually gs://BUCKET/PATH.

Slice:
  --project PROJECT          Google Cloud project (default: gcloud's configured project).
  --accelerator-type TYPE    e.g. v4-32, v5p-128, v5litepod-256, v6e-64; needed to create.
  --runtime-version VERSION  TPU software version (default from the accelerator type:
                             v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                             v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e).
  --queued                   create through a queued resource (default).
  --direct                   create with `gcloud compute tpus tpu-vm create` instead.
  --spot                     spot capacity (preemptible; training auto-resumes from workdir).
  --best-effort              best-effort tier (queued only).
  --reserved                 reserved capacity.
  --wait-minutes N           how long to wait for a queued resource to become ACTIVE (default 120).
  --delete                   delete the slice (queued-resources delete --force --async) and exit.

Software:
  --package-url URL          install var-jax from this pip URL (e.g. git+https://...@ref) instead
                             of an sdist built here and copied to every worker.
  --jax-spec SPEC            pip requirement for JAX (default "jax[tpu]==0.10.2").
  --python-version VERSION   Python of the workers' venv, made with uv (default 3.11).
  --skip-setup               do not touch the workers' venv.

Run:
  --tfds-data-dir DIR        TFDS_DATA_DIR on the workers (default: $TFDS_DATA_DIR here).
  --env KEY=VALUE            extra environment variable for training (repeatable).
  --run-name NAME            log file prefix (default train-<UTC time>).
  --restart                  stop a var-jax run this script started earlier on the workers.
  --no-tail                  do not follow worker 0's log after starting.
  --dry-run                  print every command (gcloud and the local build) instead of running.
  -h, --help                 show this help.

Arguments after `--`, and any --config.FIELD=VALUE flag, are passed to `var-jax train`.
EOF
}

die() {
  echo "tpu_train.sh: $*" >&2
  exit 2
}

usage_error() {
  echo "tpu_train.sh: $*" >&2
  usage >&2
  exit 2
}

# Quotes one argument for a POSIX shell, leaving plain words alone (like Python's shlex.quote).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces.
quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "${arg}")"
  done
  printf '%s' "${out}"
}

# Runs a command, or prints it with a leading "+ " under --dry-run.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    "$@"
  fi
}

default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for accelerator type '$1': pass --runtime-version." ;;
  esac
}

TPU=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
CONFIG=""
WORKDIR=""
MODE="queued"
SPOT=0
BEST_EFFORT=0
RESERVED=0
WAIT_MINUTES=120
DELETE=0
PACKAGE_URL=""
JAX_SPEC="jax[tpu]==0.10.2"
PYTHON_VERSION="3.11"
SKIP_SETUP=0
TFDS_DIR="${TFDS_DATA_DIR:-}"
RUN_NAME="train-$(date -u +%Y%m%d-%H%M%S)"
RESTART=0
TAIL=1
DRY_RUN=0
EXTRA_ENV=()
TRAIN_ARGS=()

# Fails unless flag $1 is followed by a value (flags given as --flag=value are split first).
need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != -* ]] || usage_error "$1 needs a value."
}

while [[ $# -gt 0 ]]; do
  flag="$1"
  if [[ "${flag}" == --*=* && "${flag}" != --config.* ]]; then
    set -- "${flag%%=*}" "${flag#*=}" "${@:2}"
    flag="$1"
  fi
  case "${flag}" in
    --tpu) need_value "$@"; TPU="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --queued) MODE="queued"; shift ;;
    --direct) MODE="direct"; shift ;;
    --spot) SPOT=1; shift ;;
    --best-effort) BEST_EFFORT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --wait-minutes) need_value "$@"; WAIT_MINUTES="$2"; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --package-url) need_value "$@"; PACKAGE_URL="$2"; shift 2 ;;
    --jax-spec) need_value "$@"; JAX_SPEC="$2"; shift 2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION="$2"; shift 2 ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --tfds-data-dir) need_value "$@"; TFDS_DIR="$2"; shift 2 ;;
    --env) need_value "$@"; EXTRA_ENV+=("$2"); shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME="$2"; shift 2 ;;
    --restart) RESTART=1; shift ;;
    --no-tail) TAIL=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*) TRAIN_ARGS+=("$1"); shift ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) usage_error "unknown argument '$1'." ;;
  esac
done

[[ -n "${TPU}" ]] || usage_error "--tpu is required."
[[ -n "${ZONE}" ]] || usage_error "--zone is required."
[[ "${TPU}" =~ ^[a-z][-a-z0-9]*$ ]] || die "--tpu '${TPU}' must be lowercase letters, digits and '-'."
[[ "${WAIT_MINUTES}" =~ ^[0-9]+$ ]] || die "--wait-minutes must be a whole number, got '${WAIT_MINUTES}'."
[[ "${RUN_NAME}" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name may hold only letters, digits, '_', '.', '-'."
if (( SPOT + BEST_EFFORT + RESERVED > 1 )); then
  die "choose at most one of --spot, --best-effort, --reserved."
fi
if [[ "${MODE}" == direct && "${BEST_EFFORT}" == 1 ]]; then
  die "--best-effort needs a queued resource: drop --direct."
fi
for pair in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do
  [[ "${pair}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '${pair}'."
done

GCLOUD_COMMON=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  GCLOUD_COMMON+=(--project="${PROJECT}")
fi
QUEUED=(gcloud alpha compute tpus queued-resources)
TPU_VM=(gcloud compute tpus tpu-vm)

if [[ "${DELETE}" == 1 ]]; then
  if [[ "${MODE}" == queued ]]; then
    run "${QUEUED[@]}" delete "${TPU}" "${GCLOUD_COMMON[@]}" --force --async --quiet
  else
    run "${TPU_VM[@]}" delete "${TPU}" "${GCLOUD_COMMON[@]}" --async --quiet
  fi
  exit 0
fi

[[ -n "${CONFIG}" ]] || usage_error "--config is required."
[[ -n "${WORKDIR}" ]] || usage_error "--workdir is required."

# --- 1. The slice: reuse it when it exists, else create it (and wait for a queued one).

slice_exists() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    if [[ "${MODE}" == queued ]]; then
      run "${QUEUED[@]}" describe "${TPU}" "${GCLOUD_COMMON[@]}" --format='value(state.state)'
    else
      run "${TPU_VM[@]}" describe "${TPU}" "${GCLOUD_COMMON[@]}" --format='value(state)'
    fi
    echo "# (dry run: assuming the slice does not exist yet)"
    return 1
  fi
  if [[ "${MODE}" == queued ]]; then
    "${QUEUED[@]}" describe "${TPU}" "${GCLOUD_COMMON[@]}" --format='value(state.state)' \
      >/dev/null 2>&1
  else
    "${TPU_VM[@]}" describe "${TPU}" "${GCLOUD_COMMON[@]}" --format='value(state)' >/dev/null 2>&1
  fi
}

create_slice() {
  [[ -n "${ACCELERATOR_TYPE}" ]] || die "slice '${TPU}' does not exist: pass --accelerator-type to create it."
  local version="${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}"
  local capacity=()
  if [[ "${SPOT}" == 1 ]]; then capacity+=(--spot); fi
  if [[ "${BEST_EFFORT}" == 1 ]]; then capacity+=(--best-effort); fi
  if [[ "${RESERVED}" == 1 ]]; then capacity+=(--reserved); fi
  if [[ "${MODE}" == queued ]]; then
    run "${QUEUED[@]}" create "${TPU}" --node-id="${TPU}" "${GCLOUD_COMMON[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${version}" \
      "${capacity[@]+"${capacity[@]}"}"
  else
    run "${TPU_VM[@]}" create "${TPU}" "${GCLOUD_COMMON[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${version}" \
      "${capacity[@]+"${capacity[@]}"}"
  fi
}

wait_until_active() {
  local state_cmd=("${QUEUED[@]}" describe "${TPU}" "${GCLOUD_COMMON[@]}" --format='value(state.state)')
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${state_cmd[@]}"
    echo "# (dry run: would poll the command above every 30 s until ACTIVE)"
    return
  fi
  local deadline=$((SECONDS + WAIT_MINUTES * 60)) state
  while true; do
    state="$("${state_cmd[@]}")"
    case "${state}" in
      ACTIVE) echo "Queued resource ${TPU} is ACTIVE."; return ;;
      FAILED | SUSPENDED) die "queued resource ${TPU} is ${state}; see \`${QUEUED[*]} describe ${TPU} --zone=${ZONE}\`." ;;
    esac
    if (( SECONDS > deadline )); then
      die "queued resource ${TPU} is still ${state} after ${WAIT_MINUTES} min; it stays queued (delete it with --delete)."
    fi
    echo "Queued resource ${TPU} is ${state:-not ready}; waiting..."
    sleep 30
  done
}

if slice_exists; then
  echo "Reusing the existing slice ${TPU}."
  if [[ "${MODE}" == queued ]]; then wait_until_active; fi
else
  create_slice
  if [[ "${MODE}" == queued ]]; then wait_until_active; fi
fi

# --- 2. The package: an sdist built here and copied to every worker, or a pip URL.

# Single quotes on purpose here and below: $HOME expands on the workers.
# shellcheck disable=SC2016
VENV_DIR='$HOME/var_jax_venv'
QUOTED_PACKAGE_SPEC=""
if [[ -z "${PACKAGE_URL}" ]]; then
  BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/var_jax_sdist.XXXXXX")"
  trap 'rm -rf "${BUILD_DIR}"' EXIT
  # `python -m build` makes a clean sdist in an isolated env; without the `build` package fall back
  # to pip, which builds a wheel from the same sources.
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "${REPO_ROOT}/var_jax/__init__.py")"
  if python3 -c 'import build' >/dev/null 2>&1; then
    run python3 -m build --sdist --outdir "${BUILD_DIR}" "${REPO_ROOT}"
    expected_name="var_jax-${version:-VERSION}.tar.gz"
  else
    run python3 -m pip wheel --no-deps --wheel-dir "${BUILD_DIR}" "${REPO_ROOT}"
    expected_name="var_jax-${version:-VERSION}-py3-none-any.whl"
  fi
  if [[ "${DRY_RUN}" == 1 ]]; then
    ARTIFACT="${BUILD_DIR}/${expected_name}"
  else
    ARTIFACT="$(find "${BUILD_DIR}" -maxdepth 1 -name 'var_jax-*' -print -quit)"
    [[ -n "${ARTIFACT}" ]] || die "the build left no var_jax-* file in ${BUILD_DIR}."
  fi
  ARTIFACT_NAME="$(basename "${ARTIFACT}")"
  run "${TPU_VM[@]}" scp "${ARTIFACT}" "${TPU}:${ARTIFACT_NAME}" "${GCLOUD_COMMON[@]}" --worker=all
  QUOTED_PACKAGE_SPEC="\"var-jax[tpu,data] @ file://\$HOME/${ARTIFACT_NAME}\""
else
  QUOTED_PACKAGE_SPEC="$(quote "var-jax[tpu,data] @ ${PACKAGE_URL}")"
fi

# The config file travels too when it is a local file; ":ARGS" variant suffixes are kept.
CONFIG_FILE="${CONFIG%%:*}"
CONFIG_SUFFIX="${CONFIG#"${CONFIG_FILE}"}"
REMOTE_CONFIG="${CONFIG}"
if [[ -f "${CONFIG_FILE}" ]]; then
  REMOTE_CONFIG="var_jax_run/$(basename "${CONFIG_FILE}")${CONFIG_SUFFIX}"
  run "${TPU_VM[@]}" ssh "${TPU}" "${GCLOUD_COMMON[@]}" --worker=all --command='mkdir -p var_jax_run'
  run "${TPU_VM[@]}" scp "${CONFIG_FILE}" "${TPU}:var_jax_run/$(basename "${CONFIG_FILE}")" \
    "${GCLOUD_COMMON[@]}" --worker=all
fi

# --- 3. Worker setup, idempotent: the venv once (uv provides the Python the package needs, the
# TPU images ship an older one), then the pinned JAX and this version of var-jax.

if [[ "${SKIP_SETUP}" == 0 ]]; then
  SETUP_COMMAND="set -euo pipefail; export PATH=\"\$HOME/.local/bin:\$PATH\"; \
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
if [ ! -x \"${VENV_DIR}/bin/python\" ]; then uv venv --python $(quote "${PYTHON_VERSION}") \"${VENV_DIR}\"; fi; \
uv pip install --quiet --python \"${VENV_DIR}/bin/python\" $(quote "${JAX_SPEC}"); \
uv pip install --quiet --python \"${VENV_DIR}/bin/python\" --reinstall-package var-jax ${QUOTED_PACKAGE_SPEC}"
  run "${TPU_VM[@]}" ssh "${TPU}" "${GCLOUD_COMMON[@]}" --worker=all --command="${SETUP_COMMAND}"
fi

# --- 4. Start training on every worker at once, detached, one log per worker.

ENV_ASSIGNMENTS=()
if [[ -n "${TFDS_DIR}" ]]; then
  ENV_ASSIGNMENTS+=("TFDS_DATA_DIR=${TFDS_DIR}")
fi
ENV_ASSIGNMENTS+=("${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}")
TRAIN_COMMAND=("${VENV_DIR}/bin/var-jax" train --config "${REMOTE_CONFIG}" --workdir "${WORKDIR}")
TRAIN_COMMAND+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
QUOTED_ENV=""
if [[ ${#ENV_ASSIGNMENTS[@]} -gt 0 ]]; then
  QUOTED_ENV="env $(quote_all "${ENV_ASSIGNMENTS[@]}") "
fi
# The venv path stays unquoted so that $HOME expands on the worker.
QUOTED_TRAIN="\"${VENV_DIR}/bin/var-jax\" $(quote_all "${TRAIN_COMMAND[@]:1}")"
# shellcheck disable=SC2016
LOG_DIR='$HOME/var_jax_logs'
# shellcheck disable=SC2016
WORKER_ID='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'
LOG_FILE="${LOG_DIR}/${RUN_NAME}-worker-\${worker}.log"
PID_FILE="${LOG_DIR}/train.pid"
START_COMMAND="set -eu; mkdir -p \"${LOG_DIR}\"; cd \"\$HOME\"; worker=${WORKER_ID}; \
if [ -f \"${PID_FILE}\" ] && kill -0 \"\$(cat \"${PID_FILE}\")\" 2>/dev/null; then \
if [ ${RESTART} = 1 ]; then old=\$(cat \"${PID_FILE}\"); kill \"\$old\"; \
for _ in \$(seq 120); do kill -0 \"\$old\" 2>/dev/null || break; sleep 1; done; \
else echo \"worker \$worker: a var-jax run (pid \$(cat \"${PID_FILE}\")) is still running; pass --restart to stop it.\" >&2; exit 1; fi; fi; \
nohup ${QUOTED_ENV}${QUOTED_TRAIN} > \"${LOG_FILE}\" 2>&1 < /dev/null & \
echo \$! > \"${PID_FILE}\"; echo \"worker \$worker: started, log ${LOG_FILE}\""
run "${TPU_VM[@]}" ssh "${TPU}" "${GCLOUD_COMMON[@]}" --worker=all --command="${START_COMMAND}"

# --- 5. Follow worker 0's log.

WORKER0_LOG="${LOG_DIR}/${RUN_NAME}-worker-0.log"
if [[ "${TAIL}" == 1 ]]; then
  run "${TPU_VM[@]}" ssh "${TPU}" "${GCLOUD_COMMON[@]}" --worker=0 \
    --command="tail -n +1 -F \"${WORKER0_LOG}\""
else
  echo "Training started. Follow it with:"
  echo "  $(quote_all "${TPU_VM[@]}" ssh "${TPU}" "${GCLOUD_COMMON[@]}" --worker=0 \
    --command="tail -n +1 -F \"${WORKER0_LOG}\"")"
fi
