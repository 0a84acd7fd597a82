"""Every check that runs before anything compiles or touches a checkpoint.

Bad input must cost no accelerator time and lose nothing already saved, so
each check raises `BadInput` with the one line the user sees (main.py prints
it as `simclr_jax: error: ...` and exits with code 2):
  check_config      the config's values (config.validate) and its evaluators;
  check_devices     the global batches against the device and process counts;
  check_workdir     the workdir exists or can be made, and is writable;
  check_dataset     the dataset is known and prepared, its splits exist,
                    are not empty, and the train split holds one global
                    batch (returns the pipeline.Data that training reads);
  check_init_checkpoint  `init_checkpoint` exists and fits the model, path by
                    path both ways (shapes only; no array is read);
  check_resume      a workdir that holds checkpoints holds this run's
                    (runtime/run_identity.py) and fewer steps than asked;
  check_step_memory the compiled train step fits the device's memory (run
                    by train.py right after it compiles the step, before
                    the first step).
  check_teacher_checkpoint  distill's `teacher_checkpoint` is a fine-tuned
                    classifier of the dataset's classes that fits
                    `config.teacher` (shapes only).
Workdir and init_checkpoint may be URLs (gs://bucket/run): they are checked
through TensorFlow's filesystems, the workdir by writing and deleting a probe.
"""
import os
import socket
import tempfile
import uuid

from absl import logging

import jax
import jax.numpy as jnp

from simclr_jax import config as config_lib
from simclr_jax.evaluators import common as evaluators_common
from simclr_jax.runtime import files


class BadInput(Exception):
  """Input that cannot run; the message is the one line the user sees."""


def one_line(error: BaseException) -> str:
  """An exception's message on one line (its type if it has none)."""
  text = ' '.join(str(error).replace('\\n', ' ').split())
  return text or type(error).__name__


def check_config(config) -> None:
  """The config's values: allowed keys, types and ranges, evaluators."""
  try:
    config_lib.validate(config)
    evaluators_common.evaluator_entries(config)
  except ValueError as e:
    raise BadInput(one_line(e)) from None
  for key in ('init_checkpoint', 'teacher_checkpoint'):
    path = config[key]
    if path and not files.is_remote(path) and not os.path.exists(path):
      raise BadInput(f'config.{key}={path!r} is invalid: no such path.')


def check_devices(config) -> None:
  """The global batches split over all devices and processes of the job."""
  try:
    config_lib.validate_for_devices(config, device_count=jax.device_count(),
                                    process_count=jax.process_count())
  except ValueError as e:
    raise BadInput(one_line(e)) from None


def check_workdir(workdir: str) -> None:
  """The workdir exists (or can be made) and is writable."""
  if files.is_remote(workdir):
    _check_remote_workdir(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise BadInput(f'--workdir={workdir!r} exists and is not a directory.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} cannot be created: '
                   f'{e.strerror}.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise BadInput(f'--workdir={workdir!r} is not writable.')
  # os.access trusts permission bits; a read-only mount or a full disk only
  # shows on an actual write. mkstemp creates a file of our own (never an
  # existing one), which is removed whether the write worked or not.
  try:
    fd, probe = tempfile.mkstemp(prefix='.simclr_jax_write_test.',
                                 dir=workdir)
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} is not writable: '
                   f'{e.strerror}.') from None
  try:
    with os.fdopen(fd, 'w') as f:
      f.write('ok')
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} is not writable: '
                   f'{e.strerror}.') from None
  finally:
    os.remove(probe)


