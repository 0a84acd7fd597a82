"""optim: LARS against a numpy re-computation of the reference update, the
warmup-cosine schedule against the reference's formula, the optimizer factory.

The numpy LARS below is written from `tf2/lars_optimizer.py`
(`_resource_apply_dense`, classic momentum) and decides exclusions from the
reference's variable-name substrings, not from our mask.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import config as config_lib
from simclr_jax import models
from simclr_jax import optim

from conftest import small_config

# Leaf path -> (shape, the reference's TF variable name). The names decide the
# reference's exclusions: 'batch_normalization', 'bias', 'head_supervised'.
LEAVES = {
    ('resnet', 'stem', 'conv', 'kernel'):
        ((3, 3, 2, 4), 'resnet/conv2d/kernel'),
    ('resnet', 'stem', 'bn', 'scale'):
        ((4,), 'resnet/batch_normalization/gamma'),
    ('resnet', 'stem', 'bn', 'bias'):
        ((4,), 'resnet/batch_normalization/beta'),
    # Starts at 0 (zero-init γ, here on a kernel to be decayed and adapted):
    # ‖w‖ = 0 gives trust ratio 1 on the first step.
    ('projection_head', 'layer_0', 'dense', 'kernel'):
        ((4, 3), 'projection_head/dense/kernel'),
    ('supervised_head', 'kernel'):
        ((4, 5), 'head_supervised/dense_1/kernel'),
    ('supervised_head', 'bias'):
        ((5,), 'head_supervised/dense_1/bias'),
}
ZERO_INIT = ('projection_head', 'layer_0', 'dense', 'kernel')
REFERENCE_EXCLUDE = ('batch_normalization', 'bias', 'head_supervised')


def nest(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def flatten(tree):
  return {tuple(k.key for k in path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def reference_lars(params, grads_per_step, lrs, *, weight_decay, momentum,
                   eeta, nesterov, exclude_all=False):
  """numpy float64 port of the reference LARS (classic momentum)."""
  params = {k: v.copy() for k, v in params.items()}
  velocity = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for path, w in params.items():
      name = LEAVES[path][1]
      excluded = exclude_all or any(s in name for s in REFERENCE_EXCLUDE)
      g = grads[path].copy()
      if not excluded:  # _use_weight_decay
        g = g + weight_decay * w
      trust_ratio = 1.0
      if not excluded:  # _do_layer_adaptation
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
          trust_ratio = eeta * w_norm / g_norm
      scaled_lr = lr * trust_ratio
      next_v = momentum * velocity[path] + scaled_lr * g
      update = momentum * next_v + scaled_lr * g if nesterov else next_v
      params[path] = w - update
      velocity[path] = next_v
  return params


def random_problem(seed, steps=5):
  rng = np.random.default_rng(seed)
  params = {p: rng.normal(size=s) for p, (s, _) in LEAVES.items()}
  params[ZERO_INIT] = np.zeros(LEAVES[ZERO_INIT][0])
  grads = [{p: rng.normal(size=s) for p, (s, _) in LEAVES.items()}
           for _ in range(steps)]
  # A zero gradient on an excluded leaf: plain momentum carries it on.
  grads[2][('resnet', 'stem', 'bn', 'bias')][:] = 0.0
  return params, grads


@pytest.mark.parametrize('nesterov,weight_decay,eeta', [
    (False, 0.1, 0.5),
    (True, 0.1, 0.5),
    (False, 0.0, 1e-3),
])
def test_lars_matches_reference_update(nesterov, weight_decay, eeta):
  # wd and eeta are large so that decay and trust ratio move the result far
  # beyond float32 noise; lr changes every step to pin where lr enters the
  # momentum buffer (inside, as the reference).
  params, grads = random_problem(seed=int(nesterov) + int(eeta * 10))
  schedule = lambda t: 0.5 + 0.25 * t
  lrs = [schedule(t) for t in range(len(grads))]
  tx = optim.lars(schedule, weight_decay=weight_decay, momentum=0.9,
                  eeta=eeta, nesterov=nesterov)
  to_tree = lambda flat: nest({k: jnp.asarray(v, jnp.float32)
                               for k, v in flat.items()})

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  p = to_tree(params)
  state = tx.init(p)
  for g in grads:
    p, state = step(p, state, to_tree(g))
  got = flatten(p)
  want = reference_lars(params, grads, lrs, weight_decay=weight_decay,
                        momentum=0.9, eeta=eeta, nesterov=nesterov)
  for path in LEAVES:
    # Compare the total change: the weights themselves would hide an error in
    # a small update.
    np.testing.assert_allclose(got[path] - params[path],
                               want[path] - params[path],
                               rtol=2e-5, atol=2e-6, err_msg=str(path))
  # The test is meaningful: adapted leaves moved by a different amount than
  # plain momentum would have moved them.
  plain = reference_lars(params, grads, lrs, weight_decay=weight_decay,
                         momentum=0.9, eeta=eeta, nesterov=nesterov,
                         exclude_all=True)
  conv = ('resnet', 'stem', 'conv', 'kernel')
  change = np.abs(want[conv] - params[conv]).max()
  assert np.abs(plain[conv] - want[conv]).max() > 0.5 * change


def test_lars_exclusion_mask_on_the_real_model():
  model = models.SimCLRModel(resnet_depth=50, sk_ratio=0.0625,
                             num_proj_layers=3, num_classes=10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                         train=False))['params']
  mask = optim.lars_exclusion_mask(shapes)
  seen = set()
  for path, excluded in jax.tree_util.tree_leaves_with_path(mask):
    names = [k.key for k in path]
    module, leaf = names[-2], names[-1]
    if names[0] == 'supervised_head':
      kind = 'supervised_head'
    elif leaf == 'kernel':
      kind = 'kernel'
      assert 'bn' not in module, names
    else:
      kind = 'batch_norm'
      assert leaf in ('scale', 'bias') and 'bn' in module, names
    assert excluded == (kind != 'kernel'), names
    seen.add(kind)
  assert seen == {'supervised_head', 'kernel', 'batch_norm'}
  # Flax's default BatchNorm name and a top-level bias are excluded too.
  mask = optim.lars_exclusion_mask(
      {'BatchNorm_0': {'scale': 0., 'bias': 0.}, 'Dense_0': {'kernel': 0.,
                                                             'bias': 0.}})
  assert mask == {'BatchNorm_0': {'scale': True, 'bias': True},
                  'Dense_0': {'kernel': False, 'bias': True}}


# --- schedule ----------------------------------------------------------------

def design_learning_rate(t, *, lr, batch, num_examples, epochs, warmup_epochs,
                         scaling, train_steps=0):
  """The reference's WarmUpAndCosineDecay, written out."""
  scaled = lr * batch / 256 if scaling == 'linear' else lr * math.sqrt(batch)
  warmup = round(warmup_epochs * num_examples // batch)
  total = train_steps or num_examples * epochs // batch + 1
  if t < warmup:
    return t / warmup * scaled
  decay_steps = total - warmup
  progress = min(t - warmup, decay_steps) / decay_steps
  return scaled * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize('scaling', ['linear', 'sqrt'])
@pytest.mark.parametrize('train_steps', [0, 300])
def test_warmup_cosine_matches_design_formula(scaling, train_steps):
  # warmup_epochs·N_ex/B = 9.77: the formula floors (9) before rounding.
  scaled = 0.3 * 2 if scaling == 'linear' else 0.3 * math.sqrt(512)
  kw = dict(batch=512, num_examples=10_000, epochs=10, warmup_epochs=0.5,
            scaling=scaling, train_steps=train_steps)
  schedule = optim.warmup_cosine(
      0.3, batch_size=512, num_examples=10_000, train_epochs=10,
      warmup_epochs=0.5, scaling=scaling, train_steps=train_steps)
  warmup = 9
  total = train_steps or 196  # 100_000 // 512 + 1
  midpoint = warmup + (total - warmup) // 2
  for t in (0, 1, warmup - 1, warmup, warmup + 1, midpoint, total - 1, total,
            total + 10):
    want = design_learning_rate(t, lr=0.3, **kw)
    # float32 cos near π: absolute error ~1e-7 of the peak.
    np.testing.assert_allclose(schedule(t), want, rtol=1e-5,
                               atol=1e-6 * scaled, err_msg=f'step {t}')
  # Pinned values, independent of the helper above.
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(warmup - 1), scaled * 8 / 9, rtol=1e-6)
  np.testing.assert_allclose(schedule(warmup), scaled, rtol=1e-6)
  if (total - warmup) % 2 == 0:
    np.testing.assert_allclose(schedule(midpoint), scaled / 2, rtol=1e-5)
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-6 * scaled)
  # Jit-traced steps give the same values (train.py logs lr(state.step)).
  np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(midpoint)),
                             schedule(midpoint), rtol=1e-6)


