"""tools/bench.py: every field on a tiny config, JSON, and sharded logits
memory."""
import json

import jax
import pytest

from simclr_jax import sharding
from simclr_jax.tools import bench

from conftest import small_config

TRAIN_FIELDS = (
    'compile_s', 'step_s', 'step_cpu_s', 'images_per_s', 'views_per_s',
    'images_per_s_per_device', 'views_per_s_per_device', 'xla_flops_per_step',
    'analytic_flops_per_step', 'xla_vs_analytic', 'mfu',
    'peak_tflops_per_device', 'memory_bytes_per_device', 'devices')


def tiny_config():
  """The CIFAR recipe's step at 8 px, 2 images per fake device."""
  return small_config(dataset='cifar10', train_batch_size=16, proj_out_dim=16,
                      color_jitter_strength=0.5)


def test_bench_prints_every_field_and_json(capsys):
  results = bench.run(tiny_config(), what=('train', 'input'), steps=2,
                      warmup=1, input_seconds=0.5)
  bench.print_report(results)
  out = capsys.readouterr().out
  train = results['train']
  for field in TRAIN_FIELDS:
    assert f'train.{field} ' in out, field
  assert 'input.images_per_s ' in out and 'input.input_vs_train_images' in out
  assert train['devices'] == jax.device_count() == 8
  assert train['step_s'] > 0 and train['images_per_s'] > 0
  assert train['views_per_s'] == pytest.approx(2 * train['images_per_s'])
  # CPU: no peak in the table, so MFU is unknown (printed as such).
  assert train['mfu'] is None and 'train.mfu' in out and 'unknown' in out
  assert train['memory_bytes_per_device'] > 0
  # XLA skips kernel taps on padding, which at 8 px is most of the deep
  # layers' taps; the analytic count includes them (see bench docstring).
  assert 0.2 < train['xla_vs_analytic'] < 1.1
  assert results['input']['images_per_s'] > 0
  line = [l for l in out.splitlines() if l.startswith('BENCH_JSON ')]
  assert len(line) == 1
  parsed = json.loads(line[0][len('BENCH_JSON '):])
  assert parsed['train']['step_s'] == pytest.approx(train['step_s'])


def test_mfu():
  assert bench.mfu(8e12, 2.0, None, 4) is None
  assert bench.mfu(4e12, 2.0, 1e12, 4) == pytest.approx(0.5)


def test_unknown_bench_name():
  with pytest.raises(ValueError, match='unknown'):
    bench.run(tiny_config(), what=('trian',))


def test_sharded_logits_memory_is_one_eighth_at_batch_4096():
  """Per-device memory of NT-Xent (+ grad) at N=4096: 8 devices vs 1.

  Each device holds [n, 2N] logits instead of [N, 2N]. XLA's temporaries also
  hold a few O(N·d) buffers (d = 16 here), hence the 15% tolerance.
  """
  config = tiny_config()
  one = bench.contrastive_loss_memory(
      config, sharding.create_mesh(jax.devices()[:1]), global_batch=4096,
      dim=16)
  eight = bench.contrastive_loss_memory(
      config, sharding.create_mesh(), global_batch=4096, dim=16)
  logits_bytes = 4096 * 2 * 4096 * 4  # One [N, 2N] float32 matrix.
  assert one >= logits_bytes  # The unsharded loss materialises it.
  assert eight / one == pytest.approx(1 / 8, rel=0.15), (one, eight)


@pytest.mark.slow
def test_baseline_runs_and_compares():
  results = bench.run(tiny_config(), what=('baseline',), steps=2, warmup=1)
  base = results['baseline']
  assert base['step_s'] > 0 and base['ours_vs_baseline_throughput'] > 0


