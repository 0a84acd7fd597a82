"""Pictures of a finished run, drawn from what it already recorded.

`write_demo_plot(workdir)` reads the scalars the CLU metric writer left in
the workdir's TensorBoard event files and writes `workdir/demo.png`: the
training loss and the kNN (or probe) accuracy against the step, and the
final linear-probe accuracies (pretrained, random init, raw pixels) as bars.
Matplotlib's Agg backend draws it (no display needed); the file is written
to a temporary name and renamed, so a reader never sees half a PNG.
"""
import io
import os
from typing import Dict, Mapping

import matplotlib
matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from simclr_jax.runtime import files  # pylint: disable=g-import-not-at-top,wrong-import-position

DEMO_PLOT = 'demo.png'
# (tag, bar label) of the final probe accuracies, in bar order.
PROBE_BARS = (('probe/pretrained_top1', 'pretrained'),
              ('probe/random_init_top1', 'random init'),
              ('probe/raw_pixels_top1', 'raw pixels'))
# The accuracy curve: the first of these with a value at more than one step.
CURVE_TAGS = ('knn/top1', 'probe/pretrained_top1', 'eval/top1')


def read_scalars(workdir: str) -> Dict[str, Dict[int, float]]:
  """{tag: {step: value}} of the scalars in workdir's event files.

  A resumed run has several files; a later value at the same step wins.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars = {}
  paths = sorted(tf.io.gfile.glob(os.path.join(workdir,
                                               'events.out.tfevents.*')))
  for path in paths:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor') and not value.tensor.string_val:
          array = tf.make_ndarray(value.tensor)
          if array.size == 1:
            scalars.setdefault(value.tag, {})[event.step] = float(
                array.reshape(-1)[0])
        elif value.HasField('simple_value'):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def write_png(figure, path: str) -> str:
  """Saves `figure` to `path` atomically (temporary name, then rename)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=110, bbox_inches='tight')
  plt.close(figure)
  temporary = f'{path}.tmp-{os.getpid()}'
  if files.is_remote(path):
    with files.gfile().GFile(temporary, 'wb') as f:
      f.write(buffer.getvalue())
    files.gfile().rename(temporary, path, overwrite=True)
  else:
    with open(temporary, 'wb') as f:
      f.write(buffer.getvalue())
    os.replace(temporary, path)
  return path


def _series(scalars: Mapping[str, Mapping[int, float]], tag: str):
  points = sorted(scalars.get(tag, {}).items())
  return [s for s, _ in points], [v for _, v in points]


def demo_figure(scalars: Mapping[str, Mapping[int, float]]):
  """Loss and accuracy against the step, and the final probe accuracies."""
  figure, (loss_ax, acc_ax, bar_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
  steps, loss = _series(scalars, 'loss')
  loss_ax.plot(steps, loss, color='tab:blue')
  loss_ax.set(title='Training loss', xlabel='step', ylabel='loss')

  curve = next((t for t in CURVE_TAGS if len(scalars.get(t, {})) > 1),
               next((t for t in CURVE_TAGS if t in scalars), None))
  if curve:
    steps, acc = _series(scalars, curve)
    acc_ax.plot(steps, [100 * a for a in acc], marker='o', color='tab:green')
    acc_ax.set(title=f'{curve} (test split)', xlabel='step',
               ylabel='accuracy (%)')
  else:
    acc_ax.set(title='no accuracy recorded')

  bars = [(label, scalars[tag][max(scalars[tag])])
          for tag, label in PROBE_BARS if scalars.get(tag)]
  if bars:
    labels, values = zip(*bars)
    drawn = bar_ax.bar(labels, [100 * v for v in values],
                       color=['tab:green', 'tab:gray', 'tab:orange'][:len(bars)])
    bar_ax.bar_label(drawn, fmt='%.1f')
    bar_ax.set_ylim(0, 105)
  bar_ax.set(title='Final linear probe (test)', ylabel='top-1 (%)')
  figure.tight_layout()
  return figure


def write_demo_plot(workdir: str) -> str:
  """Draws `demo_figure` of the workdir's scalars to workdir/demo.png."""
  path = os.path.join(files.abspath(workdir), DEMO_PLOT)
  return write_png(demo_figure(read_scalars(workdir)), path)
