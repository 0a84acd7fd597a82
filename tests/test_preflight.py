"""preflight.py: the checks that run before anything compiles, in-process.

(test_main.py runs the same checks through `python -m simclr_jax.main`.)
"""
import errno
import logging
import os
import re
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models
from simclr_jax import preflight
from simclr_jax.data import pipeline
from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import run_identity

from conftest import config_file


def test_workdir_that_is_not_writable(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('root writes through permission bits')
  wd = tmp_path / 'ro'
  wd.mkdir()
  wd.chmod(0o555)
  try:
    with pytest.raises(preflight.BadInput, match='not writable'):
      preflight.check_workdir(str(wd))
  finally:
    wd.chmod(0o755)


def _demo_config(**overrides):
  config = runpy.run_path(config_file('demo'))['get_config']()
  with config.unlocked():
    config.update(overrides)
  return config


def test_unknown_dataset_and_split():
  with pytest.raises(preflight.BadInput, match="Unknown dataset 'no_such_set'"):
    preflight.check_dataset(_demo_config(dataset='no_such_set'))
  with pytest.raises(preflight.BadInput,
                     match=r"Unknown split 'valid'.*\['test', 'train'\]"):
    preflight.check_dataset(_demo_config(eval_split='valid'))


def _abstract_variables(config, num_classes=10):
  model = models.create_model(config, num_classes)
  size = config.image_size
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))


def _save_variables(path, variables, *, bad_path=None, extra=()):
  """Writes zeros shaped like `variables` (one leaf widened, `extra` paths
  added) as a backbone."""
  def zeros(p, leaf):
    shape = tuple(leaf.shape)
    if checkpoint._path_str(p) == bad_path:  # pylint: disable=protected-access
      shape = shape[:-1] + (shape[-1] + 1,)
    return np.zeros(shape, leaf.dtype)
  tree = jax.tree_util.tree_map_with_path(zeros, {
      'params': variables['params'],
      'batch_stats': variables['batch_stats']})
  for name in extra:
    *parents, leaf = name.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.zeros((3, 3), np.float32)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def test_init_checkpoint_shape_mismatch_names_the_path(tmp_path):
  pretrain = _demo_config()
  variables = _abstract_variables(pretrain)
  bad = 'resnet/block_group2_block0/conv1/kernel'
  _save_variables(str(tmp_path / 'bad'), variables, bad_path='params/' + bad)
  _save_variables(str(tmp_path / 'good'), variables)

  linear = _demo_config(train_mode='linear_eval',
                        init_checkpoint=str(tmp_path / 'bad'))
  model = models.create_model(linear, 10)
  empty = tmp_path / 'empty_workdir'
  shape = tuple(variables['params']['resnet']['block_group2_block0']['conv1'][
      'kernel'].shape)
  widened = shape[:-1] + (shape[-1] + 1,)
  with pytest.raises(preflight.BadInput, match=(
      f"does not fit the model: .*params path '{bad}' has shape "
      f'{re.escape(str(widened))} in the checkpoint but '
      f'{re.escape(str(shape))}')):
    preflight.check_init_checkpoint(linear, str(empty), model)

  # The same file with the right shapes passes; so does a workdir that
  # already holds a checkpoint (the run resumes and never reads it).
  linear.init_checkpoint = str(tmp_path / 'good')
  preflight.check_init_checkpoint(linear, str(empty), model)

  linear.init_checkpoint = str(tmp_path)  # No checkpoint there.
  with pytest.raises(preflight.BadInput, match='no Orbax checkpoint'):
    preflight.check_init_checkpoint(linear, str(empty), model)


