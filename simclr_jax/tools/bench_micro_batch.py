r"""Micro-batched pretraining (grad_cache.py) against the plain step:
`python -m simclr_jax.tools.bench --what=micro --micro_batch_sizes=...`.

  # Memory only (compiled, nothing allocated or run):
  python -m simclr_jax.tools.bench --config=configs/r50_4096.py \
      --what=micro --micro_batch_sizes=64,128,256 --steps=0
  # Memory and time per global batch:
  python -m simclr_jax.tools.bench --config=configs/cifar10_r18.py \
      --config.train_batch_size=128 --config.image_size=16 --what=micro \
      --micro_batch_sizes=32 --steps=3

For the config's global batch B and each micro-batch size m it reports, per
device: the compiled memory (bench.device_memory_bytes: arguments + outputs
+ temporaries − donated) of
  `plain`:           the plain step at batch B (global BatchNorm);
  `micro<m>`:        the micro-batched step at batch B, m images per device
                     at a time;
  `plain_batch<m>`:  the plain step at batch m·devices, the largest that
                     holds m images per device,
and `micro<m>.memory_vs_plain_batch` = micro<m> / plain_batch<m>. The memory
is always that of the micro-batches in a `lax.scan`, the program GPUs and
TPUs run. With `--steps` > 0 the two global-batch steps also run
(bench.bench_train: the median of `steps` steps after `warmup`) as this
machine compiles them (on CPU the backward loop unrolled, `timed_loop`; see
grad_cache.unrolled_backward) and `micro<m>.time_vs_plain` is the ratio of
their step times (and of their CPU seconds); with `--steps=0` only
compiled memory is measured, on abstract inputs, so a batch far beyond the
machine's memory still compiles.
"""
import jax
import jax.numpy as jnp

from simclr_jax import config as config_lib
from simclr_jax import grad_cache
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.tools import bench


def with_batch(config, *, train_batch_size, micro_batch_size):
  """A copy of `config` with the given global batch and micro-batch size."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train_batch_size = train_batch_size
    config.micro_batch_size = micro_batch_size
  return config


def abstract_inputs(config, model, mesh):
  """(state, batch) of the pretrain step as sharded ShapeDtypeStructs."""
  tx = optim.create_optimizer(config, lambda step: 0.1)
  state = jax.eval_shape(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))
  replicated = sharding.replicated_sharding(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  n, size = config.train_batch_size, config.image_size
  shapes = {'image': ((n, 2, size, size, 3), jnp.float32),
            'label': ((n,), jnp.int32)}
  if config.color_augment == 'device':
    shapes['augment_key'] = ((n, 2, 2), jnp.uint32)
  rows = sharding.data_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
           for k, (shape, dtype) in shapes.items()}
  return state, batch


def compiled_step_memory(config, *, mesh=None, model=None,
                         loop='scan') -> int:
  """Per-device bytes of the compiled pretrain step (nothing allocated).

  `loop`: of the micro-batches (grad_cache.unrolled_backward); 'scan', the
  default, is the program GPUs and TPUs run, even when compiled on CPU.
  """
  mesh = mesh or sharding.create_mesh()
  model = model or models.create_model(config, bench.NUM_CLASSES)
  step = train.make_train_step(model, config, lambda step: 0.1, mesh,
                               micro_batch_loop=loop)
  compiled = step.lower(*abstract_inputs(config, model, mesh)).compile()
  return bench.device_memory_bytes(compiled)


def measure(config, *, steps, warmup):
  """{'memory_bytes_per_device' (the scan's), and with steps: 'step_s',
  'step_cpu_s', ... of the step this machine runs ('auto' loop)}.

  Each program compiles once: the timed step's memory is the one reported,
  unless its loop was unrolled (CPU), when the scan is compiled for memory.
  """
  if steps <= 0:
    return {'memory_bytes_per_device': compiled_step_memory(config)}
  result = bench.bench_train(config, steps=steps, warmup=warmup)
  timed = {key: result[key] for key in ('compile_s', 'step_s', 'step_cpu_s',
                                        'step_times_s', 'images_per_s',
                                        'loss', 'memory_bytes_per_device')}
  if config.micro_batch_size:
    unrolled = grad_cache.unrolled_backward(sharding.create_mesh())
    timed['timed_loop'] = 'unrolled' if unrolled else 'scan'
    if unrolled:
      timed['memory_bytes_per_device'] = compiled_step_memory(config)
  return timed


def run(config, micro_batch_sizes, *, steps, warmup):
  """Sections `plain`, `micro<m>`, `plain_batch<m>` (see the docstring)."""
  if not micro_batch_sizes:
    raise ValueError('--what=micro needs --micro_batch_sizes, e.g. 32,64.')
  devices = jax.device_count()
  batch = config.train_batch_size
  variants = [with_batch(config, train_batch_size=batch, micro_batch_size=m)
              for m in micro_batch_sizes]
  for variant in variants:  # One line, before anything compiles.
    config_lib.validate(variant)
    config_lib.validate_for_devices(variant, device_count=devices,
                                    process_count=jax.process_count())
  results = {'plain': measure(
      with_batch(config, train_batch_size=batch, micro_batch_size=0),
      steps=steps, warmup=warmup)}
  results['plain'].update(global_batch=batch, devices=devices)
  for m, variant in zip(micro_batch_sizes, variants):
    micro = measure(variant, steps=steps, warmup=warmup)
    small = compiled_step_memory(with_batch(
        config, train_batch_size=m * devices, micro_batch_size=0))
    micro['memory_vs_plain_batch'] = micro['memory_bytes_per_device'] / small
    micro['memory_vs_plain'] = (micro['memory_bytes_per_device']
                                / results['plain']['memory_bytes_per_device'])
    if steps > 0:
      micro['time_vs_plain'] = micro['step_s'] / results['plain']['step_s']
      micro['cpu_time_vs_plain'] = (micro['step_cpu_s']
                                    / results['plain']['step_cpu_s'])
    results[f'micro{m}'] = dict(micro, global_batch=batch, micro_batch_size=m)
    results[f'plain_batch{m}'] = {'memory_bytes_per_device': small,
                                  'global_batch': m * devices}
  return results


def print_table(results) -> None:
  """The README's table: one row per micro-batch size."""
  plain = results['plain']
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  timed = 'step_s' in plain
  print(f'| micro-batch m | memory, batch {plain["global_batch"]} in '
        'micro-batches | plain step at batch m | ratio |'
        + (' step time | vs plain |' if timed else ''))
  print('|---|---|---|---|' + ('---|---|' if timed else ''))
  for name, row in results.items():
    if not name.startswith('micro'):
      continue
    small = results[f'plain_batch{row["micro_batch_size"]}']
    line = (f'| {row["micro_batch_size"]} | '
            f'{gib(row["memory_bytes_per_device"])} | '
            f'{gib(small["memory_bytes_per_device"])} | '
            f'{row["memory_vs_plain_batch"]:.2f}× |')
    if timed:
      line += f' {row["step_s"]:.2f} s | {row["time_vs_plain"]:.2f}× |'
    print(line)
  print(f'| plain step, batch {plain["global_batch"]} | '
        f'{gib(plain["memory_bytes_per_device"])} | | |'
        + (f' {plain["step_s"]:.2f} s | 1× |' if timed else ''))
