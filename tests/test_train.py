"""train.py: the sharded step, the four modes end to end, resume, SIGTERM.

Tiny runs (the `tiny_config` fixture): ResNet-18 width 1 at 8 px, global
batch 16 on 8 fake CPU devices, on the offline `mnist_offline` dataset (real
digits). Training runs under `jax.transfer_guard('disallow')`: an implicit
host transfer in the step or the loop fails these tests.
"""
import functools
import hashlib
import os
import signal

import jax
import numpy as np
import pytest

from simclr_jax import models
from simclr_jax import optim
from simclr_jax import preflight
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.data import device_augment
from simclr_jax.data import pipeline
from simclr_jax.evaluators import common as evaluators_common
from simclr_jax.runtime import checkpoint

NUM_CLASSES = 10
NUM_TRAIN = 4000


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(jax.device_get(a)),
                 jax.tree.leaves(jax.device_get(b))))


def tree_hashes(path):
  """Path -> (size, mtime, sha1) of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      stat = os.stat(full)
      out[full] = (stat.st_size, stat.st_mtime_ns, digest)
  return out


# ----------------------------------------------------------------------------
# The sharded step equals the single-device step on the same global batch.
# ----------------------------------------------------------------------------
# The device-colour case also runs SimCLRv2's memory buffer (K = 40: the
# ring wraps at the second step's 32 keys).
@pytest.mark.parametrize('color_augment,memory_buffer_size',
                         [('host', 0), ('device', 40)])
def test_pretrain_step_on_8_devices_equals_1_device(color_augment,
                                                   memory_buffer_size,
                                                   tiny_config):
  config = tiny_config('pretrain', color_augment=color_augment,
                       memory_buffer_size=memory_buffer_size)
  model = models.create_model(config, NUM_CLASSES)
  lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
  tx = optim.create_optimizer(config, lr_fn)
  host_state = jax.device_get(train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  batches = [{'image': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
              'label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32)}
             for _ in range(2)]
  if color_augment == 'device':
    for batch in batches:
      batch['augment_key'] = rng.integers(0, 2**32, (16, 2, 2), np.uint32)

  def run(devices):
    mesh = sharding.create_mesh(devices)
    step = train.make_train_step(model, config, lr_fn, mesh)
    state = sharding.replicate(
        jax.tree.map(np.array, host_state, is_leaf=lambda x: x is None), mesh)
    all_metrics = []
    with jax.transfer_guard('disallow'):
      for batch in batches:
        state, metrics = step(state,
                              sharding.host_batch_to_global(batch, mesh))
        all_metrics.append(jax.device_get(metrics))
    return jax.device_get(state), all_metrics

  state8, metrics8 = run(jax.devices())
  state1, metrics1 = run(jax.devices()[:1])
  for m8, m1 in zip(metrics8, metrics1):
    for key in ('loss', 'contrastive_loss', 'contrast_acc', 'contrast_entropy',
                'supervised_loss', 'supervised_acc', 'grad_norm'):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  # The negatives are the global batch's: 2N - 2 = 30 of them per anchor, so
  # the loss at init is near 2·log(31), not 2·log(2·16/8 - 1) per device.
  assert metrics1[0]['contrastive_loss'] > 2 * np.log(31) - 1.0
  # Global BatchNorm: the running statistics match the global batch's.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6),
               state8.batch_stats, state1.batch_stats)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6), state8.params, state1.params)
  # The momentum network and the queue of the memory buffer, if any.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6), state8.memory, state1.memory)
  assert not leaves_equal(state1.params, host_state.params)
  assert int(state8.step) == 2


def test_device_color_step_equals_host_step_on_distorted_views(tiny_config):
  """The 'device' step is the 'host' step applied to distort_views(batch)."""
  rng = np.random.default_rng(1)
  batch = {'image': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32),
           'augment_key': rng.integers(0, 2**32, (16, 2, 2), np.uint32)}
  mesh = sharding.create_mesh(jax.devices())
  losses = {}
  for place in ('host', 'device'):
    config = tiny_config('pretrain', color_augment=place)
    model = models.create_model(config, NUM_CLASSES)
    lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
    state = jax.jit(lambda: train.create_train_state(
        config, model, optim.create_optimizer(config, lr_fn),
        jax.random.PRNGKey(0)))()
    state = sharding.replicate(jax.device_get(state), mesh)
    step = train.make_train_step(model, config, lr_fn, mesh)
    fed = dict(batch)
    if place == 'host':
      fed['image'] = np.asarray(jax.device_get(device_augment.distort_views(
          jax.device_put(batch['image']), jax.device_put(batch['augment_key']),
          strength=config.color_jitter_strength)))
      del fed['augment_key']
    with jax.transfer_guard('disallow'):
      _, metrics = step(state, sharding.host_batch_to_global(fed, mesh))
    losses[place] = float(jax.device_get(metrics['loss']))
  np.testing.assert_allclose(losses['device'], losses['host'], rtol=1e-5)


# ----------------------------------------------------------------------------
# Pretraining end to end.
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pretrain_run(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = tiny_config('pretrain')
  with config.unlocked():
    config.evals.knn = dict(every_steps=2, k=5, bank_split='train[:80]',
                            query_split='test[:80]')
  with jax.transfer_guard('disallow'):
    state = train.train_and_evaluate(config, workdir).state
  return workdir, state, config


def test_pretrain_writes_events_checkpoints_and_backbone(pretrain_run,
                                                         read_events):
  workdir, state, _ = pretrain_run
  assert int(state.step) == 4
  assert checkpoint.checkpoint_steps(workdir) == (2, 4)
  assert os.path.isdir(os.path.join(workdir, checkpoint.BACKBONE_DIR))
  events = read_events(workdir)
  for tag in ('loss', 'contrastive_loss', 'contrast_acc', 'contrast_entropy',
              'supervised_loss', 'supervised_acc', 'learning_rate',
              'weight_norm', 'grad_norm', 'images_per_sec'):
    assert set(events[tag]) == {2, 4}, tag
    assert all(np.isfinite(v) for v in events[tag].values()), tag
  assert 0 in events['augmented_views']  # The step-0 grid of view pairs.
  assert set(events['knn/top1']) >= {2, 4}  # config.evals, on its schedule.
  assert 4 in events['eval/top1'] and 4 in events['eval/top5']
  assert events['eval/num_examples'][4] == 160  # The whole (sub)split.
  assert any(tag.startswith('_hparams_') for tag in events)


def test_bad_config_leaves_checkpoints_untouched(pretrain_run):
  # train_and_evaluate without `data` (as a notebook calls it) runs the
  # preflight checks itself.
  workdir, _, config = pretrain_run
  before = tree_hashes(workdir)
  for key, value in (('temperature', 0.0), ('train_batch_size', 12),
                     ('train_mode', 'pretraining')):
    bad = config.copy_and_resolve_references()
    with bad.unlocked():
      bad[key] = value
    with pytest.raises(preflight.BadInput, match=f'config.{key}='):
      train.train_and_evaluate(bad, workdir)
  assert tree_hashes(workdir) == before


@pytest.mark.slow  # A second tiny run: ~1 min on a busy 2-core machine.
def test_linear_eval_uses_the_frozen_pretrained_backbone(
    pretrain_run, tmp_path, tiny_config, read_events):
  pre_workdir, pre_state, _ = pretrain_run
  config = tiny_config('linear_eval', init_checkpoint=pre_workdir)
  with jax.transfer_guard('disallow'):
    state = train.train_and_evaluate(config, str(tmp_path)).state
  assert int(state.step) == 4
  pre = jax.device_get(pre_state)
  got = jax.device_get(state)
  # Backbone and its statistics: the pretrained ones, unchanged by training.
  assert leaves_equal(got.params['resnet'], pre.params['resnet'])
  assert leaves_equal(got.batch_stats['resnet'], pre.batch_stats['resnet'])
  # ... and not a random initialisation's: its features differ.
  model = models.create_model(config, NUM_CLASSES)
  fresh = jax.jit(lambda: train.create_train_state(
      config, model, optim.create_optimizer(config, lambda _: 0.1),
      jax.random.PRNGKey(config.seed)))()
  # The classifier alone trained.
  assert not leaves_equal(got.params['supervised_head'],
                          fresh.params['supervised_head'])
  images = np.random.default_rng(0).uniform(size=(16, 8, 8, 3)).astype(
      np.float32)
  predict = evaluators_common.make_predict_fn(model, sharding.create_mesh())
  features = lambda state: jax.device_get(
      predict(state, images)['representation'])
  assert not np.allclose(features(got), features(fresh), atol=1e-3)
  assert set(read_events(str(tmp_path))['eval/top1']) == {4}


# ----------------------------------------------------------------------------
# The other modes, resume and preemption (slow: a compile each).
# ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('mode,overrides', [
    ('finetune', dict(ft_proj_selector=1, fine_tune_after_block=2)),
    ('finetune', dict(train_split='train[:1%]')),  # Like the 1% subset.
    ('supervised', dict()),
])
def test_mode_runs_end_to_end(mode, overrides, pretrain_run, tmp_path,
                              tiny_config, read_events):
  pre_workdir = pretrain_run[0]
  if mode == 'finetune':
    overrides = dict(overrides, init_checkpoint=pre_workdir)
  config = tiny_config(mode, **overrides)
  with jax.transfer_guard('disallow'):
    state = train.train_and_evaluate(config, str(tmp_path)).state
  assert int(state.step) == 4
  assert checkpoint.checkpoint_steps(str(tmp_path)) == (2, 4)
  events = read_events(str(tmp_path))
  assert set(events['supervised_loss']) == {2, 4}
  assert 4 in events['eval/top1']
  if mode == 'finetune' and overrides.get('fine_tune_after_block') == 2:
    pre = checkpoint.load_pretrained(pre_workdir)['params']['resnet']
    got = jax.device_get(state.params['resnet'])
    assert leaves_equal(got['block_group2_block1'], pre['block_group2_block1'])
    assert not leaves_equal(got['block_group4_block1'],
                            pre['block_group4_block1'])


def sigterm_at_batch(data, index):
  """`data` whose train batches send this process SIGTERM as batch `index`
  is fetched."""
  def train_batches(start_step):
    for i, batch in enumerate(data.train_batches(start_step),
                              start=start_step):
      if i == index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  return data._replace(train_batches=train_batches)


def test_sigterm_checkpoints_and_resume_is_bitwise_exact(tiny_config,
                                                         tmp_path):
  # With the colour jitter in the train step (the ImageNet configs' setting;
  # the other end-to-end runs here use the host path): its draws come with
  # the batch, so the resumed run redraws exactly the same views.
  config = tiny_config('pretrain', checkpoint_every_steps=4,
                       keep_checkpoints=5, color_augment='device',
                       memory_buffer_size=40)
  data = pipeline.create_data(config)
  with jax.transfer_guard('disallow'):
    straight = train.train_and_evaluate(config, str(tmp_path / 'straight'),
                                        data=data)
  assert not straight.preempted

  stopped_dir = str(tmp_path / 'stopped')
  # Batch 2 is fetched for step 3: the signal lands during step 3.
  stopped = train.train_and_evaluate(config, stopped_dir,
                                     data=sigterm_at_batch(data, 2))
  assert stopped.preempted and int(stopped.state.step) == 3
  assert checkpoint.checkpoint_steps(stopped_dir) == (3,)  # Not a multiple of 4.
  resumed = train.train_and_evaluate(config, stopped_dir, data=data)
  assert int(resumed.state.step) == 4 and not resumed.preempted
  # With SimCLRv2's memory buffer: its momentum network, queue, pointer
  # and fill count resume too.
  assert int(resumed.state.memory['count']) == 40
  for field in ('params', 'batch_stats', 'opt_state', 'rng', 'memory'):
    assert leaves_equal(getattr(resumed.state, field),
                        getattr(straight.state, field)), field