def _check_remote_workdir(workdir: str) -> None:
  """A URL workdir (gs://...): permissions only show on an actual write.

  tf.io.gfile, as etils.epath uses for gs:// (os calls would make a local
  `gs:/bucket/...` directory). An unknown scheme, a missing bucket or missing
  credentials all fail here, before the lock and any compile.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  probe = (f'{workdir.rstrip("/")}/.simclr_jax_write_test.'
           f'{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}')
  try:
    if gfile.exists(workdir) and not gfile.isdir(workdir):
      raise BadInput(f'--workdir={workdir!r} exists and is not a directory.')
    gfile.makedirs(workdir)
    try:
      with gfile.GFile(probe, 'w') as f:
        f.write('ok')
    finally:
      if gfile.exists(probe):
        gfile.remove(probe)
  except BadInput:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # tf.errors.* (NotFound, PermissionDenied, Unimplemented scheme, ...).
    raise BadInput(f'--workdir={workdir!r} is not writable: '
                   f'{type(e).__name__}: {one_line(e)}') from None


def check_dataset(config):
  """The dataset as training reads it (pipeline.Data), or BadInput.

  data/pipeline.py words the errors (a dataset that is not prepared gets the
  `tfds build` command that prepares it).
  """
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    data = pipeline.create_data(config)
  except ValueError as e:
    raise BadInput(one_line(e)) from None
  check_split_sizes(config, split_sizes(config))
  return data


def split_sizes(config):
  """{config key: (split, number of examples)} of split_keys(config), from
  the prepared dataset's metadata (nothing is read), or BadInput."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return {key: (split, pipeline.num_examples(config, split))
            for key, split in split_keys(config).items()}
  except ValueError as e:
    raise BadInput(one_line(e)) from None


def split_keys(config):
  """{config key: split} of every split the run reads (the evaluators' own
  splits included), in a stable order."""
  keys = {'train_split': config.train_split}
  if config.eval_split:
    keys['eval_split'] = config.eval_split
  for name, _, fields in evaluators_common.evaluator_entries(config):
    for field, split in sorted(fields.items()):
      if field.endswith('_split') and split:
        keys[f'evals.{name}.{field}'] = split
  return keys


def check_split_sizes(config, sizes) -> None:
  """Every split has examples; the train split at least one global batch.

  `sizes`: {config key: (split, number of examples)}. An eval split smaller
  than one eval batch is allowed (padding rows are masked out) and logged.
  """
  for key, (split, size) in sizes.items():
    if size == 0:
      raise BadInput(f'config.{key}={split!r} of {config.dataset!r} has no '
                     'examples.')
  split, size = sizes['train_split']
  if size < config.train_batch_size:
    raise BadInput(
        f'config.train_split={split!r} of {config.dataset!r} has {size} '
        f'examples, fewer than one global batch (config.train_batch_size='
        f'{config.train_batch_size}): every batch would repeat examples. Use '
        'a larger split or a smaller batch.')
  for key, (split, size) in sizes.items():
    if key != 'train_split' and size < config.eval_batch_size:
      logging.warning('config.%s=%r has %d examples, fewer than one eval '
                      'batch (%d): its batches are mostly padding.', key,
                      split, size, config.eval_batch_size)


def check_init_checkpoint(config, workdir: str, model) -> None:
  """init_checkpoint exists and fits `model`, path by path (shapes only).

  Skipped when the workdir holds a checkpoint: the run resumes from it and
  does not read init_checkpoint.
  """
  from simclr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  path = config.init_checkpoint
  if not path or checkpoint.latest_step(workdir) is not None:
    return
  if files.is_remote(path):
    _check_remote_path(path)
  try:
    pretrained = checkpoint.pretrained_shapes(path)
  except (OSError, ValueError) as e:
    raise BadInput(f'config.init_checkpoint={path!r} cannot be read: '
                   f'{one_line(e)}') from None
  held = [k for k in ('resnet', 'vit') if k in pretrained['params']]
  if held and config.model not in held:
    raise BadInput(f'config.init_checkpoint={path!r} holds a {held[0]!r} '
                   f'backbone but config.model={config.model!r}: set '
                   'config.model and its keys as in the run that wrote it.')
  variables = _abstract_variables(config, model)
  reinit = checkpoint.init_checkpoint_reinit(config, pretrained['params'])
  try:
    for what in ('params', 'batch_stats'):
      checkpoint.check_shapes(variables.get(what, {}), pretrained[what],
                              reinit=reinit, what=what)
  except ValueError as e:
    raise BadInput(f'config.init_checkpoint={path!r} does not fit the model: '
                   f'{one_line(e)}') from None


