"""evaluators/fewshot.py: ridge regression and the shot selection against
numpy written here."""
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.evaluators import fewshot

from test_knn import clustered
from test_knn import NUM_CLASSES


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


@pytest.mark.parametrize('n,d', [(40, 8), (6, 8)])  # Primal and dual form.
def test_ridge_regression_matches_numpy(n, d):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(n, d))
  y = np.eye(3)[rng.integers(0, 3, size=n)]
  w, b = fewshot.ridge_regression(jnp.asarray(x, jnp.float32),
                                     jnp.asarray(y, jnp.float32), 0.3)
  want_w, want_b = np_ridge(x, y, 0.3)
  np.testing.assert_allclose(np.asarray(w), want_w, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(b), want_b, atol=1e-4, rtol=1e-4)


def test_ridge_predict_matches_numpy():
  rng = np.random.default_rng(3)
  x, labels = clustered(rng, 30, 10, NUM_CLASSES)
  ev, _ = clustered(rng, 50, 10, NUM_CLASSES)
  got = fewshot.ridge_predict(jnp.asarray(x, jnp.float32),
                                 jnp.asarray(labels),
                                 jnp.asarray(ev, jnp.float32),
                                 num_classes=NUM_CLASSES, l2_reg=0.1)
  w, b = np_ridge(x, np.eye(NUM_CLASSES)[labels], 0.1)
  np.testing.assert_array_equal(np.asarray(got), np.argmax(ev @ w + b, -1))


def test_select_few_shot_is_seeded_nested_and_skips_padding():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, NUM_CLASSES, size=200)
  valid = rng.random(200) > 0.1
  one = fewshot.select_few_shot(labels, valid, 1, num_classes=NUM_CLASSES,
                                   seed=7)
  five = fewshot.select_few_shot(labels, valid, 5, num_classes=NUM_CLASSES,
                                    seed=7)
  np.testing.assert_array_equal(five, np_select(labels, valid, 5,
                                                NUM_CLASSES, 7))
  np.testing.assert_array_equal(
      five, fewshot.select_few_shot(labels, valid, 5,
                                       num_classes=NUM_CLASSES, seed=7))
  assert set(one) <= set(five)
  assert valid[five].all()
  np.testing.assert_array_equal(np.bincount(labels[five]), [5] * NUM_CLASSES)
  other = fewshot.select_few_shot(labels, valid, 5, num_classes=NUM_CLASSES,
                                     seed=8)
  assert not np.array_equal(five, other)


