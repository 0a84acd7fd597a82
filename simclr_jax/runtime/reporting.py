"""What a run shows on its dashboard beyond scalars: hyper-parameters and
the augmented views it trains on."""
from typing import Any, Dict

import ml_collections
import numpy as np


def view_grid(images, max_images: int = 8) -> np.ndarray:
  """[1, n·H, v·W, 3] grid: one row per image, its v views side by side."""
  x = np.clip(np.asarray(images[:max_images], np.float32), 0.0, 1.0)
  if x.ndim == 4:  # [n, H, W, 3]: one view per image.
    x = x[:, None]
  n, v, h, w, c = x.shape
  return x.transpose(0, 2, 1, 3, 4).reshape(1, n * h, v * w, c)


def flat_hparams(config) -> Dict[str, Any]:
  """Scalar config values with dotted keys, for TensorBoard's hparams."""
  out = {}

  def visit(prefix, value):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    elif isinstance(value, (bool, int, float, str)):
      out[prefix[:-1]] = value
    else:
      out[prefix[:-1]] = str(value)

  visit('', config.to_dict() if hasattr(config, 'to_dict') else config)
  return out


def summary_line(config, workdir: str, step: int, metrics: Dict[str, float],
                 *, preempted: bool) -> str:
  """The one line a run ends with: mode, step, final metrics, checkpoint."""
  shown = []
  for name in sorted(metrics):
    if name == 'loss' or '/' in name and not name.endswith('num_examples'):
      value = metrics[name]
      is_rate = 'top' in name or name.endswith('acc')
      shown.append(f'{name} {value:.2%}' if is_rate else f'{name} {value:.4g}')
  state = 'preempted (resume with the same command)' if preempted else 'done'
  return (f'simclr_jax: {config.train_mode} {state} at step {step}: '
          f'{", ".join(shown) or "no metrics"}; checkpoint '
          f'{workdir.rstrip("/")}/checkpoints/{step}')