def test_warmup_cosine_without_warmup_and_shorter_than_warmup():
  no_warmup = optim.warmup_cosine(1.0, batch_size=256, num_examples=2560,
                                  train_epochs=1, warmup_epochs=0)
  assert float(no_warmup(0)) == pytest.approx(1.0)
  short = optim.warmup_cosine(1.0, batch_size=256, num_examples=2560,
                              train_epochs=1, warmup_epochs=10, train_steps=5)
  assert [round(float(short(t)), 6) for t in range(5)] == [
      0.0, 0.01, 0.02, 0.03, 0.04]


def make_config(**overrides):
  settings = dict(
      optimizer='lars', learning_rate=0.3, learning_rate_scaling='linear',
      train_batch_size=512, train_epochs=10, train_steps=0, warmup_epochs=0.5,
      momentum=0.9, nesterov=False, weight_decay=1e-2, lars_eeta=1e-3)
  settings.update(overrides)
  return small_config(**settings)


def test_schedule_from_config_and_its_step_counts_agree():
  config = make_config(learning_rate_scaling='sqrt')
  schedule = optim.create_learning_rate_schedule(config, 10_000)
  for t in (0, 5, 9, 50, 195):
    np.testing.assert_allclose(
        schedule(t), design_learning_rate(
            t, lr=0.3, batch=512, num_examples=10_000, epochs=10,
            warmup_epochs=0.5, scaling='sqrt'), rtol=1e-5, atol=1e-5)
  # The run's step counts (train.py's total) are the schedule's.
  steps = config_lib.config_schedule_steps(config, 10_000)
  assert steps['warmup_steps'] == 9 and steps['total_steps'] == 196
  np.testing.assert_allclose(
      optim.scale_learning_rate(0.3, 512, 'sqrt'),
      schedule(steps['warmup_steps']), rtol=1e-6)


