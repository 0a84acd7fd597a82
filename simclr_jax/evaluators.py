"""Evaluators run while pretraining: kNN monitor, few-shot ridge probe, linear head.

Each evaluator is a small object (big_vision style) with
  - `name` and `every_steps`, and `is_due(step)`,
  - `run(state)` yielding `(metric_name, float)` pairs, names already prefixed
    (`knn/top1`, `fewshot/5shot_top1`, `linear_head/top5`, ...),
built by `create_evaluators(config, feature_fn, ...)` from `config.evals`:

  config.evals.knn = dict(every_steps=1000, k=200, temperature=0.1)
  config.evals.fewshot = dict(every_steps=1000, shots=(1, 5, 10, 25))
  config.evals.linear_head = dict(every_steps=1000)

A key of `config.evals` names an evaluator; its `type` field (default: the key)
picks the class, so two kNN monitors on different banks can coexist
(`evals.knn_10pct = dict(type='knn', bank_split='train[:10%]', ...)`). An
evaluator with `every_steps <= 0` is built but never due. `default_config()`
returns every field with its default.

Data: features come from `feature_fn(state, images) -> [n, d]` (host-local
images in, the global batch's representations out; `train.make_feature_fn`)
applied to finite eval-style iterators (`{'image', 'label', 'mask'}` batches,
the padded rows have mask False) made by `data_fn(split)`; by default
`simclr_jax.data.pipeline.create_eval_iterator` on a copy of the config whose
`eval_split` is `split`. Tests pass fakes for both.

Sharding: every feature matrix is kept as a global `[T, B, d]` array (T eval
batches of global size B) sharded `P(None, 'data')`, i.e. each device keeps the
rows it computed and nothing is gathered to one device. The kNN monitor scores
all queries against each device's share of the bank, keeps that shard's top k,
and merges the candidates per query (`knn_predict_sharded`); it equals the
single-device computation (`knn_predict`) up to ties in similarity.

The pure math (`knn_predict`, `knn_predict_sharded`, `ridge_regression`,
`ridge_predict`, `select_few_shot`) is separate from the
plumbing so that it is tested against numpy directly.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from simclr_jax import losses
from simclr_jax import sharding as sharding_lib
from simclr_jax.sharding import DATA_AXIS
# Features are compared to numpy references and to each other across device
# counts; TPUs would otherwise multiply float32 in bf16 passes.
_PRECISION = jax.lax.Precision.HIGHEST

FeatureFn = Callable[[Any, np.ndarray], Any]
DataFn = Callable[[str], Iterable[dict]]


def default_config() -> ml_collections.ConfigDict:
  """`config.evals` with every evaluator and field at its default.

  every_steps: run when `step % every_steps == 0` (<= 0: never).
  knn: k neighbours, temperature tau of the vote weights exp(s/tau),
    bank_split (labelled features to search; '' = config.train_split),
    query_split ('' = config.eval_split).
  fewshot: shots per class, l2_reg (ridge lambda on l2-normalised, centred
    features), seed (which examples are the shots), train_split ('' =
    config.train_split), query_split ('' = config.eval_split).
  linear_head: query_split ('' = config.eval_split); top-1 and top-5 of the
    model's supervised (stop-gradient) head.
  """
  evals = ml_collections.ConfigDict()
  evals.knn = dict(every_steps=1000, k=200, temperature=0.1,
                   bank_split='', query_split='')
  evals.fewshot = dict(every_steps=1000, shots=(1, 5, 10, 25), l2_reg=0.1,
                       seed=0, train_split='', query_split='')
  evals.linear_head = dict(every_steps=1000, query_split='')
  return evals


# ----------------------------------------------------------------------------
# Pure math.
# ----------------------------------------------------------------------------


def _weighted_votes(top_sims, top_labels, *, temperature, num_classes):
  """InstDisc (Wu et al. 2018, §3.4) vote: score_c = Σ_{j in top-k, y_j=c} exp(s_j/τ).

  Computed as exp((s_j − 1)/τ): the same argmax (a common factor e^{−1/τ}, as
  cosine s ≤ 1) without float32 overflow at small τ. Masked-out candidates
  carry s = −inf and so weight 0.
  """
  weights = jnp.exp((top_sims - 1.0) / temperature)
  onehot = jax.nn.one_hot(top_labels, num_classes, dtype=weights.dtype)
  return jnp.einsum('qk,qkc->qc', weights, onehot, precision=_PRECISION)


def knn_predict(queries, bank, bank_labels, bank_mask=None, *, k, temperature,
                num_classes):
  """Weighted kNN class prediction on one device.

  queries: [q, d], bank: [n, d] (both l2-normalised, so x·y is the cosine),
  bank_labels: int [n], bank_mask: bool [n] (False rows are never neighbours).
  Returns int32 [q]: argmax_c Σ_{j ∈ top-k(s)} exp(s_j/τ)·[y_j = c].
  """
  sims = jnp.matmul(queries, bank.T, precision=_PRECISION)
  if bank_mask is not None:
    sims = jnp.where(bank_mask[None, :], sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, min(k, bank.shape[0]))
  votes = _weighted_votes(top_sims, bank_labels[top_idx],
                          temperature=temperature, num_classes=num_classes)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)


def knn_predict_sharded(mesh, queries, bank, bank_labels, bank_mask, *, k,
                        temperature, num_classes):
  """`knn_predict` with queries and bank sharded over the mesh's 'data' axis.

  queries: [Tq, B, d]; bank: [Tb, B', d], bank_labels/bank_mask: [Tb, B'];
  all sharded P(None, 'data') (the layout `extract_features` returns). Each
  device, for one query batch at a time (lax.map over Tq):
    1. all-gathers the batch's queries ([B, d]: O(B·d), not O(bank)),
    2. scores them against its own bank rows and keeps its top k' = min(k, n_local),
    3. sends every other device the candidates of that device's queries
       (all_to_all), so it holds D·k' candidates for each of its own queries,
    4. keeps the best k of those and votes as in `knn_predict`.
  The top k of the union of per-shard top k's is the global top k, so this
  equals the single-device result (up to ties). Returns int32 [Tq, B] sharded
  like the queries.
  """
  fn = _knn_sharded_fn(mesh, k, temperature, num_classes)
  return fn(queries, bank, bank_labels, bank_mask)


@functools.lru_cache(maxsize=None)
def _knn_sharded_fn(mesh, k, temperature, num_classes):
  """The jitted shard_map of knn_predict_sharded, built once per setting."""
  num_shards = mesh.shape[DATA_AXIS]

  def local(q_batches, bank_local, labels_local, mask_local):
    d = bank_local.shape[-1]
    bank_flat = bank_local.reshape(-1, d)
    labels_flat = labels_local.reshape(-1)
    mask_flat = mask_local.reshape(-1)
    k_local = min(k, bank_flat.shape[0])
    k_final = min(k, num_shards * k_local)

    def one_batch(q):  # q: [b, d], this device's queries of one batch.
      b = q.shape[0]
      q_all = jax.lax.all_gather(q, DATA_AXIS, tiled=True)  # [D·b, d]
      sims = jnp.matmul(q_all, bank_flat.T, precision=_PRECISION)
      sims = jnp.where(mask_flat[None, :], sims, -jnp.inf)
      top_sims, top_idx = jax.lax.top_k(sims, k_local)  # [D·b, k']
      top_labels = labels_flat[top_idx]
      # Row block i of the candidates belongs to device i's queries.
      top_sims = top_sims.reshape(num_shards, b, k_local)
      top_labels = top_labels.reshape(num_shards, b, k_local)
      top_sims = jax.lax.all_to_all(top_sims, DATA_AXIS, 0, 0)
      top_labels = jax.lax.all_to_all(top_labels, DATA_AXIS, 0, 0)
      # [D, b, k'] (source shard, my query, candidate) -> [b, D·k'].
      cand_sims = top_sims.transpose(1, 0, 2).reshape(b, -1)
      cand_labels = top_labels.transpose(1, 0, 2).reshape(b, -1)
      best_sims, best = jax.lax.top_k(cand_sims, k_final)
      best_labels = jnp.take_along_axis(cand_labels, best, axis=-1)
      votes = _weighted_votes(best_sims, best_labels, temperature=temperature,
                              num_classes=num_classes)
      return jnp.argmax(votes, axis=-1).astype(jnp.int32)

    return jax.lax.map(one_batch, q_batches)

  spec = P(None, DATA_AXIS)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4,
                               out_specs=spec))


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


# ----------------------------------------------------------------------------
# Features of a whole split, sharded.
# ----------------------------------------------------------------------------


class SplitFeatures(NamedTuple):
  """A split's features, [T, B, d], labels and mask [T, B]; P(None, 'data')."""
  features: jax.Array
  labels: jax.Array
  mask: jax.Array


