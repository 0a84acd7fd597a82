"""runtime/plots.py: demo.png from the event files a run leaves, and the demo
command printing the progress line and naming the picture last."""
import os
import subprocess
import sys

from clu import metric_writers
import numpy as np
from PIL import Image
import pytest

from simclr_jax.runtime import plots

from conftest import config_file
from conftest import REPO


def _write_events(workdir):
  writer = metric_writers.create_default_writer(workdir)
  for step in range(1, 7):
    writer.write_scalars(step, {'loss': 6.0 - 0.1 * step})
    if step % 2 == 0:
      writer.write_scalars(step, {'knn/top1': 0.5 + 0.05 * step})
  writer.write_scalars(6, {'probe/pretrained_top1': 0.9,
                           'probe/random_init_top1': 0.3,
                           'probe/raw_pixels_top1': 0.8})
  writer.flush()
  writer.close()


def test_read_scalars_and_write_demo_plot(tmp_path):
  workdir = str(tmp_path)
  _write_events(workdir)
  scalars = plots.read_scalars(workdir)
  assert scalars['loss'] == {s: np.float32(6.0 - 0.1 * s) for s in range(1, 7)}
  assert sorted(scalars['knn/top1']) == [2, 4, 6]
  assert scalars['probe/raw_pixels_top1'] == {6: np.float32(0.8)}
  path = plots.write_demo_plot(workdir)
  assert path == os.path.join(workdir, 'demo.png')
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size[0] > 600
  # Atomic: nothing but the PNG (and the events) is left behind.
  assert not [n for n in os.listdir(workdir) if '.tmp' in n]


def test_tiny_run_prints_progress_and_ends_naming_demo_png(
    tiny_config, tmp_path, capsys):
  """A real loop (stand-in model) with demo_plot: progress lines while it
  trains, demo.png drawn from its events, the last line names it."""
  from simclr_jax import main  # pylint: disable=g-import-not-at-top
  from simclr_jax import preflight  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  from test_reliability import TinyModel  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  config = tiny_config('pretrain', eval_split='test[:80]', log_every_steps=1,
                       demo_plot=True)
  with config.unlocked():
    config.evals.knn = dict(every_steps=1, k=5, bank_split='train[:80]')
    config.evals.probe = dict(train_examples=80,
                              baselines=('random_init', 'raw_pixels'))
  data = preflight.check_dataset(config)
  capsys.readouterr()  # What preparing the dataset printed.
  result = train.train_and_evaluate(config, workdir, data=data,
                                    model=TinyModel())
  main.print_ending(config, workdir, result)
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('step 1/4  loss ') and ' img/s  ETA ' in lines[0]
  assert lines[1].startswith('step 4/4  loss ')
  assert lines[-2].startswith('simclr_jax: pretrain done at step 4')
  png = os.path.join(workdir, 'demo.png')
  assert lines[-1] == f'simclr_jax: wrote {png}'
  with Image.open(png) as image:
    image.verify()
  scalars = plots.read_scalars(workdir)
  assert sorted(scalars['knn/top1']) == [1, 2, 3, 4]  # The curve drawn.
  assert all(scalars[tag] for tag, _ in plots.PROBE_BARS)  # The bars.


@pytest.mark.slow
def test_demo_command_prints_progress_and_names_demo_png_last(
    tmp_path, mnist_dir, tiny_overrides):
  """configs/demo.py shrunk to 2 steps: a progress line at the first step,
  demo.png written, and the last stdout line names it."""
  workdir = str(tmp_path / 'demo')
  overrides = tiny_overrides(
      data_dir=mnist_dir, train_steps=2, checkpoint_every_steps=2,
      log_every_steps=1)
  overrides += ['--config.evals.probe.train_examples=80',
                '--config.evals.knn.every_steps=1',
                '--config.evals.knn.bank_split=train[:80]']
  result = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main',
       f'--config={config_file("demo")}', f'--workdir={workdir}',
       *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert any(line.startswith('step 1/2  loss ') and ' img/s  ETA ' in line
             for line in lines), lines
  png = os.path.join(workdir, 'demo.png')
  assert lines[-1] == f'simclr_jax: wrote {png}'
  with Image.open(png) as image:
    image.verify()
