"""The training progress line: when it prints and what it says (fake clock)."""
import numpy as np
import pytest

from simclr_jax.runtime import progress


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.mark.parametrize('seconds, text', [
    (0, '0s'), (42.4, '42s'), (185, '3m05s'), (3723, '1h02m03s')])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_prints_first_step_then_every_30s_and_the_last_step():
  clock, lines = FakeClock(), []
  hook = progress.ProgressLine(total_steps=600, batch_size=128, start_step=0,
                               clock=clock, printer=lines.append)
  printed_at = []
  for step in range(1, 601):
    clock.now += 0.25 if step > 1 else 10.0  # The first step: 10 s.
    if hook.update(step, {'loss': np.float32(6.0 - step / 1000)}):
      printed_at.append(step)
  # Step 1, then a line as soon as one at the next chance (the end of the
  # next step, 2 × 0.25 s on) would come more than 30 s after the previous
  # one (every 119 steps), then the last step.
  assert printed_at == [1, 120, 239, 358, 477, 596, 600]
  # Step 1 took 10 s: 12.8 img/s, 599 steps left at 0.1 steps/s.
  assert lines[0] == 'step 1/600  loss 5.999  13 img/s  ETA 1h39m50s'
  # 119 steps × 128 images in 29.75 s = 512 img/s; 480 steps × 0.25 s left.
  assert lines[1] == 'step 120/600  loss 5.88  512 img/s  ETA 2m00s'
  assert lines[-1].startswith('step 600/600  loss 5.4  512 img/s  ETA 0s')


def test_resumed_run_and_excluded_evaluation_time():
  clock, lines = FakeClock(), []
  hook = progress.ProgressLine(total_steps=100, batch_size=10, start_step=40,
                               every_secs=30.0, clock=clock,
                               printer=lines.append)
  clock.now += 2.0
  assert hook.update(41, {'loss': 1.0})  # The first step after a resume.
  assert lines[0] == 'step 41/100  loss 1  5 img/s  ETA 1m58s'
  clock.now += 100.0  # An evaluation of 100 s, then one step of 1 s.
  hook.exclude(100.0)
  clock.now += 1.0
  # Due by the wall clock (101 s since the last line); the speed is of the
  # one second of training.
  assert hook.update(42, {'loss': 1.0})
  assert lines[1] == 'step 42/100  loss 1  10 img/s  ETA 58s'
  for step in range(43, 74):
    clock.now += 1.0
    hook.update(step, {'loss': 1.0})
  assert len(lines) == 3 and lines[2].startswith('step 71/100')
  assert '10 img/s' in lines[2]  # 29 steps in 29 s.


class PendingLoss:
  """A step's loss on a fake device: waiting for it moves the host's clock
  to the step's end."""

  def __init__(self, clock, done_at):
    self.clock, self.done_at = clock, done_at

  def block_until_ready(self):
    self.clock.now = max(self.clock.now, self.done_at)
    return self

  def __float__(self):
    self.block_until_ready()
    return 6.0

  def __array__(self, dtype=None, copy=None):
    return np.asarray(float(self), dtype)


def test_lines_keep_to_30s_when_steps_run_ahead_of_the_host():
  # As in the train loop: dispatching a step is instant, the device takes
  # 2.5 s a step, and the host waits for the device only when it logs
  # metrics (every 10 steps) and for an 8 s evaluation every 30 steps.
  # Reading the clock at dispatch alone would print every 20 steps, 50 s
  # apart.
  clock, lines = FakeClock(), []
  hook = progress.ProgressLine(total_steps=120, batch_size=128, start_step=0,
                               clock=clock, printer=lines.append)
  done_at, printed_at = clock.now, []
  for step in range(1, 121):
    done_at = max(done_at, clock.now) + 2.5
    loss = PendingLoss(clock, done_at=done_at)
    if hook.update(step, {'loss': loss}):
      printed_at.append(clock.now)
    if step % 10 == 0:
      loss.block_until_ready()
    if step % 30 == 0 and step < 120:
      clock.now += 8.0
      hook.exclude(8.0)
  gaps = np.diff(printed_at)
  assert len(printed_at) >= 12 and max(gaps) <= 30.0, printed_at
  # The speed leaves the evaluations out: 128 images per 2.5 s.
  assert lines[-1].startswith('step 120/120  loss 6  51 img/s  ETA 0s')
