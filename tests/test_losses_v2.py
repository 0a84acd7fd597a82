"""SimCLRv2 losses against independent numpy / jnp formulas.

The memory buffer (nt_xent_loss(memory=...), update_memory_queue, ema_update)
and distillation (distillation_loss, distillation_loss_with_labels), each
checked against a formula written here from the papers: the NT-Xent reference
in the paper's form (2N anchors, each against the 2N − 1 other views and the K
memory entries), MoCo's queue pushed one key at a time and its momentum
update, and SimCLRv2's Eq. (2)/(3) with explicit loops over classes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax import losses


def np_l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def np_nt_xent_memory(z1, z2, memory, temperature, hidden_norm, mask=None):
  """Reference-convention loss (sum of both directions = Σ over 2N anchors / N).

  Anchor i of the 2N views: ℓ_i = −log e^{s_i,pos} / (Σ_{k≠i} e^{s_ik} +
  Σ_{j valid} e^{m_ij}), s = cos or dot / τ against the batch, m against the
  memory.
  """
  z = np.concatenate([z1, z2], 0).astype(np.float64)
  mem = np.asarray(memory, np.float64).reshape(-1, z.shape[1])
  if hidden_norm:
    z, mem = np_l2n(z), np_l2n(mem)
  keep = (np.ones(len(mem), bool) if mask is None
          else np.asarray(mask, bool))
  n = z1.shape[0]
  total = 0.0
  for i in range(2 * n):
    pos = (i + n) % (2 * n)
    others = [z[i] @ z[k] / temperature for k in range(2 * n) if k != i]
    others += [z[i] @ mem[j] / temperature for j in range(len(mem)) if keep[j]]
    others = np.array(others)
    top = others.max()
    log_denominator = top + np.log(np.exp(others - top).sum())
    total += log_denominator - z[i] @ z[pos] / temperature
  return total / n


def jnp_nt_xent_memory(z1, z2, memory, temperature, hidden_norm):
  """The same loss as one (2N) × (2N + K) matrix, for jax.grad."""
  z = jnp.concatenate([z1, z2], 0)
  mem = memory
  if hidden_norm:
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    mem = mem / jnp.linalg.norm(mem, axis=1, keepdims=True)
  two_n = z.shape[0]
  s = z @ z.T / temperature
  s = jnp.where(jnp.eye(two_n, dtype=bool), -jnp.inf, s)
  logits = jnp.concatenate([s, z @ mem.T / temperature], axis=1)
  pos = jnp.concatenate([jnp.arange(two_n // 2, two_n), jnp.arange(two_n // 2)])
  nll = (jax.nn.logsumexp(logits, axis=1)
         - logits[jnp.arange(two_n), pos])
  return jnp.sum(nll) / (two_n // 2)


@functools.partial(jax.jit, static_argnames="hidden_norm")
def loss_of(z1, z2, temperature, memory=None, memory_mask=None,
            hidden_norm=True):
  return losses.nt_xent_loss(z1, z2, temperature=temperature,
                             hidden_norm=hidden_norm, memory=memory,
                             memory_mask=memory_mask)


def draw(rng, n, d, k):
  z1 = rng.normal(size=(n, d)).astype(np.float32)
  z2 = (z1 + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
  memory = rng.normal(size=(k, d)).astype(np.float32)
  return z1, z2, memory


# --- nt_xent_loss with memory -------------------------------------------------

@pytest.mark.parametrize("n,d,k,tau,hidden_norm,masked", [
    (1, 4, 3, 0.5, True, False),
    (2, 8, 5, 0.1, True, True),
    (5, 3, 7, 1.0, False, False),
    (8, 16, 20, 0.2, True, True),
    (4, 6, 1, 0.1, False, True),
])
def test_memory_loss_matches_numpy(n, d, k, tau, hidden_norm, masked):
  rng = np.random.default_rng(10 * n + k)
  z1, z2, memory = draw(rng, n, d, k)
  mask = rng.random(k) < 0.6 if masked else None
  if masked:
    mask[0] = True  # at least one entry in, and (k > 1) usually one out
  loss, logits_ab, labels = loss_of(z1, z2, tau, memory, mask,
                                    hidden_norm=hidden_norm)
  want = np_nt_xent_memory(z1, z2, memory, tau, hidden_norm, mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
  # The metrics block is still the in-batch view-1-to-view-2 [n, n].
  assert logits_ab.shape == (n, n)
  np.testing.assert_array_equal(labels, np.arange(n))
  # More negatives, larger denominators (strictly so for cosine logits; raw
  # dot products at τ = 0.1 can leave a memory term below float32 rounding).
  plain = loss_of(z1, z2, tau, hidden_norm=hidden_norm)[0]
  assert loss > plain if hidden_norm else loss >= plain


def test_memory_none_or_empty_is_the_v1_loss():
  rng = np.random.default_rng(0)
  z1, z2, _ = draw(rng, 6, 5, 0)
  v1 = jax.jit(lambda a, b: losses.nt_xent_loss(a, b, temperature=0.2))(
      z1, z2)
  none = jax.jit(lambda a, b: losses.nt_xent_loss(
      a, b, temperature=0.2, memory=None))(z1, z2)
  empty = loss_of(z1, z2, 0.2, np.zeros((0, 5), np.float32))
  for a, b in zip(v1, none):
    np.testing.assert_array_equal(a, b)  # the same program
  np.testing.assert_allclose(empty[0], v1[0], rtol=1e-6)
  np.testing.assert_allclose(
      v1[0], np_nt_xent_memory(z1, z2, np.zeros((0, 5)), 0.2, True),
      rtol=1e-5)


def test_all_entries_masked_is_the_v1_loss():
  rng = np.random.default_rng(1)
  z1, z2, memory = draw(rng, 4, 3, 9)
  masked = loss_of(z1, z2, 0.1, memory, np.zeros(9, bool))[0]
  np.testing.assert_allclose(masked, loss_of(z1, z2, 0.1)[0], rtol=1e-6)


@pytest.mark.parametrize("hidden_norm", [True, False])
def test_memory_gradients_match_independent_formula(hidden_norm):
  rng = np.random.default_rng(2)
  z1, z2, memory = draw(rng, 6, 5, 11)
  tau = 0.3
  ours = jax.jit(jax.value_and_grad(
      lambda a, b, m: losses.nt_xent_loss(
          a, b, temperature=tau, hidden_norm=hidden_norm, memory=m)[0],
      argnums=(0, 1, 2)))
  theirs = jax.jit(jax.value_and_grad(
      lambda a, b: jnp_nt_xent_memory(a, b, memory, tau, hidden_norm),
      argnums=(0, 1)))
  loss, (g1, g2, g_mem) = ours(z1, z2, memory)
  want_loss, (w1, w2) = theirs(z1, z2)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for got, want in ((g1, w1), (g2, w2)):
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The memory holds constants of the momentum network: no gradient.
  np.testing.assert_array_equal(g_mem, np.zeros_like(memory))


def test_memory_is_normalised_like_the_batch():
  # With hidden_norm, rescaling memory rows changes nothing (cosine logits).
  rng = np.random.default_rng(3)
  z1, z2, memory = draw(rng, 3, 4, 6)
  scales = rng.uniform(0.1, 10.0, size=(6, 1)).astype(np.float32)
  a = loss_of(z1, z2, 0.1, memory)[0]
  b = loss_of(z1, z2, 0.1, memory * scales)[0]
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_memory_bad_shapes_raise():
  z = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r"memory of shape \[K, 3\]"):
    losses.nt_xent_loss(z, z, temperature=0.1, memory=jnp.zeros((5, 4)))
  with pytest.raises(ValueError, match="memory_mask"):
    losses.nt_xent_loss(z, z, temperature=0.1, memory_mask=jnp.ones(5, bool))
  with pytest.raises(ValueError, match="memory_mask"):
    losses.nt_xent_loss(z, z, temperature=0.1, memory=jnp.zeros((5, 3)),
                        memory_mask=jnp.ones(4, bool))


# --- sharded: 8 devices, queue replicated, [n, 2N + K] per device -------------

def _mesh():
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "conftest must give 8 fake CPU devices"
  return Mesh(devices, ("data",))


def _sharded_loss(mesh, tau, hidden_norm, local_shapes=None):
  def per_device(a, b, mem, mask):
    loss, logits_ab, labels = losses.nt_xent_loss(
        a, b, temperature=tau, hidden_norm=hidden_norm, axis_name="data",
        memory=mem, memory_mask=mask)
    if local_shapes is not None:
      local_shapes.append((a.shape, logits_ab.shape, mem.shape))
    metrics = jax.lax.pmean(losses.contrastive_metrics(logits_ab, labels),
                            "data")
    return jax.lax.pmean(loss, "data"), metrics

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P("data"), P("data"), P(), P()),
                       out_specs=(P(), P()))


@pytest.mark.parametrize("n_local,k,hidden_norm", [(1, 3, True), (2, 13, True),
                                                   (3, 8, False)])
def test_sharded_memory_loss_and_grads_equal_single_device(n_local, k,
                                                           hidden_norm):
  mesh = _mesh()
  n_global, d, tau = 8 * n_local, 5, 0.2
  rng = np.random.default_rng(n_local + k)
  z1, z2, memory = draw(rng, n_global, d, k)
  mask = np.arange(k) < k - 1  # the last slot not yet filled
  local_shapes = []
  sharded = _sharded_loss(mesh, tau, hidden_norm, local_shapes)

  def single(a, b, mem, msk):
    loss, logits_ab, labels = losses.nt_xent_loss(
        a, b, temperature=tau, hidden_norm=hidden_norm, memory=mem,
        memory_mask=msk)
    return loss, losses.contrastive_metrics(logits_ab, labels)

  def loss_and_grads(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        z1, z2, memory, mask)

  (loss_s, m_s), grads_s = loss_and_grads(sharded)
  (loss_1, m_1), grads_1 = loss_and_grads(single)
  np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      loss_1, np_nt_xent_memory(z1, z2, memory, tau, hidden_norm, mask),
      rtol=1e-5)
  for key in m_1:
    np.testing.assert_allclose(m_s[key], m_1[key], rtol=1e-5, atol=1e-6)
  # Per device: n local anchors, the whole queue, [n, N] metrics block.
  assert local_shapes[0] == ((n_local, d), (n_local, n_global), (k, d))
  for gs, g1 in zip(grads_s, grads_1):
    assert np.abs(np.asarray(g1)).max() > 1e-4
    np.testing.assert_allclose(gs, g1, rtol=1e-5, atol=1e-5)


def _walk_avals(jaxpr):
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield v.aval
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _walk_avals(sub)


def test_sharded_memory_logits_are_n_by_2N_plus_K():
  mesh = _mesh()
  n_local, d, k = 2, 4, 24
  n_global = 8 * n_local
  f = _sharded_loss(mesh, 0.1, True)
  z = jnp.ones((n_global, d), jnp.float32)
  mem = jnp.ones((k, d), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(
      lambda a, b: f(a, b, mem, jnp.ones(k, bool))[0], argnums=(0, 1)))(z, z)
  body = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
  assert body, "expected a shard_map in the jaxpr"
  shapes = [aval.shape for e in body for aval in _walk_avals(e.params["jaxpr"])
            if hasattr(aval, "shape")]
  assert (n_local, 2 * n_global + k) in shapes
  assert (n_local, k) in shapes
  too_big = [s for s in shapes
             if len(s) == 2 and s[0] >= n_global and s[1] >= n_global]
  assert not too_big, too_big


def _compiled_temp_bytes(devices, n_global, k, d):
  mesh = Mesh(np.array(devices), ("data",))
  f = _sharded_loss(mesh, 0.1, True)
  rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  fn = jax.jit(
      jax.value_and_grad(lambda a, b, m, msk: f(a, b, m, msk)[0],
                         argnums=(0, 1)),
      in_shardings=(rows, rows, rep, rep))
  z = jax.ShapeDtypeStruct((n_global, d), jnp.float32, sharding=rows)
  mem = jax.ShapeDtypeStruct((k, d), jnp.float32, sharding=rep)
  mask = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=rep)
  return fn.lower(z, z, mem, mask).compile().memory_analysis(
      ).temp_size_in_bytes


def test_sharded_memory_per_device_temp_scales_with_local_rows():
  """Compiled loss + grad at N = 256, K = 1024: ~n·(2N+K) per device.

  XLA keeps a few logits-sized buffers (forward and backward of both
  directions); on 8 devices each holds n = N/8 rows of them, never the
  [N, 2N + K] of the unsharded loss.
  """
  n_global, k, d = 256, 1024, 8
  full_logits = n_global * (2 * n_global + k) * 4  # [N, 2N+K] float32
  one = _compiled_temp_bytes(jax.devices()[:1], n_global, k, d)
  eight = _compiled_temp_bytes(jax.devices()[:8], n_global, k, d)
  assert one >= full_logits  # the unsharded loss materialises it
  assert eight < full_logits  # not even one full matrix per device
  assert eight / one == pytest.approx(1 / 8, rel=0.15), (one, eight)


# --- update_memory_queue ------------------------------------------------------

def np_push_one_by_one(queue, pointer, keys):
  queue = queue.copy()
  for key in keys:
    queue[pointer] = key
    pointer = (pointer + 1) % len(queue)
  return queue, pointer


@pytest.mark.parametrize("size,batch,start,pushes", [
    (8, 3, 0, 5),    # wraps around, K not a multiple of the batch
    (12, 4, 0, 4),   # K a multiple of the batch (MoCo's case)
    (6, 6, 2, 3),    # batch == K, pointer not at 0
    (5, 12, 3, 2),   # batch > K: only the last K keys of each push survive
    (7, 1, 6, 9),    # one key at a time
])
def test_queue_matches_one_by_one_pushes(size, batch, start, pushes):
  rng = np.random.default_rng(size * batch)
  d = 3
  queue = rng.normal(size=(size, d)).astype(np.float32)
  want_q, want_p = queue, start
  got_q, got_p = jnp.asarray(queue), jnp.int32(start)
  push = jax.jit(losses.update_memory_queue)
  for _ in range(pushes):
    keys = rng.normal(size=(batch, d)).astype(np.float32)
    want_q, want_p = np_push_one_by_one(want_q, want_p, keys)
    got_q, got_p = push(got_q, got_p, keys)
    np.testing.assert_array_equal(got_q, want_q)
    assert int(got_p) == want_p and got_p.dtype == jnp.int32


def test_queue_ring_order_and_filled_prefix():
  size, d = 5, 2
  push = jax.jit(losses.update_memory_queue)
  queue, pointer = jnp.zeros((size, d)), 0
  keys = np.arange(1, 7, dtype=np.float32).reshape(3, d)
  # First column 1, 3, 5: slots 0-2 fill; the filled slots are the prefix,
  # the pointer the next free slot.
  queue, pointer = push(queue, pointer, keys)
  np.testing.assert_array_equal(queue[:, 0], [1, 3, 5, 0, 0])
  assert int(pointer) == 3
  # Three more: slots 3, 4, then 0 (the oldest) is overwritten.
  queue, pointer = push(queue, pointer, keys + 10)
  np.testing.assert_array_equal(queue[:, 0], [15, 3, 5, 11, 13])
  assert int(pointer) == 1
  # Oldest-to-newest read from the pointer: the 5 most recent keys in order.
  order = (int(pointer) + np.arange(size)) % size
  np.testing.assert_array_equal(queue[order, 0], [3, 5, 11, 13, 15])


def test_queue_under_scan_and_no_gradient():
  size, batch, d = 7, 3, 2
  rng = np.random.default_rng(5)
  pushes = rng.normal(size=(4, batch, d)).astype(np.float32)

  def body(carry, keys):
    return losses.update_memory_queue(*carry, keys), None

  (queue, pointer), _ = jax.jit(
      lambda ks: jax.lax.scan(body, (jnp.zeros((size, d)), jnp.int32(0)),
                              ks))(pushes)
  want_q, want_p = np.zeros((size, d), np.float32), 0
  for keys in pushes:
    want_q, want_p = np_push_one_by_one(want_q, want_p, keys)
  np.testing.assert_array_equal(queue, want_q)
  assert int(pointer) == want_p
  grad = jax.grad(lambda k: jnp.sum(
      losses.update_memory_queue(jnp.zeros((size, d)), 0, k)[0]))(pushes[0])
  np.testing.assert_array_equal(grad, np.zeros_like(pushes[0]))


def test_sharded_push_of_the_global_batch_equals_single_device():
  # Each device holds the replicated queue and its n local keys; gathering
  # the keys in device order (tiled) pushes the global batch, so every
  # replica equals the single-device queue. to="invarying" types the gather
  # as equal on all devices, so the queue can leave with out_specs P().
  mesh = _mesh()
  size, n_local, d = 20, 3, 2
  rng = np.random.default_rng(12)
  queue = rng.normal(size=(size, d)).astype(np.float32)
  keys = rng.normal(size=(8 * n_local, d)).astype(np.float32)

  def per_device(q, p, k):
    return losses.update_memory_queue(
        q, p, jax.lax.all_gather(k, "data", tiled=True, to="invarying"))

  push = jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P(), P(), P("data")),
                               out_specs=(P(), P())))
  got_q, got_p = push(queue, jnp.int32(7), keys)
  want_q, want_p = np_push_one_by_one(queue, 7, keys)
  np.testing.assert_array_equal(got_q, want_q)
  assert int(got_p) == want_p


def test_queue_bad_shapes_raise():
  with pytest.raises(ValueError, match="queue"):
    losses.update_memory_queue(jnp.zeros((4, 3)), 0, jnp.zeros((2, 5)))


# --- ema_update ---------------------------------------------------------------

def _tree(rng, dtype=np.float32):
  return {
      "params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(
                     dtype)},
                 "bn": {"scale": rng.normal(size=4).astype(dtype),
                        "bias": rng.normal(size=4).astype(dtype)}},
      "batch_stats": {"bn": {"mean": rng.normal(size=4).astype(dtype),
                             "var": rng.uniform(0.5, 2, size=4).astype(dtype)}},
  }


def test_ema_update_matches_numpy():
  rng = np.random.default_rng(6)
  target, online = _tree(rng), _tree(rng)
  for m in (0.999, 0.9, 0.0, 1.0):
    got = jax.jit(losses.ema_update)(target, online, m)
    want = jax.tree.map(
        lambda t, o: m * t.astype(np.float64) + (1 - m) * o.astype(np.float64),
        target, online)
    assert jax.tree.structure(got) == jax.tree.structure(target)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6,
                                                         atol=1e-7), got, want)
  # Endpoints exactly: m = 1 keeps the target, m = 0 copies the online net.
  jax.tree.map(np.testing.assert_array_equal,
               losses.ema_update(target, online, 1.0), target)
  jax.tree.map(np.testing.assert_array_equal,
               losses.ema_update(target, online, 0.0), online)


def test_ema_update_repeated_converges_geometrically():
  # k updates towards a fixed online net: θ_t − θ_o shrinks by m^k.
  rng = np.random.default_rng(7)
  target, online = _tree(rng), _tree(rng)
  step = jax.jit(lambda t: losses.ema_update(t, online, jnp.float32(0.9)))
  got = target
  for _ in range(20):
    got = step(got)
  jax.tree.map(
      lambda g, t, o: np.testing.assert_allclose(
          g - o, 0.9 ** 20 * (t - o), rtol=1e-4, atol=1e-6),
      got, target, online)


def test_ema_update_keeps_dtypes_and_rejects_bad_input():
  rng = np.random.default_rng(8)
  target = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(rng))
  online = _tree(rng)
  got = losses.ema_update(target, online, 0.5)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
  with pytest.raises(ValueError, match="momentum"):
    losses.ema_update(online, online, 1.5)
  with pytest.raises(TypeError, match="float"):
    losses.ema_update({"step": jnp.int32(3)}, {"step": jnp.int32(4)}, 0.5)
  with pytest.raises(ValueError):
    losses.ema_update({"a": jnp.zeros(2)}, {"b": jnp.zeros(2)}, 0.5)


# --- distillation -------------------------------------------------------------

distill = jax.jit(losses.distillation_loss, static_argnames="temperature")


def np_distill(student, teacher, tau):
  """−(1/B) Σ_x Σ_y P_T(y|x; τ) log P_S(y|x; τ), class by class."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  total = 0.0
  for s_row, t_row in zip(student, teacher):
    p_t = np.exp(t_row / tau - (t_row / tau).max())
    p_t /= p_t.sum()
    log_z = (s_row / tau).max() + np.log(np.exp(
        s_row / tau - (s_row / tau).max()).sum())
    total -= sum(p_t[y] * (s_row[y] / tau - log_z) for y in range(len(s_row)))
  return total / len(student)


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("batch,classes,tau", [(1, 2, 1.0), (6, 10, 0.1),
                                               (9, 5, 2.0)])