def default_mesh() -> Mesh:
  """The training mesh: 'data' over every device of every host."""
  return sharding_lib.create_mesh()


def as_global(x, mesh: Mesh) -> jax.Array:
  """A batch-major array as a global jax.Array, rows split over 'data'.

  A non-fully-addressable jax.Array is already global (a multi-host
  feature_fn output) and is only resharded if needed; anything else is this
  host's rows, concatenated across hosts in process order like the images.
  """
  rows = sharding_lib.data_sharding(mesh)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_equivalent_to(rows, x.ndim):
      return x
    return jax.device_put(x, rows)
  if jax.process_count() == 1:
    return jax.device_put(x, rows)
  return sharding_lib.host_batch_to_global(np.asarray(x), mesh)


def _to_host(x) -> np.ndarray:
  """The global value of a (possibly multi-host) array, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def extract_features(state, feature_fn: FeatureFn, batches: Iterable[dict],
                     mesh: Mesh) -> SplitFeatures:
  """l2-normalised `feature_fn` outputs of every batch, stacked to [T, B, d]."""
  feats, labels, masks = [], [], []
  for batch in batches:
    f = as_global(feature_fn(state, batch['image']), mesh)
    feats.append(_normalize_rows(f.astype(jnp.float32)))
    labels.append(as_global(np.asarray(batch['label'], np.int32), mesh))
    mask = batch.get('mask')
    if mask is None:
      mask = np.ones(np.shape(batch['label']), bool)
    masks.append(as_global(np.asarray(mask, bool), mesh))
  if not feats:
    raise ValueError('The evaluation iterator yielded no batches.')
  stack = _stacker(NamedSharding(mesh, P(None, DATA_AXIS)))
  return SplitFeatures(stack(feats), stack(labels), stack(masks))


@jax.jit
def _normalize_rows(x):
  return losses.l2_normalize(x)


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
  # Stacking P('data') rows into P(None, 'data') keeps every row on its device.
  return jax.jit(lambda xs: jnp.stack(xs), out_shardings=sharding)


class FeatureCache:
  """Features per split for one train state, shared by the evaluators.

  The kNN bank and the few-shot pool are the same train split by default, so
  one forward pass over it serves both. Holds only the latest state's
  features; `clear()` frees them (run_evaluators does, after a round).
  """

  def __init__(self, feature_fn: FeatureFn, data_fn: DataFn, mesh: Mesh):
    self.feature_fn, self.data_fn, self.mesh = feature_fn, data_fn, mesh
    self._state = None
    self._features: dict[str, SplitFeatures] = {}

  def __call__(self, state, split: str) -> SplitFeatures:
    if state is not self._state:
      self.clear()
      self._state = state
    if split not in self._features:
      self._features[split] = extract_features(
          state, self.feature_fn, self.data_fn(split), self.mesh)
    return self._features[split]

  def clear(self):
    self._state, self._features = None, {}


# ----------------------------------------------------------------------------
# Evaluators.
# ----------------------------------------------------------------------------


class Evaluator:
  """Base: a name, a period in steps, and `run(state)` yielding (name, value)."""
  name: str = ''
  every_steps: int = 0

  def is_due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def run(self, state) -> Iterator[tuple[str, float]]:
    raise NotImplementedError


@jax.jit
def _masked_mean_correct(pred, labels, mask):
  return jnp.sum((pred == labels) & mask) / jnp.maximum(jnp.sum(mask), 1)


class KnnEvaluator(Evaluator):
  """kNN monitor: top-1 of the temperature-weighted k-NN vote (InstDisc)."""

  def __init__(self, name, features: FeatureCache, *, bank_split, query_split,
               num_classes, every_steps=0, k=200, temperature=0.1):
    self.name, self.features = name, features
    self.bank_split, self.query_split = bank_split, query_split
    self.num_classes, self.every_steps = num_classes, every_steps
    self.k, self.temperature = k, temperature

  def run(self, state):
    bank = self.features(state, self.bank_split)
    queries = self.features(state, self.query_split)
    pred = knn_predict_sharded(
        self.features.mesh, queries.features, bank.features, bank.labels,
        bank.mask, k=self.k, temperature=self.temperature,
        num_classes=self.num_classes)
    acc = _masked_mean_correct(pred, queries.labels, queries.mask)
    yield f'{self.name}/top1', float(_to_host(acc))


class FewShotEvaluator(Evaluator):
  """Closed-form ridge probe on `shots` train examples per class."""

  def __init__(self, name, features: FeatureCache, *, train_split,
               query_split, num_classes, every_steps=0, shots=(1, 5, 10, 25),
               l2_reg=0.1, seed=0):
    self.name, self.features = name, features
    self.train_split, self.query_split = train_split, query_split
    self.num_classes, self.every_steps = num_classes, every_steps
    self.shots, self.l2_reg, self.seed = tuple(shots), l2_reg, seed

  def run(self, state):
    pool = self.features(state, self.train_split)
    queries = self.features(state, self.query_split)
    labels = _to_host(pool.labels).reshape(-1)
    valid = _to_host(pool.mask).reshape(-1)
    for shots in self.shots:
      idx = select_few_shot(labels, valid, shots, num_classes=self.num_classes,
                            seed=self.seed)
      if idx.size < shots * self.num_classes:
        logging.warning('%s: only %d examples for %d shots x %d classes.',
                        self.name, idx.size, shots, self.num_classes)
      train_x = _row_gatherer(self.features.mesh)(pool.features,
                                                  jnp.asarray(idx))
      pred = _fewshot_predict(train_x, jnp.asarray(labels[idx]),
                              queries.features, num_classes=self.num_classes,
                              l2_reg=self.l2_reg)
      acc = _masked_mean_correct(pred, queries.labels, queries.mask)
      yield f'{self.name}/{shots}shot_top1', float(_to_host(acc))


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


@jax.jit
def _head_counts(logits, labels, mask):
  m = mask.astype(jnp.float32)
  # losses.topk_correct: a tie at the k-th place counts as correct, as
  # tf.math.in_top_k (the reference's top-k accuracy) counts it.
  return (jnp.sum(losses.topk_correct(logits, labels, 1) * m),
          jnp.sum(losses.topk_correct(logits, labels, 5) * m), jnp.sum(m))


class LinearHeadEvaluator(Evaluator):
  """Top-1/top-5 of the model's supervised logits over the query split."""

  def __init__(self, name, logits_fn, data_fn: DataFn, mesh: Mesh, *,
               query_split, every_steps=0):
    self.name, self.logits_fn, self.data_fn = name, logits_fn, data_fn
    self.mesh, self.query_split = mesh, query_split
    self.every_steps = every_steps

  def run(self, state):
    totals = None
    for batch in self.data_fn(self.query_split):
      logits = as_global(self.logits_fn(state, batch['image']), self.mesh)
      labels = as_global(np.asarray(batch['label'], np.int32), self.mesh)
      mask = batch.get('mask')
      if mask is None:
        mask = np.ones(np.shape(batch['label']), bool)
      counts = _head_counts(logits, labels,
                            as_global(np.asarray(mask, bool), self.mesh))
      totals = counts if totals is None else jax.tree.map(jnp.add, totals,
                                                          counts)
    if totals is None:
      raise ValueError('The evaluation iterator yielded no batches.')
    top1, top5, n = (float(_to_host(t)) for t in totals)
    yield f'{self.name}/top1', top1 / max(n, 1.0)
    yield f'{self.name}/top5', top5 / max(n, 1.0)


