r"""Speed of a config on the devices present: `python -m simclr_jax.tools.bench`
(alias: `python -m simclr_jax.bench`).

  python -m simclr_jax.tools.bench --config=configs/cifar10_r18.py \
      [--config.train_batch_size=32] [--what=train,input,baseline] \
      [--steps=5] [--warmup=1] [--peak_tflops=X] [--weak_scaling=1,2,4,8]

What it measures (pretrain step of `train.make_train_step` on a synthetic
batch of the config's global batch size, so no dataset is needed):
- compile time of the jitted step;
- steady-state step time: median of `steps` steps after `warmup` steps, each
  blocked on its result;
- images/s and views/s (2 per image), total and per device;
- model FLOPs per step from XLA's cost analysis of the compiled step (per
  device × devices) next to the analytic count of flops.py (3 × forward).
  XLA counts only the kernel taps that land inside the image (a 3×3 SAME
  conv on a 4×4 map: 100 of 144 taps), the analytic count all of them, as
  published FLOP figures do; so the ratio is < 1 at small image sizes
  (≈0.77 at 16 px) and → 1 at 224 px. MFU uses the analytic count;
- MFU = analytic FLOPs / step time / (peak per device × devices); the peak
  comes from flops.PEAK_FLOPS by device kind, or --peak_tflops (unknown on
  CPU otherwise);
- per-device memory of the compiled step (arguments + outputs + temporaries −
  donated aliases) from `compiled.memory_analysis()`;
- `input`: the input pipeline alone, two-view images/s, to see which side is
  the bottleneck;
- `baseline`: the same step written directly with `jax.jit` (bench_baseline.py),
  and the ratio of our throughput to it (ResNets only, as `tf`);
- `tf`: the same step in TensorFlow as the reference release runs it
  (bench_tf_reference.py: oneDNN convolutions on x86 CPUs, no XLA), on the
  host CPU, and the ratio of our throughput to it (meaningful when our step
  runs on the same CPU);
- `micro` (with --micro_batch_sizes): the micro-batched step (grad_cache.py)
  against the plain one, compiled memory and time per global batch
  (bench_micro_batch.py).
Output: a table, then one line `BENCH_JSON {...}` for scripts.

`--weak_scaling=1,2,4,8` reruns the train bench in subprocesses on that many
fake CPU devices with the per-device batch fixed (config batch / devices of
this process) and prints one table row per device count.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from simclr_jax.runtime.memory import device_memory_bytes
from simclr_jax.tools import flops

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (main.py owns
  `--config` when both modules are imported, e.g. in the tests)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_list('what', ['train', 'input'],
                    'Any of train, input, baseline, tf (all: the four; '
                    'baseline and tf are ResNet steps).')
  flags.DEFINE_integer('steps', 5, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_float('peak_tflops', None,
                     'Peak TFLOP/s of one device, for MFU where the device kind '
                     'is not in flops.PEAK_FLOPS (e.g. CPUs).')
  flags.DEFINE_list('weak_scaling', [],
                    'Fake CPU device counts, e.g. 1,2,4,8: fixed per-device '
                    'batch, one subprocess per count.')
  flags.DEFINE_float('input_seconds', 10.0, 'Seconds the input bench runs.')
  flags.DEFINE_list('micro_batch_sizes', [],
                    '--what=micro: images per device per micro-batch, e.g. '
                    '64,128,256 (--steps=0: compiled memory only).')


NUM_CLASSES = 10  # Synthetic labels; the linear head's width hardly matters.


# ----------------------------------------------------------------------------
# Measurement helpers.
# ----------------------------------------------------------------------------
def time_steps(run_step, *, steps, warmup):
  """(median wall s, wall times, median process-CPU s) of `steps` calls.

  run_step must block until its result is ready. The CPU seconds of this
  process (all its threads) per step are reported too: on a shared, loaded
  machine they vary much less than the wall time.
  """
  for _ in range(warmup):
    run_step()
  times, cpu_times = [], []
  for _ in range(max(steps, 1)):
    start, cpu_start = time.perf_counter(), time.process_time()
    run_step()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return statistics.median(times), times, statistics.median(cpu_times)


def xla_flops(compiled):
  """FLOPs of one device's program from XLA's cost analysis (None if absent)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per program.
    analysis = analysis[0] if analysis else None
  flops_value = (analysis or {}).get('flops')
  return float(flops_value) if flops_value is not None else None