def test_distillation_loss_and_gradients_match_numpy(batch, classes, tau):
  rng = np.random.default_rng(batch * classes)
  student = rng.normal(size=(batch, classes)).astype(np.float32) * 2
  teacher = rng.normal(size=(batch, classes)).astype(np.float32) * 2
  loss, (g_student, g_teacher) = jax.jit(jax.value_and_grad(
      lambda s, t: losses.distillation_loss(s, t, temperature=tau),
      argnums=(0, 1)))(student, teacher)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, np_distill(student, teacher, tau),
                             rtol=1e-5, atol=1e-6)
  # ∂L/∂s = (P_S − P_T) / (τ·B), both at temperature τ.
  want = (np_softmax(student.astype(np.float64) / tau)
          - np_softmax(teacher.astype(np.float64) / tau)) / (tau * batch)
  np.testing.assert_allclose(g_student, want, rtol=1e-4, atol=1e-6)
  # The teacher is fixed.
  np.testing.assert_array_equal(g_teacher, np.zeros_like(teacher))


def test_distillation_minimum_is_the_teacher_entropy():
  rng = np.random.default_rng(9)
  teacher = rng.normal(size=(4, 7)).astype(np.float32)
  tau = 0.5
  p_t = np_softmax(teacher.astype(np.float64) / tau)
  entropy = -np.mean(np.sum(p_t * np.log(p_t), axis=1))
  at_teacher = distill(teacher, teacher, temperature=tau)
  np.testing.assert_allclose(at_teacher, entropy, rtol=1e-5)
  # Shifting student logits per row changes nothing (softmax invariance);
  # any other student costs more.
  shifted = teacher + rng.normal(size=(4, 1)).astype(np.float32)
  np.testing.assert_allclose(
      distill(shifted, teacher, temperature=tau), entropy,
      rtol=1e-5)
  other = teacher + rng.normal(size=teacher.shape).astype(np.float32)
  assert distill(other, teacher, temperature=tau) > entropy


