"""Which run a workdir belongs to: recorded at its first save, checked on resume.

A workdir's checkpoints are one run's. Resuming them under another train
mode, model, image size or dataset would either train on top of the other
run's state (and let the retention policy delete that run's older
checkpoints) or fail deep inside Orbax with a tree mismatch. So the first
save writes `workdir/checkpoints/simclr_jax_run.json`:

  {"config": {key: value for key in IDENTITY_KEYS},
   "num_classes": the dataset's classes,
   "shapes": {"params/resnet/conv_stem/kernel": [3, 3, 3, 64], ...}}

and a run that resumes the workdir must match it (preflight.check_resume).
The config keys are what defines the run: what it trains (mode, dataset,
train split, batch, seed, optimizer), the model it trains (architecture,
image size) and the state it carries besides the model (the size of
SimCLRv2's memory buffer, whose queue and momentum network are in the
checkpoint); the shapes of every parameter and BatchNorm statistic also
catch any other setting that changes the model. Everything else may change
on resume: the length (train_steps, train_epochs), the evaluation, logging,
checkpoint and profiling cadence, the evaluators, keep_checkpoints, dtype and
remat (numerics and memory, not the saved state), and init_checkpoint (only
read at step 0).
"""
import json
import os
from typing import Any, Dict, Mapping, Optional

import jax

from simclr_jax.runtime import files

FILE_NAME = 'simclr_jax_run.json'
IDENTITY_KEYS = (
    'train_mode', 'dataset', 'train_split', 'image_size', 'train_batch_size',
    'seed', 'optimizer', 'model', 'resnet_depth', 'width_multiplier',
    'sk_ratio', 'vit_variant', 'vit_pooling', 'proj_head_mode',
    'num_proj_layers', 'proj_out_dim', 'ft_proj_selector',
    'fine_tune_after_block', 'lineareval_while_pretraining',
    'memory_buffer_size')


def path(workdir: str) -> str:
  return os.path.join(files.abspath(workdir), 'checkpoints', FILE_NAME)


def _path_str(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                  for k in key_path)


def of_run(config, num_classes: int, variables: Mapping[str, Any]
           ) -> Dict[str, Any]:
  """The identity of a run: its config keys, classes and variable shapes.

  `variables` holds 'params' and 'batch_stats' as arrays or shape structs
  (jax.eval_shape of model.init): only shapes are read.
  """
  shapes = {}
  for what in ('params', 'batch_stats'):
    leaves = jax.tree_util.tree_flatten_with_path(variables.get(what, {}))[0]
    for key_path, leaf in leaves:
      shapes[f'{what}/{_path_str(key_path)}'] = [int(d) for d in leaf.shape]
  return {'config': {k: config.get(k) for k in IDENTITY_KEYS},
          'num_classes': int(num_classes or 0), 'shapes': shapes}


def read(workdir: str) -> Optional[Dict[str, Any]]:
  """The recorded identity, or None when the workdir has none."""
  try:
    return json.loads(files.read_text(path(workdir)))
  except FileNotFoundError:
    return None


def write(workdir: str, identity: Mapping[str, Any]) -> None:
  """Records `identity` (process 0 only; replaces an earlier record)."""
  if jax.process_index() == 0:
    files.write_text_atomic(path(workdir),
                            json.dumps(identity, indent=1, sort_keys=True))


def first_difference(saved: Mapping[str, Any], current: Mapping[str, Any]
                     ) -> Optional[str]:
  """The first way `current` is another run than `saved`, in words; or None.

  Names the key and both values: "train_mode='pretrain' in the workdir's
  run, 'linear_eval' in this config".
  """
  saved_config = saved.get('config', {})
  for key in IDENTITY_KEYS:
    if key in saved_config and saved_config[key] != current['config'][key]:
      return (f'config.{key}={saved_config[key]!r} in the workdir\'s run, '
              f'{current["config"][key]!r} in this one')
  if saved.get('num_classes', current['num_classes']) != (
      current['num_classes']):
    return (f'the dataset has {saved["num_classes"]} classes in the '
            f'workdir\'s run, {current["num_classes"]} in this one')
  saved_shapes, shapes = saved.get('shapes', {}), current['shapes']
  for name in sorted(set(saved_shapes) | set(shapes)):
    before, now = saved_shapes.get(name), shapes.get(name)
    if before != now:
      describe = lambda s: 'absent' if s is None else f'shape {tuple(s)}'
      return (f'{name} is {describe(before)} in the workdir\'s run, '
              f'{describe(now)} in this one')
  return None
