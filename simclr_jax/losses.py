"""Losses and metrics: NT-Xent (SimCLR), supervised cross-entropy, top-k.

All functions are pure. The contrastive loss follows the reference release
(google-research/simclr `tf2/objective.py`):

  h = l2_normalize(z)                              (if hidden_norm)
  for local anchor i with global index g = i + rank * n:
    ab = h1 · h2_allᵀ / τ        aa = h1 · h1_allᵀ / τ − 1e9 · onehot(g)
    ba = h2 · h1_allᵀ / τ        bb = h2 · h2_allᵀ / τ − 1e9 · onehot(g)
  loss = mean_i( CE(g, [ab | aa]) + CE(g, [ba | bb]) )

i.e. the sum of both directions, twice the paper's 1/(2N) form; the reference's
hyper-parameters (temperature, learning rate) assume this convention.
"""
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

# Subtracted from a logit to remove it from the softmax (reference LARGE_NUM):
# exp(x − 1e9) is exactly 0 in float32, and unlike −inf it never makes NaNs.
LARGE_NUM = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12
                 ) -> jax.Array:
  """x / sqrt(max(Σ x², ε)), as tf.math.l2_normalize (finite at x = 0)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, epsilon))


def nt_xent_loss(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float,
    hidden_norm: bool = True,
    axis_name: Optional[Any] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """NT-Xent contrastive loss of two views, reference convention.

  Args:
    z1: `[n, d]` projections of view 1 of the n local images.
    z2: `[n, d]` projections of view 2 of the same images, row for row.
    temperature: τ, the softmax temperature.
    hidden_norm: l2-normalise the projections first (cosine similarity).
    axis_name: None for a batch that is already global (single device, or a
      global array under `jax.jit`). Inside `shard_map`/`pmap`, the name of
      the data axis: negatives are `all_gather`ed over it (gradients flow back
      through the gather to the device that owns each row) and the labels are
      offset by `axis_index · n`. Each device then holds logits of shape
      `[n, 2N]` (N = n · axis size), never `[N, N]`.

  Returns:
    `(loss, logits_ab, labels)`:
      loss: scalar, mean over the *local* anchors of
        `CE(g, [ab|aa]) + CE(g, [ba|bb])`. With `axis_name`, the caller
        takes `jax.lax.pmean(loss, axis_name)`, which equals the
        single-device loss of the global batch (all shards have n rows).
      logits_ab: `[n, N]` float32 view-1-to-view-2 logits, for metrics.
      labels: `[n]` int32, the global index g of each local row, i.e. the
        column of its positive in `logits_ab`.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
        f"nt_xent_loss wants z1, z2 of the same shape [n, d]; got {z1.shape} "
        f"and {z2.shape}.")
  # float32 whatever the compute dtype: logits are dot products / τ and the
  # softmax over 2N terms is precision-sensitive.
  h1 = jnp.asarray(z1, jnp.float32)
  h2 = jnp.asarray(z2, jnp.float32)
  if hidden_norm:
    h1, h2 = l2_normalize(h1), l2_normalize(h2)
  n = h1.shape[0]

  if axis_name is None:
    h1_all, h2_all = h1, h2
    offset = 0
  else:
    # tiled: [D·n, d] in device order, so row g of the gather is device
    # g // n, local row g % n, matching labels = axis_index · n + i.
    h1_all = jax.lax.all_gather(h1, axis_name, tiled=True)
    h2_all = jax.lax.all_gather(h2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  n_global = h1_all.shape[0]
  labels = (offset + jnp.arange(n)).astype(jnp.int32)
  # −1e9 at the anchor's own column of aa / bb: a view is not its own negative.
  self_mask = jax.nn.one_hot(labels, n_global, dtype=jnp.float32) * LARGE_NUM

  logits_aa = h1 @ h1_all.T / temperature - self_mask
  logits_bb = h2 @ h2_all.T / temperature - self_mask
  logits_ab = h1 @ h2_all.T / temperature
  logits_ba = h2 @ h1_all.T / temperature

  # Per-device [n, 2N]: the positive of row i sits at column g of the ab (ba)
  # half; the aa (bb) half holds the 2N − 2 other negatives plus the masked
  # self-similarity.
  loss_a = optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate([logits_ab, logits_aa], axis=1), labels)
  loss_b = optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate([logits_ba, logits_bb], axis=1), labels)
  loss = jnp.mean(loss_a + loss_b)
  return loss, logits_ab, labels


def contrastive_metrics(logits_ab: jax.Array, labels: jax.Array
                        ) -> Dict[str, jax.Array]:
  """Metrics of the ab block (reference `tf2/metrics.py`).

  contrast_acc = mean_i [argmax_j ab_ij == g_i]
  contrast_entropy = −mean_i Σ_j p_ij log(p_ij + 1e-8),  p = softmax(ab).

  With a sharded loss these are local means; `pmean` them like the loss.
  """
  logits_ab = jnp.asarray(logits_ab, jnp.float32)
  acc = jnp.mean(
      (jnp.argmax(logits_ab, axis=-1) == labels).astype(jnp.float32))
  p = jax.nn.softmax(logits_ab, axis=-1)
  entropy = -jnp.mean(jnp.sum(p * jnp.log(p + 1e-8), axis=-1))
  return {"contrast_acc": acc, "contrast_entropy": entropy}


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mean_i −log softmax(logits_i)[labels_i], integer labels."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      jnp.asarray(logits, jnp.float32), labels))


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example float 1.0 if the label is among the top k logits, else 0.0.

  Rank form: correct iff fewer than k logits are strictly greater than the
  label's. Ties at the boundary count as correct, as tf.math.in_top_k. Kept
  per example so callers can mask padded rows before summing.
  """
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  num_greater = jnp.sum(logits > label_logit, axis=-1)
  return (num_greater < k).astype(jnp.float32)