# --- factory -------------------------------------------------------------------

def small_params():
  return nest({p: jnp.ones(s, jnp.float32) for p, (s, _) in LEAVES.items()})


def one_update(tx, params, grads):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return flatten(updates)


@pytest.mark.parametrize('name', ['lars', 'momentum', 'adam'])
def test_factory_builds_each_optimizer(name):
  config = make_config(optimizer=name)
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  params = small_params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates = one_update(tx, params, zero_grads)
  # With zero gradients only the decay moves weights: it acts on conv and
  # projection kernels, never on BatchNorm parameters; the supervised head's
  # kernel is decayed by supervised_head_l2 in the loss instead.
  for path, u in updates.items():
    decayed = path[-1] == 'kernel' and path[0] != 'supervised_head'
    if name != 'lars' and path == ('supervised_head', 'bias'):
      decayed = True  # reference: l2 of every non-BN weight for non-LARS.
    assert np.all(u < 0) if decayed else np.all(u == 0), (name, path)
  if name == 'momentum':
    # One SGD step with lr inside the buffer: −lr·(g + wd·w).
    np.testing.assert_allclose(updates[('resnet', 'stem', 'conv', 'kernel')],
                               -0.1 * 1e-2, rtol=1e-6)


def test_momentum_nesterov_and_lars_under_multi_transform():
  params = small_params()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

  def two_steps(tx):
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    return flatten(updates)

  lr = 0.1
  plain = two_steps(optim.create_optimizer(make_config(
      optimizer='momentum', weight_decay=0.0), lr))
  nesterov = two_steps(optim.create_optimizer(make_config(
      optimizer='momentum', weight_decay=0.0, nesterov=True), lr))
  key = ('resnet', 'stem', 'bn', 'scale')
  np.testing.assert_allclose(plain[key], -lr * 0.5 * 1.9, rtol=1e-6)
  np.testing.assert_allclose(nesterov[key], -lr * 0.5 * (0.9 * 1.9 + 1),
                             rtol=1e-6)
  # create_optimizer wraps the optimizer in multi_transform to freeze
  # parameters; the path masks must still work on the partial trees it
  # passes down.
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: 'train' if p[0].key == 'supervised_head' else 'frozen',
      params)
  tx = optax.multi_transform(
      {'train': optim.base_optimizer(make_config(), lr),
       'frozen': optax.set_to_zero()}, labels)
  updates = two_steps(tx)
  for path, u in updates.items():
    assert np.all(u == 0) == (path[0] != 'supervised_head'), path


