"""Preemption: SIGTERM (a preempted TPU VM or a cluster's time limit) becomes
a flag that the training loop polls between steps, so the run can save a
checkpoint at the current step and stop cleanly."""
import signal
import threading
from typing import Any, Callable, Optional

from absl import logging
import jax


class PreemptionWatch:
  """Turns SIGTERM into a flag the loop polls between steps (a context)."""

  def __init__(self, on_exit: Optional[Callable[[], Any]] = None):
    self.requested = False
    self._previous = None
    # Called when the loop ends, normally or by an exception (a non-finite
    # loss): lets an in-flight checkpoint save complete before the process
    # exits, so the newest good checkpoint is not lost with it.
    self._on_exit = on_exit

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Signal %d: saving a checkpoint and stopping.', signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self._on_exit is not None:
      self._on_exit()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must stop at the same step to save together.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # Preemption service not enabled.
        return False
    return self.requested
