"""Few-shot probe: closed-form ridge regression on `shots` examples per class.

The ridge fit has an unpenalised bias and solves the smaller Gram matrix
(d×d or n×n); the shots are drawn from a seed alone and are nested (the 1-shot
example is among the 5 shots). Sharded: the chosen rows are assembled from
the devices that hold them (O(rows·d) traffic); the queries stay sharded.
"""
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from simclr_jax import sharding as sharding_lib
from simclr_jax.evaluators import common
from simclr_jax.sharding import DATA_AXIS

# shots per class; l2_reg: ridge λ on l2-normalised, centred features; seed:
# which examples are the shots; train_split ('' = config.train_split),
# query_split ('' = config.eval_split); output: the model output probed.
DEFAULTS = dict(every_steps=1000, shots=(1, 5, 10, 25), l2_reg=0.1, seed=0,
                train_split='', query_split='', output='representation')
_PRECISION = common.PRECISION


def ridge_regression(x, y, l2_reg):
  """Closed-form ridge with an unpenalised bias.

  Minimises ‖X W + 1 bᵀ − Y‖² + λ‖W‖² for x: [n, d], y: [n, c]:
    W = (X̄ᵀX̄ + λI)⁻¹ X̄ᵀȲ  = X̄ᵀ(X̄X̄ᵀ + λI)⁻¹ Ȳ   (X̄, Ȳ centred),
    b = mean(Y) − mean(X) W.
  The two forms are equal (push-through identity); the smaller Gram matrix
  (d×d or n×n) is solved, so 25 shots × 1000 classes at d=2048 costs a
  2048² solve. Returns (W [d, c], b [c]).
  """
  x_mean = jnp.mean(x, axis=0)
  y_mean = jnp.mean(y, axis=0)
  xc, yc = x - x_mean, y - y_mean
  n, d = x.shape
  if n >= d:
    gram = jnp.matmul(xc.T, xc, precision=_PRECISION) + l2_reg * jnp.eye(d)
    rhs = jnp.matmul(xc.T, yc, precision=_PRECISION)
    w = jax.scipy.linalg.solve(gram, rhs, assume_a='pos')
  else:
    gram = jnp.matmul(xc, xc.T, precision=_PRECISION) + l2_reg * jnp.eye(n)
    alpha = jax.scipy.linalg.solve(gram, yc, assume_a='pos')
    w = jnp.matmul(xc.T, alpha, precision=_PRECISION)
  b = y_mean - jnp.matmul(x_mean, w, precision=_PRECISION)
  return w, b


def ridge_predict(train_x, train_labels, eval_x, *, num_classes, l2_reg):
  """Few-shot probe: ridge to one-hot targets, then argmax of the eval scores."""
  y = jax.nn.one_hot(train_labels, num_classes, dtype=train_x.dtype)
  w, b = ridge_regression(train_x, y, l2_reg)
  scores = jnp.matmul(eval_x, w, precision=_PRECISION) + b
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def select_few_shot(labels, valid, shots, *, num_classes, seed):
  """Indices of `shots` examples per class, drawn from `seed` alone.

  labels, valid: [N] host arrays (valid False = padding). For each class, in
  order, a seeded permutation of its valid indices; its first `shots` are
  taken, so the draws are nested (the 1-shot example is among the 5 shots).
  A class with fewer examples gives all it has. Returns sorted int64 indices.
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels).reshape(-1)
  valid = np.asarray(valid, bool).reshape(-1)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(valid & (labels == c))
    chosen.append(rng.permutation(members)[:shots])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


class FewShotEvaluator(common.Evaluator):
  """Closed-form ridge probe on `shots` train examples per class."""

  def __init__(self, name, cache: common.FeatureCache, *, train_split,
               query_split, num_classes, every_steps=0, shots=(1, 5, 10, 25),
               l2_reg=0.1, seed=0, output='representation'):
    self.name, self.cache = name, cache
    self.train_split, self.query_split = train_split, query_split
    self.num_classes, self.every_steps = num_classes, every_steps
    self.shots, self.l2_reg, self.seed = tuple(shots), l2_reg, seed
    self.output = output

  def run(self, state):
    pool = self.cache(state, self.train_split, self.output)
    queries = self.cache(state, self.query_split, self.output)
    labels = common.to_host(pool.labels).reshape(-1)
    valid = common.to_host(pool.mask).reshape(-1)
    for shots in self.shots:
      idx = select_few_shot(labels, valid, shots, num_classes=self.num_classes,
                            seed=self.seed)
      if idx.size < shots * self.num_classes:
        logging.warning('%s: only %d examples for %d shots x %d classes.',
                        self.name, idx.size, shots, self.num_classes)
      replicated = sharding_lib.replicated_sharding(self.cache.mesh)
      train_x = _row_gatherer(self.cache.mesh)(
          pool.features, jax.device_put(idx, replicated))
      pred = _fewshot_predict(train_x, jax.device_put(labels[idx], replicated),
                              queries.features, num_classes=self.num_classes,
                              l2_reg=self.l2_reg)
      acc = common.masked_mean_correct(pred, queries.labels, queries.mask)
      yield f'{self.name}/{shots}shot_top1', float(common.to_host(acc))


@functools.lru_cache(maxsize=None)
def _row_gatherer(mesh):
  """Rows of a [T, B, d] P(None, 'data') array by flat index t·B + j.

  Each device contributes the requested rows it holds (zeros elsewhere) and a
  psum over 'data' assembles them, replicated: O(rows·d) traffic, and no
  reshape of the sharded axis (which Explicit-axis meshes reject).
  """
  def local(a, idx):
    t_count, b_local, _ = a.shape
    b_global = b_local * jax.lax.psum(1, DATA_AXIS)
    t, j = idx // b_global, idx % b_global
    mine = j // b_local == jax.lax.axis_index(DATA_AXIS)
    rows = a[jnp.clip(t, 0, t_count - 1), j % b_local]
    return jax.lax.psum(jnp.where(mine[:, None], rows, 0), DATA_AXIS)

  return jax.jit(jax.shard_map(local, mesh=mesh,
                               in_specs=(P(None, DATA_AXIS), P()),
                               out_specs=P(), check_vma=False))


@functools.partial(jax.jit, static_argnames=('num_classes', 'l2_reg'))
def _fewshot_predict(train_x, train_labels, query_feats, *, num_classes,
                     l2_reg):
  """ridge_predict with [T, B, d] queries (kept 3-D: B is the sharded axis)."""
  y = jax.nn.one_hot(train_labels, num_classes, dtype=train_x.dtype)
  w, b = ridge_regression(train_x, y, l2_reg)
  scores = jnp.einsum('tbd,dc->tbc', query_feats, w, precision=_PRECISION)
  return jnp.argmax(scores + b, axis=-1).astype(jnp.int32)


def create(name, fields, *, cache, config, num_classes, **_):
  fields = dict(fields)
  return FewShotEvaluator(
      name, cache, train_split=fields.pop('train_split') or config.train_split,
      query_split=fields.pop('query_split') or config.eval_split,
      num_classes=num_classes, **fields)
