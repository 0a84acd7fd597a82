#!/usr/bin/env bash
# Pretrain (or evaluate) on a multi-node GPU cluster under SLURM.
#
# Run it on a login node: it submits itself with sbatch; inside the job it
# starts `python -m simclr_jax.main` with srun on every node. Each process
# calls jax.distributed.initialize(), which reads SLURM's variables
# (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID): the first node is the coordinator, every task a process.
#
# Settings come from the environment (see launch/README.md):
#   required: NODES GPUS_PER_NODE PARTITION WORKDIR CONFIG
#   optional: PROCS=gpu (default: one process per GPU, each sees GPU
#               $SLURM_LOCALID) or PROCS=node (one process per node driving
#               all its GPUs), PYTHON (default python3; the interpreter with
#               simclr_jax[cuda] installed, on a filesystem every node sees),
#             TIME (default 24:00:00), ACCOUNT, JOB_NAME (default simclr_jax),
#             CPUS_PER_TASK, DATA_DIR (tfds data dir), LOG_DIR (default
#               ./slurm_logs; the job's output is LOG_DIR/JOB_NAME-JOBID.out).
# Usage:
#   launch/gpu_slurm.sh [--dry-run] [--config.key=value ...]
#     --dry-run  print the sbatch command and the srun command the job runs
#   Every --config.key=value is passed on to simclr_jax.main as an override.
#   Inside an allocation you already hold (salloc), add --inside-allocation
#   to skip sbatch and srun at once.
# Resubmitting with the same WORKDIR resumes from its newest checkpoint.
set -euo pipefail

# The header comment above, without the '#'s.
usage() { sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; }

die() {
  echo "gpu_slurm.sh: error: $*" >&2
  exit 2
}

dry_run=0
inside=0
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --inside-allocation) inside=1 ;;
    --config.*=*) overrides+=("$arg") ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (config overrides look like --config.train_epochs=800)" ;;
  esac
done

missing=()
for var in NODES GPUS_PER_NODE PARTITION WORKDIR CONFIG; do
  if [[ -z "${!var:-}" ]]; then
    missing+=("$var")
  fi
done
if ((${#missing[@]})); then
  die "missing environment variable(s): ${missing[*]} (see launch/README.md)"
fi
for var in NODES GPUS_PER_NODE; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var=${!var} must be a positive integer"
done
PROCS="${PROCS:-gpu}"
case "$PROCS" in
  gpu) tasks_per_node="$GPUS_PER_NODE" ;;
  node) tasks_per_node=1 ;;
  *) die "PROCS=$PROCS must be 'gpu' or 'node'" ;;
esac
PYTHON="${PYTHON:-python3}"
JOB_NAME="${JOB_NAME:-simclr_jax}"
LOG_DIR="${LOG_DIR:-slurm_logs}"

# sbatch runs a copy of this file from SLURM's spool directory, so the
# repository is found from the submitting shell and handed down.
if [[ -z "${SIMCLR_REPO_ROOT:-}" ]]; then
  SIMCLR_REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  export SIMCLR_REPO_ROOT
fi
if [[ ! -f "$SIMCLR_REPO_ROOT/$CONFIG" ]]; then
  die "CONFIG=$CONFIG is not a file under $SIMCLR_REPO_ROOT (give it relative to the repository, e.g. configs/r50_4096.py)"
fi

# Prints a command the way a shell would read it back; runs it unless --dry-run.
run() {
  local out="+" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//\'/\'\\\'\'}'"
    fi
  done
  echo "$out"
  if ((!dry_run)); then
    "$@"
  fi
}

srun_command=(srun --kill-on-bad-exit=1 --label
  --nodes="$NODES" --ntasks-per-node="$tasks_per_node"
  "$PYTHON" -m simclr_jax.main --config="$CONFIG" --workdir="$WORKDIR")
if [[ -n "${DATA_DIR:-}" ]]; then
  srun_command+=(--config.data_dir="$DATA_DIR")
fi
srun_command+=("${overrides[@]}")

run_job() {
  cd "$SIMCLR_REPO_ROOT"
  if [[ "$PROCS" == node ]]; then
    # jax.distributed would otherwise give each process only GPU
    # $SLURM_LOCALID (= 0 with one task a node); this one drives them all.
    JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
    export JAX_LOCAL_DEVICE_IDS
    echo "+ export JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
  fi
  run "${srun_command[@]}"
}

if ((inside)); then
  run_job
  exit
fi

sbatch_command=(sbatch --job-name="$JOB_NAME" --partition="$PARTITION"
  --nodes="$NODES" --ntasks-per-node="$tasks_per_node"
  --gpus-per-node="$GPUS_PER_NODE" --time="${TIME:-24:00:00}"
  --chdir="$SIMCLR_REPO_ROOT" --output="$LOG_DIR/%x-%j.out" --export=ALL)
if [[ -n "${ACCOUNT:-}" ]]; then
  sbatch_command+=(--account="$ACCOUNT")
fi
if [[ -n "${CPUS_PER_TASK:-}" ]]; then
  sbatch_command+=(--cpus-per-task="$CPUS_PER_TASK")
fi
sbatch_command+=("$SIMCLR_REPO_ROOT/launch/gpu_slurm.sh" --inside-allocation "${overrides[@]}")

if ((!dry_run)); then
  mkdir -p "$SIMCLR_REPO_ROOT/$LOG_DIR"
fi
run "${sbatch_command[@]}"
if ((dry_run)); then
  echo "# inside the job:"
  run_job
else
  echo "gpu_slurm.sh: follow the job with: tail -F $SIMCLR_REPO_ROOT/$LOG_DIR/$JOB_NAME-<jobid>.out" >&2
fi
