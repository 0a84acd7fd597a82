"""What every evaluator shares: features of a split, their cache, the registry.

Each evaluator is a small class in its own module of this package
(big_vision style) with
  - `name` and `every_steps`, and `is_due(step)`,
  - `run(state)` yielding `(metric_name, float)` pairs, names already prefixed
    (`knn/top1`, `fewshot/5shot_top1`, `eval/top5`, ...),
  - a module-level `DEFAULTS` dict of its config fields,
and `create_evaluators(config, predict_fn, ...)` builds them from
`config.evals`:

  config.evals.knn = dict(every_steps=1000, k=200, temperature=0.1)
  config.evals.fewshot = dict(every_steps=1000, shots=(1, 5, 10, 25))
  config.evals.probe = dict(train_examples=4000, baselines=('raw_pixels',))

A key of `config.evals` names an evaluator; its `type` field (default: the
key) is the module that implements it, so two kNN monitors on different banks
can coexist (`evals.knn_10pct = dict(type='knn', bank_split='train[:10%]')`).
An evaluator with `every_steps <= 0` runs only at the end of training.

Data: `predict_fn(state, images)` maps host-local images to the model's named
outputs for the global batch (`representation`, `projection`, `logits`,
sharded on 'data'; `make_predict_fn`), applied to finite eval-style iterators
(`{'image', 'label', 'mask'}` batches, padded rows have mask False) made by
`data_fn(split)`. Tests pass fakes for both.

Sharding: every feature matrix is a global `[T, B, d]` array (T eval batches
of global size B) sharded `P(None, 'data')`: each device keeps the rows it
computed and nothing is gathered to one device.
"""
from __future__ import annotations

import functools
import importlib
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

# Features are compared to numpy references and across device counts; TPUs
# would otherwise multiply float32 in bf16 passes.
PRECISION = jax.lax.Precision.HIGHEST
# The evaluator modules of this package, by `type` name.
TYPES = ('knn', 'fewshot', 'linear_head', 'probe')
# The flattened images, for a probe on the raw pixels (no model involved).
PIXELS = 'pixels'

PredictFn = Callable[[Any, np.ndarray], dict]
DataFn = Callable[[str], Iterable[dict]]


def _module(kind: str):
  return importlib.import_module(f'simclr_jax.evaluators.{kind}')


def default_config() -> ml_collections.ConfigDict:
  """`config.evals` with every evaluator type and field at its default."""
  evals = ml_collections.ConfigDict()
  for kind in TYPES:
    evals[kind] = dict(_module(kind).DEFAULTS)
  return evals


class Evaluator:
  """Base: a name, a period in steps, and `run(state)` yielding (name, value)."""
  name: str = ''
  every_steps: int = 0

  def is_due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def run(self, state) -> Iterator[tuple[str, float]]:
    raise NotImplementedError


def with_baselines(evaluator, state, metric: str
                   ) -> Iterator[tuple[str, float]]:
  """`evaluator.accuracy` of the trained network as NAME/metric, then of the
  evaluator's `baselines`: the same network at initialisation
  (NAME/random_init_top1) and the raw pixels (NAME/raw_pixels_top1)."""
  name = evaluator.name
  yield f'{name}/{metric}', evaluator.accuracy(state, evaluator.output)
  if 'random_init' in evaluator.baselines:
    yield (f'{name}/random_init_top1',
           evaluator.accuracy(evaluator.random_state_fn(), evaluator.output))
  if 'raw_pixels' in evaluator.baselines:
    yield f'{name}/raw_pixels_top1', evaluator.accuracy(None, PIXELS)


# ----------------------------------------------------------------------------
# The model's outputs over a whole split, sharded.
# ----------------------------------------------------------------------------
def make_predict_fn(model, mesh: Mesh) -> PredictFn:
  """fn(state, host-local images) -> the model's named outputs, global.

  Inference mode; every output stays sharded on 'data' (each device keeps the
  rows it computed). The host batch must split evenly over local devices.
  """
  rows = sharding_lib.data_sharding(mesh)
  apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False),
                  in_shardings=(sharding_lib.replicated_sharding(mesh), rows),
                  out_shardings=rows)
  return lambda state, images: apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      sharding_lib.host_batch_to_global(images, mesh))


class SplitFeatures(NamedTuple):
  """A split's features, [T, B, d], labels and mask [T, B]; P(None, 'data')."""
  features: jax.Array
  labels: jax.Array
  mask: jax.Array


def as_global(x, mesh: Mesh) -> jax.Array:
  """A batch-major array as a global jax.Array, rows split over 'data'.

  A non-fully-addressable jax.Array is already global (a multi-host
  predict_fn output) and is only resharded if needed; anything else is this
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


def to_host(x) -> np.ndarray:
  """The global value of a (possibly multi-host) array, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def batch_mask(batch) -> np.ndarray:
  """The batch's `mask` (True = a real example), all True if it has none."""
  mask = batch.get('mask')
  if mask is None:
    mask = np.ones(np.shape(batch['label']), bool)
  return np.asarray(mask, bool)