def test_init_checkpoint_with_parameters_the_model_lacks_is_refused(
    tmp_path, caplog):
  """Checked both ways: a deeper network's checkpoint does not load in part.
  Extra parameters under a subtree the mode initialises afresh (the linear
  eval classifier) are allowed, and the load logs that subtree."""
  # A pretraining run with the online linear head: its checkpoint holds a
  # supervised_head that linear_eval initialises afresh.
  pretrain = _demo_config(lineareval_while_pretraining=True)
  variables = _abstract_variables(pretrain)
  deeper = 'resnet/block_group4_block2/conv1/kernel'
  _save_variables(str(tmp_path / 'deeper'), variables,
                  extra=['params/' + deeper])
  linear = _demo_config(train_mode='linear_eval',
                        init_checkpoint=str(tmp_path / 'deeper'))
  model = models.create_model(linear, 10)
  empty = str(tmp_path / 'empty_workdir')
  with pytest.raises(preflight.BadInput, match=(
      f"does not fit the model: .*params path '{deeper}' of the checkpoint "
      r'is not in the model \(1 such path')):
    preflight.check_init_checkpoint(linear, empty, model)

  _save_variables(str(tmp_path / 'other_head'), variables,
                  extra=['params/supervised_head/old_bias'])
  linear.init_checkpoint = str(tmp_path / 'other_head')
  preflight.check_init_checkpoint(linear, empty, model)
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  with caplog.at_level(logging.INFO, logger='absl'):
    checkpoint.merge_pretrained(
        target['params'],
        checkpoint.load_pretrained(linear.init_checkpoint)['params'])
  assert ('params of supervised_head initialised afresh on purpose'
          in caplog.text)


def test_workdir_probe_is_removed_when_its_write_fails(tmp_path, monkeypatch):
  """A full disk fails the probe's write: the probe file does not stay."""
  class FullDisk:
    def __init__(self, fd):
      os.close(fd)
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      return False
    def write(self, _):
      raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(preflight.os, 'fdopen', lambda fd, mode: FullDisk(fd))
  with pytest.raises(preflight.BadInput, match='No space left on device'):
    preflight.check_workdir(str(tmp_path))
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Splits against the batch.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,fragment', [
    (dict(train_split='train[:0]'),
     "config.train_split='train[:0]' of 'mnist_offline' has no examples."),
    (dict(eval_split='test[5:5]'),
     "config.eval_split='test[5:5]' of 'mnist_offline' has no examples."),
    (dict(train_split='train[:10]'),
     "config.train_split='train[:10]' of 'mnist_offline' has 10 examples, "
     'fewer than one global batch (config.train_batch_size=16)'),
    (dict(knn_bank='train[:0]'),
     "config.evals.knn.bank_split='train[:0]' of 'mnist_offline' has no "
     'examples.'),
], ids=['empty_train', 'empty_eval', 'train_below_batch', 'empty_evaluator'])
def test_empty_split_or_train_split_below_a_batch_is_refused(
    overrides, fragment, tiny_config):
  knn_bank = overrides.pop('knn_bank', None)
  config = tiny_config('pretrain', **overrides)
  if knn_bank:
    with config.unlocked():
      config.evals.knn = dict(bank_split=knn_bank)
  with pytest.raises(preflight.BadInput) as error:
    preflight.check_dataset(config)
  assert str(error.value).startswith(fragment), str(error.value)


def test_eval_split_below_an_eval_batch_is_logged_not_refused(tiny_config,
                                                              caplog):
  config = tiny_config('pretrain', eval_split='test[:40]')  # Batch 80.
  with caplog.at_level(logging.WARNING):
    data = preflight.check_dataset(config)
  assert data.num_train_examples == 4000
  assert ("config.eval_split='test[:40]' has 40 examples, fewer than one "
          'eval batch (80)') in caplog.text


# ----------------------------------------------------------------------------
# Resuming a workdir: its run identity and its step.
# ----------------------------------------------------------------------------
def _data(num_classes=10):
  return pipeline.Data(num_train_examples=4000, num_classes=num_classes,
                       train_batches=None, eval_batches=None)


def _recorded_run(workdir, config, step=50):
  """A workdir holding a (fake) checkpoint at `step` of `config`'s run and
  the identity its first save recorded."""
  step_dir = workdir / checkpoint.CHECKPOINT_DIR / str(step) / 'state'
  step_dir.mkdir(parents=True)
  (step_dir / 'array_data').write_bytes(b'\x00\x01' * 100)
  run_identity.write(str(workdir), run_identity.of_run(
      config, 10, _abstract_variables(config)))
  return _tree_bytes(workdir)