def analytic_step_flops(config):
  """flops.py's count of one pretraining step (both views, 3 × forward):
  the config's ResNet or ViT (`config.model`) and its projection head."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  width = models.representation_width(config)
  hidden = config.proj_hidden_dim or width
  head = ()
  if config.proj_head_mode == 'nonlinear':
    head = (hidden,) * (config.num_proj_layers - 1) + (config.proj_out_dim,)
  elif config.proj_head_mode == 'linear':
    head = (config.proj_out_dim,)
  if config.model == 'vit':
    from simclr_jax.models import vit  # pylint: disable=g-import-not-at-top
    shape = vit.parse_vit_variant(config.vit_variant)
    per_image = flops.vit_forward_flops(
        image_size=config.image_size, patch_size=shape['patch_size'],
        hidden_size=shape['hidden_size'], depth=shape['depth'],
        class_token=config.vit_pooling == 'token', head_dims=head)
  else:
    per_image = flops.resnet_forward_flops(
        config.resnet_depth, image_size=config.image_size,
        width_multiplier=config.width_multiplier,
        cifar_stem=config.image_size <= 32, head_dims=head)
  return flops.train_step_flops(per_image, 2 * config.train_batch_size)


def model_name(config) -> str:
  """'ResNet-50 1x' or 'ViT-S/16' (the bench's header and JSON)."""
  if config.model == 'vit':
    return f'ViT-{config.vit_variant}'
  return f'ResNet-{config.resnet_depth} {config.width_multiplier:g}x'


def mfu(flops_per_step, step_s, peak_flops_per_device, devices):
  """Model FLOPs utilisation, or None where the peak is unknown."""
  if not peak_flops_per_device:
    return None
  return flops_per_step / step_s / (peak_flops_per_device * devices)


def synthetic_batch(config, seed=0):
  """A host-local pretrain batch: image [n, 2, H, W, 3] in [0, 1], label [n]
  (and the views' augment_key [n, 2, 2] with color_augment='device')."""
  n = config.train_batch_size // jax.process_count()
  size = config.image_size
  rng = np.random.default_rng(seed)
  batch = {'image': rng.random((n, 2, size, size, 3), np.float32),
           'label': rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32)}
  if config.color_augment == 'device':
    batch['augment_key'] = rng.integers(0, 2**32, (n, 2, 2), np.uint32)
  return batch


def _rates(config, step_time, devices):
  images = config.train_batch_size / step_time
  return {'images_per_s': images, 'views_per_s': 2 * images,
          'images_per_s_per_device': images / devices,
          'views_per_s_per_device': 2 * images / devices}


