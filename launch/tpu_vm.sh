#!/usr/bin/env bash
# Pretrain (or evaluate) on a Cloud TPU VM or pod slice, start to finish:
#   1. create the TPU VM (every host of a pod slice is a "worker"),
#   2. copy this checkout's committed tree (git archive HEAD) to every worker,
#   3. pip-install it with the TPU build of jax on every worker,
#   4. run `python -m simclr_jax.main` on all workers at once (--worker=all);
#      gcloud streams every worker's output here, prefixed by worker; when
#      it exits with code 75 (preempted: SIGTERM, checkpoint saved), run it
#      again to resume, on a new VM if the old one is gone (up to
#      MAX_RESTARTS times); any other code ends the script with that code
#      (3, a non-finite loss, or 4, a checkpoint that could not be written,
#      would fail the same way again),
#   5. delete the TPU VM (also when a step fails), unless --keep.
#
# Settings come from the environment (see launch/README.md):
#   required: TPU_NAME ZONE ACCELERATOR_TYPE PROJECT WORKDIR CONFIG
#   optional: TPU_RUNTIME_VERSION (default: from ACCELERATOR_TYPE),
#             DATA_DIR (tfds data dir, e.g. gs://bucket/tensorflow_datasets),
#             SPOT=1 (spot capacity), PIP_EXTRA (extra install args, ending
#             in a space), PYTHON_VERSION (workers' Python, default 3.11),
#             MAX_RESTARTS (default 10: reruns after preemption).
# Usage:
#   launch/tpu_vm.sh [--dry-run] [--keep] [--reuse] [--config.key=value ...]
#     --dry-run  print the commands, run nothing
#     --keep     leave the TPU VM running at the end (to look at it, or rerun)
#     --reuse    use an existing TPU VM named TPU_NAME: no create, no delete
#   Every --config.key=value is passed on to simclr_jax.main as an override.
# Rerunning with the same WORKDIR resumes from its newest checkpoint.
set -euo pipefail

# The header comment above, without the '#'s.
usage() { sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; }

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

# simclr_jax.main's exit code for "stopped early by SIGTERM, checkpoint
# saved, rerun to resume" (EXIT_PREEMPTED in simclr_jax/main.py).
EXIT_PREEMPTED=75

dry_run=0
keep=0
reuse=0
overrides=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --keep) keep=1 ;;
    --reuse) reuse=1 ;;
    --config.*=*) overrides+=("$arg") ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (config overrides look like --config.train_epochs=800)" ;;
  esac
done

missing=()
for var in TPU_NAME ZONE ACCELERATOR_TYPE PROJECT WORKDIR CONFIG; do
  if [[ -z "${!var:-}" ]]; then
    missing+=("$var")
  fi
done
if ((${#missing[@]})); then
  die "missing environment variable(s): ${missing[*]} (see launch/README.md)"
fi
MAX_RESTARTS="${MAX_RESTARTS:-10}"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS must be an integer >= 0"

# The TPU software version that Google recommends for JAX, per generation.
default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"

if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_vm.sh: warning: WORKDIR=$WORKDIR is not on GCS; every worker" \
    "writes checkpoints, so it must be a path all of them share." >&2
fi

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ! -f "$repo_root/$CONFIG" ]]; then
  die "CONFIG=$CONFIG is not a file under $repo_root (give it relative to the repository, e.g. configs/r50_4096.py)"
fi
tarball="${TMPDIR:-/tmp}/simclr_jax-${TPU_NAME}.tar.gz"

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

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --project="$PROJECT")

# The workers' virtualenv; the ~ is meant for their shell, not this one.
# shellcheck disable=SC2088
venv="~/simclr_venv"

# The training command, quoted for the workers' shell.
# --multihost=yes: every worker joins one jax.distributed job (the TPU
# metadata names the coordinator), which Orbax's multi-host saves rely on.
train_cmd="cd ~/simclr_jax && $venv/bin/python -m simclr_jax.main --multihost=yes"
train_cmd+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
if [[ -n "${DATA_DIR:-}" ]]; then
  train_cmd+=" --config.data_dir=$(printf '%q' "$DATA_DIR")"