def _tree_bytes(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[path] = (f.read(), os.stat(path).st_mtime_ns)
  return out


@pytest.mark.parametrize('key,value', [
    ('train_mode', 'supervised'), ('image_size', 24), ('dataset', 'cifar10'),
    ('resnet_depth', 34), ('train_split', 'train[:50%]'), ('seed', 1),
    ('memory_buffer_size', 1024)])
def test_resuming_another_run_names_the_key_and_both_values(tmp_path, key,
                                                            value):
  pretrain = _demo_config(train_steps=100)
  before = _recorded_run(tmp_path, pretrain)
  other = _demo_config(train_steps=100, **{key: value})
  with pytest.raises(preflight.BadInput) as error:
    preflight.check_resume(other, str(tmp_path), _data(),
                           models.create_model(other, 10))
  message = str(error.value)
  assert (f"--workdir='{tmp_path}' holds another run (config.{key}="
          f"{pretrain[key]!r} in the workdir's run, {value!r} in this one)"
          in message), message
  assert '\n' not in message
  assert _tree_bytes(tmp_path) == before  # Nothing touched.


def test_resume_allows_what_may_change_and_refuses_fewer_steps(tmp_path,
                                                              caplog):
  pretrain = _demo_config(train_steps=100)
  before = _recorded_run(tmp_path, pretrain, step=50)
  model = models.create_model(pretrain, 10)
  # Longer, other cadences, other evaluators, another precision: allowed.
  changed = _demo_config(
      train_steps=200, eval_every_steps=7, log_every_steps=3,
      checkpoint_every_steps=11, keep_checkpoints=9, num_profile_steps=0,
      dtype='bfloat16', learning_rate=0.5)
  with changed.unlocked():
    changed.evals.knn = dict(every_steps=5)
  preflight.check_resume(changed, str(tmp_path), _data(), model)
  preflight.check_resume(_demo_config(train_steps=50), str(tmp_path),
                         _data(), model)  # Finished: nothing left, allowed.
  for overrides, fragment in (
      (dict(train_steps=20), 'config.train_steps=20 is below step 50'),
      (dict(train_steps=0, train_epochs=1),  # 4000 // 128 + 1 steps.
       'config.train_epochs=1 (32 steps) is below step 50')):
    with pytest.raises(preflight.BadInput, match=re.escape(fragment)):
      preflight.check_resume(_demo_config(**overrides), str(tmp_path),
                             _data(), model)
  # Another number of classes (another dataset build) is another run.
  with pytest.raises(preflight.BadInput, match='10 classes in the workdir'):
    preflight.check_resume(pretrain, str(tmp_path), _data(num_classes=7),
                           model)
  assert _tree_bytes(tmp_path) == before

  # A workdir from before the identity was recorded: resumed unchecked.
  os.remove(run_identity.path(str(tmp_path)))
  with caplog.at_level(logging.WARNING):
    preflight.check_resume(_demo_config(train_steps=100, seed=3),
                           str(tmp_path), _data(), model)
  assert 'records no run identity' in caplog.text


# ----------------------------------------------------------------------------
# The compiled step against the device's memory.
# ----------------------------------------------------------------------------
class FakeAccelerator:
  platform, device_kind, id = 'tpu', 'TPU v4', 0

  def __init__(self, limit):
    self.limit = limit

  def memory_stats(self):
    return {'bytes_limit': self.limit, 'bytes_in_use': 0}


def test_step_larger_than_the_device_memory_is_refused_with_both_figures(
    monkeypatch, caplog):
  # 1 MiB argument and 1 MiB output (no temporaries): 2 MiB live at peak.
  compiled = jax.jit(lambda x: x * 2).lower(
      jax.ShapeDtypeStruct((256, 1024), jnp.float32)).compile()
  with pytest.raises(preflight.BadInput) as error:
    preflight.check_step_memory(compiled, FakeAccelerator(2**20))
  assert str(error.value).startswith(
      'the compiled train step (arguments, outputs and temporaries per '
      'device) needs 2.00 MiB but TPU v4 0 holds 1.00 MiB: it cannot run.')
  preflight.check_step_memory(compiled, FakeAccelerator(2**21))  # Fits.

  # CPU: the host's available memory takes the outputs on every device.
  from simclr_jax.runtime import memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, 'host_available_bytes', lambda: 2**20)
  with pytest.raises(preflight.BadInput, match=(
      r'outputs and temporaries on 8 cpu device\(s\)\) needs 8.00 MiB but '
      r'host \S+ has available 1.00 MiB')):
    preflight.check_step_memory(compiled)
  monkeypatch.setattr(memory, 'host_available_bytes', lambda: None)
  with caplog.at_level(logging.INFO, logger='absl'):
    preflight.check_step_memory(compiled)  # Unknown: skipped, and logged.
  assert 'Memory check skipped' in caplog.text