# ----------------------------------------------------------------------------
# The three benches.
# ----------------------------------------------------------------------------
def bench_train(config, *, steps, warmup, peak_tflops=None):
  """Our jitted pretrain step (train.make_train_step) on a synthetic batch."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  from simclr_jax import optim  # pylint: disable=g-import-not-at-top
  from simclr_jax import sharding  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh()
  devices = mesh.size
  model = models.create_model(config, NUM_CLASSES)
  learning_rate_fn = lambda step: 0.1 * jnp.ones_like(step, jnp.float32)
  tx = optim.create_optimizer(config, learning_rate_fn)
  state = jax.jit(lambda rng: train.create_train_state(config, model, tx, rng),
                  out_shardings=sharding.replicated_sharding(mesh))(
                      jax.random.PRNGKey(0))
  batch = sharding.host_batch_to_global(synthetic_batch(config), mesh)

  start = time.perf_counter()
  step = train.make_train_step(model, config, learning_rate_fn, mesh).lower(
      state, batch).compile()
  compile_s = time.perf_counter() - start

  holder = {'state': state}

  def run_step():
    holder['state'], metrics = step(holder['state'], batch)
    holder['loss'] = float(jax.block_until_ready(metrics)['loss'])

  step_time, times, cpu_time = time_steps(run_step, steps=steps, warmup=warmup)
  xla = xla_flops(step)
  analytic = analytic_step_flops(config)
  kind = jax.devices()[0].device_kind
  if peak_tflops:
    peak = peak_tflops * 1e12
  else:
    peak = flops.peak_flops_per_device(kind, config.dtype)
  result = {
      'config_batch': config.train_batch_size, 'image_size': config.image_size,
      'model': model_name(config),
      'resnet_depth': config.resnet_depth, 'dtype': config.dtype,
      'platform': jax.devices()[0].platform, 'device_kind': kind,
      'devices': devices, 'processes': jax.process_count(),
      'compile_s': compile_s, 'step_s': step_time,
      'step_times_s': times, 'step_cpu_s': cpu_time,
      **_rates(config, step_time, devices),
      'xla_flops_per_step': None if xla is None else xla * devices,
      'analytic_flops_per_step': analytic,
      'xla_vs_analytic': None if xla is None else xla * devices / analytic,
      'achieved_tflops_per_device': analytic / step_time / devices / 1e12,
      'peak_tflops_per_device': None if peak is None else peak / 1e12,
      'mfu': mfu(analytic, step_time, peak, devices),
      'memory_bytes_per_device': device_memory_bytes(step),
      'loss': holder['loss'],
  }
  return result


def bench_baseline(config, *, steps, warmup):
  """The same step written directly with jax.jit (bench_baseline.py)."""
  from simclr_jax.tools import bench_baseline as baseline  # pylint: disable=g-import-not-at-top
  from simclr_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh()
  step, state = baseline.from_config(config, NUM_CLASSES, mesh=mesh)
  batch = sharding.host_batch_to_global(synthetic_batch(config), mesh)
  start = time.perf_counter()
  compiled = step.lower(*state, batch['image'], batch['label']).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def run_step():
    *new_state, metrics = compiled(*holder[0], batch['image'], batch['label'])
    jax.block_until_ready(metrics)
    holder[0] = new_state

  step_time, times, cpu_time = time_steps(run_step, steps=steps, warmup=warmup)
  return {'compile_s': compile_s, 'step_s': step_time, 'step_times_s': times,
          'step_cpu_s': cpu_time,
          **_rates(config, step_time, mesh.size),
          'memory_bytes_per_device': device_memory_bytes(compiled)}


def bench_tf_reference(config, *, steps, warmup):
  """The same step in TensorFlow, as the reference runs it on CPU."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from simclr_jax.tools import bench_tf_reference as reference  # pylint: disable=g-import-not-at-top
  if config.dtype != 'float32':
    raise ValueError('--what=tf compares float32 steps on the CPU; got '
                     f'config.dtype={config.dtype!r}.')
  step, _ = reference.from_config(config, NUM_CLASSES)
  batch = synthetic_batch(config)
  images = tf.constant(batch['image'])
  labels = tf.constant(batch['label'])
  start = time.perf_counter()
  step.get_concrete_function(images, labels)
  trace_s = time.perf_counter() - start
  step_time, times, cpu_time = time_steps(
      lambda: float(step(images, labels)[0]), steps=steps, warmup=warmup)
  return {'trace_s': trace_s, 'step_s': step_time, 'step_times_s': times,
          'step_cpu_s': cpu_time, **_rates(config, step_time, 1)}


