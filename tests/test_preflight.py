"""preflight.py: the checks that run before anything compiles, in-process.

(test_main.py runs the same checks through `python -m simclr_jax.main`.)
"""
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models
from simclr_jax import preflight
from simclr_jax.runtime import checkpoint

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


def _save_variables(path, variables, *, bad_path=None):
  """Writes zeros shaped like `variables` (one leaf widened) as a backbone."""
  def zeros(p, leaf):
    shape = tuple(leaf.shape)
    if checkpoint._path_str(p) == bad_path:  # pylint: disable=protected-access
      shape = shape[:-1] + (shape[-1] + 1,)
    return np.zeros(shape, leaf.dtype)
  tree = jax.tree_util.tree_map_with_path(zeros, {
      'params': variables['params'],
      'batch_stats': variables['batch_stats']})
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
  with pytest.raises(preflight.BadInput, match=(
      f"does not fit the model: .*params path '{bad}' has shape "
      r'\(3, 3, 64, 129\) in the checkpoint but \(3, 3, 64, 128\)')):
    preflight.check_init_checkpoint(linear, str(empty), model)

  # The same file with the right shapes passes; so does a workdir that
  # already holds a checkpoint (the run resumes and never reads it).
  linear.init_checkpoint = str(tmp_path / 'good')
  preflight.check_init_checkpoint(linear, str(empty), model)

  linear.init_checkpoint = str(tmp_path)  # No checkpoint there.
  with pytest.raises(preflight.BadInput, match='no Orbax checkpoint'):
    preflight.check_init_checkpoint(linear, str(empty), model)


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