def test_unknown_optimizer_and_scaling_raise():
  with pytest.raises(ValueError, match='optimizer'):
    optim.create_optimizer(make_config(optimizer='sgd'), 0.1)
  with pytest.raises(ValueError, match='scaling'):
    optim.warmup_cosine(0.1, batch_size=256, num_examples=1000,
                        train_epochs=1, warmup_epochs=0, scaling='cubic')


def test_supervised_head_l2():
  params = small_params()
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 5)).astype(np.float32)
  params['supervised_head']['kernel'] = jnp.asarray(kernel)
  got = optim.supervised_head_l2(params, 1e-3)
  np.testing.assert_allclose(got, 1e-3 * 0.5 * np.sum(kernel.astype(
      np.float64) ** 2), rtol=1e-6)
  assert float(optim.supervised_head_l2({'resnet': params['resnet']},
                                        1e-3)) == 0.0
  # Its gradient is wd·W on the kernel only.
  grads = jax.grad(optim.supervised_head_l2)(params, 1e-3)
  np.testing.assert_allclose(grads['supervised_head']['kernel'], 1e-3 * kernel,
                             rtol=1e-6)
  assert float(jnp.sum(jnp.abs(grads['supervised_head']['bias']))) == 0.0


@pytest.mark.parametrize('mode,after,trained', [
    ('linear_eval', -1, {'supervised_head'}),
    ('finetune', 2, {'block_group3', 'block_group4', 'projection_head',
                     'supervised_head'}),
    ('finetune', -1, {'stem', 'block_group1', 'block_group2', 'block_group3',
                      'block_group4', 'projection_head', 'supervised_head'}),
])
def test_trainable_labels_follow_mode_and_fine_tune_after_block(
    mode, after, trained):
  config = small_config(mode, fine_tune_after_block=after, init_checkpoint='x')
  model = models.create_model(config, 10)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)),
                         train=False))['params']
  labels = optim.trainable_labels(params, config)
  seen = set()
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    names = [str(getattr(k, 'key', k)) for k in path]
    group = names[1].split('_block')[0] if names[0] == 'resnet' else names[0]
    seen.add(group)
    assert (label == 'train') == (group in trained), names
  assert trained <= seen


def test_momentum_is_nesterov_by_default_as_the_reference():
  """The reference's build_optimizer always uses Nesterov momentum: the base
  config's momentum optimizer takes the Nesterov step (by hand: v = m·v + g,
  update −lr·(m·v + g))."""
  config = small_config(optimizer='momentum', weight_decay=0.0)
  assert config.nesterov
  params = {'w': jnp.ones((3,))}
  grads = {'w': jnp.full((3,), 0.5)}
  tx = optim.create_optimizer(config, 0.1)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, params)
  v = 0.9 * 0.5 + 0.5  # After the second gradient.
  np.testing.assert_allclose(updates['w'], -0.1 * (0.9 * v + 0.5), rtol=1e-6)


def test_adam_epsilon_is_keras_1e7():
  """One Adam step with a gradient of 1e-7: the bias-corrected moments are
  m̂ = g, v̂ = g², so the step is −lr·g/(|g| + ε), by hand −lr/2 for ε = 1e-7
  (Keras, the reference) and −lr/1.1 for optax's default 1e-8."""
  config = small_config(optimizer='adam', weight_decay=0.0)
  params = {'w': jnp.ones((2,))}
  grads = {'w': jnp.full((2,), 1e-7)}
  tx = optim.create_optimizer(config, 0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.1 * 1e-7 / (1e-7 + 1e-7),
                             rtol=1e-4)