def test_distillation_bfloat16_computed_in_float32_and_bad_shapes():
  rng = np.random.default_rng(10)
  student = rng.normal(size=(3, 4)).astype(np.float32)
  teacher = rng.normal(size=(3, 4)).astype(np.float32)
  got = distill(jnp.asarray(student, jnp.bfloat16),
                jnp.asarray(teacher, jnp.bfloat16), temperature=0.1)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_distill(student, teacher, 0.1), rtol=5e-2)
  with pytest.raises(ValueError, match="same shape"):
    losses.distillation_loss(jnp.zeros((3, 4)), jnp.zeros((3, 5)),
                             temperature=1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distillation_with_labels_matches_numpy(alpha):
  rng = np.random.default_rng(11)
  student = rng.normal(size=(6, 5)).astype(np.float32)
  teacher = rng.normal(size=(6, 5)).astype(np.float32)
  labeled = rng.normal(size=(3, 5)).astype(np.float32)
  labels = np.array([4, 0, 2], np.int32)
  tau = 0.1
  got = jax.jit(losses.distillation_loss_with_labels,
                static_argnames="temperature")(
                    student, teacher, labeled, labels, temperature=tau,
                    alpha=alpha)
  # Labeled term at temperature 1: −mean log softmax(labeled)[label].
  ce = -np.mean(np.log(np_softmax(labeled.astype(np.float64))[
      np.arange(3), labels]))
  want = (1 - alpha) * ce + alpha * np_distill(student, teacher, tau)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="alpha"):
    losses.distillation_loss_with_labels(
        student, teacher, labeled, labels, temperature=tau, alpha=1.5)