# ----------------------------------------------------------------------------
# Factory.
# ----------------------------------------------------------------------------

_TYPES = ('knn', 'fewshot', 'linear_head')


def _pipeline_data_fn(config) -> DataFn:
  """Eval-style iterators over any split: the config's eval iterator, re-split."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def data_fn(split):
    split_config = config.copy_and_resolve_references()
    split_config.eval_split = split
    return pipeline.create_eval_iterator(split_config)

  return data_fn


def create_evaluators(config, feature_fn: FeatureFn, *, logits_fn=None,
                      mesh: Mesh | None = None, data_fn: DataFn | None = None,
                      num_classes: int | None = None) -> list[Evaluator]:
  """Evaluators for every entry of `config.evals` (none if it has no `evals`).

  feature_fn(state, images) -> [n, d] representations (train.make_feature_fn).
  logits_fn(state, images) -> [n, classes] supervised logits; needed only by a
    linear_head entry.
  mesh: the training Mesh (default: all devices on one 'data' axis).
  data_fn(split) -> finite iterator of {'image', 'label', 'mask'} batches
    (default: the data pipeline's eval iterator on that split).
  num_classes: default `pipeline.num_classes(config)`.
  """
  evals = config.get('evals')
  if not evals:
    return []
  mesh = mesh or default_mesh()
  data_fn = data_fn or _pipeline_data_fn(config)
  if num_classes is None:
    from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    num_classes = pipeline.num_classes(config)
  cache = FeatureCache(feature_fn, data_fn, mesh)
  defaults = default_config()
  train_split = config.get('train_split', 'train')
  eval_split = config.get('eval_split', 'test')

  evaluators = []
  for name, entry in sorted(evals.items()):
    entry = dict(entry)
    kind = entry.pop('type', name)
    if kind not in _TYPES:
      raise ValueError(f'config.evals.{name}: unknown evaluator type {kind!r}; '
                       f'known: {_TYPES}.')
    unknown = set(entry) - set(defaults[kind])
    if unknown:
      raise ValueError(f'config.evals.{name}: unknown fields {sorted(unknown)};'
                       f' {kind} takes {sorted(defaults[kind])}.')
    opts = {**dict(defaults[kind]), **entry}
    query_split = opts.pop('query_split') or eval_split
    if kind == 'knn':
      evaluators.append(KnnEvaluator(
          name, cache, bank_split=opts.pop('bank_split') or train_split,
          query_split=query_split, num_classes=num_classes, **opts))
    elif kind == 'fewshot':
      evaluators.append(FewShotEvaluator(
          name, cache, train_split=opts.pop('train_split') or train_split,
          query_split=query_split, num_classes=num_classes, **opts))
    else:
      if logits_fn is None:
        raise ValueError(f'config.evals.{name} (linear_head) needs logits_fn, '
                         'the model\'s supervised logits.')
      evaluators.append(LinearHeadEvaluator(
          name, logits_fn, data_fn, mesh, query_split=query_split, **opts))
  return evaluators


def run_evaluators(evaluators: Sequence[Evaluator], state, step: int, *,
                   force: bool = False) -> dict[str, float]:
  """Runs the evaluators due at `step` (all if `force`); frees their features."""
  metrics = {}
  for evaluator in evaluators:
    if force or evaluator.is_due(step):
      metrics.update(evaluator.run(state))
  for evaluator in evaluators:
    cache = getattr(evaluator, 'features', None)
    if isinstance(cache, FeatureCache):
      cache.clear()
  return metrics
