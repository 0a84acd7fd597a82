"""grad_cache.py: micro-batched pretraining with the whole batch's NT-Xent.

Tiny stand-in networks (a conv layer, BatchNorm, dense layers with the
SimCLR model's named outputs) compile in seconds; global batch 16, 8 px, on
1 and on 8 fake CPU devices. One slow test runs the real ResNet-18.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import config as config_lib
from simclr_jax import grad_cache
from simclr_jax import losses
from simclr_jax import optim
from simclr_jax import preflight
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.data import pipeline
from simclr_jax.runtime import checkpoint

from conftest import small_config

NUM_CLASSES = 10
BATCH, SIZE = 16, 8


class ConvNet(nn.Module):
  """conv -> BatchNorm -> pooled h -> projection z, linear head on sg(h).

  `bn_train=False` keeps BatchNorm in inference mode whatever `train` says
  (the network is then a function of each image alone).
  """
  bn_train: bool = True
  head: bool = True

  @nn.compact
  def __call__(self, images, train=True):
    x = nn.Conv(8, (3, 3), name='conv')(images)
    x = nn.BatchNorm(use_running_average=not (train and self.bn_train),
                     momentum=0.9, name='bn')(x)
    h = nn.Dense(16, name='resnet')(jnp.mean(nn.relu(x), axis=(1, 2)))
    z = nn.Dense(8, name='projection_head')(nn.relu(h))
    outputs = {'representation': h, 'projection': z}
    if self.head:
      outputs['logits'] = nn.Dense(NUM_CLASSES, name='supervised_head')(
          jax.lax.stop_gradient(h))
    return outputs

  def has_supervised_head(self):
    return self.head


def tiny_config(**overrides):
  return small_config('pretrain', **{
      'image_size': SIZE, 'train_batch_size': BATCH, 'temperature': 0.5,
      'weight_decay': 1e-3, **overrides})


def random_batch(seed, n=BATCH, keys=False):
  rng = np.random.default_rng(seed)
  batch = {'image': rng.uniform(size=(n, 2, SIZE, SIZE, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
  if keys:
    batch['augment_key'] = rng.integers(0, 2**32, (n, 2, 2), np.uint32)
  return batch


def initial_state(config, model):
  lr_fn = optim.create_learning_rate_schedule(config, 1000)
  tx = optim.create_optimizer(config, lr_fn)
  state = jax.jit(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))()
  # Perturbed statistics: inference-mode BatchNorm then does something.
  stats = jax.tree.map(lambda x: x + 0.3, jax.device_get(state.batch_stats))
  return jax.device_get(state.replace(batch_stats=stats)), lr_fn


def full_batch_loss(params, batch_stats, *, model, config, batch):
  """The pretraining objective on the whole batch, written independently:
  one forward of all 2N views, the unsharded NT-Xent, the head's mean CE
  and its l2 term."""
  images = batch['image'].reshape((-1, SIZE, SIZE, 3))
  out = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                    train=False)
  z = out['projection'].reshape(BATCH, 2, -1)
  con, _, _ = losses.nt_xent_loss(z[:, 0], z[:, 1],
                                  temperature=config.temperature)
  sup = losses.softmax_cross_entropy(out['logits'],
                                     np.repeat(batch['label'], 2))
  return con + sup + optim.supervised_head_l2(params, config.weight_decay)


def assert_trees_close(got, want, **tol):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **tol),
               jax.device_get(got), jax.device_get(want))


def assert_grads_close(got, want):
  """Equal to float32 rounding: relative, or absolute on the scale of the
  largest gradient (some, e.g. a bias under BatchNorm, are 0 up to noise)."""
  scale = max(np.abs(x).max() for x in jax.tree.leaves(jax.device_get(want)))
  assert_trees_close(got, want, rtol=2e-5, atol=2e-6 * scale)


# ----------------------------------------------------------------------------
# Exactness: BatchNorm in inference mode.
# ----------------------------------------------------------------------------
# The backward loop as GPUs and TPUs run it (a scan) and as CPUs do.
@pytest.mark.parametrize('loop', ['scan', 'unrolled'])
@pytest.mark.parametrize('devices,micro', [(1, 4), (8, 1)])
def test_loss_and_gradients_equal_the_full_batch(devices, micro, loop):
  config = tiny_config(micro_batch_size=micro)
  model = ConvNet(bn_train=False)
  state, _ = initial_state(config, model)
  batch = random_batch(0)
  mesh = sharding.create_mesh(jax.devices()[:devices])
  gradients = grad_cache_gradients(model, config, mesh, loop)
  with jax.transfer_guard('disallow'):
    grads, (metrics, _) = gradients(
        sharding.replicate(state, mesh),
        sharding.host_batch_to_global(batch, mesh))
  want_loss, want_grads = jax.jit(jax.value_and_grad(functools.partial(
      full_batch_loss, model=model, config=config)))(
          state.params, state.batch_stats, batch=batch)
  np.testing.assert_allclose(metrics['loss'], want_loss, rtol=1e-6)
  assert_grads_close(grads, want_grads)
  assert np.abs(jax.device_get(grads['projection_head']['kernel'])).max() > 0
  # All 2N − 2 negatives, not the micro-batch's 2m − 2: near 2·log(31).
  assert metrics['contrastive_loss'] > 2 * np.log(2 * BATCH - 1) - 1.0


def grad_cache_gradients(model, config, mesh, loop='auto'):
  gradients = grad_cache.make_micro_batch_gradients(
      model, config, mesh, train.make_contrastive_loss(config, mesh),
      loop=loop)
  return jax.jit(lambda state, batch: gradients(state, batch, state.rng))


@pytest.mark.parametrize('memory', [0, 32], ids=['no_memory', 'memory_32'])
def test_micro_batched_step_equals_the_plain_step(memory):
  """Through train.make_train_step on 8 devices, with the colour jitter in
  the step (per micro-batch): the same metrics and the same updated
  parameters (LARS, momentum) after two steps. With SimCLRv2's memory
  buffer, the second step's negatives include the first step's 32 keys."""
  color_augment = 'device'
  model = ConvNet(bn_train=False)
  mesh = sharding.create_mesh()
  batches = [random_batch(i, keys=color_augment == 'device')
             for i in range(2)]
  results = {}
  for micro in (0, 1):
    config = tiny_config(micro_batch_size=micro, color_augment=color_augment,
                         memory_buffer_size=memory, memory_momentum=0.9)
    state, lr_fn = initial_state(config, model)
    state = sharding.replicate(state, mesh)
    step = train.make_train_step(model, config, lr_fn, mesh)
    with jax.transfer_guard('disallow'):
      for batch in batches:
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    results[micro] = jax.device_get((state, metrics))
  (plain, plain_metrics), (micro, micro_metrics) = results[0], results[1]
  assert set(micro_metrics) == set(plain_metrics)
  for key in plain_metrics:
    np.testing.assert_allclose(micro_metrics[key], plain_metrics[key],
                               rtol=2e-5, atol=1e-6, err_msg=key)
  assert_trees_close(micro.params, plain.params, rtol=2e-5, atol=1e-6)
  assert_trees_close(micro.opt_state, plain.opt_state, rtol=2e-5, atol=1e-6)
  assert_trees_close(micro.memory, plain.memory, rtol=2e-5, atol=1e-6)
  if memory:
    assert int(micro.memory['count']) == memory


# ----------------------------------------------------------------------------
# BatchNorm in training mode: statistics per micro-batch and device.
# ----------------------------------------------------------------------------
def per_micro_batch_objective(params, batch_stats, *, model, config, batch,
                              micro):
  """Each micro-batch of `micro` images through the network on its own
  (BatchNorm over its 2m views), in a Python loop: (loss, running stats
  averaged over the micro-batches' updates)."""
  images = batch['image']
  z, logits, stats = [], [], []
  for start in range(0, BATCH, micro):
    out, new = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        images[start:start + micro].reshape((-1, SIZE, SIZE, 3)), train=True,
        mutable=['batch_stats'])
    z.append(out['projection'])
    logits.append(out['logits'])
    stats.append(new['batch_stats'])
  z = jnp.concatenate(z).reshape(BATCH, 2, -1)
  con, _, _ = losses.nt_xent_loss(z[:, 0], z[:, 1],
                                  temperature=config.temperature)
  sup = losses.softmax_cross_entropy(jnp.concatenate(logits),
                                     np.repeat(batch['label'], 2))
  loss = con + sup + optim.supervised_head_l2(params, config.weight_decay)
  return loss, jax.tree.map(lambda *s: sum(s) / len(s), *stats)


