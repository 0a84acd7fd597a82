"""Checkpoint saves that fail are noticed at the next step, in one line.

Saves are asynchronous: Orbax writes the arrays in a background thread while
training goes on. A save that fails there (the disk is full, the directory
was made read-only) would surface only when the next save waits for it,
an interval later, inside Orbax's tracebacks. `SaveWatch` wraps the run's
CheckpointManager so that the loop learns of it at the next step boundary:

  save(state, force=False)  starts a save (checkpoint.save); an error raised
                            at once (the step directory cannot be made) is
                            a CheckpointWriteError already;
  check()                   between steps: while the save runs, one flag
                            read; once it has ended, one wait (which returns
                            at once) and one look at the step directory;
  wait()                    blocks until the pending save has ended (the end
                            of the run), with the same errors.

A failed save raises CheckpointWriteError, whose message is one line: the
step, its directory, the cause, and the free space there. The temporary
directory of the failed save (`<step>.orbax-checkpoint-tmp*`; on gs://, the
step directory without its commit file) is removed, and nothing else: Orbax deletes older checkpoints (keep-N) only
after a save has committed, so the earlier ones are intact. main.py exits
with its own code for this (retrying fails the same way until space is
freed or the directory is writable again).

With several processes, each could see the background save end at a
different step, and stopping at different steps would leave the others
waiting in a collective; there a failed save is reported at the next save,
where every process waits for the previous one anyway.
"""
import os
from typing import Optional

from absl import logging
import jax

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import files
from simclr_jax.runtime import memory

TMP_MARK = '.orbax-checkpoint-tmp'


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the message is one line."""


class SaveWatch:
  """The run's checkpoint saves, with failures reported between steps."""

  def __init__(self, manager):
    self.manager = manager
    self.directory = str(manager.directory)
    self.pending: Optional[int] = None  # Step of the save in flight.
    self._tmp_before = set()
    self.reported = False
    self._poll_between_steps = jax.process_count() == 1

  # --- Saving -------------------------------------------------------------
  def save(self, state, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (see checkpoint.save)."""
    self.wait()  # The previous save's failure is reported as itself.
    step = int(jax.device_get(state.step))
    # What is there already was left by an earlier run, except the one
    # temporary name that Orbax itself replaces when it saves this step.
    self._tmp_before = set(self._temporary_dirs(step)) - {
        self._step_dir(step) + TMP_MARK}
    self.pending = step
    try:
      started = checkpoint.save(self.manager, state, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    if not started:
      self.pending = None
    return started

  def check(self) -> None:
    """Between steps: raises CheckpointWriteError if the pending save failed."""
    if (self.pending is None or not self._poll_between_steps
        or self.manager.is_saving_in_progress()):
      return
    self.wait()

  def wait(self) -> None:
    """Waits for the pending save; raises CheckpointWriteError if it failed."""
    if self.pending is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(e)
    if not self._committed(self.pending):
      self._fail(None)
    self.pending = None

  # --- A failed save ------------------------------------------------------
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _committed(self, step: int) -> bool:
    return step in checkpoint.committed_steps(self.directory)

  def _temporary_dirs(self, step: int):
    """The step's temporary directories, and on filesystems where Orbax
    commits with a marker file (gs://) the step directory without it."""
    if not files.isdir(self.directory):
      return []
    found = [os.path.join(self.directory, name)
             for name in files.listdir(self.directory)
             if name.startswith(f'{step}{TMP_MARK}')]
    step_dir = self._step_dir(step)
    if files.isdir(step_dir) and not self._committed(step):
      found.append(step_dir)
    return found

  def _remove_temporary(self, step: int) -> str:
    """Removes what the failed save of `step` left; '' or why it could not."""
    if jax.process_index() != 0:
      return ''
    problems = []
    for path in self._temporary_dirs(step):
      if path in self._tmp_before:
        continue  # An earlier run's, not this save's.
      try:
        files.remove_tree(path)
        logging.info('Removed the partial checkpoint %s.', path)
      except OSError as e:
        problems.append(f'{path} ({e.strerror or e})')
    if problems:
      return f'; could not remove the partial {", ".join(problems)}'
    return ''

  def _fail(self, error: Optional[BaseException]) -> None:
    step, self.pending = self.pending, None
    self.reported = True
    where = self._step_dir(step)
    left = self._remove_temporary(step)
    free = files.free_bytes(self.directory)
    free_text = ('free space unknown' if free is None else
                 f'{memory.size_text(free)} free there')
    earlier = [s for s in checkpoint.committed_steps(self.directory)
               if s < step]
    resume = (f'earlier checkpoints are intact; the same command resumes '
              f'from step {earlier[-1]}' if earlier else
              'no earlier checkpoint; the same command starts over')
    raise CheckpointWriteError(
        f'the checkpoint of step {step} could not be written to {where}: '
        f'{describe(error)} ({free_text}){left}; {resume} once the disk has '
        'space and the directory is writable.') from error


def describe(error: Optional[BaseException]) -> str:
  """The root cause of a failed write in a few words (an OSError's errno
  text and path where there is one)."""
  if error is None:
    return 'the save ended without committing the step'
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      target = f': {seen.filename}' if seen.filename else ''
      return f'{type(seen).__name__}: {seen.strerror}{target}'
    seen = seen.__cause__ or seen.__context__
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:300] or "no message"}'
