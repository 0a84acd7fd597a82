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
#               ./slurm_logs; the job's output is LOG_DIR/JOB_NAME-JOBID.out),
#             SIGNAL_LEAD (default 300: seconds before the time limit at
#               which SLURM sends the training processes SIGTERM).
# Usage:
#   launch/gpu_slurm.sh [--dry-run] [--config.key=value ...]
#     --dry-run  print the sbatch command and the srun command the job runs
#   Every --config.key=value is passed on to simclr_jax.main as an override.
#   Inside an allocation you already hold (salloc), add --inside-allocation
#   to skip sbatch and srun at once.
# Preemption and time limits: SLURM sends SIGTERM SIGNAL_LEAD seconds before
# the time limit (or when it preempts the job); simclr_jax.main saves a
# checkpoint and exits with code 75, and the job then requeues itself
# (scontrol requeue) to resume from that checkpoint. Any other exit code
# ends the job with that code: 3 (non-finite loss) and 4 (a checkpoint could
# not be written) would fail the same way again.
# Resubmitting with the same WORKDIR resumes from its newest checkpoint.
set -euo pipefail

# The header comment above, without the '#'s.
usage() { sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; }

die() {
  echo "gpu_slurm.sh: error: $*" >&2
  exit 2
}

# simclr_jax.main's exit code for "stopped early by SIGTERM, checkpoint
# saved, rerun to resume" (EXIT_PREEMPTED in simclr_jax/main.py).
EXIT_PREEMPTED=75

dry_run=0
inside=0
requeue=0
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --inside-allocation) inside=1 ;;
    --requeue-on-preemption) requeue=1 ;;
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
SIGNAL_LEAD="${SIGNAL_LEAD:-300}"
for var in NODES GPUS_PER_NODE SIGNAL_LEAD; do
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
  local rc=0
  run "${srun_command[@]}" || rc=$?
  if ((rc == EXIT_PREEMPTED)); then
    echo "gpu_slurm.sh: training stopped early (exit $rc: SIGTERM, checkpoint saved)." >&2
    if ((requeue)) && [[ -n "${SLURM_JOB_ID:-}" ]]; then
      echo "gpu_slurm.sh: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint." >&2
      run scontrol requeue "$SLURM_JOB_ID"
    else
      echo "gpu_slurm.sh: run the same command again to resume." >&2
    fi
  elif ((rc != 0)); then
    echo "gpu_slurm.sh: training failed with exit code $rc (not requeued; see README, Failure and resume)." >&2
  fi
  return "$rc"
}

if ((inside)); then
  rc=0
  run_job || rc=$?
  exit "$rc"
fi

# --requeue lets the job requeue itself after a preemption (run_job);
# --signal sends the training processes SIGTERM before the time limit, so
# they save a checkpoint instead of being killed.
sbatch_command=(sbatch --job-name="$JOB_NAME" --partition="$PARTITION"
  --nodes="$NODES" --ntasks-per-node="$tasks_per_node"
  --gpus-per-node="$GPUS_PER_NODE" --time="${TIME:-24:00:00}"
  --requeue --signal="TERM@$SIGNAL_LEAD" --open-mode=append
  --chdir="$SIMCLR_REPO_ROOT" --output="$LOG_DIR/%x-%j.out" --export=ALL)
if [[ -n "${ACCOUNT:-}" ]]; then
  sbatch_command+=(--account="$ACCOUNT")
fi
if [[ -n "${CPUS_PER_TASK:-}" ]]; then
  sbatch_command+=(--cpus-per-task="$CPUS_PER_TASK")
fi
sbatch_command+=("$SIMCLR_REPO_ROOT/launch/gpu_slurm.sh" --inside-allocation
  --requeue-on-preemption "${overrides[@]}")

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
