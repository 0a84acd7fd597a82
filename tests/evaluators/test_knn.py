"""evaluators/knn.py against a single-device numpy kNN written here; the
sharded path on the 8 fake CPU devices that conftest.py sets up."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from simclr_jax.evaluators import knn

NUM_CLASSES = 5
MESH_TYPES = [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto]


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


def clustered(rng, n, d, num_classes, spread=1.5):
  """Features around class centres, so accuracies are neither 0 nor 1."""
  centres = rng.normal(size=(num_classes, d))
  labels = rng.integers(0, num_classes, size=n)
  return centres[labels] + spread * rng.normal(size=(n, d)), labels


def make_mesh(axis_type):
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(axis_type,))


@pytest.mark.parametrize('k', [1, 7, 200])
def test_knn_predict_matches_numpy(k):
  rng = np.random.default_rng(0)
  bank, bank_labels = clustered(rng, 60, 12, NUM_CLASSES)
  queries, _ = clustered(rng, 20, 12, NUM_CLASSES)
  mask = rng.random(60) > 0.2
  got = knn.knn_predict(
      jnp.asarray(np_normalize(queries), jnp.float32),
      jnp.asarray(np_normalize(bank), jnp.float32), jnp.asarray(bank_labels),
      jnp.asarray(mask), k=k, temperature=0.1, num_classes=NUM_CLASSES)
  want = np_knn(queries, bank, bank_labels, mask, k, 0.1, NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(got), want)


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
  got = knn.knn_predict_sharded(
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
  pred = knn.knn_predict(x, x, jnp.array([0, 1, 2, 0]), k=2,
                                temperature=0.005, num_classes=3)
  np.testing.assert_array_equal(np.asarray(pred), [0, 1, 2, 0])


