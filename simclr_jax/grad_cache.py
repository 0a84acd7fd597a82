"""Exact NT-Xent gradients over a global batch larger than memory.

The gradient cache of Gao, Zhang, Han and Callan, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup" (RepL4NLP 2021). Plain
gradient accumulation does not work for a contrastive loss: each micro-batch
would see only its own negatives. But the loss L depends on the parameters θ
only through the projections z = [z_1 … z_k] of the k micro-batches, which
are small ([N, 2, d]), so

  ∂L/∂θ = Σ_j (∂z_j/∂θ)ᵀ · ∂L/∂z_j

and one step runs in three passes:
  1. z_j of every micro-batch j, forward only, `lax.scan`ned so no
     activation outlives its micro-batch;
  2. L(z) and g = ∂L/∂z of the whole global batch: the sharded NT-Xent of the
     plain step (each anchor has all 2N − 2 negatives of all devices);
  3. for every micro-batch, the forward pass again and one backward pass with
     cotangent g_j (`jax.vjp`), summing the parameter gradients.
Memory: one micro-batch's activations, the global batch's inputs and
projections, and one extra copy of the gradients (the running sum). Cost: one
extra forward pass per step.

The supervised head of `lineareval_while_pretraining` (on stop-gradient
features) has a per-view loss whose mean over the 2N views is additive over
micro-batches: pass 3 adds each micro-batch's share Σ CE / 2N with
cotangent 1.

Micro-batches and devices: each device splits its own n = N / D images into
n / m micro-batches of m images (2m views), device d's micro-batch j being
global micro-batch d·(n/m) + j; one device runs the same global micro-batches
as D devices, only in another order.

BatchNorm in training mode normalises each micro-batch by its own statistics
(the 2m views in memory on one device, as per-device BatchNorm on GPU
clusters), in passes 1 and 3 alike, so the gradient is exact for that
network. The running statistics move once per step by the mean of the
micro-batches' statistics over all devices:
  running ← decay · running + (1 − decay) · mean_j(batch statistics of j),
i.e. the mean of the k·D running-average updates the micro-batches would
make. With BatchNorm in inference mode (or none), the loss and gradients
equal those of the plain step on the global batch to float32 rounding.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from simclr_jax import losses
from simclr_jax import optim
from simclr_jax import sharding

AXIS = sharding.DATA_AXIS


def _split(tree, micro_batch_size: int):
  """Leaves [n, ...] -> [n / m, m, ...]: consecutive micro-batches."""
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // micro_batch_size, micro_batch_size)
                          + x.shape[1:]), tree)


def _mean_over_devices(tree):
  """Mean over the micro-batches (axis 0) and then over the devices."""
  return jax.lax.pmean(jax.tree.map(lambda x: jnp.mean(x, axis=0), tree),
                       AXIS)


LOOPS = ('auto', 'scan', 'unrolled')


def unrolled_backward(mesh, loop: str = 'auto') -> bool:
  """Whether pass 3 runs as straight-line code instead of a `lax.scan`.

  'auto' unrolls on CPU only. XLA:CPU compiles a convolution's weight
  gradient inside a loop body to its slow generic kernel (a known XLA:CPU
  limitation, not a GPU or TPU one): a ResNet-18's micro-batched step took 5× the plain step's time
  with the scan and 1.45× unrolled. XLA:CPU's scheduler then keeps about a
  full batch's activations, which host memory affords. GPU and TPU run the
  scan: one micro-batch's activations, a program that does not grow with
  the number of micro-batches.
  """
  if loop not in LOOPS:
    raise ValueError(f'loop={loop!r}: expected one of {LOOPS}.')
  if loop == 'auto':
    return mesh.devices.flat[0].platform == 'cpu'
  return loop == 'unrolled'


def _unrolled_scan(body, carry, xs, count: int):
  """`lax.scan(body, carry, xs)[0]`, unrolled, one micro-batch at a time:
  the barrier ties micro-batch j's inputs to the sum after j − 1, so its
  forward pass cannot start before micro-batch j − 1 is done."""
  for j in range(count):
    x = jax.tree.map(lambda a: a[j], xs)  # pylint: disable=cell-var-from-loop
    x, carry = jax.lax.optimization_barrier((x, carry))
    carry, _ = body(carry, x)
  return carry


def make_micro_batch_gradients(model, config, mesh, contrastive_loss: Callable,
                               distort: Optional[Callable] = None,
                               loop: str = 'auto') -> Callable:
  """The pretrain step's gradient with `config.micro_batch_size` per device.

  Args:
    model: the SimCLR model (`apply(variables, images, train, mutable, rngs)`
      returning named outputs 'projection' and, if it has a supervised head,
      'logits').
    config: reads `micro_batch_size` and `weight_decay` (the supervised
      head's l2 term, as in the plain step).
    mesh: the 'data' mesh.
    contrastive_loss: `train.make_contrastive_loss(config, mesh)`,
      z [N, 2, d] -> (loss, metrics), sharded over 'data'.
    distort: None, or `(images, keys) -> images` applied to each micro-batch
      (color_augment='device'; the views' keys come in `batch['augment_key']`).
    loop: how pass 3 loops over the micro-batches (`unrolled_backward`).

  Returns:
    `gradients(state, batch, rng, *loss_args) -> (grads, (metrics,
    batch_stats))`, what `jax.grad(loss_fn, has_aux=True)` gives in the plain
    step: the metrics have the same names and the new BatchNorm statistics
    come back with them.
    `batch`: image [N, 2, H, W, 3], label [N] (and augment_key [N, 2, 2]),
    global arrays sharded over 'data'. `loss_args` follow z into
    `contrastive_loss` (with SimCLRv2's memory buffer: its queue and mask,
    negatives that carry no gradient).
  """
  micro = config.micro_batch_size
  unrolled = unrolled_backward(mesh, loop)
  head_metrics = (('supervised_loss', 'supervised_acc')
                  if model.has_supervised_head() else ())

  def forward(params, batch_stats, chunk, rng):
    """One micro-batch's 2m views through the network, BatchNorm over them."""
    images = chunk['image']
    if distort is not None:
      images = distort(images, chunk['augment_key'])
    images = images.reshape((2 * micro,) + images.shape[2:])
    outputs, new_vars = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': rng})
    return outputs, new_vars['batch_stats']

  def chunk_keys(rng, count):
    """One key per micro-batch, a function of its global index."""
    first = jax.lax.axis_index(AXIS) * count
    return jax.vmap(lambda j: jax.random.fold_in(rng, first + j))(
        jnp.arange(count))

  def project(params, batch_stats, batch, rng):
    """Pass 1 (per device): z [n, 2, d] and the new running statistics."""
    chunks = _split(batch, micro)
    count = chunks['image'].shape[0]

    def body(_, xs):
      chunk, key = xs
      outputs, stats = forward(params, batch_stats, chunk, key)
      return None, (outputs['projection'].reshape(micro, 2, -1), stats)

    _, (z, stats) = jax.lax.scan(body, None,
                                 (chunks, chunk_keys(rng, count)))
    return z.reshape((-1,) + z.shape[2:]), _mean_over_devices(stats)

  def backprop(params, batch_stats, batch, dz, rng):
    """Pass 3 (per device): Σ_j (∂z_j/∂θ)ᵀ g_j + the supervised head's."""
    chunks = _split(batch, micro)
    count = chunks['image'].shape[0]
    num_views = 2 * batch['image'].shape[0] * jax.lax.axis_size(AXIS)
    # This device's share of the gradient: varying over 'data', summed over
    # the devices once at the end, not once per micro-batch.
    params = jax.lax.pcast(params, AXIS, to='varying')

    def body(carry, xs):
      chunk, dz_chunk, key = xs
      labels = jnp.repeat(chunk['label'], 2)

      def share(p):
        outputs, _ = forward(p, batch_stats, chunk, key)
        z = outputs['projection'].reshape(micro, 2, -1)
        sums = {}
        if head_metrics:
          logits = outputs['logits']
          sums['supervised_loss'] = jnp.sum(
              optax.softmax_cross_entropy_with_integer_labels(
                  logits.astype(jnp.float32), labels)) / num_views
          sums['supervised_acc'] = jnp.sum(
              losses.topk_correct(logits, labels, 1)) / num_views
        sup = sums.get('supervised_loss', jnp.zeros((), jnp.float32))
        return (z, sup), sums

      (_, sup), pullback, sums = jax.vjp(share, params, has_aux=True)
      (grads,) = pullback((dz_chunk, jnp.ones_like(sup)))
      grads_sum, sums_total = carry
      return (jax.tree.map(jnp.add, grads_sum, grads),
              jax.tree.map(jnp.add, sums_total, sums)), None

    zero = jax.lax.pcast(jnp.zeros((), jnp.float32), AXIS, to='varying')
    init = (jax.tree.map(jnp.zeros_like, params),  # Varying, like params.
            {name: zero for name in head_metrics})
    xs = (chunks, _split(dz, micro), chunk_keys(rng, count))
    if unrolled:
      grads, sums = _unrolled_scan(body, init, xs, count)
    else:
      (grads, sums), _ = jax.lax.scan(body, init, xs)
    return jax.lax.psum((grads, sums), AXIS)

  rows, whole = P(AXIS), P()
  project = jax.shard_map(project, mesh=mesh,
                          in_specs=(whole, whole, rows, whole),
                          out_specs=(rows, whole))
  backprop = jax.shard_map(backprop, mesh=mesh,
                           in_specs=(whole, whole, rows, rows, whole),
                           out_specs=whole)

  def gradients(state, batch, rng, *loss_args):
    z, batch_stats = project(state.params, state.batch_stats, batch, rng)
    (con_loss, con_metrics), dz = jax.value_and_grad(
        contrastive_loss, has_aux=True)(z, *loss_args)
    grads, sums = backprop(state.params, state.batch_stats, batch, dz, rng)
    metrics = dict(contrastive_loss=con_loss, **con_metrics, **sums)
    loss = con_loss
    if 'supervised_loss' in sums:
      l2, l2_grads = jax.value_and_grad(optim.supervised_head_l2)(
          state.params, config.weight_decay)
      loss = loss + sums['supervised_loss'] + l2
      grads = jax.tree.map(jnp.add, grads, l2_grads)
    metrics['loss'] = loss
    return grads, (metrics, batch_stats)

  return gradients

