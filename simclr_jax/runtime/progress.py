"""The progress line a run prints while it trains.

`step 120/600  loss 5.91  412 img/s  ETA 3m05s`: at the first step after
compiling, then at least every `every_secs` of wall time, and at the last
step. A `clu.periodic_actions.PeriodicAction` (time-based, like clu's
ReportProgress, which only sets work-unit notes and writes steps/s to the
metric writer): the loop calls `update(step, metrics)` after dispatching
each step. Steps run asynchronously, so the host's clock says nothing of
the device until it waits: `update` waits for the step before (one step
stays queued, the device never idles) and prints a line when waiting
for one more step would make it late. Reading the loss waits for that step to
finish, so the images/s and the ETA measure finished steps, not dispatched
ones; it costs one scalar transfer per line.
"""
import functools
import time
from typing import Callable, Optional

from clu import periodic_actions
import jax


def format_duration(seconds: float) -> str:
  """1h02m03s, 3m05s or 42s (whole seconds, rounded)."""
  total = int(round(max(seconds, 0.0)))
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{secs:02d}s'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def progress_line(step: int, total_steps: int, loss: float,
                  images_per_sec: float, eta_seconds: float) -> str:
  return (f'step {step}/{total_steps}  loss {loss:.4g}  '
          f'{images_per_sec:.0f} img/s  ETA {format_duration(eta_seconds)}')


class ProgressLine(periodic_actions.PeriodicAction):
  """Prints `progress_line` at least every `every_secs` seconds.

  Speed is over the steps since the previous line (for the first line: since
  the hook was made, just before the loop); time spent in evaluation is
  taken out with `exclude(seconds)`. `clock` and `printer` are for tests.
  """

  def __init__(self, *, total_steps: int, batch_size: int, start_step: int,
               every_secs: float = 30.0,
               clock: Callable[[], float] = time.monotonic,
               printer: Callable[[str], None] = functools.partial(
                   print, flush=True)):
    super().__init__(every_secs=every_secs,
                     on_steps=(start_step + 1, total_steps))
    self.total_steps, self.batch_size = total_steps, batch_size
    self.clock, self.printer = clock, printer
    self._line_step, self._line_time = start_step, clock()
    self._metrics: Optional[dict] = None
    # When the last step finished, and how long it took.
    self._update_time: Optional[float] = None
    self._step_secs = 0.0

  def update(self, step: int, metrics) -> bool:
    """After dispatching each step: waits for the one before, then prints a
    line if one is due; True if it did."""
    if self._metrics is not None:
      jax.block_until_ready(self._metrics['loss'])
    self._metrics = metrics
    now = self.clock()
    if self._update_time is not None:
      self._step_secs = now - self._update_time
    self._update_time = now
    return self(step, now)

  def exclude(self, seconds: float) -> None:
    """Time outside training steps (evaluation) is not counted in the speed
    or the step time; a line is still due 30 s of wall time after the last."""
    self._line_time += seconds
    if self._update_time is not None:
      self._update_time += seconds

  def _should_trigger(self, step: int, t: float) -> bool:
    # t is the end of the step before; a line printed now shows at the end
    # of this one, and the next chance's at the end of the next: due now if
    # that would be late.
    return super()._should_trigger(step, t + 2 * self._step_secs)

  def _apply(self, step: int, t: float) -> None:
    loss = float(jax.device_get(self._metrics['loss']))  # Waits for the step.
    now = self.clock()
    steps_per_sec = (step - self._line_step) / max(now - self._line_time,
                                                   1e-9)
    eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    self.printer(progress_line(step, self.total_steps, loss,
                               steps_per_sec * self.batch_size, eta))
    self._line_step, self._line_time = step, now

  def _after_apply(self, step: int, t: float) -> None:
    # The next line is due every_secs after this one was printed.
    super()._after_apply(step, self.clock())
