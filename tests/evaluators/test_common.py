"""evaluators/common.py and the evaluators end to end: a fake linear model on
fake data, against single-device numpy computations written here.

The sharded paths run on the 8 fake CPU devices that conftest.py sets up.
"""
import jax
import ml_collections
import numpy as np
import pytest

from simclr_jax import evaluators
from simclr_jax.evaluators import common

from conftest import small_config
from test_fewshot import np_ridge
from test_fewshot import np_select
from test_knn import make_mesh
from test_knn import MESH_TYPES
from test_knn import np_knn
from test_knn import np_normalize
from test_knn import NUM_CLASSES


# ---------------------------------------------------------------------------
# Evaluators end to end, with a fake model and fake data.
# ---------------------------------------------------------------------------

IMG = (2, 2, 3)  # Tiny "images": 12 numbers each.
BATCH = 16


class FakeData:
  """Eval-style batches per split, the last one padded; counts passes."""

  def __init__(self, seed=5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_CLASSES, int(np.prod(IMG))))
    self.splits = {}
    for split, n in [('train', 70), ('test', 37)]:
      labels = rng.integers(0, NUM_CLASSES, size=n)
      x = centres[labels] + 1.2 * rng.normal(size=(n, centres.shape[1]))
      self.splits[split] = (x.reshape((n,) + IMG).astype(np.float32), labels)
    self.batches_served = 0

  def __call__(self, split):
    name, _, first = split.partition('[:')  # 'train' or 'train[:N]'.
    images, labels = self.splits[name]
    if first:
      images, labels = images[:int(first[:-1])], labels[:int(first[:-1])]
    n = len(labels)
    for start in range(0, n, BATCH):
      img = np.zeros((BATCH,) + IMG, np.float32)
      lab = np.zeros((BATCH,), np.int32)
      mask = np.zeros((BATCH,), bool)
      m = min(BATCH, n - start)
      img[:m], lab[:m], mask[:m] = images[start:start + m], labels[start:start +
                                                                   m], True
      self.batches_served += 1
      yield {'image': img, 'label': lab, 'mask': mask}


def fake_state(seed=6):
  rng = np.random.default_rng(seed)
  return {'w': jax.device_put(rng.normal(size=(12, 10)).astype(np.float32)),
          'head': jax.device_put(
              rng.normal(size=(12, NUM_CLASSES)).astype(np.float32))}


def predict_fn(state, images):
  """A linear 'model' with named outputs: h = x·w, logits = x·head."""
  x = jax.device_put(images).reshape(images.shape[0], -1)
  return {'representation': x @ state['w'], 'logits': x @ state['head']}


def make_config(**evals):
  config = small_config(train_split='train', eval_split='test')
  with config.unlocked():
    config.evals = ml_collections.ConfigDict(evals)
  return config


def create(config, data, mesh=None, **kwargs):
  return evaluators.create_evaluators(
      config, predict_fn, mesh=mesh or make_mesh(MESH_TYPES[1]),
      data_fn=data, num_classes=NUM_CLASSES, **kwargs)


@pytest.mark.parametrize('axis_type', MESH_TYPES)
def test_evaluators_match_numpy_end_to_end(axis_type):
  data = FakeData()
  state = fake_state()
  config = make_config(
      knn=dict(every_steps=10, k=20, temperature=0.1),
      fewshot=dict(every_steps=10, shots=(1, 5), l2_reg=0.5, seed=3),
      linear_head=dict(every_steps=5))
  evs = create(config, data, make_mesh(axis_type))
  assert [e.name for e in evs] == ['fewshot', 'knn', 'linear_head']
  metrics = evaluators.run_evaluators(evs, state, step=10)
  assert set(metrics) == {'knn/top1', 'fewshot/1shot_top1',
                          'fewshot/5shot_top1', 'linear_head/top1',
                          'linear_head/top5', 'linear_head/num_examples'}
  assert metrics['linear_head/num_examples'] == 37
  # Train split: 5 batches, test: 3, each read once although two evaluators
  # use each (shared features), plus the linear head's 3 test batches.
  assert data.batches_served == 5 + 3 + 3

  x_tr, y_tr = data.splits['train']
  x_te, y_te = data.splits['test']
  w = np.asarray(state['w'], np.float64)
  f_tr, f_te = x_tr.reshape(70, -1) @ w, x_te.reshape(37, -1) @ w
  knn = np_knn(f_te, f_tr, y_tr, np.ones(70, bool), 20, 0.1, NUM_CLASSES)
  assert metrics['knn/top1'] == pytest.approx(np.mean(knn == y_te))

  for shots in (1, 5):
    idx = np_select(y_tr, np.ones(70, bool), shots, NUM_CLASSES, 3)
    rw, rb = np_ridge(np_normalize(f_tr[idx]), np.eye(NUM_CLASSES)[y_tr[idx]],
                      0.5)
    pred = np.argmax(np_normalize(f_te) @ rw + rb, -1)
    assert metrics[f'fewshot/{shots}shot_top1'] == pytest.approx(
        np.mean(pred == y_te))

  logits = x_te.reshape(37, -1) @ np.asarray(state['head'], np.float64)
  order = np.argsort(-logits, axis=1)
  assert metrics['linear_head/top1'] == pytest.approx(
      np.mean(order[:, 0] == y_te))
  assert metrics['linear_head/top5'] == pytest.approx(
      np.mean((order[:, :5] == y_te[:, None]).any(1)))
  # A sanity floor: the fake classes are separable enough to beat chance.
  assert metrics['knn/top1'] > 1.5 / NUM_CLASSES


