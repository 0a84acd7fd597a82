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

SimCLRv2 (Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised
Learners", NeurIPS 2020) adds two things its reference release does not
contain, written here from the paper and from MoCo (He et al., "Momentum
Contrast for Unsupervised Visual Representation Learning", CVPR 2020):
  * a memory buffer: `nt_xent_loss(..., memory=...)` takes the projections of
    a momentum (EMA) copy of the network as extra negatives, kept in a FIFO
    ring buffer by `update_memory_queue`, the copy updated by `ema_update`;
  * distillation: `distillation_loss`, the paper's Eq. (2), and
    `distillation_loss_with_labels`, its weighted combination with the
    labeled cross-entropy.
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
    memory: Optional[jax.Array] = None,
    memory_mask: Optional[jax.Array] = None,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """NT-Xent contrastive loss of two views, reference convention.

  With `memory` (SimCLRv2's memory buffer), each anchor's softmax is over
  [its positive, the 2N − 2 other in-batch views, the K memory entries]:
    am = h1 · memᵀ / τ      bm = h2 · memᵀ / τ
    loss = mean_i( CE(g, [ab | aa | am]) + CE(g, [ba | bb | bm]) )
  The memory entries are negatives for the anchors of both views and never
  positives: the caller pushes the current batch's momentum projections into
  the queue *after* computing the loss (as MoCo does), so an image never meets
  its own memory entry in the same step.

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
    memory: None (SimCLR v1), or `[K, d]` projections of the momentum network
      from earlier steps, in the same space as z1, z2: with `hidden_norm`
      they are l2-normalised here exactly like the batch (so the queue may
      hold raw or normalised projections; the result is the same up to
      rounding). They are constants (`stop_gradient`). With `axis_name` the
      same queue is replicated on every device (`in_specs=P()`): each device
      computes only its `[n, K]` memory block, so its logits are
      `[n, 2N + K]`, never `[N, 2N + K]`. K = 0 gives the v1 loss.
    memory_mask: optional `[K]` bool, False for entries to leave out of the
      softmax (a queue not yet filled: its valid entries are the first
      `min(pushed, K)` slots when the pointer starts at 0).

  Returns:
    `(loss, logits_ab, labels)`:
      loss: scalar, mean over the *local* anchors of
        `CE(g, [ab|aa]) + CE(g, [ba|bb])` (`[ab|aa|am]`, `[ba|bb|bm]` with
        a memory). With `axis_name`, the caller
        takes `jax.lax.pmean(loss, axis_name)`, which equals the
        single-device loss of the global batch (all shards have n rows).
      logits_ab: `[n, N]` float32 view-1-to-view-2 logits, for metrics (the
        memory block is not part of them, as the reference's metrics).
      labels: `[n]` int32, the global index g of each local row, i.e. the
        column of its positive in `logits_ab`.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
        f"nt_xent_loss wants z1, z2 of the same shape [n, d]; got {z1.shape} "
        f"and {z2.shape}.")
  if memory is not None and (
      memory.ndim != 2 or memory.shape[1] != z1.shape[1]):
    raise ValueError(
        f"nt_xent_loss wants memory of shape [K, {z1.shape[1]}]; got "
        f"{memory.shape}.")
  if memory_mask is not None and (
      memory is None or memory_mask.shape != memory.shape[:1]):
    raise ValueError(
        f"nt_xent_loss wants memory_mask of shape [K] with a memory [K, d]; "
        f"got {memory_mask.shape} and "
        f"{None if memory is None else memory.shape}.")
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

  # Per-device [n, 2N] (+ K): the positive of row i sits at column g of the
  # ab (ba) block; the aa (bb) block holds the 2N − 2 other negatives plus the
  # masked self-similarity; the memory block, if any, K more negatives.
  blocks_a = [logits_ab, logits_aa]
  blocks_b = [logits_ba, logits_bb]
  if memory is not None:
    logits_am, logits_bm = _memory_logits(
        h1, h2, memory, memory_mask, temperature=temperature,
        hidden_norm=hidden_norm)
    blocks_a.append(logits_am)
    blocks_b.append(logits_bm)
  loss_a = optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate(blocks_a, axis=1), labels)
  loss_b = optax.softmax_cross_entropy_with_integer_labels(
      jnp.concatenate(blocks_b, axis=1), labels)
  loss = jnp.mean(loss_a + loss_b)
  return loss, logits_ab, labels


def _memory_logits(h1, h2, memory, memory_mask, *, temperature, hidden_norm):
  """The [n, K] blocks h1·memᵀ/τ and h2·memᵀ/τ, masked entries at −1e9."""
  mem = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))
  if hidden_norm:
    mem = l2_normalize(mem)
  logits_am = h1 @ mem.T / temperature
  logits_bm = h2 @ mem.T / temperature
  if memory_mask is not None:
    left_out = (1.0 - jnp.asarray(memory_mask, jnp.float32)) * LARGE_NUM
    logits_am, logits_bm = logits_am - left_out, logits_bm - left_out
  return logits_am, logits_bm


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


# --- SimCLRv2: memory buffer ------------------------------------------------

def update_memory_queue(queue: jax.Array, pointer: jax.Array, keys: jax.Array
                        ) -> Tuple[jax.Array, jax.Array]:
  """Pushes `keys` into a FIFO ring buffer of the K most recent entries.

  MoCo's queue (He et al. 2020, Algorithm 1 "enqueue / dequeue"): key j of
  the batch goes to slot `(pointer + j) mod K`, overwriting the oldest entry,
  and the pointer moves to `(pointer + M) mod K`. Unlike MoCo's reference,
  K need not be a multiple of M, and M > K keeps only the last K keys (as
  pushing them one by one would). Pure and jittable: M and K are static.

  Args:
    queue: `[K, d]`; start from zeros with pointer 0, then the filled slots
      after `T` pushed keys are exactly the first `min(T, K)`.
    pointer: int32 scalar in [0, K), the slot the next key goes to (= the
      oldest entry once the queue is full).
    keys: `[M, d]` in push order. With a sharded batch pass the global batch
      (under `jax.jit` on global arrays; inside `shard_map`,
      `all_gather(keys, axis, tiled=True, to="invarying")`, which lets the
      queue leave with `out_specs=P()`) so every device's replica of the
      queue stays equal to the single-device one. Stored as constants
      (`stop_gradient`).

  Returns:
    `(new_queue, new_pointer)`.
  """
  if queue.ndim != 2 or keys.ndim != 2 or keys.shape[1] != queue.shape[1]:
    raise ValueError(
        f"update_memory_queue wants queue [K, d] and keys [M, d]; got "
        f"{queue.shape} and {keys.shape}.")
  size, num_keys = queue.shape[0], keys.shape[0]
  pointer = jnp.asarray(pointer, jnp.int32)
  if size == 0 or num_keys == 0:
    return queue, pointer
  kept = min(num_keys, size)
  # Only the last `kept` keys survive; they land where one-by-one pushes put
  # them, all in distinct slots since kept ≤ K.
  slots = (pointer + (num_keys - kept) + jnp.arange(kept, dtype=jnp.int32)
           ) % size
  tail = jax.lax.stop_gradient(keys[num_keys - kept:]).astype(queue.dtype)
  new_queue = queue.at[slots].set(tail, unique_indices=True)
  new_pointer = (pointer + num_keys % size) % size
  return new_queue, new_pointer


def ema_update(target_tree: Any, online_tree: Any, momentum: Any) -> Any:
  """θ_t ← m·θ_t + (1 − m)·θ_o for every leaf (MoCo's Eq. 2).

  The momentum ("memory") network of SimCLRv2 is a moving average of the
  online network's weights; apply this to the parameters and to the
  BatchNorm statistics alike. Pure: returns the new target tree, each leaf in
  its own dtype. `momentum` may be a traced scalar (a schedule).

  Args:
    target_tree: the EMA copy θ_t (a pytree of float arrays).
    online_tree: the trained network θ_o, the same structure.
    momentum: m in [0, 1]; m = 1 keeps θ_t, m = 0 copies θ_o. SimCLRv2 and
      MoCo use 0.999.
  """
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"ema_update wants momentum in [0, 1]; got {momentum}.")

  def leaf(target, online):
    target, online = jnp.asarray(target), jnp.asarray(online)
    if not jnp.issubdtype(target.dtype, jnp.inexact):
      raise TypeError(
          f"ema_update averages float leaves only; got {target.dtype}.")
    # Mixed in at least float32, so a bf16 leaf does not round twice.
    dtype = jnp.promote_types(target.dtype, jnp.float32)
    mixed = (momentum * target.astype(dtype)
             + (1.0 - momentum) * online.astype(dtype))
    return mixed.astype(target.dtype)

  return jax.tree.map(leaf, target_tree, online_tree)


# --- SimCLRv2: distillation ---------------------------------------------------

def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      *, temperature: float) -> jax.Array:
  """SimCLRv2's distillation loss (Eq. 2), mean over the examples:

    L = −mean_x Σ_y P_T(y|x; τ) log P_S(y|x; τ),
    P(y|x; τ) = exp(f(x)[y]/τ) / Σ_y' exp(f(x)[y']/τ)

  with the same τ for teacher and student. The teacher is fixed: its logits
  pass through `stop_gradient` here, so ∂L/∂teacher = 0 and
  ∂L/∂student_logits = (P_S − P_T) / (τ · B) for a batch of B. Computed in
  float32 whatever the input dtype.

  The paper's Eq. (2) has no τ² factor; the reference release's distillation
  colab multiplies by τ² (Hinton et al. 2015's gradient-scale correction).
  The two agree at τ = 1 (the big-to-small setting) and differ by 100× at
  SimCLRv2's self-distillation τ = 0.1; LARS's trust ratio makes the layer
  updates largely independent of that scale, not the excluded parameters'.

  Args:
    student_logits: `[B, C]` f_task(x) of the student.
    teacher_logits: `[B, C]` of the frozen teacher on the same images.
    temperature: τ (SimCLRv2: 0.1 for self-distillation, 1.0 big-to-small).
  """
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(
        f"distillation_loss wants student and teacher logits of the same "
        f"shape [B, C]; got {student_logits.shape} and "
        f"{teacher_logits.shape}.")
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  student = jnp.asarray(student_logits, jnp.float32)
  teacher_probs = jax.nn.softmax(teacher / temperature, axis=-1)
  return jnp.mean(optax.softmax_cross_entropy(student / temperature,
                                              teacher_probs))


def distillation_loss_with_labels(
    student_logits: jax.Array, teacher_logits: jax.Array,
    labeled_student_logits: jax.Array, labels: jax.Array, *,
    temperature: float, alpha: float) -> jax.Array:
  """SimCLRv2's Eq. (3): the distillation loss plus the labeled cross-entropy.

    L = −(1 − α) mean_{(x, y) ∈ D^L} log P_S(y|x)
        − α mean_{x ∈ D} Σ_y P_T(y|x; τ) log P_S(y|x; τ)

  The paper writes sums over the labeled set D^L and the whole set D; per
  batch both are means over their examples. The labeled term is at τ = 1.
  α = 1 is the distillation-only loss the paper uses throughout; the paper
  adds the labels "when the number of labeled examples is significant".

  Args:
    student_logits, teacher_logits: `[B, C]` on (unlabeled) images of D.
    labeled_student_logits: `[B_L, C]` of the student on labeled images.
    labels: `[B_L]` int class indices.
    temperature: τ of the distillation term.
    alpha: α in [0, 1], the weight of the distillation term.
  """
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distillation alpha must be in [0, 1]; got {alpha}.")
  distill = distillation_loss(student_logits, teacher_logits,
                              temperature=temperature)
  labeled = softmax_cross_entropy(labeled_student_logits, labels)
  return (1.0 - alpha) * labeled + alpha * distill