# --- AdamW, frozen patch projection, clipping: the ViT recipe ---------------
def numpy_adamw(params, grads_per_step, lrs, *, weight_decay, decayed,
                b1=0.9, b2=0.999, eps=1e-8):
  """Loshchilov & Hutter's AdamW as torch.optim.AdamW steps it (MoCo v3):
  w <- w − lr·wd·w, then w <- w − lr·m̂/(√v̂ + ε)."""
  w = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
    for k in w:
      g = grads[k]
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      wd = weight_decay if decayed(k) else 0.0
      w[k] = w[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w[k])
  return w


VIT_LEAVES = {
    ('vit', 'patch_embedding', 'kernel'): (4, 4, 3, 8),
    ('vit', 'patch_embedding', 'bias'): (8,),
    ('vit', 'class_token'): (1, 1, 8),
    ('vit', 'block0', 'norm1', 'scale'): (8,),
    ('vit', 'block0', 'attention', 'query', 'kernel'): (8, 2, 4),
    ('vit', 'block0', 'attention', 'query', 'bias'): (2, 4),
    ('projection_head', 'layer_0', 'bn', 'scale'): (16,),
    ('supervised_head', 'kernel'): (8, 5),
    ('supervised_head', 'bias'): (5,),
}
PATCHES = ('vit', 'patch_embedding')


def vit_problem(seed=0, steps=4):
  rng = np.random.default_rng(seed)
  params = {p: rng.normal(size=s) for p, s in VIT_LEAVES.items()}
  grads = [{p: rng.normal(size=s) for p, s in VIT_LEAVES.items()}
           for _ in range(steps)]
  for g in grads:  # The model's stop_gradient: no patch-projection gradient.
    for p in g:
      if p[:2] == PATCHES:
        g[p] = np.zeros_like(g[p])
  return params, grads


def run_optimizer(tx, params, grads_per_step):
  tree = nest({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  state = tx.init(tree)
  for grads in grads_per_step:
    g = nest({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()})
    updates, state = tx.update(g, state, tree)
    tree = optax.apply_updates(tree, updates)
  return flatten(tree)


def vit_config(**overrides):
  settings = dict(model='vit', vit_variant='mu/4', optimizer='adamw',
                  weight_decay=0.1)
  settings.update(overrides)
  return make_config(**settings)


@pytest.mark.parametrize('frozen', [True, False])
def test_adamw_matches_numpy_and_decays_all_that_trains(frozen):
  """MoCo v3's AdamW decays every parameter that trains (biases, norms, the
  class token, the classifier) and leaves a frozen patch projection exactly
  where it was (its gradient is zero, but decay alone would shrink it)."""
  config = vit_config(vit_frozen_patch_embedding=frozen)
  params, grads = vit_problem()
  lrs = [0.01] * len(grads)
  got = run_optimizer(optim.create_optimizer(config, 0.01), params, grads)
  want = numpy_adamw(params, grads, lrs, weight_decay=0.1,
                     decayed=lambda k: True)
  for k in params:
    if frozen and k[:2] == PATCHES:
      np.testing.assert_array_equal(got[k], params[k].astype(np.float32))
    else:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6,
                                 err_msg=str(k))
  if not frozen:  # Decay alone moved the projection that gets no gradient.
    assert not np.allclose(got[('vit', 'patch_embedding', 'kernel')],
                           params[('vit', 'patch_embedding', 'kernel')])


def test_adamw_moves_no_weight_through_the_loss_l2():
  # AdamW's decoupled decay covers the supervised head: no l2 in the loss.
  assert optim.loss_weight_decay(vit_config()) == 0.0
  assert optim.loss_weight_decay(make_config(weight_decay=1e-6)) == 1e-6


@pytest.mark.parametrize('name', ['lars', 'momentum', 'adam', 'adamw'])
def test_frozen_patch_projection_never_moves(name):
  """Whatever the optimizer: LARS and momentum/adam decay would move it
  too, so it is taken out of the optimizer."""
  config = vit_config(optimizer=name)
  params, grads = vit_problem(seed=1)
  got = run_optimizer(optim.create_optimizer(config, 0.05), params, grads)
  for k in params:
    moved = not np.array_equal(got[k], params[k].astype(np.float32))
    assert moved == (k[:2] != PATCHES), (name, k)


def test_lars_exclusions_on_the_real_vit():
  """LARS skips decay and trust ratio on LayerNorm parameters, biases (also
  the [heads, head_dim] attention biases) and the classifier; it adapts the
  kernels, the class token and a learned position embedding."""
  config = vit_config(vit_variant='Ti/16', vit_position_embedding='learned',
                      image_size=32)
  model = models.create_model(config, 10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))['params']
  layer_norms = {'norm1', 'norm2', 'final_norm'}
  seen = set()
  for path, excluded in jax.tree_util.tree_leaves_with_path(
      optim.lars_exclusion_mask(shapes)):
    names = [k.key for k in path]
    if names[0] == 'supervised_head':
      kind = 'classifier'
    elif names[-2] in layer_norms or names[-2] == 'bn':
      kind = 'norm'
    elif names[-1] == 'bias':
      kind = 'bias'
    else:
      assert names[-1] in ('kernel', 'class_token', 'position_embedding')
      kind = names[-1]
    seen.add(kind)
    assert excluded == (kind in ('classifier', 'norm', 'bias')), names
  assert seen == {'classifier', 'norm', 'bias', 'kernel', 'class_token',
                  'position_embedding'}


