"""save_watch.py: a save that fails is reported between steps, in one line,
with the earlier checkpoints intact and no temporary directory left.

The failures are injected at Orbax's boundary (its temporary-path class),
as a full disk or a read-only directory would raise them: root, which these
tests may run as, writes through permission bits.
"""
import errno
import os
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.path import atomicity
import pytest

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import save_watch


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: tuple
  rng: jax.Array


def make_state(step):
  return State(step=jnp.asarray(step, jnp.int32),
               params={'w': jnp.full((64, 64), float(step))},
               batch_stats={}, opt_state=(), rng=jax.random.PRNGKey(step))


def _fail_at(monkeypatch, step, method, error):
  """Orbax's temporary path `method` raises `error` for step `step`."""
  original = getattr(atomicity.AtomicRenameTemporaryPath, method)

  async def failing(self, *args, **kwargs):
    if f'{os.sep}{step}' in str(self.get_final()):
      raise error
    return await original(self, *args, **kwargs)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, method, failing)


def _leftovers(directory):
  return [n for n in os.listdir(directory) if save_watch.TMP_MARK in n]


def test_background_failure_is_reported_at_the_next_check(tmp_path,
                                                          monkeypatch):
  """Disk full while the save of step 20 finishes in the background."""
  directory = tmp_path / checkpoint.CHECKPOINT_DIR
  directory.mkdir()
  stale = directory / '20.orbax-checkpoint-tmp-1700000000'  # Not this run's.
  stale.mkdir()
  killed = directory / '20.orbax-checkpoint-tmp'  # Orbax replaces this one.
  (killed / 'state').mkdir(parents=True)
  _fail_at(monkeypatch, 20, 'finalize',
           OSError(errno.ENOSPC, 'No space left on device'))
  manager = checkpoint.create_manager(str(tmp_path), keep=1)
  saves = save_watch.SaveWatch(manager)
  assert saves.save(make_state(10))
  saves.wait()
  start = time.monotonic()
  assert saves.save(make_state(20))
  with pytest.raises(save_watch.CheckpointWriteError) as error:
    while time.monotonic() - start < 120:  # The loop's step boundaries.
      saves.check()
      time.sleep(0.01)
  message = str(error.value)
  assert message.startswith(
      f'the checkpoint of step 20 could not be written to {directory}/20: '
      'OSError: No space left on device ('), message
  assert ' free there); earlier checkpoints are intact; the same command ' \
         'resumes from step 10 once' in message
  assert '\n' not in message
  # keep=1 did not delete step 10 for the failed 20; it still restores.
  assert checkpoint.checkpoint_steps(str(tmp_path)) == (10,)
  assert _leftovers(directory) == [stale.name]  # Only the earlier run's.
  saves.wait()  # Reported once; the end of the run does not raise again.
  manager.close()
  resumed = checkpoint.create_manager(str(tmp_path), keep=1)  # A rerun.
  restored, step = checkpoint.restore_latest(resumed, make_state(0))
  assert step == 10
  np.testing.assert_array_equal(restored.params['w'], np.full((64, 64), 10.))
  resumed.close()


# Orbax's timed-out waiters leave coroutines that never ran.
@pytest.mark.filterwarnings('ignore::RuntimeWarning')
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_directory_that_cannot_be_made_is_reported_at_the_next_check(
    tmp_path, monkeypatch):
  """A read-only checkpoint directory: the step directory cannot be made.

  Orbax's writer threads then wait for a directory that never comes until
  their coordination timeout (5 minutes; 3 s here), which is why main.py
  exits without waiting for them; the failure itself is seen at once.
  """
  monkeypatch.setattr(multihost, 'coordination_timeout', lambda: 3)
  _fail_at(monkeypatch, 4, 'create',
           PermissionError(errno.EACCES, 'Permission denied'))
  manager = checkpoint.create_manager(str(tmp_path), keep=3)
  saves = save_watch.SaveWatch(manager)
  assert saves.save(make_state(2))
  saves.wait()
  start = time.monotonic()
  saves.save(make_state(4))
  with pytest.raises(save_watch.CheckpointWriteError,
                     match=r'^the checkpoint of step 4 could not be written '
                     r'to .*/checkpoints/4: PermissionError: Permission '
                     r'denied \(.* free there\); earlier checkpoints are '
                     'intact; the same command resumes from step 2'):
    while time.monotonic() - start < 120:
      saves.check()
      time.sleep(0.01)
  assert time.monotonic() - start < 3  # Before Orbax's waiters give up.
  assert checkpoint.checkpoint_steps(str(tmp_path)) == (2,)
  assert _leftovers(tmp_path / checkpoint.CHECKPOINT_DIR) == []
  for thread in threading.enumerate():  # Orbax's waiters, timed out.
    if isinstance(thread, future._SignalingThread):  # pylint: disable=protected-access
      threading.Thread.join(thread, timeout=30)  # Not its re-raising join.


def test_describe_finds_the_os_error_inside():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', '/ckpt/d/x')
    except OSError as e:
      raise ValueError('tensorstore write failed') from e
  except ValueError as e:
    assert save_watch.describe(e) == (
        'OSError: No space left on device: /ckpt/d/x')
  assert save_watch.describe(RuntimeError('a  b\nc')) == 'RuntimeError: a b c'
