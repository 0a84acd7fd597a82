"""train.py: the sharded step, the four modes end to end, resume, SIGTERM.

Tiny runs: ResNet-18 width 1 at 8 px, global batch 16 on 8 fake CPU devices,
on the offline `mnist_offline` dataset (real digits, built in a temp dir).
"""
import functools
import glob
import hashlib
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import checkpoint
from simclr_jax import configlib
from simclr_jax import device_augment
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.data import pipeline

NUM_CLASSES = 10
NUM_TRAIN = 4000


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('mnist_offline', data_dir=path).download_and_prepare()
  return path


def tiny_config(data_dir, mode='pretrain', **overrides):
  config = configlib.base_config()
  config.update(
      dataset='mnist_offline', data_dir=data_dir, train_split='train',
      eval_split='test[:160]', image_size=8, train_batch_size=16,
      eval_batch_size=80, train_epochs=0, train_steps=4, warmup_epochs=0.0,
      learning_rate=1.0, temperature=0.5, color_jitter_strength=0.5,
      use_blur=False, resnet_depth=18, num_proj_layers=2, proj_out_dim=32,
      cache_dataset=True, checkpoint_every_steps=2, log_every_steps=2,
      num_profile_steps=0, train_mode=mode)
  if mode != 'pretrain':
    config.update(optimizer='momentum', learning_rate=0.1,
                  lineareval_while_pretraining=False)
  config.update(overrides)
  return configlib.lock(config)


def read_events(workdir):
  """{tag: {step: value or None}} from the run's TensorBoard event files."""
  tags = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        number = None
        if value.HasField('tensor') and not value.tensor.string_val:
          array = tf.make_ndarray(value.tensor)
          if array.size == 1:
            number = float(array.reshape(-1)[0])
        tags.setdefault(value.tag, {})[event.step] = number
  return tags


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
# Trainable parameters per mode (no data, shapes only).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('mode,after,trained', [
    ('linear_eval', -1, {'supervised_head'}),
    ('finetune', 2, {'block_group3', 'block_group4', 'projection_head',
                     'supervised_head'}),
    ('finetune', -1, {'stem', 'block_group1', 'block_group2', 'block_group3',
                      'block_group4', 'projection_head', 'supervised_head'}),
])
def test_trainable_labels_follow_mode_and_fine_tune_after_block(
    mode, after, trained):
  config = tiny_config('', mode, fine_tune_after_block=after,
                       init_checkpoint='x')
  model = models.create_model(config, NUM_CLASSES)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)),
                         train=False))['params']
  labels = train.trainable_labels(params, config)
  seen = set()
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    names = [str(getattr(k, 'key', k)) for k in path]
    group = names[1].split('_block')[0] if names[0] == 'resnet' else names[0]
    seen.add(group)
    assert (label == 'train') == (group in trained), names
  assert trained <= seen


# ----------------------------------------------------------------------------
# The sharded step equals the single-device step on the same global batch.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('color_augment', ['host', 'device'])
def test_pretrain_step_on_8_devices_equals_1_device(color_augment):
  config = tiny_config('', 'pretrain', color_augment=color_augment)
  model = models.create_model(config, NUM_CLASSES)
  lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
  tx = train.create_optimizer(config, lr_fn)
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
    for batch in batches:
      state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
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
  assert not leaves_equal(state1.params, host_state.params)
  assert int(state8.step) == 2


def test_device_color_step_equals_host_step_on_distorted_views():
  """The 'device' step is the 'host' step applied to distort_views(batch)."""
  rng = np.random.default_rng(1)
  batch = {'image': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32),
           'augment_key': rng.integers(0, 2**32, (16, 2, 2), np.uint32)}
  mesh = sharding.create_mesh(jax.devices())
  losses = {}
  for place in ('host', 'device'):
    config = tiny_config('', 'pretrain', color_augment=place)
    model = models.create_model(config, NUM_CLASSES)
    lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
    state = train.create_train_state(config, model, train.create_optimizer(
        config, lr_fn), jax.random.PRNGKey(0))
    state = sharding.replicate(jax.device_get(state), mesh)
    step = train.make_train_step(model, config, lr_fn, mesh)
    fed = dict(batch)
    if place == 'host':
      fed['image'] = np.asarray(device_augment.distort_views(
          batch['image'], batch['augment_key'],
          strength=config.color_jitter_strength))
      del fed['augment_key']
    _, metrics = step(state, sharding.host_batch_to_global(fed, mesh))
    losses[place] = float(metrics['loss'])
  np.testing.assert_allclose(losses['device'], losses['host'], rtol=1e-5)


