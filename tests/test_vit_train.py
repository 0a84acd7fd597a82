"""Vision Transformer backbones through train.py: the sharded step, bfloat16,
the three modes end to end, and the pretrained probe against random init.

The ViT is big_vision's micro size ('mu/4': width 32, one block, 4 px
patches) at 8 px on the offline digits, with MoCo v3's recipe switched on
(AdamW with decoupled decay, frozen random patch projection, sin-cos
position embedding, a 3-layer BN head whose output BN has no scale) plus
gradient clipping, so every ViT-specific path of the step runs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.runtime import checkpoint

from conftest import config_file
from conftest import small_config

NUM_CLASSES = 10
NUM_TRAIN = 4000
# The ViT keys for the tiny runs; resnet_depth back at its default (the
# tiny ResNet's 18 would be refused with a ViT).
VIT = dict(model='vit', resnet_depth=50, vit_variant='mu/4',
           optimizer='adamw', learning_rate=2e-3, weight_decay=0.1,
           grad_clip_norm=1.0, proj_hidden_dim=64, num_proj_layers=3,
           proj_out_dim=16, proj_out_bn_scale=False)


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(jax.device_get(a)),
                 jax.tree.leaves(jax.device_get(b))))


def flat(tree):
  """{'vit/block0/...': array} of a parameter tree."""
  return {'/'.join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def random_batches(n=2, batch=16, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.uniform(size=(batch, 2, size, size, 3)).astype(
               np.float32),
           'label': rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}
          for _ in range(n)]


def run_steps(config, host_state, batches, devices):
  """The real train step on `devices`: (final state, metrics per step)."""
  model = models.create_model(config, NUM_CLASSES)
  lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
  mesh = sharding.create_mesh(devices)
  step = train.make_train_step(model, config, lr_fn, mesh)
  state = sharding.replicate(
      jax.tree.map(np.array, host_state, is_leaf=lambda x: x is None), mesh)
  metrics = []
  with jax.transfer_guard('disallow'):
    for batch in batches:
      state, m = step(state, sharding.host_batch_to_global(batch, mesh))
      metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def initial_state(config):
  model = models.create_model(config, NUM_CLASSES)
  lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
  tx = optim.create_optimizer(config, lr_fn)
  return jax.device_get(jax.jit(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))())


@pytest.fixture(scope='module')
def one_device_run():
  """Two float32 steps on one device: (config, initial state, batches,
  final state, metrics), shared by the sharding and bfloat16 tests."""
  config = small_config('pretrain', **VIT)
  host_state = initial_state(config)
  batches = random_batches()
  state, metrics = run_steps(config, host_state, batches, jax.devices()[:1])
  return config, host_state, batches, state, metrics


def test_vit_pretrain_step_on_8_devices_equals_1_device(one_device_run):
  config, host_state, batches, state1, metrics1 = one_device_run
  state8, metrics8 = run_steps(config, host_state, batches, jax.devices())
  for m8, m1 in zip(metrics8, metrics1):
    for key in ('loss', 'contrastive_loss', 'contrast_acc', 'supervised_loss',
                'grad_norm'):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  # 2N - 2 = 30 negatives per anchor: the global batch's, not a device's.
  assert metrics1[0]['contrastive_loss'] > 2 * np.log(31) - 1.0
  # Adam divides by √v̂: where a gradient entry is near 0, the reduction
  # order's rounding becomes an update difference of a few % of the step
  # (lr·B/256 = 1.25e-4 here), so parameters get an absolute tolerance.
  # Two biases have an exactly zero gradient, so their Adam steps are
  # rounding noise of up to ±lr: the attention's key bias (softmax ignores
  # q·b, the same for every key) and the final LayerNorm's (it shifts every
  # h alike, and the head's first BatchNorm subtracts the batch mean).
  noise = ('vit/block0/attention/key/bias', 'vit/final_norm/bias')
  lr = 2e-3 * 16 / 256
  params8, params1 = flat(state8.params), flat(state1.params)
  assert set(params8) == set(params1) and set(noise) <= set(params1)
  for name, value in params1.items():
    if name in noise:
      np.testing.assert_allclose(params8[name], value,
                                 atol=2 * len(batches) * lr, err_msg=name)
    else:
      np.testing.assert_allclose(params8[name], value, rtol=1e-4, atol=1e-5,
                                 err_msg=name)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-6),
               state8.batch_stats, state1.batch_stats)  # The head's BN.
  # Trained, except the frozen random patch projection (bit for bit).
  vit0, vit1 = host_state.params['vit'], state1.params['vit']
  assert leaves_equal(vit1['patch_embedding'], vit0['patch_embedding'])
  for name in ('class_token', 'block0', 'final_norm'):
    assert not leaves_equal(vit1[name], vit0[name]), name


def test_vit_bf16_step_is_close_to_f32_and_keeps_f32_parameters(
    one_device_run):
  _, host_state, batches, _, f32_metrics = one_device_run
  config = small_config('pretrain', dtype='bfloat16', **VIT)
  state, metrics = run_steps(config, host_state, batches, jax.devices()[:1])
  bf16 = np.array([m['contrastive_loss'] for m in metrics])
  f32 = np.array([m['contrastive_loss'] for m in f32_metrics])
  assert np.all(np.isfinite(bf16))
  np.testing.assert_allclose(bf16, f32, rtol=0.02)
  dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype('float32')}


# ----------------------------------------------------------------------------
# train_and_evaluate end to end: the same commands as for a ResNet.
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def vit_pretrain_run(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('vit_pretrain'))
  config = tiny_config('pretrain', **VIT)
  with jax.transfer_guard('disallow'):
    result = train.train_and_evaluate(config, workdir)  # Preflight too.
  return workdir, result


def test_vit_pretrains_end_to_end(vit_pretrain_run, read_events):
  workdir, result = vit_pretrain_run
  assert int(result.state.step) == 4 and not result.preempted
  assert checkpoint.checkpoint_steps(workdir) == (2, 4)
  events = read_events(workdir)
  for tag in ('contrastive_loss', 'supervised_loss', 'grad_norm'):
    assert set(events[tag]) == {2, 4}, tag
    assert all(np.isfinite(v) for v in events[tag].values()), tag
  assert 4 in events['eval/top1']  # The linear head on the class token.
  exported = checkpoint.load_pretrained(
      f'{workdir}/{checkpoint.BACKBONE_DIR}')
  assert set(exported['params']) == {'vit'}  # The backbone alone.


def test_vit_modes_freeze_what_they_should():
  """linear_eval: no gradient reaches the ViT; finetune with
  fine_tune_after_block=0: none reaches the embedding, the block gets one."""
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)),
                       jnp.float32)
  labels = jnp.arange(4) % NUM_CLASSES
  for mode, after in (('linear_eval', -1), ('finetune', 0)):
    config = small_config(mode, fine_tune_after_block=after,
                          init_checkpoint='x', **VIT)
    model = models.create_model(config, NUM_CLASSES)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)

    def loss(params):
      outputs, _ = model.apply({**variables, 'params': params}, images,
                               train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(outputs['logits'])[
          jnp.arange(4), labels])

    grads = jax.grad(loss)(variables['params'])['vit']
    zero = {name: all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(t))
            for name, t in grads.items()}
    if mode == 'linear_eval':
      assert all(zero.values()), zero
    else:
      assert zero == {'patch_embedding': True, 'class_token': True,
                      'block0': False, 'final_norm': False}, zero


@pytest.mark.slow  # Two more tiny runs.
def test_vit_linear_eval_and_finetune_from_the_pretrained_run(
    vit_pretrain_run, tiny_config, tmp_path):
  pre_workdir, pre = vit_pretrain_run
  pre_vit = jax.device_get(pre.state.params['vit'])
  # linear_eval: the class token's features frozen, the classifier trains.
  config = tiny_config('linear_eval', init_checkpoint=pre_workdir,
                       train_steps=2, **{**VIT, 'optimizer': 'momentum'})
  with jax.transfer_guard('disallow'):
    state = train.train_and_evaluate(config, str(tmp_path / 'linear')).state
  assert leaves_equal(state.params['vit'], pre_vit)
  # finetune with fine_tune_after_block=0 (stages count ViT blocks): the
  # embedding stays, the block (and the final LayerNorm) train.
  config = tiny_config('finetune', init_checkpoint=pre_workdir, train_steps=2,
                       fine_tune_after_block=0, **VIT)
  with jax.transfer_guard('disallow'):
    result = train.train_and_evaluate(config, str(tmp_path / 'finetune'))
  got = jax.device_get(result.state.params['vit'])
  assert leaves_equal(got['patch_embedding'], pre_vit['patch_embedding'])
  assert leaves_equal(got['class_token'], pre_vit['class_token'])
  assert not leaves_equal(got['block0'], pre_vit['block0'])
  assert 'eval/top1' in result.metrics


def test_vit_pretraining_probe_beats_random_init(tmp_path, mnist_dir):
  """configs/demo_vit.py with big_vision's micro ViT (one block, width 32;
  0.05 s a step) for 150 steps: the linear probe on the pretrained class
  token beats the same probe on the random ViT. Measured on the demo's
  split: 63.6 vs 55.4 % after 150 steps, 67.0 vs 55.4 % after 1000."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('demo_vit',
                                                config_file('demo_vit'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.update(data_dir=mnist_dir, vit_variant='mu/4', train_steps=150,
                  checkpoint_every_steps=150, log_every_steps=50)
  # No transfer guard: the probe fits its ridge regression eagerly.
  metrics = train.train_and_evaluate(config, str(tmp_path)).metrics
  assert metrics['probe/pretrained_top1'] > (
      metrics['probe/random_init_top1'] + 0.04), metrics