def bench_input(config, *, seconds, num_images=128):
  """Two-view images/s of the training preprocessing alone (no device work).

  tools/throughput.py: in-memory JPEGs through the pipeline's two-view map at
  the config's image size, jitter and blur, on this host's CPU. With
  color_augment='device' the host only crops, flips and resizes (the colour
  and blur are in the train step's time).
  """
  from simclr_jax.tools import throughput  # pylint: disable=g-import-not-at-top
  host_batch = config.train_batch_size // jax.process_count()
  result = throughput.measure_input_throughput(
      config.image_size, num_images=num_images,
      batch_size=min(host_batch, 256), seconds=seconds,
      warmup_batches=2, blur=config.use_blur,
      color_jitter_strength=config.color_jitter_strength,
      color_on_device=config.color_augment == 'device')
  views = result['views_per_s']
  return {'images_per_s': views / 2, 'views_per_s': views,
          'color_augment': config.color_augment,
          'views_per_s_per_core': result['views_per_s_per_core'],
          'source': result['source'], 'seconds': seconds}


def contrastive_loss_memory(config, mesh, *, global_batch, dim):
  """Per-device temporary bytes of the train step's NT-Xent loss + gradient.

  Compiled (not run) on `mesh` for projections z [global_batch, 2, dim]: with
  the logits sharded by rows, each device holds [n, 2N] instead of [N, 2N].
  """
  from simclr_jax import sharding  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  loss = train.make_contrastive_loss(config, mesh)
  rows = sharding.data_sharding(mesh)
  fn = jax.jit(jax.value_and_grad(lambda z: loss(z)[0]), in_shardings=rows,
               out_shardings=(sharding.replicated_sharding(mesh), rows))
  z = jax.ShapeDtypeStruct((global_batch, 2, dim), jnp.float32, sharding=rows)
  return fn.lower(z).compile().memory_analysis().temp_size_in_bytes


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------
def _fmt(value):
  if value is None:
    return 'unknown'
  if isinstance(value, float):
    return f'{value:.4g}'
  if isinstance(value, list):
    return ', '.join(_fmt(v) for v in value)
  return str(value)


def print_report(results):
  """One `section.key  value` row per field, then `BENCH_JSON {...}`."""
  rows = [(f'{section}.{key}', _fmt(value))
          for section, fields in results.items() for key, value in fields.items()]
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f'{name:<{width}}  {value}')
  print('BENCH_JSON ' + json.dumps(results, sort_keys=True), flush=True)


def benches(config, what):
  """The --what list as a tuple of bench names; ValueError (one line) for
  an unknown name, or a ResNet-only bench with another backbone."""
  allowed = ('train', 'input', 'baseline', 'tf')
  if 'all' in what:  # All that apply: baseline and tf model ResNets.
    return allowed if config.model == 'resnet' else allowed[:2]
  what = tuple(what)
  unknown = set(what) - set(allowed) - {'micro'}
  if unknown:
    raise ValueError(f'--what: unknown {sorted(unknown)}; allowed '
                     f'{", ".join(allowed)}, micro, all.')
  resnet_only = [w for w in what if w in ('baseline', 'tf')]
  if resnet_only and config.model != 'resnet':
    raise ValueError(f'--what={",".join(resnet_only)} does not apply: the '
                     'hand-written baseline and the TensorFlow reference '
                     f'step model ResNets only, config.model is '
                     f'{config.model!r} (use --what=train,input).')
  return what