def test_remote_workdir_is_probed_with_a_write(tmp_path, monkeypatch):
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  url = f'ram://main_test/{tmp_path.name}/run'
  preflight.check_workdir(url)
  assert gfile.isdir(url) and gfile.listdir(url) == []  # Probe deleted.
  with gfile.GFile(f'{url}/a_file', 'w') as f:
    f.write('x')
  with pytest.raises(preflight.BadInput, match='exists and is not a directory'):
    preflight.check_workdir(f'{url}/a_file')
  assert os.listdir(tmp_path) == []  # Nothing local named after the URL.

  config = _demo_config(init_checkpoint=f'{url}/missing')
  with pytest.raises(preflight.BadInput, match=r"init_checkpoint='ram://.*' is "
                     'invalid: no such path'):
    preflight.check_init_checkpoint(config, str(tmp_path / 'new'), None)
  gfile.rmtree(url)


def test_init_checkpoint_of_the_other_backbone_is_named(tmp_path):
  """A ResNet checkpoint (e.g. a converted reference model) as a ViT's
  init_checkpoint, and the reverse: one line naming both."""
  resnet = _demo_config()
  _save_variables(str(tmp_path / 'resnet'), _abstract_variables(resnet))
  vit_config = runpy.run_path(config_file('demo_vit'))['get_config']()
  with vit_config.unlocked():
    vit_config.update(train_mode='linear_eval',
                      init_checkpoint=str(tmp_path / 'resnet'))
  empty = str(tmp_path / 'empty_workdir')
  with pytest.raises(preflight.BadInput, match=(
      r"holds a 'resnet' backbone but config.model='vit': set config.model "
      'and its keys as in the run that wrote it')):
    preflight.check_init_checkpoint(
        vit_config, empty, models.create_model(vit_config, 10))
  with vit_config.unlocked():
    vit_config.train_mode = 'pretrain'
  _save_variables(str(tmp_path / 'vit'), _abstract_variables(vit_config))
  linear = _demo_config(train_mode='linear_eval',
                        init_checkpoint=str(tmp_path / 'vit'))
  with pytest.raises(preflight.BadInput, match=(
      r"holds a 'vit' backbone but config.model='resnet'")):
    preflight.check_init_checkpoint(linear, empty,
                                    models.create_model(linear, 10))


def _distill_config(teacher_checkpoint):
  """The demo's data and ResNet as a distillation student; the teacher the
  same ResNet fine-tuned from layer 1 of the demo's projection head."""
  demo = _demo_config()
  return _demo_config(
      train_mode='distill', teacher_checkpoint=teacher_checkpoint,
      proj_head_mode='none', ft_proj_selector=0, teacher=dict(
          resnet_depth=demo.resnet_depth, width_multiplier=1, sk_ratio=0.0,
          proj_head_mode='nonlinear', num_proj_layers=demo.num_proj_layers,
          proj_out_dim=demo.proj_out_dim, ft_proj_selector=1))


def test_teacher_checkpoint_is_checked_before_compiling(tmp_path):
  config = _distill_config(str(tmp_path / 'good'))
  size = config.image_size

  def teacher_shapes(num_classes):
    model = models.create_teacher_model(config, num_classes)
    return jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))

  bad = 'projection_head/layer_0/dense/kernel'
  _save_variables(str(tmp_path / 'good'), teacher_shapes(10))
  _save_variables(str(tmp_path / 'bad'), teacher_shapes(10),
                  bad_path='params/' + bad)
  _save_variables(str(tmp_path / 'seven'), teacher_shapes(7))
  _save_variables(str(tmp_path / 'pretrained'),
                  _abstract_variables(_demo_config(
                      lineareval_while_pretraining=False)))
  preflight.check_teacher_checkpoint(config, 10)
  for name, fragments in (
      ('seven', "its classifier has 7 classes but config.dataset="
                "'mnist_offline' has 10"),
      ('pretrained', 'it has no supervised_head'),
      ('bad', f"params path '{bad}' has shape"),
      ('', 'no Orbax checkpoint')):
    config.teacher_checkpoint = str(tmp_path / name)
    with pytest.raises(preflight.BadInput) as error:
      preflight.check_teacher_checkpoint(config, 10)
    message = str(error.value)
    assert message.startswith(
        f'config.teacher_checkpoint={config.teacher_checkpoint!r}')
    assert fragments in message and '\n' not in message
  config.teacher_checkpoint = str(tmp_path / 'missing')
  with pytest.raises(preflight.BadInput, match='no such path'):
    preflight.check_config(config)
