"""Linear probe on frozen features: ridge regression, λ chosen on held-out data.

The probe fits a ridge classifier (fewshot.ridge_predict) on the l2-normalised
features of `train_examples` train images (eval preprocessing: no
augmentation) and reports its top-1 on the query split. λ is picked from
`L2_GRID` on a tenth of the train features held out, then refitted on all of
them. A closed-form stand-in for the paper's linear evaluation that takes
seconds, for small datasets (the features of the train subset are gathered
to the host).

`baselines` adds the same probe on reference points, reported beside it:
  'random_init': the same network at its initialisation;
  'raw_pixels': the flattened images themselves (no network).
"""
import jax
import numpy as np

from simclr_jax.evaluators import common
from simclr_jax.evaluators import fewshot

# every_steps <= 0: at the end of training only. train_split ('' =
# config.train_split), the first train_examples of it (0: all), query_split
# ('' = config.eval_split); output: the model output probed
# ('representation' = h, 'projection' = z).
DEFAULTS = dict(every_steps=0, train_split='', train_examples=0,
                query_split='', output='representation', baselines=())
BASELINES = ('random_init', 'raw_pixels')
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _host_rows(features: common.SplitFeatures, limit=0):
  """(x [n, d], y [n]) of the unmasked rows, in split order, on the host."""
  x, y, m = (common.to_host(a) for a in features)
  x, y, m = x.reshape(-1, x.shape[-1]), y.reshape(-1), m.reshape(-1)
  x, y = x[m], y[m]
  return (x[:limit], y[:limit]) if limit else (x, y)


def probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes) -> float:
  """Test top-1 of ridge on (train_x, train_y), λ from L2_GRID on held-out."""
  def accuracy(fit_x, fit_y, x, y, l2):
    pred = fewshot.ridge_predict(
        jax.device_put(fit_x), jax.device_put(fit_y), jax.device_put(x),
        num_classes=num_classes, l2_reg=l2)
    return float(np.mean(np.asarray(jax.device_get(pred)) == y))

  held = len(train_x) // 10
  best_l2 = max(L2_GRID, key=lambda l2: accuracy(
      train_x[held:], train_y[held:], train_x[:held], train_y[:held], l2))
  return accuracy(train_x, train_y, test_x, test_y, best_l2)


class LinearProbeEvaluator(common.Evaluator):
  """Ridge probe on frozen features of the train split, top-1 on the queries."""

  def __init__(self, name, cache: common.FeatureCache, *, train_split,
               query_split, num_classes, train_examples=0, every_steps=0,
               output='representation', baselines=(), random_state_fn=None):
    unknown = set(baselines) - set(BASELINES)
    if unknown:
      raise ValueError(f'config.evals.{name}.baselines: unknown '
                       f'{sorted(unknown)}; allowed: {", ".join(BASELINES)}.')
    if 'random_init' in baselines and random_state_fn is None:
      raise ValueError(f'config.evals.{name}: the random_init baseline needs '
                       'random_state_fn.')
    self.name, self.cache = name, cache
    # Read only the examples the probe uses.
    self.train_split = (f'{train_split}[:{train_examples}]'
                        if train_examples and '[' not in train_split
                        else train_split)
    self.train_examples = train_examples
    self.query_split, self.num_classes = query_split, num_classes
    self.every_steps, self.output = every_steps, output
    self.baselines, self.random_state_fn = tuple(baselines), random_state_fn

  def accuracy(self, state, output: str) -> float:
    train_x, train_y = _host_rows(
        self.cache(state, self.train_split, output), self.train_examples)
    test_x, test_y = _host_rows(self.cache(state, self.query_split, output))
    return probe_accuracy(train_x, train_y, test_x, test_y,
                          num_classes=self.num_classes)

  def run(self, state):
    return common.with_baselines(self, state, 'pretrained_top1')


def create(name, fields, *, cache, config, num_classes, random_state_fn=None,
           **_):
  fields = dict(fields)
  return LinearProbeEvaluator(
      name, cache, train_split=fields.pop('train_split') or config.train_split,
      query_split=fields.pop('query_split') or config.eval_split,
      num_classes=num_classes, random_state_fn=random_state_fn, **fields)
