"""kNN monitor: top-1 of the temperature-weighted k-NN vote (InstDisc).

Each query's label is argmax_c Σ_{j ∈ top-k(s)} exp(s_j/τ)·[y_j = c] over the
cosine similarities s to a labelled bank (Wu et al. 2018, §3.4). Sharded:
`knn_predict_sharded` scores all queries against each device's share of the
bank, keeps that shard's top k and merges the candidates per query; it equals
the single-device `knn_predict` up to ties in similarity.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simclr_jax.evaluators import common
from simclr_jax.sharding import DATA_AXIS

# every_steps: run when step % every_steps == 0 (<= 0: at the end only);
# k neighbours, temperature τ of the vote weights exp(s/τ); bank_split
# (labelled features to search; '' = config.train_split), query_split
# ('' = config.eval_split); output: the model output compared; baselines:
# the same kNN on the network at initialisation ('random_init') and on the
# flattened images ('raw_pixels'), as for the linear probe.
DEFAULTS = dict(every_steps=1000, k=200, temperature=0.1, bank_split='',
                query_split='', output='representation', baselines=())
BASELINES = ('random_init', 'raw_pixels')
_PRECISION = common.PRECISION


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


class KnnEvaluator(common.Evaluator):
  """kNN monitor: top-1 of the temperature-weighted k-NN vote."""

  def __init__(self, name, cache: common.FeatureCache, *, bank_split,
               query_split, num_classes, every_steps=0, k=200,
               temperature=0.1, output='representation', baselines=(),
               random_state_fn=None):
    unknown = set(baselines) - set(BASELINES)
    if unknown:
      raise ValueError(f'config.evals.{name}.baselines: unknown '
                       f'{sorted(unknown)}; allowed: {", ".join(BASELINES)}.')
    if 'random_init' in baselines and random_state_fn is None:
      raise ValueError(f'config.evals.{name}: the random_init baseline needs '
                       'random_state_fn.')
    self.name, self.cache = name, cache
    self.bank_split, self.query_split = bank_split, query_split
    self.num_classes, self.every_steps = num_classes, every_steps
    self.k, self.temperature, self.output = k, temperature, output
    self.baselines, self.random_state_fn = tuple(baselines), random_state_fn

  def accuracy(self, state, output: str) -> float:
    bank = self.cache(state, self.bank_split, output)
    queries = self.cache(state, self.query_split, output)
    pred = knn_predict_sharded(
        self.cache.mesh, queries.features, bank.features, bank.labels,
        bank.mask, k=self.k, temperature=self.temperature,
        num_classes=self.num_classes)
    acc = common.masked_mean_correct(pred, queries.labels, queries.mask)
    return float(common.to_host(acc))

  def run(self, state):
    return common.with_baselines(self, state, 'top1')


def create(name, fields, *, cache, config, num_classes, random_state_fn=None,
           **_):
  fields = dict(fields)
  return KnnEvaluator(
      name, cache, bank_split=fields.pop('bank_split') or config.train_split,
      query_split=fields.pop('query_split') or config.eval_split,
      num_classes=num_classes, random_state_fn=random_state_fn, **fields)
