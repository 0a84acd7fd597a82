"""nt_xent_loss, contrastive metrics, CE and top-k against numpy; sharded loss.

The numpy reference is written from the paper's formula (2N anchors, each
against the 2N − 1 others, self excluded), an independent form of the
reference's `tf2/objective.py`: the reference convention is exactly twice the
paper's mean.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from simclr_jax import losses


def np_nt_xent_paper(z1, z2, temperature, hidden_norm):
  """Paper form: ℓ(i, j) = −log e^{s_ij/τ} / Σ_{k≠i} e^{s_ik/τ}, mean over 2N."""
  z = np.concatenate([z1, z2], 0).astype(np.float64)
  if hidden_norm:
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)
  n = z1.shape[0]
  s = z @ z.T / temperature
  total = 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    others = np.array([s[i, k] for k in range(2 * n) if k != i])
    m = others.max()
    lse = m + np.log(np.exp(others - m).sum())
    total += lse - s[i, pos]
  return total / (2 * n), s[:n, n:]


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("n,d,tau,hidden_norm", [
    (1, 4, 0.5, True),
    (1, 3, 0.1, False),
    (2, 8, 0.1, True),
    (5, 3, 1.0, False),
    (8, 16, 0.5, True),
    (16, 7, 0.2, True),
])
def test_nt_xent_matches_numpy(n, d, tau, hidden_norm):
  rng = np.random.default_rng(n * 100 + d)
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  z2 = rng.normal(size=(n, d)).astype(np.float32)
  loss, logits_ab, labels = jax.jit(
      lambda a, b: losses.nt_xent_loss(
          a, b, temperature=tau, hidden_norm=hidden_norm))(z1, z2)
  want_paper, want_ab = np_nt_xent_paper(z1, z2, tau, hidden_norm)
  # Reference convention: sum of both directions = 2 × the paper's mean.
  np.testing.assert_allclose(loss, 2 * want_paper, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_ab, want_ab, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, np.arange(n))
  assert logits_ab.shape == (n, n) and labels.dtype == jnp.int32


@pytest.mark.parametrize("n,hidden_norm", [(1, True), (4, True), (8, False),
                                           (32, True)])
def test_identical_embeddings_give_log_2n_minus_1(n, hidden_norm):
  # At initialisation all projections are nearly equal: every anchor then
  # sees 2N − 1 equal logits (its own is masked), so each CE is log(2N − 1).
  v = np.random.default_rng(0).normal(size=(1, 6)).astype(np.float32) * 0.3
  z = np.repeat(v, n, axis=0)
  loss, _, _ = losses.nt_xent_loss(z, z, temperature=0.1,
                                   hidden_norm=hidden_norm)
  np.testing.assert_allclose(loss, 2 * np.log(2 * n - 1), rtol=1e-5, atol=1e-6)


def test_gradients_finite_including_zero_rows():
  rng = np.random.default_rng(1)
  z1 = rng.normal(size=(6, 5)).astype(np.float32)
  z2 = rng.normal(size=(6, 5)).astype(np.float32)
  z1[2] = 0.0  # l2_normalize must stay finite at 0 (ε as tf.math).
  for hidden_norm in (True, False):
    g1, g2 = jax.jit(jax.grad(
        lambda a, b: losses.nt_xent_loss(
            a, b, temperature=0.1, hidden_norm=hidden_norm)[0],
        argnums=(0, 1)))(z1, z2)
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
    assert np.abs(g1).sum() > 0 and np.abs(g2).sum() > 0


def test_bfloat16_inputs_computed_in_float32():
  rng = np.random.default_rng(2)
  z1 = rng.normal(size=(4, 8)).astype(np.float32)
  z2 = rng.normal(size=(4, 8)).astype(np.float32)
  loss, logits_ab, _ = losses.nt_xent_loss(
      jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16),
      temperature=0.5)
  assert loss.dtype == jnp.float32 and logits_ab.dtype == jnp.float32
  want, _ = np_nt_xent_paper(z1, z2, 0.5, True)
  np.testing.assert_allclose(loss, 2 * want, rtol=2e-2)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="same shape"):
    losses.nt_xent_loss(jnp.zeros((4, 3)), jnp.zeros((3, 3)), temperature=0.1)


def test_contrastive_metrics_match_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 12)).astype(np.float32) * 3
  labels = np.array([0, 5, 2, 3, 11, 7], np.int32)
  logits[1, 5] = 50.0  # make at least two rows correct
  logits[3, 3] = 50.0
  m = losses.contrastive_metrics(logits, labels)
  p = np_softmax(logits.astype(np.float64))
  want_acc = np.mean(logits.argmax(-1) == labels)
  want_ent = -np.mean(np.sum(p * np.log(p + 1e-8), -1))
  np.testing.assert_allclose(m["contrast_acc"], want_acc, atol=1e-7)
  np.testing.assert_allclose(m["contrast_entropy"], want_ent, rtol=1e-5)
  assert 0 < want_acc < 1


def test_softmax_cross_entropy_and_topk_match_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(10, 7)).astype(np.float32)
  labels = rng.integers(0, 7, size=10).astype(np.int32)
  p = np_softmax(logits.astype(np.float64))
  want_ce = -np.mean(np.log(p[np.arange(10), labels]))
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels),
                             want_ce, rtol=1e-5)
  order = np.argsort(-logits, axis=-1)
  for k in (1, 3, 5, 7):
    want = np.array([labels[i] in order[i, :k] for i in range(10)], np.float32)
    got = losses.topk_correct(logits, labels, k)
    assert got.dtype == jnp.float32 and got.shape == (10,)
    np.testing.assert_array_equal(got, want)
  # Both cases occur, so a constant answer would fail.
  assert 0 < losses.topk_correct(logits, labels, 1).sum() < 10


def test_topk_correct_ties_follow_tf_in_top_k():
  """A label tied at the k-th place counts as correct, as the reference's
  tf.math.in_top_k counts it (lax.top_k would break the tie by index)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  logits = np.array([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],
                     [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  labels = np.array([1, 5, 2], np.int32)
  for k, want in ((1, [0, 0, 1]), (3, [1, 1, 1]), (5, [1, 1, 1])):
    got = losses.topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        got, tf.math.in_top_k(labels, logits, k).numpy().astype(np.float32))


# --- sharded: 8 devices, negatives gathered over the 'data' axis --------------

def _walk_avals(jaxpr):
  """Every intermediate aval of a closed or open jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield eqn.primitive.name, v.aval
    for p in eqn.params.values():
      subs = p if isinstance(p, (list, tuple)) else [p]
      for sub in subs:
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _walk_avals(sub)


@pytest.mark.parametrize("n_local,hidden_norm", [(1, True), (2, True),
                                                 (3, False)])
def test_sharded_loss_and_grads_equal_single_device(n_local, hidden_norm):
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "conftest must give 8 fake CPU devices"
  mesh = Mesh(devices, ("data",))
  n_global, d, tau = 8 * n_local, 5, 0.2
  rng = np.random.default_rng(n_local)
  z1 = jnp.asarray(rng.normal(size=(n_global, d)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(n_global, d)), jnp.float32)
  local_shapes = []

  def per_device(a, b):
    loss, logits_ab, labels = losses.nt_xent_loss(
        a, b, temperature=tau, hidden_norm=hidden_norm, axis_name="data")
    local_shapes.append((a.shape, logits_ab.shape))
    metrics = losses.contrastive_metrics(logits_ab, labels)
    metrics = jax.lax.pmean(metrics, "data")
    return jax.lax.pmean(loss, "data"), logits_ab, labels, metrics

  sharded = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P("data"), P("data")),
      out_specs=(P(), P("data"), P("data"), P()))

  def single(a, b):
    loss, logits_ab, labels = losses.nt_xent_loss(
        a, b, temperature=tau, hidden_norm=hidden_norm)
    return loss, logits_ab, labels, losses.contrastive_metrics(logits_ab,
                                                               labels)

  loss_s, ab_s, labels_s, m_s = jax.jit(sharded)(z1, z2)
  loss_1, ab_1, labels_1, m_1 = jax.jit(single)(z1, z2)
  np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5, atol=1e-5)
  # Row blocks of the sharded logits are each device's [n, N] ab block.
  np.testing.assert_allclose(ab_s, ab_1, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels_s, labels_1)  # global indices
  for k in m_1:
    np.testing.assert_allclose(m_s[k], m_1[k], rtol=1e-5, atol=1e-6)
  # Per device: n local rows against the N gathered columns.
  assert local_shapes[0] == ((n_local, d), (n_local, n_global))

  grad_s = jax.jit(jax.grad(lambda a, b: sharded(a, b)[0], argnums=(0, 1)))
  grad_1 = jax.jit(jax.grad(lambda a, b: single(a, b)[0], argnums=(0, 1)))
  for gs, g1 in zip(grad_s(z1, z2), grad_1(z1, z2)):
    assert np.abs(np.asarray(g1)).max() > 1e-4
    np.testing.assert_allclose(gs, g1, rtol=1e-5, atol=1e-5)


def test_sharded_memory_is_n_by_2N_never_N_by_N():
  # Walk the jaxpr of loss + gradient: inside shard_map no intermediate may
  # have N_global rows (an [N, N] logits matrix); the concatenated per-device
  # logits are [n, 2N].
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  n_local, d = 2, 4
  n_global = 8 * n_local

  def per_device(a, b):
    loss, _, _ = losses.nt_xent_loss(a, b, temperature=0.1, axis_name="data")
    return jax.lax.pmean(loss, "data")

  f = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                    out_specs=P())
  z = jnp.ones((n_global, d), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(z, z)
  body = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
  assert body, "expected a shard_map in the jaxpr"
  shapes = []
  for e in body:
    shapes += [aval.shape for _, aval in _walk_avals(e.params["jaxpr"])
               if hasattr(aval, "shape")]
  assert (n_local, 2 * n_global) in shapes
  too_big = [s for s in shapes
             if len(s) == 2 and s[0] >= n_global and s[1] >= n_global]
  assert not too_big, too_big