def test_run_evaluators_runs_only_due_ones():
  data = FakeData()
  config = make_config(knn=dict(every_steps=4, k=5),
                       linear_head=dict(every_steps=3),
                       off=dict(type='knn', every_steps=0))
  evs = create(config, data)
  state = fake_state()
  assert set(evaluators.run_evaluators(evs, state, step=4)) == {'knn/top1'}
  assert set(evaluators.run_evaluators(evs, state, step=6)) == {
      'linear_head/top1', 'linear_head/top5', 'linear_head/num_examples'}
  assert evaluators.run_evaluators(evs, state, step=7) == {}
  assert 'off/top1' in evaluators.run_evaluators(evs, state, step=7,
                                                 force=True)


def test_feature_cache_is_per_state():
  data = FakeData()
  cache = common.FeatureCache(predict_fn, data, make_mesh(MESH_TYPES[1]))
  s1, s2 = fake_state(1), fake_state(2)
  a = cache(s1, 'test', 'representation')
  assert cache(s1, 'test', 'representation') is a
  assert data.batches_served == 3
  b = cache(s2, 'test', 'representation')
  assert data.batches_served == 6
  assert a.features.shape == (3, BATCH, 10)
  mask = np.asarray(b.mask)
  assert mask.sum() == 37  # The padding of the last batch is marked.
  norms = np.linalg.norm(np.asarray(b.features), axis=-1)
  np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)


def test_default_config_builds_every_type():
  config = make_config()
  with config.unlocked():
    config.evals = common.default_config()
  evs = create(config, FakeData())
  kinds = {type(e).__name__ for e in evs}
  assert kinds == {'KnnEvaluator', 'FewShotEvaluator', 'LinearHeadEvaluator',
                   'LinearProbeEvaluator'}
  knn = next(e for e in evs if e.name == 'knn')
  assert (knn.k, knn.temperature) == (200, 0.1)
  assert (knn.bank_split, knn.query_split) == ('train', 'test')


@pytest.mark.parametrize('evals,message', [
    (dict(knn=dict(type='kmeans')), 'unknown evaluator type'),
    (dict(knn=dict(kk=3)), 'unknown fields'),
    (dict(probe=dict(baselines=('noise',))), 'unknown'),
    (dict(probe=dict(baselines=('random_init',))), 'random_state_fn'),
])
def test_bad_config_fails_clearly(evals, message):
  with pytest.raises(ValueError, match=message):
    create(make_config(**evals), FakeData())


def test_no_evals_gives_no_evaluators():
  assert create(make_config(), FakeData()) == []


def test_probe_matches_numpy_ridge_with_held_out_l2():
  """The probe: ridge on the first train_examples, λ picked on their first
  tenth, top-1 on the queries; baselines on a random state and the pixels."""
  from simclr_jax.evaluators import probe  # pylint: disable=g-import-not-at-top
  data = FakeData()
  state, random_state = fake_state(6), fake_state(9)
  config = make_config(probe=dict(train_examples=60,
                                  baselines=('random_init', 'raw_pixels')))
  (ev,) = create(config, data, random_state_fn=lambda: random_state)
  metrics = dict(ev.run(state))

  x_tr, y_tr = data.splits['train']
  x_te, y_te = data.splits['test']
  x_tr, y_tr = x_tr[:60].reshape(60, -1), y_tr[:60]
  x_te = x_te.reshape(37, -1)

  def np_probe(f_tr, f_te):
    f_tr, f_te = np_normalize(f_tr), np_normalize(f_te)
    def acc(fx, fy, x, y, lam):
      w, b = np_ridge(fx, np.eye(NUM_CLASSES)[fy], lam)
      return np.mean(np.argmax(x @ w + b, -1) == y)
    best = max(probe.L2_GRID, key=lambda lam: acc(
        f_tr[6:], y_tr[6:], f_tr[:6], y_tr[:6], lam))
    return acc(f_tr, y_tr, f_te, y_te, best)

  for name, s in (('pretrained', state), ('random_init', random_state)):
    w = np.asarray(s['w'], np.float64)
    assert metrics[f'probe/{name}_top1'] == pytest.approx(
        np_probe(x_tr @ w, x_te @ w)), name
  assert metrics['probe/raw_pixels_top1'] == pytest.approx(
      np_probe(x_tr, x_te))


def test_knn_baselines_match_numpy():
  """kNN's baselines: the same vote on a random state's features and on the
  flattened pixels, beside the pretrained state's."""
  data = FakeData()
  state, random_state = fake_state(6), fake_state(9)
  config = make_config(knn=dict(k=5, temperature=0.2,
                                baselines=('random_init', 'raw_pixels')))
  (ev,) = create(config, data, random_state_fn=lambda: random_state)
  metrics = dict(ev.run(state))
  x_tr, y_tr = data.splits['train']
  x_te, y_te = data.splits['test']
  x_tr, x_te = x_tr.reshape(70, -1), x_te.reshape(37, -1)

  def np_acc(f_tr, f_te):
    pred = np_knn(f_te, f_tr, y_tr, np.ones(70, bool), 5, 0.2, NUM_CLASSES)
    return np.mean(pred == y_te)

  for name, s in (('top1', state), ('random_init_top1', random_state)):
    w = np.asarray(s['w'], np.float64)
    assert metrics[f'knn/{name}'] == pytest.approx(np_acc(x_tr @ w, x_te @ w))
  assert metrics['knn/raw_pixels_top1'] == pytest.approx(np_acc(x_tr, x_te))
  with pytest.raises(ValueError, match='random_state_fn'):
    create(make_config(knn=dict(baselines=('random_init',))), data)