def _abstract_variables(config, model):
  """The model's variables as shapes (tracing only; nothing is allocated)."""
  size = config.image_size
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((2, size, size, 3), jnp.float32),
                         train=False))


def check_resume(config, workdir: str, data, model) -> None:
  """A workdir with checkpoints: they are this run's, and it has steps left.

  The run's identity (runtime/run_identity.py) recorded at its first save
  must match this config's; a mismatch names the key and both values.
  """
  from simclr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import run_identity  # pylint: disable=g-import-not-at-top
  step = checkpoint.latest_step(workdir)
  if step is None:
    return
  saved = run_identity.read(workdir)
  if saved is None:
    logging.warning('%s records no run identity (written by an older '
                    'version); resuming it unchecked.', workdir)
  else:
    current = run_identity.of_run(config, data.num_classes,
                                  _abstract_variables(config, model))
    difference = run_identity.first_difference(saved, current)
    if difference:
      raise BadInput(
          f'--workdir={workdir!r} holds another run ({difference}): resume '
          'it with the settings it was started with, or use another '
          '--workdir.')
  total = config_lib.config_schedule_steps(
      config, data.num_train_examples)['total_steps']
  if total < step:
    source = (f'config.train_steps={config.train_steps}' if
              config.train_steps else
              f'config.train_epochs={config.train_epochs} '
              f'({total} steps)')
    raise BadInput(
        f'{source} is below step {step}, where the run in --workdir='
        f'{workdir!r} already is: nothing would be trained. Ask for at least '
        f'{step} steps to continue it, or use another --workdir.')


def check_step_memory(compiled, device=None) -> None:
  """The compiled train step fits the device's memory (see runtime/memory.py).

  Where the backend reports neither figure, the check is skipped and says so
  in the log.
  """
  from simclr_jax.runtime import memory  # pylint: disable=g-import-not-at-top
  device = device or jax.local_devices()[0]
  fit = memory.step_fit(compiled, device, jax.local_device_count())
  if fit is None:
    logging.info('Memory check skipped: %s reports no memory figures.',
                 device.platform)
    return
  logging.info('Memory: %s.', fit.line())
  if not fit.fits():
    raise BadInput(f'{fit.line()}: it cannot run. Use a smaller '
                   'train_batch_size or image_size, config.dtype='
                   "'bfloat16', or config.remat=True.")


def _check_remote_path(path: str, key: str = 'init_checkpoint') -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    exists = tf.io.gfile.exists(path)
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(f'config.{key}={path!r} cannot be read: '
                   f'{type(e).__name__}: {one_line(e)}') from None
  if not exists:
    raise BadInput(f'config.{key}={path!r} is invalid: no such path.')


def check_teacher_checkpoint(config, num_classes: int) -> None:
  """train_mode='distill': teacher_checkpoint is readable, its classifier
  has `num_classes` outputs and its shapes fit `config.teacher`.

  Checked at every start, resumed or not: the teacher is read again each
  time (it is not part of the student's checkpoints).
  """
  if config.train_mode != 'distill':
    return
  from simclr_jax import distill  # pylint: disable=g-import-not-at-top
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  path = config.teacher_checkpoint
  if files.is_remote(path):
    _check_remote_path(path, key='teacher_checkpoint')
  try:
    shapes = checkpoint.pretrained_shapes(path)
  except (OSError, ValueError) as e:
    raise BadInput(f'config.teacher_checkpoint={path!r} cannot be read: '
                   f'{one_line(e)}') from None
  try:
    distill.check_teacher(config, models.create_teacher_model(
        config, num_classes), num_classes, shapes)
  except ValueError as e:
    raise BadInput(f'config.teacher_checkpoint={path!r} does not fit the '
                   f'teacher (config.teacher): {one_line(e)}') from None
