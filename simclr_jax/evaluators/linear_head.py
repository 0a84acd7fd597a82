"""Top-1 and top-5 of the model's supervised head over a split.

The one top-k evaluation of the package: the linear head trained on
stop-gradient features during pretraining, the linear-eval and fine-tuned
classifiers, and the supervised baseline all report through it (the train
loop adds one named `eval` every `config.eval_every_steps` and at the end).
A tie at the k-th place counts as correct, as tf.math.in_top_k (the
reference's top-k accuracy) counts it.
"""
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import losses
from simclr_jax.evaluators import common

# query_split: '' = config.eval_split.
DEFAULTS = dict(every_steps=1000, query_split='')


@jax.jit
def _head_counts(logits, labels, mask):
  m = mask.astype(jnp.float32)
  return (jnp.sum(losses.topk_correct(logits, labels, 1) * m),
          jnp.sum(losses.topk_correct(logits, labels, 5) * m), jnp.sum(m))


class LinearHeadEvaluator(common.Evaluator):
  """Top-1/top-5 of the model's supervised logits over the query split."""

  def __init__(self, name, predict_fn: common.PredictFn,
               data_fn: common.DataFn, mesh, *, query_split, every_steps=0):
    self.name, self.predict_fn, self.data_fn = name, predict_fn, data_fn
    self.mesh, self.query_split = mesh, query_split
    self.every_steps = every_steps

  def run(self, state):
    totals = None
    for batch in self.data_fn(self.query_split):
      logits = common.as_global(self.predict_fn(state, batch['image'])['logits'],
                                self.mesh)
      labels = common.as_global(np.asarray(batch['label'], np.int32),
                                self.mesh)
      mask = common.as_global(common.batch_mask(batch), self.mesh)
      counts = _head_counts(logits, labels, mask)
      totals = counts if totals is None else jax.tree.map(jnp.add, totals,
                                                          counts)
    if totals is None:
      raise ValueError('The evaluation iterator yielded no batches.')
    top1, top5, n = (float(common.to_host(t)) for t in totals)
    yield f'{self.name}/top1', top1 / max(n, 1.0)
    yield f'{self.name}/top5', top5 / max(n, 1.0)
    yield f'{self.name}/num_examples', n


def create(name, fields, *, cache, config, **_):
  return LinearHeadEvaluator(
      name, cache.predict_fn, cache.data_fn, cache.mesh,
      query_split=fields['query_split'] or config.eval_split,
      every_steps=fields['every_steps'])
