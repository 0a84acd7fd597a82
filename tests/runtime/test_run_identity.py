"""run_identity.py: what a run's identity holds and how two are compared."""
import os

import jax
import numpy as np

from simclr_jax.runtime import run_identity

from conftest import small_config


def _variables():
  return {'params': {'resnet': {'conv': {'kernel': np.zeros((3, 3, 3, 8))}},
                     'projection_head': {'dense': {'bias': np.zeros(4)}}},
          'batch_stats': {'resnet': {'bn': {'mean': np.zeros(8)}}}}


def test_identity_holds_the_keys_classes_and_every_shape():
  config = small_config('pretrain')
  identity = run_identity.of_run(config, 10, _variables())
  assert identity['config'] == {k: config[k]
                                for k in run_identity.IDENTITY_KEYS}
  assert identity['config']['train_mode'] == 'pretrain'
  assert identity['num_classes'] == 10
  assert identity['shapes'] == {  # Written out by hand.
      'params/resnet/conv/kernel': [3, 3, 3, 8],
      'params/projection_head/dense/bias': [4],
      'batch_stats/resnet/bn/mean': [8]}
  # Shape structs (jax.eval_shape) give the same record as arrays.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          _variables())
  assert run_identity.of_run(config, 10, abstract) == identity


def test_first_difference_names_the_key_and_both_values():
  config = small_config('pretrain')
  saved = run_identity.of_run(config, 10, _variables())
  assert run_identity.first_difference(saved, saved) is None
  other = run_identity.of_run(small_config('pretrain', image_size=16), 10,
                              _variables())
  assert run_identity.first_difference(saved, other) == (
      "config.image_size=8 in the workdir's run, 16 in this one")
  assert run_identity.first_difference(
      saved, run_identity.of_run(config, 7, _variables())) == (
          "the dataset has 10 classes in the workdir's run, 7 in this one")
  wider = _variables()
  wider['params']['resnet']['conv']['kernel'] = np.zeros((3, 3, 3, 16))
  assert run_identity.first_difference(
      saved, run_identity.of_run(config, 10, wider)) == (
          "params/resnet/conv/kernel is shape (3, 3, 3, 8) in the workdir's "
          'run, shape (3, 3, 3, 16) in this one')
  headless = _variables()
  del headless['params']['projection_head']
  assert run_identity.first_difference(
      saved, run_identity.of_run(config, 10, headless)) == (
          "params/projection_head/dense/bias is shape (4,) in the workdir's "
          'run, absent in this one')


def test_write_and_read_back_leave_no_temporary_file(tmp_path):
  assert run_identity.read(str(tmp_path)) is None
  identity = run_identity.of_run(small_config('pretrain'), 10, _variables())
  run_identity.write(str(tmp_path), identity)
  run_identity.write(str(tmp_path), identity)  # Replaces its own record.
  assert run_identity.read(str(tmp_path)) == identity
  assert os.listdir(tmp_path / 'checkpoints') == [run_identity.FILE_NAME]


def test_another_memory_buffer_size_is_another_run():
  # The queue [K, d] and the momentum network are checkpointed state outside
  # the model's variables: the shapes alone would not see K change, and
  # Orbax would fail restoring a queue of another size.
  with_buffer = run_identity.of_run(
      small_config('pretrain', memory_buffer_size=64), 10, _variables())
  for other in (0, 128):
    current = run_identity.of_run(
        small_config('pretrain', memory_buffer_size=other), 10, _variables())
    assert run_identity.first_difference(with_buffer, current) == (
        f"config.memory_buffer_size=64 in the workdir's run, {other} in this "
        'one')
  # The momentum changes the numbers, not the saved state: allowed.
  assert run_identity.first_difference(with_buffer, run_identity.of_run(
      small_config('pretrain', memory_buffer_size=64, memory_momentum=0.9),
      10, _variables())) is None