def test_tf_reference_step_is_the_baseline_computation():
  """The TF yardstick (bench_tf_reference.py) computes what the plain-jax.jit
  baseline does: from the same initial values and batch, the same NT-Xent
  at step 0, and both losses fall as both train on that batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simclr_jax.tools import bench_baseline  # pylint: disable=g-import-not-at-top
  from simclr_jax.tools import bench_tf_reference  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  with config.unlocked():
    config.train_batch_size = 8
  batch = bench.synthetic_batch(config)
  jax_step, state = bench_baseline.from_config(config, bench.NUM_CLASSES)
  tf_step, _ = bench_tf_reference.from_config(config, bench.NUM_CLASSES)
  jax_losses, tf_losses = [], []
  for _ in range(3):
    *state, (contrastive, _, _) = jax_step(*state, batch['image'],
                                           batch['label'])
    jax_losses.append(float(contrastive))
    tf_losses.append(float(tf_step(tf.constant(batch['image']),
                                   tf.constant(batch['label']))[1]))
  np.testing.assert_allclose(tf_losses[0], jax_losses[0], rtol=1e-4)
  assert tf_losses[-1] < tf_losses[0] and jax_losses[-1] < jax_losses[0]
  results = bench.run(config, what=('train', 'tf'), steps=1, warmup=1)
  assert results['tf_reference']['step_s'] > 0
  assert results['tf_reference']['ours_vs_tf_throughput'] > 0


# ----------------------------------------------------------------------------
# Vision Transformers.
# ----------------------------------------------------------------------------
def vit_s16_config(batch=2):
  return small_config(model='vit', resnet_depth=50, vit_variant='S/16',
                      image_size=224, train_batch_size=batch,
                      optimizer='adamw', num_proj_layers=3,
                      proj_hidden_dim=4096, proj_out_dim=256,
                      proj_out_bn_scale=False)


def test_vit_analytic_step_flops_against_xla_train_step():
  """bench's analytic count for a ViT-S/16 step at 224 px (3 × forward of
  flops.vit_forward_flops and the head, both views) against XLA's count of
  the real train step on one device. XLA counts more: GELU's erf, softmax,
  LayerNorm, BatchNorm and the loss (+2.9 % on the forward); less: the
  frozen patch projection has no backward. Measured 1.009 (the compiled
  program's count agrees with the lowered one's within 0.1 %)."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  from simclr_jax import optim  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = vit_s16_config()
  model = models.create_model(config, bench.NUM_CLASSES)
  lr_fn = lambda step: jnp.float32(0.1)
  tx = optim.create_optimizer(config, lr_fn)
  state = jax.eval_shape(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))
  batch = {'image': jax.ShapeDtypeStruct((2, 2, 224, 224, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((2,), jnp.int32)}
  step = train.make_train_step(model, config, lr_fn,
                               sharding.create_mesh(jax.devices()[:1]))
  xla = step.lower(state, batch).cost_analysis()['flops']
  analytic = bench.analytic_step_flops(config)
  # By hand: the ViT-S/16 forward in multiply-adds (4.6 G, MoCo v3's
  # Table 3), the head 384·4096 + 4096² + 4096·256; ×2 FLOPs, ×3 for the
  # backward, ×4 views.
  vit_macs = (196 * 768 * 384
              + 12 * (12 * 197 * 384**2 + 2 * 197**2 * 384))
  assert round(vit_macs / 1e9, 1) == 4.6
  head = 384 * 4096 + 4096 * 4096 + 4096 * 256
  assert analytic == 2 * 3 * 4 * (vit_macs + head)
  assert 0.99 < xla / analytic < 1.03, xla / analytic


def test_resnet_only_benches_do_not_apply_to_a_vit():
  config = vit_s16_config()
  for what in (('baseline',), ('train', 'tf')):
    with pytest.raises(ValueError, match=r"does not apply: .* ResNets only, "
                       r"config.model is 'vit'"):
      bench.run(config, what=what)
  assert bench.benches(config, ('all',)) == ('train', 'input')
  assert bench.model_name(config) == 'ViT-S/16'
  assert bench.model_name(tiny_config()) == 'ResNet-18 1x'
