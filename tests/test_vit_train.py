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


def test_vit_pretrain_step_on_8_devices_equals_1_device():
  config = small_config('pretrain', **VIT)
  host_state = initial_state(config)
  batches = random_batches()
  state8, metrics8 = run_steps(config, host_state, batches, jax.devices())
  state1, metrics1 = run_steps(config, host_state, batches, jax.devices()[:1])
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
  # The attention's key bias has an exactly zero gradient (softmax ignores
  # q·b, the same for every key): its Adam steps are ±lr of rounding noise.
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  key_bias = lambda state: state.params['vit']['block0']['attention'][
      'key'].pop('bias')
  lr = 2e-3 * 16 / 256
  np.testing.assert_allclose(key_bias(state8), key_bias(state1),
                             atol=2 * len(batches) * lr)
  jax.tree.map(close, state8.params, state1.params)
  jax.tree.map(close, state8.batch_stats, state1.batch_stats)  # Head BN.
  # Trained, except the frozen random patch projection (bit for bit).
  vit0, vit1 = host_state.params['vit'], state1.params['vit']
  assert leaves_equal(vit1['patch_embedding'], vit0['patch_embedding'])
  for name in ('class_token', 'block0', 'final_norm'):
    assert not leaves_equal(vit1[name], vit0[name]), name


def test_vit_bf16_step_is_close_to_f32_and_keeps_f32_parameters():
  batches = random_batches(n=3, seed=1)
  losses, states = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = small_config('pretrain', dtype=dtype, **VIT)
    # The same float32 initial parameters for both compute dtypes.
    host_state = initial_state(small_config('pretrain', **VIT))
    states[dtype], metrics = run_steps(config, host_state, batches,
                                       jax.devices()[:1])
    losses[dtype] = np.array([m['contrastive_loss'] for m in metrics])
  assert np.all(np.isfinite(losses['bfloat16']))
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.02)
  dtypes = {x.dtype for x in jax.tree.leaves(
      (states['bfloat16'].params, states['bfloat16'].opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype('float32')}


# ----------------------------------------------------------------------------
# train_and_evaluate end to end: the same commands as for a ResNet.
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def vit_pretrain_run(tiny_config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('vit_pretrain'))
  config = tiny_config('pretrain', **VIT)
  with config.unlocked():
    config.evals.knn = dict(every_steps=4, k=5, bank_split='train[:80]',
                            query_split='test[:80]')
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
  assert 4 in events['knn/top1'] and 4 in events['eval/top1']
  exported = checkpoint.load_pretrained(
      f'{workdir}/{checkpoint.BACKBONE_DIR}')
  assert set(exported['params']) == {'vit'}  # The backbone alone.


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


@pytest.mark.slow  # About 3 min on a busy 2-core machine.
def test_vit_demo_probe_beats_random_init(tmp_path, mnist_dir):
  """configs/demo_vit.py, shortened: the linear probe on the pretrained
  ViT's class token beats the same probe on a random ViT."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('demo_vit',
                                                config_file('demo_vit'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  with config.unlocked():
    config.data_dir = mnist_dir
  with jax.transfer_guard('disallow'):
    metrics = train.train_and_evaluate(config, str(tmp_path)).metrics
  assert metrics['probe/pretrained_top1'] > (
      metrics['probe/random_init_top1'] + 0.02), metrics
