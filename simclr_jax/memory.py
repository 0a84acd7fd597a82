"""SimCLRv2's memory buffer: a momentum network and a queue of its projections.

SimCLRv2 (Chen et al., NeurIPS 2020, §2) takes MoCo's memory mechanism (He et
al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020): a memory network whose weights are a moving average of the
trained network's, whose projections are buffered and used as extra
negatives of the contrastive loss. The paper's settings: a 64K buffer and an
EMA decay of 0.999 (MoCo's values).

One train step with a buffer, in MoCo's order (its Algorithm 1):
  1. keys = momentum network's projections of both views (no gradient),
  2. NT-Xent of the online network with the queue as it was BEFORE this
     batch (so an image never meets its own memory entry),
  3. optimizer step of the online network,
  4. momentum network ← EMA(momentum network, updated online network),
  5. push the global batch's 2N keys (views of image i at 2i, 2i + 1).

The memory state is a dict that lives in the TrainState (replicated on every
device, saved in the checkpoint):
  params, batch_stats  the momentum network (the online network's variables
                       at initialisation; both moving averages after);
  queue    float32 [K, d]  keys as the loss compares them (l2-normalised
                           when config.hidden_norm, as MoCo's keys);
  pointer  int32 []        the slot the next key goes to;
  count    int32 []        filled slots, min(keys pushed, K): the first
                           `count` slots hold keys, the rest are masked.
"""
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from simclr_jax import losses


def init_memory(config, apply_fn: Callable, variables: Dict[str, Any],
                images: jax.Array) -> Dict[str, Any]:
  """The memory state at step 0, or {} when config.memory_buffer_size is 0.

  Args:
    config: memory_buffer_size (K).
    apply_fn: the model's apply, for the width d of its 'projection'.
    variables: the online network's {'params', 'batch_stats'}: the
      momentum network starts as a copy (MoCo).
    images: a dummy batch the model takes.
  """
  size = config.memory_buffer_size
  if not size:
    return {}
  projection = jax.eval_shape(
      lambda: apply_fn(variables, images, train=False))['projection']
  copy = lambda tree: jax.tree.map(jnp.array, tree)
  return {
      'params': copy(variables['params']),
      'batch_stats': copy(variables.get('batch_stats', {})),
      'queue': jnp.zeros((size, projection.shape[-1]), jnp.float32),
      'pointer': jnp.zeros((), jnp.int32),
      'count': jnp.zeros((), jnp.int32),
  }


def restart(memory: Dict[str, Any], params, batch_stats) -> Dict[str, Any]:
  """The memory of a run that starts from loaded weights (init_checkpoint):
  the momentum network becomes their copy; {} stays {}."""
  if not memory:
    return memory
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return dict(memory, params=copy(params), batch_stats=copy(batch_stats))


def valid_mask(memory: Dict[str, Any]) -> jax.Array:
  """bool [K]: the filled slots (the first `count`, as the ring fills 0..K-1)."""
  size = memory['queue'].shape[0]
  return jnp.arange(size, dtype=jnp.int32) < memory['count']


def loss_args(memory: Dict[str, Any]) -> Tuple[jax.Array, jax.Array]:
  """(queue [K, d], valid mask [K]): nt_xent_loss's memory and memory_mask."""
  return memory['queue'], valid_mask(memory)


def momentum_keys(apply_fn: Callable, memory: Dict[str, Any], images,
                  *, hidden_norm: bool, rngs) -> jax.Array:
  """[2N, d] float32 projections of the momentum network, no gradient.

  Run in training mode like the online network (BatchNorm normalises with
  the global batch's statistics, as MoCo's key encoder); the running
  statistics this pass computes are dropped: the momentum network's are the
  moving average of the online network's.
  """
  outputs, _ = apply_fn(
      {'params': memory['params'], 'batch_stats': memory['batch_stats']},
      images, train=True, mutable=['batch_stats'], rngs=rngs)
  keys = jax.lax.stop_gradient(outputs['projection'].astype(jnp.float32))
  return losses.l2_normalize(keys) if hidden_norm else keys


def advance(memory: Dict[str, Any], online_variables: Dict[str, Any],
            keys: jax.Array, momentum: float) -> Dict[str, Any]:
  """Steps 4 and 5: the EMA update, then the push of this batch's keys."""
  averaged = losses.ema_update(
      {'params': memory['params'], 'batch_stats': memory['batch_stats']},
      {'params': online_variables['params'],
       'batch_stats': online_variables.get('batch_stats', {})}, momentum)
  queue, pointer = losses.update_memory_queue(memory['queue'],
                                              memory['pointer'], keys)
  size = memory['queue'].shape[0]
  count = jnp.minimum(memory['count'] + keys.shape[0], size).astype(jnp.int32)
  return {**averaged, 'queue': queue, 'pointer': pointer, 'count': count}