def extract_features(state, predict_fn: PredictFn, batches: Iterable[dict],
                     mesh: Mesh, outputs: Sequence[str]
                     ) -> dict[str, SplitFeatures]:
  """The l2-normalised named `outputs` of every batch, stacked to [T, B, d].

  `PIXELS` is the flattened images themselves.
  """
  feats = {name: [] for name in outputs}
  labels, masks = [], []
  for batch in batches:
    model_outputs = {}
    if any(name != PIXELS for name in outputs):
      model_outputs = predict_fn(state, batch['image'])
    for name in outputs:
      if name == PIXELS:
        images = np.asarray(batch['image'], np.float32)
        value = images.reshape(images.shape[0], -1)
      else:
        value = model_outputs[name]
      feats[name].append(
          normalize_rows(as_global(value, mesh).astype(jnp.float32)))
    labels.append(as_global(np.asarray(batch['label'], np.int32), mesh))
    masks.append(as_global(batch_mask(batch), mesh))
  if not labels:
    raise ValueError('The evaluation iterator yielded no batches.')
  stack = _stacker(NamedSharding(mesh, P(None, DATA_AXIS)))
  labels, masks = stack(labels), stack(masks)
  return {name: SplitFeatures(stack(f), labels, masks)
          for name, f in feats.items()}


@jax.jit
def normalize_rows(x):
  return losses.l2_normalize(x)


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
  # Stacking P('data') rows into P(None, 'data') keeps every row on its device.
  return jax.jit(lambda xs: jnp.stack(xs), out_shardings=sharding)


class FeatureCache:
  """Features per (split, output) for one train state, shared by evaluators.

  The kNN bank and the few-shot pool are the same train split by default, so
  one forward pass over it serves both. `outputs` are the model outputs kept
  from each pass (what the evaluators ask for). Holds only the latest state's
  features; `clear()` frees them (run_evaluators does, after a round).
  """

  def __init__(self, predict_fn: PredictFn, data_fn: DataFn, mesh: Mesh,
               outputs: Sequence[str] = ('representation',)):
    self.predict_fn, self.data_fn, self.mesh = predict_fn, data_fn, mesh
    self.outputs = tuple(outputs)
    self._state = None
    self._features: dict[str, dict[str, SplitFeatures]] = {}

  def __call__(self, state, split: str, output: str) -> SplitFeatures:
    if state is not self._state:
      self.clear()
      self._state = state
    if split not in self._features:
      wanted = self.outputs if output in self.outputs else (output,)
      self._features[split] = extract_features(
          state, self.predict_fn, self.data_fn(split), self.mesh, wanted)
    elif output not in self._features[split]:
      self._features[split].update(extract_features(
          state, self.predict_fn, self.data_fn(split), self.mesh, (output,)))
    return self._features[split][output]

  def clear(self):
    self._state, self._features = None, {}


@jax.jit
def masked_mean_correct(pred, labels, mask):
  return jnp.sum((pred == labels) & mask) / jnp.maximum(jnp.sum(mask), 1)


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------
def evaluator_entries(config) -> list[tuple[str, str, dict]]:
  """(name, type, fields with defaults filled in) of each `config.evals` entry.

  Raises ValueError naming an unknown type or field (the config check runs
  this before anything compiles).
  """
  entries = []
  for name, entry in sorted(config.evals.items()):
    entry = dict(entry)
    kind = entry.pop('type', name)
    if kind not in TYPES:
      raise ValueError(f'config.evals.{name}: unknown evaluator type {kind!r}; '
                       f'known: {", ".join(TYPES)}.')
    defaults = _module(kind).DEFAULTS
    unknown = set(entry) - set(defaults)
    if unknown:
      raise ValueError(f'config.evals.{name}: unknown fields {sorted(unknown)};'
                       f' {kind} takes {sorted(defaults)}.')
    entries.append((name, kind, {**defaults, **entry}))
  return entries


def create_evaluators(config, predict_fn: PredictFn, *, mesh: Mesh,
                      num_classes: int, data_fn: DataFn,
                      random_state_fn: Callable[[], Any] | None = None,
                      extra: Sequence[tuple[str, str, dict]] = ()
                      ) -> list[Evaluator]:
  """Evaluators for every entry of `config.evals` (and `extra` entries).

  predict_fn(state, images) -> the model's named outputs (make_predict_fn).
  mesh: the training Mesh.
  num_classes: the dataset's classes.
  data_fn(split) -> finite iterator of {'image', 'label', 'mask'} batches
    (pipeline.Data.eval_batches).
  random_state_fn() -> the state at initialisation (for a probe baseline).
  extra: (name, type, fields) entries added by the caller, e.g. the top-1/5
    evaluation of the supervised head.
  """
  entries = evaluator_entries(config) + list(extra)
  if not entries:
    return []
  wanted = sorted({fields.get('output', 'representation')
                   for _, kind, fields in entries if kind != 'linear_head'})
  cache = FeatureCache(predict_fn, data_fn, mesh,
                       [o for o in wanted if o != PIXELS] or ['representation'])
  context = dict(cache=cache, config=config, num_classes=num_classes,
                 random_state_fn=random_state_fn)
  return [_module(kind).create(name, fields, **context)
          for name, kind, fields in entries]


def run_evaluators(evaluators: Sequence[Evaluator], state, step: int, *,
                   force: bool = False) -> dict[str, float]:
  """Runs the evaluators due at `step` (all if `force`); frees their features."""
  metrics = {}
  caches = []
  for evaluator in evaluators:
    if force or evaluator.is_due(step):
      metrics.update(evaluator.run(state))
    cache = getattr(evaluator, 'cache', None)
    if isinstance(cache, FeatureCache) and cache not in caches:
      caches.append(cache)
  for cache in caches:
    cache.clear()
  return metrics