fi
for override in "${overrides[@]}"; do
  train_cmd+=" $(printf '%q' "$override")"
done

# Unpack fresh, then install the package and its pinned stack with jax[tpu]
# into a virtualenv. jax 0.10 needs Python >= 3.11 and the TPU VM images ship
# Ubuntu 22.04's 3.10, so uv (from PyPI) provides the interpreter.
# ~/simclr_jax and ~/simclr_venv are replaced only when an earlier run of
# this script made them (it leaves the file $owned in each); a directory of
# that name made by anyone else is refused, never deleted.
owned=.made_by_tpu_vm_sh
install_cmd="cd ~ && for d in simclr_jax simclr_venv; do"
install_cmd+=" if [ -e \$d ] && [ ! -e \$d/$owned ]; then"
install_cmd+=" echo \"tpu_vm.sh: error: ~/\$d exists and was not made by tpu_vm.sh; move it away\" >&2; exit 2; fi; done"
install_cmd+=" && rm -rf simclr_jax $venv && tar -xzf simclr_jax.tar.gz && touch simclr_jax/$owned"
install_cmd+=" && python3 -m pip install --user --quiet uv"
install_cmd+=" && python3 -m uv venv --quiet --python ${PYTHON_VERSION:-3.11} $venv && touch $venv/$owned"
install_cmd+=" && python3 -m uv pip install --quiet --python $venv/bin/python"
install_cmd+=" ${PIP_EXTRA:-}'./simclr_jax[tpu]'"

delete_tpu() {
  run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
}

create_tpu() {
  local create=("${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
}

# Copy the package to every worker and install it there.
install_on_workers() {
  run "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:~/simclr_jax.tar.gz" "${where[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$install_cmd"
}

# READY while the VM runs; PREEMPTED, another state or nothing once it is gone.
tpu_state() {
  "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || true
}

# 1. Create.
if ((!reuse)); then
  create_tpu
  # Only a VM this script created is deleted, and only after it exists.
  if ((!keep)); then
    trap delete_tpu EXIT
  fi
fi

# 2. Package the committed tree and copy it to every worker.
if ((!dry_run)) && [[ -n "$(git -C "$repo_root" status --porcelain --untracked-files=no)" ]]; then
  echo "tpu_vm.sh: warning: uncommitted changes are not shipped (git archive HEAD)." >&2
fi
run git -C "$repo_root" archive --format=tar.gz --prefix=simclr_jax/ -o "$tarball" HEAD

# 3. Install on every worker.
install_on_workers

# 4. Train on every worker; the output of all of them streams here. Exit
# code 75 (preempted, checkpoint saved) reruns it, which resumes.
restarts=0
while :; do
  rc=0
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$train_cmd" || rc=$?
  if ((rc != EXIT_PREEMPTED)); then
    break
  fi
  if ((restarts >= MAX_RESTARTS)); then
    echo "tpu_vm.sh: preempted $((restarts + 1)) times; stopping (MAX_RESTARTS=$MAX_RESTARTS). Run the same command again to resume." >&2
    break
  fi
  restarts=$((restarts + 1))
  echo "tpu_vm.sh: training stopped early (exit $rc: preempted, checkpoint saved); resuming (restart $restarts of $MAX_RESTARTS)." >&2
  if ((!reuse)) && [[ "$(tpu_state)" != READY ]]; then
    # A preempted (spot) VM does not come back: replace it.
    delete_tpu || true
    create_tpu
    install_on_workers
  fi
done
if ((rc != 0 && rc != EXIT_PREEMPTED)); then
  echo "tpu_vm.sh: training failed with exit code $rc (not rerun; see README, Failure and resume)." >&2
fi

# 5. The EXIT trap deletes the VM (set in step 1 unless --keep or --reuse).
if ((keep || reuse)); then
  echo "tpu_vm.sh: TPU VM $TPU_NAME left running; delete it with:" >&2
  echo "  ${gcloud_tpu[*]} delete $TPU_NAME --zone=$ZONE --project=$PROJECT --quiet" >&2
fi
exit "$rc"
