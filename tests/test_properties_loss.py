"""Property tests of nt_xent_loss over random shapes and temperatures.

Embeddings come from a numpy generator seeded by hypothesis (shapes, scale and
temperature are drawn by hypothesis): fast, never degenerate rows, and a
failing case is reproducible from the printed draw.

Shapes come from small sets and the loss is jitted with the temperature as an
argument, so the 75 examples need only a few dozen compilations (each new
shape compiles; eager dispatch of every op would compile far more).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses

hypothesis = pytest.importorskip('hypothesis')
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

FAST = settings(max_examples=25, deadline=None, derandomize=True)

problems = st.fixed_dictionaries(dict(
    n=st.sampled_from([1, 2, 3, 5, 8]),
    d=st.sampled_from([1, 2, 7, 16]),
    temperature=st.floats(0.05, 2.0),
    scale=st.floats(1e-2, 1e2),
    hidden_norm=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
))


def draw_embeddings(p):
  rng = np.random.default_rng(p['seed'])
  z1 = rng.normal(size=(p['n'], p['d'])) * p['scale']
  # The second view near the first, as after training, or unrelated.
  z2 = z1 + rng.normal(size=z1.shape) * p['scale'] * rng.uniform(0.1, 2.0)
  return z1.astype(np.float32), z2.astype(np.float32), rng


@functools.partial(jax.jit, static_argnames='hidden_norm')
def _loss_and_metrics(z1, z2, temperature, hidden_norm):
  loss, logits_ab, labels = losses.nt_xent_loss(
      z1, z2, temperature=temperature, hidden_norm=hidden_norm)
  return loss, logits_ab, labels, losses.contrastive_metrics(logits_ab, labels)


def loss_of(z1, z2, p, hidden_norm=None):
  hidden_norm = p['hidden_norm'] if hidden_norm is None else hidden_norm
  return _loss_and_metrics(jnp.asarray(z1), jnp.asarray(z2),
                           jnp.float32(p['temperature']), hidden_norm)


@FAST
@given(problems)
def test_finite_non_negative_and_shaped(p):
  if not p['hidden_norm']:
    # Without normalisation the logits are |z|²/τ: keep them in float32 range.
    p['scale'] = min(p['scale'], 3.0)
  z1, z2, _ = draw_embeddings(p)
  loss, logits_ab, labels, metrics = loss_of(z1, z2, p)
  assert np.isfinite(float(loss))
  assert float(loss) >= -1e-6  # a sum of cross-entropies
  assert logits_ab.shape == (p['n'], p['n'])
  assert np.all(np.isfinite(logits_ab))
  np.testing.assert_array_equal(labels, np.arange(p['n']))
  if p['hidden_norm']:
    # Cosine logits lie in [−1/τ, 1/τ].
    assert np.abs(logits_ab).max() <= 1 / p['temperature'] * (1 + 1e-5)
  assert 0.0 <= float(metrics['contrast_acc']) <= 1.0
  assert -1e-5 <= float(metrics['contrast_entropy']) <= np.log(p['n']) + 1e-4


@FAST
@given(problems)
def test_invariant_to_common_rotation_with_hidden_norm(p):
  z1, z2, rng = draw_embeddings(p)
  q, r = np.linalg.qr(rng.normal(size=(p['d'], p['d'])))
  q = (q * np.sign(np.diag(r))).astype(np.float32)  # Haar-random orthogonal
  loss = loss_of(z1, z2, p, hidden_norm=True)[0]
  rotated = loss_of(z1 @ q, z2 @ q, p, hidden_norm=True)[0]
  np.testing.assert_allclose(rotated, loss, rtol=1e-4, atol=1e-4)


@FAST
@given(problems)
def test_hidden_norm_ignores_row_scale_and_views_are_symmetric(p):
  z1, z2, rng = draw_embeddings(p)
  loss = loss_of(z1, z2, p, hidden_norm=True)[0]
  scales = rng.uniform(0.1, 10.0, size=(p['n'], 1)).astype(np.float32)
  np.testing.assert_allclose(loss_of(z1 * scales, z2, p, hidden_norm=True)[0],
                             loss, rtol=1e-4, atol=1e-4)
  # Both directions are summed, so swapping the views changes nothing, and
  # neither does reordering the images consistently in both views.
  np.testing.assert_allclose(loss_of(z2, z1, p, hidden_norm=True)[0], loss,
                             rtol=1e-4, atol=1e-4)
  perm = rng.permutation(p['n'])
  np.testing.assert_allclose(
      loss_of(z1[perm], z2[perm], p, hidden_norm=True)[0], loss,
      rtol=1e-4, atol=1e-4)
