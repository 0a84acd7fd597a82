"""Crashes and NaNs cost at most about one checkpoint interval, and never the run.

* kill -9 at random moments (during a step, while an asynchronous checkpoint
  is being written, right after a step) of `python -m simclr_jax.main` on a
  tiny version of the demo config; every restart resumes from the newest
  complete checkpoint, and the final state after the full step count is
  bitwise equal to that of a run that was never interrupted.
* A non-finite loss stops the run naming the step and metric, before any
  checkpoint of non-finite parameters is written; with
  `skip_nonfinite_steps` such steps are skipped and counted instead.
"""
import errno
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import preflight
from simclr_jax import train
from simclr_jax.data import pipeline
from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import memory
from simclr_jax.runtime import run_identity
from simclr_jax.runtime import save_watch

from conftest import config_file
from conftest import REPO
from conftest import small_config

DEMO = config_file('demo')
INTERVAL = 2  # checkpoint_every_steps of the runs below.

# The demo, shrunk so that a run is start-up plus seconds of training.
TINY_OVERRIDES = {
    'train_batch_size': 8, 'eval_batch_size': 8, 'image_size': 8,
    'width_multiplier': 0.25,
    'checkpoint_every_steps': INTERVAL, 'keep_checkpoints': 2,
    'log_every_steps': 1, 'lineareval_while_pretraining': False,
    'cache_dataset': False,
}


def _child_env(cache_dir):
  env = dict(os.environ)
  env.update({
      # One CPU device: the fake-device flag of conftest would only add
      # overhead here (sharding has its own tests).
      'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2',
      # Restarts load the compiled step instead of compiling it again.
      'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  })
  return env


def _start(workdir, total_steps, cache_dir, log_path):
  args = [sys.executable, '-m', 'simclr_jax.main', f'--config={DEMO}',
          f'--workdir={workdir}', f'--config.train_steps={total_steps}']
  args += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  log = open(log_path, 'w')
  proc = subprocess.Popen(args, cwd=str(REPO), env=_child_env(cache_dir),
                          stdout=log, stderr=subprocess.STDOUT)
  proc.log_file = log
  return proc


STEP_LINE = re.compile(r'\] \[(\d+)\] .*\bloss=')
RESUMED = re.compile(r'Resumed from (\S+) at step (\d+)\.')


def _read(log_path):
  with open(log_path, errors='replace') as f:
    return f.read()


def _last_step(text):
  steps = [int(m.group(1)) for m in STEP_LINE.finditer(text)]
  return max(steps) if steps else None


def _resumed_step(text):
  match = RESUMED.search(text)
  return int(match.group(2)) if match else 0


def _in_flight(workdir, step='*'):
  """Half-written step directories (of `step`, or of any step)."""
  return glob.glob(os.path.join(workdir, checkpoint.CHECKPOINT_DIR,
                                f'{step}.orbax-checkpoint-tmp*'))


def _kill_when(proc, log_path, workdir, mode, target, rng, timeout=900):
  """Waits for the moment `mode` at or after step `target`, then kill -9.

  Returns the last step the child logged as done, or None if it exited
  on its own first.
  """
  tmp_before = set(_in_flight(workdir))
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      return None
    done = _last_step(_read(log_path))
    if done is not None and done >= target:
      if mode == 'between_steps':
        break
      if mode == 'during_step':
        time.sleep(rng.uniform(0.0, 1.0))  # Within the next step or so.
        break
      if mode == 'async_write' and set(_in_flight(workdir)) - tmp_before:
        break
    time.sleep(0.01)
  else:
    raise AssertionError(f'child did not reach {mode} at step {target}')
  proc.kill()
  proc.wait()  # Reaped: its pid must not look alive to the workdir lock.
  proc.log_file.close()
  return _last_step(_read(log_path)) or 0


def _final_state(workdir, step):
  item = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step), 'state')
  ckptr = ocp.PyTreeCheckpointer()
  metadata = ckptr.metadata(item).item_metadata.tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return ckptr.restore(item,
                       args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _assert_bitwise_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), f'{jax.tree_util.keystr(path)} differs'


