"""Evaluators against single-device numpy computations written here.

The sharded paths run on the 8 fake CPU devices that conftest.py sets up.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from simclr_jax import evaluators

NUM_CLASSES = 5


# ---------------------------------------------------------------------------
# Independent numpy references.
# ---------------------------------------------------------------------------


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_knn(queries, bank, bank_labels, bank_mask, k, tau, num_classes):
  """InstDisc kNN: cosine top-k among valid bank rows, votes Σ exp(s/τ)."""
  q, b = np_normalize(queries), np_normalize(bank)
  keep = np.flatnonzero(bank_mask)
  b, bl = b[keep], np.asarray(bank_labels)[keep]
  preds = []
  for row in q:
    sims = b @ row
    top = np.argsort(-sims, kind='stable')[:k]
    votes = np.zeros(num_classes)
    for j in top:
      votes[bl[j]] += np.exp(sims[j] / tau)
    preds.append(np.argmax(votes))
  return np.array(preds)


def np_ridge(x, y, lam):
  """Primal ridge with an unpenalised bias via an augmented least squares."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xm, ym = x.mean(0), y.mean(0)
  xc = x - xm
  w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - ym))
  return w, ym - xm @ w


def np_select(labels, valid, shots, num_classes, seed):
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_classes):
    idx = [i for i in range(len(labels)) if valid[i] and labels[i] == c]
    out.extend(rng.permutation(np.array(idx, np.int64))[:shots])
  return np.sort(np.array(out, np.int64))


def clustered(rng, n, d, num_classes, spread=1.5):
  """Features around class centres, so accuracies are neither 0 nor 1."""
  centres = rng.normal(size=(num_classes, d))
  labels = rng.integers(0, num_classes, size=n)
  return centres[labels] + spread * rng.normal(size=(n, d)), labels


# ---------------------------------------------------------------------------
# Pure math.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('k', [1, 7, 200])
def test_knn_predict_matches_numpy(k):
  rng = np.random.default_rng(0)
  bank, bank_labels = clustered(rng, 60, 12, NUM_CLASSES)
  queries, _ = clustered(rng, 20, 12, NUM_CLASSES)
  mask = rng.random(60) > 0.2
  got = evaluators.knn_predict(
      jnp.asarray(np_normalize(queries), jnp.float32),
      jnp.asarray(np_normalize(bank), jnp.float32), jnp.asarray(bank_labels),
      jnp.asarray(mask), k=k, temperature=0.1, num_classes=NUM_CLASSES)
  want = np_knn(queries, bank, bank_labels, mask, k, 0.1, NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(got), want)


def make_mesh(axis_type):
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(axis_type,))


MESH_TYPES = [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto]


@pytest.mark.parametrize('axis_type', MESH_TYPES)
@pytest.mark.parametrize('k,tau', [(1, 0.1), (5, 0.07), (10, 0.5), (200, 0.1)])
def test_knn_predict_sharded_matches_numpy(k, tau, axis_type):
  """Bank 3×16 rows over 8 devices (6 a device, fewer than k), 2×16 queries."""
  assert jax.device_count() == 8
  mesh = make_mesh(axis_type)
  spec = NamedSharding(mesh, P(None, 'data'))
  rng = np.random.default_rng(1)
  bank, bank_labels = clustered(rng, 48, 16, NUM_CLASSES)
  queries, _ = clustered(rng, 32, 16, NUM_CLASSES)
  mask = np.ones(48, bool)
  mask[-5:] = False  # A padded last batch.
  mask[7] = False
  put = lambda x, shape: jax.device_put(np.asarray(x).reshape(shape), spec)
  got = evaluators.knn_predict_sharded(
      mesh, put(np_normalize(queries).astype(np.float32), (2, 16, 16)),
      put(np_normalize(bank).astype(np.float32), (3, 16, 16)),
      put(bank_labels.astype(np.int32), (3, 16)), put(mask, (3, 16)),
      k=k, temperature=tau, num_classes=NUM_CLASSES)
  assert got.shape == (2, 16)
  assert got.sharding.is_equivalent_to(spec, 2)
  want = np_knn(queries, bank, bank_labels, mask, k, tau, NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)


def test_knn_votes_do_not_overflow_at_small_temperature():
  x = np_normalize(np.eye(3)[[0, 1, 2, 0]] + 0.01).astype(np.float32)
  pred = evaluators.knn_predict(x, x, jnp.array([0, 1, 2, 0]), k=2,
                                temperature=0.005, num_classes=3)
  np.testing.assert_array_equal(np.asarray(pred), [0, 1, 2, 0])


@pytest.mark.parametrize('n,d', [(40, 8), (6, 8)])  # Primal and dual form.
def test_ridge_regression_matches_numpy(n, d):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(n, d))
  y = np.eye(3)[rng.integers(0, 3, size=n)]
  w, b = evaluators.ridge_regression(jnp.asarray(x, jnp.float32),
                                     jnp.asarray(y, jnp.float32), 0.3)
  want_w, want_b = np_ridge(x, y, 0.3)
  np.testing.assert_allclose(np.asarray(w), want_w, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(b), want_b, atol=1e-4, rtol=1e-4)