@pytest.mark.parametrize('loop', ['scan', 'unrolled'])
@pytest.mark.parametrize('devices', [1, 8])
def test_training_mode_batchnorm_is_per_micro_batch(devices, loop):
  micro = 2
  config = tiny_config(micro_batch_size=micro)
  model = ConvNet(bn_train=True)
  state, _ = initial_state(config, model)
  batch = random_batch(1)
  mesh = sharding.create_mesh(jax.devices()[:devices])
  grads, (metrics, batch_stats) = grad_cache_gradients(model, config, mesh,
                                                       loop)(
      sharding.replicate(state, mesh),
      sharding.host_batch_to_global(batch, mesh))
  (want_loss, want_stats), want_grads = jax.jit(jax.value_and_grad(
      functools.partial(per_micro_batch_objective, model=model, config=config,
                        micro=micro), has_aux=True))(
                            state.params, state.batch_stats, batch=batch)
  np.testing.assert_allclose(metrics['loss'], want_loss, rtol=1e-6)
  assert_grads_close(grads, want_grads)
  assert_trees_close(batch_stats, want_stats, rtol=1e-6, atol=1e-7)
  # running ← 0.9·running + 0.1·mean_j(mean of micro-batch j), by hand.
  conv = jax.device_get(state.params['conv'])
  x = jnp.asarray(batch['image']).reshape(BATCH // micro, 2 * micro, SIZE,
                                          SIZE, 3)
  y = jax.vmap(lambda v: nn.Conv(8, (3, 3)).apply({'params': conv}, v))(x)
  chunk_means = np.asarray(jnp.mean(y, axis=(1, 2, 3)))
  np.testing.assert_allclose(
      batch_stats['bn']['mean'],
      0.9 * state.batch_stats['bn']['mean'] + 0.1 * chunk_means.mean(0),
      rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # Two ResNet-18 compiles with remat: minutes on 2 cores.
def test_resnet_bfloat16_remat_micro_batches_on_8_devices_equal_1_device():
  """The real network, bfloat16 and rematerialised, training-mode
  BatchNorm: 8 devices run the same micro-batches as 1 device."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  config = tiny_config(micro_batch_size=1, dtype='bfloat16', remat=True,
                       color_augment='device')
  model = models.create_model(config, NUM_CLASSES)
  state, _ = initial_state(config, model)
  batch = random_batch(2, keys=True)
  results = []
  for devices in (8, 1):
    mesh = sharding.create_mesh(jax.devices()[:devices])
    gradients = grad_cache.make_micro_batch_gradients(
        model, config, mesh, train.make_contrastive_loss(config, mesh),
        distort=lambda x, keys: train.distort_on_device(x, keys, config))
    results.append(jax.device_get(jax.jit(
        lambda s, b: gradients(s, b, s.rng))(
            sharding.replicate(state, mesh),
            sharding.host_batch_to_global(batch, mesh))))
  (grads8, (metrics8, stats8)), (grads1, (metrics1, stats1)) = results
  assert np.isfinite(metrics1['loss'])
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5,
                               err_msg=key)
  assert_grads_close(grads8, grads1)
  assert_trees_close(stats8, stats1, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# In the loop: runs, logs, resumes bit for bit.
# ----------------------------------------------------------------------------
def synthetic_data(config):
  def batches(start_step):
    step = start_step
    while True:
      step += 1
      yield random_batch(step, keys=config.color_augment == 'device')
  return pipeline.Data(num_train_examples=1000, num_classes=NUM_CLASSES,
                       train_batches=batches, eval_batches=None)


def test_micro_batched_run_resumes_bitwise_exact(tmp_path):
  from test_train import sigterm_at_batch  # pylint: disable=g-import-not-at-top
  config = tiny_config(micro_batch_size=1, color_augment='device',
                       checkpoint_every_steps=4, keep_checkpoints=5,
                       lineareval_while_pretraining=False)
  data, model = synthetic_data(config), ConvNet(head=False)
  with jax.transfer_guard('disallow'):
    straight = train.train_and_evaluate(config, str(tmp_path / 'straight'),
                                        data=data, model=model)
  assert int(straight.state.step) == 4
  assert np.isfinite(straight.metrics['contrastive_loss'])
  stopped_dir = str(tmp_path / 'stopped')
  stopped = train.train_and_evaluate(config, stopped_dir, model=model,
                                     data=sigterm_at_batch(data, 2))
  assert stopped.preempted and checkpoint.checkpoint_steps(stopped_dir) == (3,)
  resumed = train.train_and_evaluate(config, stopped_dir, data=data,
                                     model=model)
  assert int(resumed.state.step) == 4
  for field in ('params', 'batch_stats', 'opt_state', 'rng'):
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.device_get(getattr(resumed.state, field))),
        jax.tree.leaves(jax.device_get(getattr(straight.state, field))))), field


# ----------------------------------------------------------------------------
# Memory: one micro-batch's activations, not the global batch's.
# ----------------------------------------------------------------------------
class WideConvNet(nn.Module):
  """Three 3×3 conv + BatchNorm layers, 32 channels at full resolution: its
  memory is activations (≈ 0.4 MB a 16-px view to keep for the backward
  pass), its parameters 40 kB."""

  @nn.compact
  def __call__(self, images, train=True):
    x = images
    for i in range(3):
      x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f'bn{i}')(
          nn.Conv(32, (3, 3), name=f'conv{i}')(x)))
    h = nn.Dense(16, name='resnet')(jnp.mean(x, axis=(1, 2)))
    return {'representation': h,
            'projection': nn.Dense(8, name='projection_head')(h)}

  def has_supervised_head(self):
    return False


def test_micro_batched_step_needs_the_memory_of_one_micro_batch():
  """Compiled (not run) on one device: batch 128 in micro-batches of 8
  needs about what a plain step at batch 8 needs (plus the 128 images'
  inputs, 0.8 MB), a small fraction of a plain step at batch 128."""
  from simclr_jax.tools import bench_micro_batch as bmb  # pylint: disable=g-import-not-at-top
  config = tiny_config(image_size=16, train_batch_size=128, micro_batch_size=8,
                       lineareval_while_pretraining=False)
  model, mesh = WideConvNet(), sharding.create_mesh(jax.devices()[:1])
  memory = lambda batch, micro: bmb.compiled_step_memory(
      bmb.with_batch(config, train_batch_size=batch, micro_batch_size=micro),
      mesh=mesh, model=model)
  micro, small, full = memory(128, 8), memory(8, 0), memory(128, 0)
  assert full > 10 * small  # Activations dominate, as in a real network.
  assert micro < 1.5 * small, (micro, small)
  assert micro < 0.15 * full, (micro, full)


# ----------------------------------------------------------------------------
# Config: one line naming the value, before anything compiles.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,expected', [
    (dict(micro_batch_size=-1), 'must be >= 0'),
    (dict(micro_batch_size=3), 'must divide train_batch_size=16'),
    (dict(micro_batch_size=2, train_mode='supervised'),
     "micro-batches are for train_mode='pretrain'"),
])
def test_bad_micro_batch_size_is_one_line(overrides, expected):
  config = tiny_config(**overrides)
  with pytest.raises(preflight.BadInput) as error:
    preflight.check_config(config)
  message = str(error.value)
  assert message.startswith(
      f'config.micro_batch_size={overrides["micro_batch_size"]} is invalid')
  assert expected in message and '\n' not in message


def test_micro_batch_size_must_divide_the_per_device_batch():
  config = tiny_config(micro_batch_size=4)  # 16 images: 2 per device on 8.
  config_lib.validate(config)
  config_lib.validate_for_devices(config, device_count=4, process_count=1)
  with pytest.raises(preflight.BadInput, match=(
      r'^config.micro_batch_size=4 is invalid: must divide the per-device '
      r'batch 2 \(train_batch_size=16 / 8 devices\)\.$')):
    preflight.check_devices(config)


def test_backward_loop_is_unrolled_on_cpu_only_unless_asked():
  mesh = sharding.create_mesh(jax.devices()[:1])  # CPU devices here.
  assert grad_cache.unrolled_backward(mesh)
  assert grad_cache.unrolled_backward(mesh, 'unrolled')
  assert not grad_cache.unrolled_backward(mesh, 'scan')
  with pytest.raises(ValueError, match=r"loop='while': expected one of"):
    grad_cache.unrolled_backward(mesh, 'while')


def test_bench_reports_memory_and_time_ratios(monkeypatch, capsys):
  """The bench's arithmetic and table, on made-up measurements (the real
  measurement is compiled_step_memory, tested above)."""
  from simclr_jax.tools import bench  # pylint: disable=g-import-not-at-top
  from simclr_jax.tools import bench_micro_batch as bmb  # pylint: disable=g-import-not-at-top
  memory = lambda c: 1000 * c.train_batch_size + 7 * c.micro_batch_size
  compiled = []  # (batch, micro-batch) of every program compiled.

  def compiled_step_memory(c):
    compiled.append((c.train_batch_size, c.micro_batch_size))
    return memory(c)

  def bench_train(c, steps, warmup):
    compiled.append((c.train_batch_size, c.micro_batch_size))
    # The timed step on CPU unrolls its loop: a memory unlike the scan's.
    return dict(memory_bytes_per_device=memory(c) + 5 * c.micro_batch_size,
                compile_s=1.0, step_s=2.0 + c.micro_batch_size,
                step_cpu_s=1.0, step_times_s=[2.0], images_per_s=1.0,
                loss=1.0)

  monkeypatch.setattr(bmb, 'compiled_step_memory', compiled_step_memory)
  monkeypatch.setattr(bench, 'bench_train', bench_train)
  config = tiny_config()
  results = bench.run(config, what=('micro',), micro_batch_sizes=['1', '2'],
                      steps=1)
  # Timed: plain and each micro-batched step; memory only: the scans (CPU
  # unrolls the timed ones) and the plain steps at batch m·devices.
  assert sorted(compiled) == sorted([(16, 0), (16, 1), (16, 1), (8, 0),
                                     (16, 2), (16, 2), (16, 0)])
  assert results['plain']['memory_bytes_per_device'] == 16_000
  assert results['micro1']['memory_bytes_per_device'] == 16_007
  assert results['micro1']['timed_loop'] == 'unrolled'
  assert set(results) == {'plain', 'micro1', 'micro2', 'plain_batch1',
                          'plain_batch2'}
  assert results['plain_batch2']['global_batch'] == 16  # 2 × 8 devices.
  assert results['micro2']['memory_vs_plain_batch'] == pytest.approx(
      (16_000 + 14) / 16_000)
  assert results['micro1']['time_vs_plain'] == pytest.approx(3.0 / 2.0)
  bmb.print_table(results)
  table = capsys.readouterr().out
  assert '| 2 | ' in table and '| plain step, batch 16 |' in table
  with pytest.raises(config_lib.ConfigError, match='micro_batch_size=3'):
    bench.run(config, what=('micro',), micro_batch_sizes=['3'], steps=0)