def _kill_and_resume(tmp_path, *, total_steps, modes, seed):
  """Runs a reference and a killed-and-restarted run; checks them."""
  rng = random.Random(seed)
  cache = tmp_path / 'jax_cache'
  ref_dir, dir_ = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  # The uninterrupted reference runs beside the killed runs (2 cores).
  reference = _start(ref_dir, total_steps, cache, tmp_path / 'reference.log')

  history = []
  for attempt, mode in enumerate(modes):
    log_path = tmp_path / f'run{attempt}.log'
    proc = _start(dir_, total_steps, cache, log_path)
    # The previous kill's newest complete checkpoint is where this one starts.
    expected_resume = checkpoint.latest_step(dir_) or 0
    start = history[-1]['resume_to'] if history else 0
    assert start == expected_resume
    target = min(start + rng.randint(1, INTERVAL + 1), total_steps - 1)
    done = _kill_when(proc, log_path, dir_, mode, target, rng)
    assert done is not None, f'run {attempt} finished before its kill'
    text = _read(log_path)
    assert _resumed_step(text) == start, (attempt, start, text[-2000:])
    resume_to = checkpoint.latest_step(dir_) or 0
    # Was the save of the last checkpoint step before the kill unfinished?
    boundary = done - done % INTERVAL
    in_flight = boundary > resume_to and bool(_in_flight(dir_, boundary))
    lost = done - resume_to
    history.append(dict(mode=mode, start=start, done=done,
                        resume_to=resume_to, lost=lost, in_flight=in_flight))
    # At most one interval, plus the steps that ran while the newest save
    # was still being written (saves are asynchronous).
    assert lost <= (2 * INTERVAL - 1 if in_flight else INTERVAL), history

  last_log = tmp_path / 'final.log'
  final = _start(dir_, total_steps, cache, last_log)
  assert final.wait(timeout=900) == 0, _read(last_log)[-3000:]
  assert _resumed_step(_read(last_log)) == history[-1]['resume_to']
  assert reference.wait(timeout=900) == 0, _read(
      tmp_path / 'reference.log')[-3000:]
  for proc in (final, reference):
    proc.log_file.close()
  print('kill history:', history)

  _assert_bitwise_equal(_final_state(dir_, total_steps),
                        _final_state(ref_dir, total_steps))
  # A killed run leaves no lock behind that blocks the next one; the final
  # run released its own.
  assert not os.path.exists(os.path.join(dir_, 'simclr_jax.lock'))
  return history


def test_kill_9_and_resume_is_exact(tmp_path):
  """Light variant for the default run: one kill, while a checkpoint is being
  written (~3 process starts, ~75 CPU-seconds; the 10-kill run is slow)."""
  history = _kill_and_resume(tmp_path, total_steps=6, modes=['async_write'],
                             seed=0)
  assert len(history) == 1


@pytest.mark.slow  # 15 process starts: minutes on 2 cores.
def test_kill_9_ten_times_and_resume_is_exact(tmp_path):
  modes = ['during_step', 'async_write', 'between_steps'] * 3 + ['async_write']
  history = _kill_and_resume(tmp_path, total_steps=14, modes=modes,
                             seed=1234)
  assert len(history) == 10


# ----------------------------------------------------------------------------
# Non-finite loss: stop before saving, or skip and count.
# ----------------------------------------------------------------------------
NAN_STEP = 3


def _tiny_config(**overrides):
  settings = dict(TINY_OVERRIDES, train_steps=5, log_every_steps=10)
  settings.update(overrides)
  return small_config(**settings)


def _synthetic_batches(config, start_step=0, nan_step=NAN_STEP):
  """Random two-view batches, a function of the step; NaN images at
  `nan_step`."""
  seed, size, n = config.seed, config.image_size, config.train_batch_size
  step = start_step
  while True:
    step += 1
    rng = np.random.default_rng([seed, step])
    image = rng.uniform(size=(n, 2, size, size, 3)).astype(np.float32)
    if step == nan_step:
      image[:] = np.nan
    yield {'image': image, 'label': rng.integers(0, 10, n).astype(np.int32)}


class TinyModel(nn.Module):
  """SimCLRModel's interface at a thousandth of its compile time."""

  @nn.compact
  def __call__(self, images, train=True):
    x = images.reshape((images.shape[0], -1))
    h = nn.BatchNorm(use_running_average=not train, name='resnet_bn')(
        nn.Dense(16, name='resnet')(x))
    return {'representation': h,
            'projection': nn.Dense(8, name='projection_head')(h)}

  def has_supervised_head(self):
    return False