def test_ridge_predict_matches_numpy():
  rng = np.random.default_rng(3)
  x, labels = clustered(rng, 30, 10, NUM_CLASSES)
  ev, _ = clustered(rng, 50, 10, NUM_CLASSES)
  got = evaluators.ridge_predict(jnp.asarray(x, jnp.float32),
                                 jnp.asarray(labels),
                                 jnp.asarray(ev, jnp.float32),
                                 num_classes=NUM_CLASSES, l2_reg=0.1)
  w, b = np_ridge(x, np.eye(NUM_CLASSES)[labels], 0.1)
  np.testing.assert_array_equal(np.asarray(got), np.argmax(ev @ w + b, -1))


def test_select_few_shot_is_seeded_nested_and_skips_padding():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, NUM_CLASSES, size=200)
  valid = rng.random(200) > 0.1
  one = evaluators.select_few_shot(labels, valid, 1, num_classes=NUM_CLASSES,
                                   seed=7)
  five = evaluators.select_few_shot(labels, valid, 5, num_classes=NUM_CLASSES,
                                    seed=7)
  np.testing.assert_array_equal(five, np_select(labels, valid, 5,
                                                NUM_CLASSES, 7))
  np.testing.assert_array_equal(
      five, evaluators.select_few_shot(labels, valid, 5,
                                       num_classes=NUM_CLASSES, seed=7))
  assert set(one) <= set(five)
  assert valid[five].all()
  np.testing.assert_array_equal(np.bincount(labels[five]), [5] * NUM_CLASSES)
  other = evaluators.select_few_shot(labels, valid, 5, num_classes=NUM_CLASSES,
                                     seed=8)
  assert not np.array_equal(five, other)


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
    images, labels = self.splits[split]
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
  return {'w': jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
          'head': jnp.asarray(rng.normal(size=(12, NUM_CLASSES)), jnp.float32)}


def feature_fn(state, images):
  return jnp.asarray(images).reshape(images.shape[0], -1) @ state['w']


def logits_fn(state, images):
  return jnp.asarray(images).reshape(images.shape[0], -1) @ state['head']


def make_config(**evals):
  config = ml_collections.ConfigDict(dict(train_split='train',
                                          eval_split='test'))
  config.evals = ml_collections.ConfigDict(evals)
  return config


@pytest.mark.parametrize('axis_type', MESH_TYPES)
def test_evaluators_match_numpy_end_to_end(axis_type):
  data = FakeData()
  state = fake_state()
  config = make_config(
      knn=dict(every_steps=10, k=20, temperature=0.1),
      fewshot=dict(every_steps=10, shots=(1, 5), l2_reg=0.5, seed=3),
      linear_head=dict(every_steps=5))
  evs = evaluators.create_evaluators(config, feature_fn, logits_fn=logits_fn,
                                     mesh=make_mesh(axis_type), data_fn=data,
                                     num_classes=NUM_CLASSES)
  assert [e.name for e in evs] == ['fewshot', 'knn', 'linear_head']
  metrics = evaluators.run_evaluators(evs, state, step=10)
  assert set(metrics) == {'knn/top1', 'fewshot/1shot_top1',
                          'fewshot/5shot_top1', 'linear_head/top1',
                          'linear_head/top5'}
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
  evs = evaluators.create_evaluators(config, feature_fn, logits_fn=logits_fn,
                                     data_fn=data, num_classes=NUM_CLASSES)
  state = fake_state()
  assert set(evaluators.run_evaluators(evs, state, step=4)) == {'knn/top1'}
  assert set(evaluators.run_evaluators(evs, state, step=6)) == {
      'linear_head/top1', 'linear_head/top5'}
  assert evaluators.run_evaluators(evs, state, step=7) == {}
  assert 'off/top1' in evaluators.run_evaluators(evs, state, step=7,
                                                 force=True)


def test_feature_cache_is_per_state():
  data = FakeData()
  cache = evaluators.FeatureCache(feature_fn, data, evaluators.default_mesh())
  s1, s2 = fake_state(1), fake_state(2)
  a = cache(s1, 'test')
  assert cache(s1, 'test') is a and data.batches_served == 3
  b = cache(s2, 'test')
  assert data.batches_served == 6
  assert a.features.shape == (3, BATCH, 10)
  mask = np.asarray(b.mask)
  assert mask.sum() == 37  # The padding of the last batch is marked.
  norms = np.linalg.norm(np.asarray(b.features), axis=-1)
  np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)


def test_default_config_builds_every_type():
  config = make_config()
  config.evals = evaluators.default_config()
  evs = evaluators.create_evaluators(config, feature_fn, logits_fn=logits_fn,
                                     data_fn=FakeData(),
                                     num_classes=NUM_CLASSES)
  kinds = {type(e).__name__ for e in evs}
  assert kinds == {'KnnEvaluator', 'FewShotEvaluator', 'LinearHeadEvaluator'}
  knn = next(e for e in evs if e.name == 'knn')
  assert (knn.k, knn.temperature) == (200, 0.1)
  assert (knn.bank_split, knn.query_split) == ('train', 'test')


@pytest.mark.parametrize('evals,message', [
    (dict(knn=dict(type='kmeans')), 'unknown evaluator type'),
    (dict(knn=dict(kk=3)), 'unknown fields'),
    (dict(linear_head=dict(every_steps=1)), 'needs logits_fn'),
])
def test_bad_config_fails_clearly(evals, message):
  with pytest.raises(ValueError, match=message):
    evaluators.create_evaluators(make_config(**evals), feature_fn,
                                 data_fn=FakeData(), num_classes=NUM_CLASSES)


def test_no_evals_gives_no_evaluators():
  config = ml_collections.ConfigDict(dict(train_split='train'))
  assert evaluators.create_evaluators(config, feature_fn) == []