# ----------------------------------------------------------------------------
# Pretraining end to end.
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pretrain_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = tiny_config(data_dir, 'pretrain')
  with config.unlocked():
    config.evals.knn = dict(every_steps=2, k=5, bank_split='train[:80]',
                            query_split='test[:80]')
  state = train.train_and_evaluate(config, workdir)
  return workdir, state, config


def test_pretrain_writes_events_checkpoints_and_backbone(pretrain_run):
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
  workdir, _, config = pretrain_run
  before = tree_hashes(workdir)
  for key, value in (('temperature', 0.0), ('train_batch_size', 12),
                     ('train_mode', 'pretraining')):
    bad = config.copy_and_resolve_references()
    with bad.unlocked():
      bad[key] = value
    with pytest.raises(configlib.ConfigError, match=f'config.{key}='):
      train.train_and_evaluate(bad, workdir)
  assert tree_hashes(workdir) == before


@pytest.mark.slow  # A second tiny run: ~1 min on a busy 2-core machine.
def test_linear_eval_uses_the_frozen_pretrained_backbone(pretrain_run,
                                                         tmp_path):
  pre_workdir, pre_state, pre_config = pretrain_run
  config = tiny_config(pre_config.data_dir, 'linear_eval',
                       init_checkpoint=pre_workdir)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  pre = jax.device_get(pre_state)
  got = jax.device_get(state)
  # Backbone and its statistics: the pretrained ones, unchanged by training.
  assert leaves_equal(got.params['resnet'], pre.params['resnet'])
  assert leaves_equal(got.batch_stats['resnet'], pre.batch_stats['resnet'])
  # ... and not a random initialisation's: its features differ.
  model = models.create_model(config, NUM_CLASSES)
  fresh = train.create_train_state(config, model, train.create_optimizer(
      config, lambda _: 0.1), jax.random.PRNGKey(config.seed))
  # The classifier alone trained.
  assert not leaves_equal(got.params['supervised_head'],
                          fresh.params['supervised_head'])
  images = np.random.default_rng(0).uniform(size=(16, 8, 8, 3)).astype(
      np.float32)
  features = train.make_feature_fn(model, sharding.create_mesh())
  assert not np.allclose(np.asarray(features(got, images)),
                         np.asarray(features(fresh, images)), atol=1e-3)
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
def test_mode_runs_end_to_end(mode, overrides, pretrain_run, tmp_path):
  pre_workdir = pretrain_run[0]
  if mode == 'finetune':
    overrides = dict(overrides, init_checkpoint=pre_workdir)
  config = tiny_config(pretrain_run[2].data_dir, mode, **overrides)
  state = train.train_and_evaluate(config, str(tmp_path))
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


def sigterm_at_batch(monkeypatch, index):
  """The train iterator sends this process SIGTERM as it yields batch `index`."""
  create = pipeline.create_train_iterator

  def wrapped(config, *, seed, start_step=0, **kwargs):
    for i, batch in enumerate(create(config, seed=seed, start_step=start_step,
                                     **kwargs), start=start_step):
      if i == index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(pipeline, 'create_train_iterator', wrapped)


def test_sigterm_checkpoints_and_resume_is_bitwise_exact(
    data_dir, tmp_path, monkeypatch):
  # With the colour jitter in the train step (the ImageNet configs' setting;
  # the other end-to-end runs here use the host path): its draws come with
  # the batch, so the resumed run redraws exactly the same views.
  config = tiny_config(data_dir, 'pretrain', checkpoint_every_steps=4,
                       keep_checkpoints=5, color_augment='device')
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))

  stopped_dir = str(tmp_path / 'stopped')
  with monkeypatch.context() as m:
    # Batch 2 is fetched for step 3: the signal lands during step 3.
    sigterm_at_batch(m, 2)
    stopped = train.train_and_evaluate(config, stopped_dir)
  assert int(stopped.step) == 3
  assert checkpoint.checkpoint_steps(stopped_dir) == (3,)  # Not a multiple of 4.
  resumed = train.train_and_evaluate(config, stopped_dir)
  assert int(resumed.step) == 4
  for field in ('params', 'batch_stats', 'opt_state', 'rng'):
    assert leaves_equal(getattr(resumed, field), getattr(straight, field)), (
        field)
