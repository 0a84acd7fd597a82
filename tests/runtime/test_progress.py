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
  # Step 1, then the first step more than 30 s after the previous line
  # (121 steps of 0.25 s), then the last step.
  assert printed_at == [1, 122, 243, 364, 485, 600]
  # Step 1 took 10 s: 12.8 img/s, 599 steps left at 0.1 steps/s.
  assert lines[0] == 'step 1/600  loss 5.999  13 img/s  ETA 1h39m50s'
  # 121 steps × 128 images in 30.25 s = 512 img/s; 478 steps × 0.25 s left.
  assert lines[1] == 'step 122/600  loss 5.878  512 img/s  ETA 2m00s'
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
  assert not hook.update(42, {'loss': 1.0})  # 1 s of training: not due.
  for step in range(43, 74):
    clock.now += 1.0
    hook.update(step, {'loss': 1.0})
  assert len(lines) == 2 and lines[1].startswith('step 72/100')
  assert '10 img/s' in lines[1]  # 31 steps in 31 s, evaluation excluded.