def _poisoned(config, nan_step=NAN_STEP):
  """(data, model): the loop and checkpoints are real; model and data are tiny
  stand-ins, the data with NaN images at `nan_step` (None: never)."""
  data = pipeline.Data(
      num_train_examples=1000, num_classes=10,
      train_batches=lambda start: _synthetic_batches(config, start, nan_step),
      eval_batches=None)
  return dict(data=data, model=TinyModel())


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nonfinite_loss_stops_before_it_is_saved(tmp_path):
  workdir = str(tmp_path)
  config = _tiny_config()
  # Logs every 10 steps: the check before the step-4 checkpoint catches it.
  with pytest.raises(FloatingPointError,
                     match=rf'non-finite loss \(nan\) at step {NAN_STEP};'):
    train.train_and_evaluate(config, workdir, **_poisoned(config))
  assert checkpoint.checkpoint_steps(workdir) == (2,)
  assert not _in_flight(workdir)
  assert _all_finite(_final_state(workdir, 2))


def test_skip_nonfinite_steps_skips_and_counts(tmp_path, read_events):
  workdir = str(tmp_path)
  config = _tiny_config(skip_nonfinite_steps=True, log_every_steps=1)
  state = train.train_and_evaluate(config, workdir, **_poisoned(config)).state
  assert int(state.step) == 5
  assert _all_finite(_final_state(workdir, 5))
  counts = read_events(workdir)['skipped_nonfinite_steps']
  assert counts == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1}


@pytest.mark.slow
def test_main_exits_3_on_nonfinite_loss(tmp_path, read_events):
  """The entry point: one line naming the step and metric, exit code 3, and
  no checkpoint of the blown-up parameters (lr 1e30: inf after step 1)."""
  workdir = str(tmp_path / 'run')
  args = [sys.executable, '-m', 'simclr_jax.main', f'--config={DEMO}',
          f'--workdir={workdir}', '--config.train_steps=6',
          '--config.learning_rate=1e30', '--config.warmup_epochs=0']
  args += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  result = subprocess.run(args, cwd=str(REPO), env=_child_env(tmp_path / 'cache'),
                          capture_output=True, text=True, timeout=900)
  errors = [l for l in result.stderr.splitlines()
            if l.startswith('simclr_jax: error: ')]
  assert result.returncode == 3, result.stderr[-3000:]
  assert len(errors) == 1 and re.search(
      r'non-finite (loss|grad_norm) \(\S+\) at step \d+;', errors[0]), errors
  for step in checkpoint.checkpoint_steps(workdir):
    assert _all_finite(_final_state(workdir, step)), step
  assert not os.path.exists(os.path.join(workdir, 'simclr_jax.lock'))


# ----------------------------------------------------------------------------
# A checkpoint that cannot be written: noticed at the next step, in one line.
# ----------------------------------------------------------------------------
def _counting(data, fetched, slow_after=None):
  """`data` whose train batches record their index in `fetched`, and take
  0.3 s each after batch `slow_after` (a step the background save outlasts)."""
  def train_batches(start_step):
    for i, batch in enumerate(data.train_batches(start_step),
                              start=start_step):
      fetched.append(i)
      if slow_after is not None and i > slow_after:
        time.sleep(0.3)
      yield batch
  return data._replace(train_batches=train_batches)