def run(config, *, what=('train', 'input'), steps=5, warmup=1,
        peak_tflops=None, input_seconds=10.0, micro_batch_sizes=()):
  """Runs the requested benches; returns {'train': {...}, 'input': ..., ...}."""
  what = benches(config, what)
  results = {}
  if 'micro' in what:
    from simclr_jax.tools import bench_micro_batch  # pylint: disable=g-import-not-at-top
    results.update(bench_micro_batch.run(
        config, [int(m) for m in micro_batch_sizes], steps=steps,
        warmup=warmup))
  if 'train' in what or 'baseline' in what or 'tf' in what:
    results['train'] = bench_train(config, steps=steps, warmup=warmup,
                                   peak_tflops=peak_tflops)
  if 'baseline' in what:
    base = bench_baseline(config, steps=steps, warmup=warmup)
    base['ours_vs_baseline_throughput'] = (base['step_s']
                                          / results['train']['step_s'])
    base['ours_vs_baseline_cpu'] = (base['step_cpu_s']
                                   / results['train']['step_cpu_s'])
    results['baseline'] = base
  if 'tf' in what:
    ref = bench_tf_reference(config, steps=steps, warmup=warmup)
    ref['ours_vs_tf_throughput'] = ref['step_s'] / results['train']['step_s']
    ref['ours_vs_tf_cpu'] = ref['step_cpu_s'] / results['train']['step_cpu_s']
    results['tf_reference'] = ref
  if 'input' in what:
    results['input'] = bench_input(config, seconds=input_seconds)
    if 'train' in results:
      results['input']['input_vs_train_images'] = (
          results['input']['images_per_s'] / results['train']['images_per_s'])
  return results


def weak_scaling(argv, device_counts, per_device_batch):
  """Train bench in one subprocess per fake-CPU device count."""
  rows = []
  passthrough = [a for a in argv[1:] if not a.startswith(
      ('--weak_scaling', '--what', '--config.train_batch_size'))]
  for count in device_counts:
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
        os.environ.get('XLA_FLAGS', '') +
        f' --xla_force_host_platform_device_count={count}').strip())
    cmd = [sys.executable, '-m', 'simclr_jax.tools.bench', *passthrough,
           '--what=train', f'--config.train_batch_size={per_device_batch * count}']
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         check=True).stdout
    line = [l for l in out.splitlines() if l.startswith('BENCH_JSON ')][-1]
    train = json.loads(line[len('BENCH_JSON '):])['train']
    rows.append(train)
  print(f'{"devices":>7} {"batch":>6} {"step_s":>8} {"img/s":>8} '
        f'{"img/s/dev":>9} {"efficiency":>10} {"mem/dev MiB":>11}')
  base = rows[0]['images_per_s_per_device']
  for r in rows:
    print(f'{r["devices"]:>7} {r["config_batch"]:>6} {r["step_s"]:>8.3f} '
          f'{r["images_per_s"]:>8.1f} {r["images_per_s_per_device"]:>9.2f} '
          f'{r["images_per_s_per_device"] / base:>10.2f} '
          f'{(r["memory_bytes_per_device"] or 0) / 2**20:>11.1f}')
  print('BENCH_JSON ' + json.dumps({'weak_scaling': rows}), flush=True)
  return rows


def main(argv):
  config = FLAGS.config
  try:
    benches(config, FLAGS.what)
  except ValueError as e:
    print(f'simclr_jax.bench: error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  if FLAGS.weak_scaling:
    per_device = config.train_batch_size // jax.device_count()
    weak_scaling(sys.argv, [int(c) for c in FLAGS.weak_scaling], per_device)
    return
  print(f'simclr_jax.bench: {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, global batch '
        f'{config.train_batch_size}, {config.image_size} px, '
        f'{model_name(config)}, {config.dtype}', flush=True)
  results = run(config, what=FLAGS.what, steps=FLAGS.steps,
                warmup=FLAGS.warmup, peak_tflops=FLAGS.peak_tflops,
                input_seconds=FLAGS.input_seconds,
                micro_batch_sizes=FLAGS.micro_batch_sizes)
  print_report(results)
  if 'micro' in FLAGS.what:
    from simclr_jax.tools import bench_micro_batch  # pylint: disable=g-import-not-at-top
    bench_micro_batch.print_table(results)
  del argv


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