@pytest.mark.parametrize('after,frozen_stages', [
    (-1, set()), (0, {0}), (1, {0, 1}), (12, set(range(14)))])
def test_vit_fine_tune_after_block_freezes_stages(after, frozen_stages):
  """Stage 0: patch projection, class token; stage k: block{k-1}; the final
  LayerNorm (stage 13 here) goes with the last block. The patch projection
  is frozen in every mode (vit_frozen_patch_embedding)."""
  config = small_config('finetune', model='vit', vit_variant='Ti/4',
                        image_size=8, fine_tune_after_block=after,
                        init_checkpoint='x')
  model = models.create_model(config, 10)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)),
                         train=False))['params']
  for path, label in jax.tree_util.tree_leaves_with_path(
      optim.trainable_labels(params, config)):
    names = [k.key for k in path]
    if names[0] != 'vit':
      assert label == 'train', names
      continue
    if names[1].startswith('block'):
      stage = int(names[1][len('block'):]) + 1
    else:
      stage = 13 if names[1] == 'final_norm' else 0
    frozen = stage in frozen_stages or (after == 12 and stage == 13)
    frozen |= names[1] == 'patch_embedding'
    assert (label == 'frozen') == frozen, names


def test_gradient_clipping_by_global_norm():
  """grad_clip_norm=c: the optimizer sees g·c/max(‖g‖, c) (the global norm
  over every leaf; numpy by hand)."""
  params, grads = vit_problem(seed=2, steps=1)
  norm = math.sqrt(sum(np.sum(g**2) for g in grads[0].values()))
  clipped = [{k: g * 0.5 / norm for k, g in grads[0].items()}]
  config = vit_config(optimizer='momentum', weight_decay=0.0,
                      vit_frozen_patch_embedding=False)
  got = run_optimizer(optim.create_optimizer(
      vit_config(optimizer='momentum', weight_decay=0.0,
                 vit_frozen_patch_embedding=False, grad_clip_norm=0.5), 0.1),
                      params, grads)
  want = run_optimizer(optim.create_optimizer(config, 0.1), params, clipped)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=str(k))
  # Below the threshold nothing changes.
  loose = run_optimizer(optim.create_optimizer(
      vit_config(optimizer='momentum', weight_decay=0.0,
                 vit_frozen_patch_embedding=False,
                 grad_clip_norm=2 * norm), 0.1), params, grads)
  plain = run_optimizer(optim.create_optimizer(config, 0.1), params, grads)
  for k in params:
    np.testing.assert_allclose(loose[k], plain[k], rtol=1e-6)