def test_failed_background_save_stops_the_run_at_the_next_step(
    tmp_path, monkeypatch):
  """The disk fills while step 6 is written in the background: the run stops
  at the next step boundary (not at step 9's save, nor minutes later), names
  the step, its directory and the free space, leaves step 3 restorable
  (keep_checkpoints=1 does not delete it for the failed save) and no
  temporary directory. The run's identity was recorded before its first
  save."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full_at_6(self):
    if self.get_final().name == '6' or self.get_final().parent.name == '6':
      raise OSError(errno.ENOSPC, 'No space left on device')
    return await finalize(self)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      disk_full_at_6)
  workdir = str(tmp_path)
  config = _tiny_config(train_steps=12, checkpoint_every_steps=3,
                        keep_checkpoints=1)
  fetched = []
  run = _poisoned(config, nan_step=None)
  run['data'] = _counting(run['data'], fetched, slow_after=6)
  start = time.monotonic()
  with pytest.raises(save_watch.CheckpointWriteError) as error:
    train.train_and_evaluate(config, workdir, **run)
  message = str(error.value)
  assert message.startswith(
      f'the checkpoint of step 6 could not be written to {workdir}/'
      'checkpoints/6: OSError: No space left on device ('), message
  assert 'free there); earlier checkpoints are intact; the same command ' \
      'resumes from step 3' in message
  assert max(fetched) < 9  # Stopped before the next save (step 9).
  assert time.monotonic() - start < 120
  assert checkpoint.checkpoint_steps(workdir) == (3,)
  assert not _in_flight(workdir)
  assert _all_finite(_final_state(workdir, 3))
  recorded = run_identity.read(workdir)
  assert recorded['config']['train_mode'] == 'pretrain'
  assert set(recorded['shapes']) >= {'params/resnet/kernel',
                                     'batch_stats/resnet_bn/mean'}


def test_step_too_large_for_memory_is_refused_before_the_first_step(
    tmp_path, monkeypatch):
  """The compiled step against the host's memory (CPU): refused right after
  compiling, before any step, checkpoint or log is written."""
  monkeypatch.setattr(memory, 'host_available_bytes', lambda: 1024)
  config = _tiny_config()
  fetched = []
  run = _poisoned(config, nan_step=None)
  run['data'] = _counting(run['data'], fetched)
  with pytest.raises(preflight.BadInput,
                     match=r'the compiled train step .* needs .* but host '
                     r'\S+ has available 1.00 KiB: it cannot run'):
    train.train_and_evaluate(config, str(tmp_path), **run)
  assert fetched == [0]  # The batch the step was compiled for, no other.
  assert checkpoint.checkpoint_steps(str(tmp_path)) == ()
  assert run_identity.read(str(tmp_path)) is None
  assert not glob.glob(str(tmp_path / 'events.out.tfevents.*'))


# ----------------------------------------------------------------------------
# The entry point end to end (slow: a process start and a compile each).
# ----------------------------------------------------------------------------
def _main_args(workdir, total_steps):
  args = [sys.executable, '-m', 'simclr_jax.main', f'--config={DEMO}',
          f'--workdir={workdir}', f'--config.train_steps={total_steps}']
  return args + [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]


@pytest.mark.slow
def test_main_exits_75_on_sigterm_with_a_checkpoint_and_quiet_logs(tmp_path):
  """SIGTERM mid-run: a checkpoint at the current step, the summary line
  says so, exit code 75; no Orbax INFO line at the default verbosity."""
  workdir = str(tmp_path / 'run')
  log_path = tmp_path / 'run.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(_main_args(workdir, 10_000), cwd=str(REPO),
                            env=_child_env(tmp_path / 'cache'), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while (_last_step(_read(log_path)) or 0) < 3:
      assert proc.poll() is None and time.time() < deadline, _read(log_path)
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 75, _read(log_path)[-3000:]
  text = _read(log_path)
  step = checkpoint.latest_step(workdir)
  assert step is not None and step >= 3
  assert (f'simclr_jax: pretrain preempted (resume with the same command) '
          f'at step {step}') in text
  assert '[process=0]' not in text  # Orbax's INFO lines.
  assert not os.path.exists(os.path.join(workdir, 'simclr_jax.lock'))


FAIL_CREATE_AT_4 = '''
import errno, sys
from orbax.checkpoint._src.path import atomicity
create = atomicity.AtomicRenameTemporaryPath.create
async def read_only_at_4(self):
  if self.get_final().name == '4':
    raise PermissionError(errno.EACCES, 'Permission denied')
  return await create(self)
atomicity.AtomicRenameTemporaryPath.create = read_only_at_4
from absl import app
from simclr_jax import main
sys.argv = ['simclr_jax.main'] + sys.argv[1:]
app.run(main.main, flags_parser=main.parse_flags)
'''


@pytest.mark.slow
def test_main_exits_4_at_once_when_the_checkpoint_dir_cannot_be_written(
    tmp_path):
  """The step directory of step 4 cannot be made (a read-only directory):
  one line, exit code 4, within seconds, not after Orbax's 5-minute wait."""
  workdir = str(tmp_path / 'run')
  args = _main_args(workdir, 8)
  args[1:3] = ['-c', FAIL_CREATE_AT_4]
  start = time.time()
  result = subprocess.run(args, cwd=str(REPO),
                          env=_child_env(tmp_path / 'cache'),
                          capture_output=True, text=True, timeout=900)
  elapsed = time.time() - start
  errors = [l for l in result.stderr.splitlines()
            if l.startswith('simclr_jax: error: ')]
  assert result.returncode == 4, result.stderr[-3000:]
  assert len(errors) == 1 and errors[0].startswith(
      'simclr_jax: error: the checkpoint of step 4 could not be written to '
      f'{workdir}/checkpoints/4: PermissionError: Permission denied'), errors
  assert 'Traceback' not in result.stderr
  assert checkpoint.checkpoint_steps(workdir) == (2,)
  assert not _in_flight(workdir)
  assert elapsed < 240, elapsed  # Start-up and compile, without the wait.
