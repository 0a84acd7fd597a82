"""Tests for simclr_jax.models: ResNet backbones, projection head, SimCLRModel.

Speed: real initialisation of a ResNet compiles its initialisers (~10 s on the
2-core CI machine), so most tests take the parameter *shapes* from
`jax.eval_shape` and fill them with seeded numpy values (`filled_variables`).
Real `init` is used only where the initial values are what is tested (zero-γ,
head kernel std), and then on a single block or a head.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import config as config_lib
from simclr_jax import models
from simclr_jax.models import heads
from simclr_jax.models import resnet


def variable_shapes(module, image_size, batch=2, **kwargs):
  return jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0),
                          jnp.zeros((batch, image_size, image_size, 3)),
                          train=False, **kwargs))


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def filled_variables(shapes, seed=0):
  """Seeded stand-in for `init`: kernels ~ N(0, 1/fan_in), BN γ=1, β=0.

  Unlike the real init, the last γ of each block is 1, so the residual
  branches are active (with zero γ a random net is mostly identity shortcuts,
  and a bf16/f32 comparison would test little).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    elif name in ('scale', 'var'):
      value = np.ones(leaf.shape)
    else:  # bias, mean
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_images(n, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, size, size, 3)),
                     jnp.float32)


# ---------------------------------------------------------------------------
# Backbone: parameter counts, output widths, structure.


@pytest.mark.parametrize('depth,width,expected', [
    (50, 1, 23_508_032),
    (50, 2, 93_907_072),
    (50, 4, 375_378_176),
    (18, 1, 11_180_736),
])
def test_backbone_param_count_matches_reference(depth, width, expected):
  # Conv kernels + BN γ, β, ImageNet stem, no classifier, counted from the
  # reference release's Keras model (tf2/resnet.py).
  shapes = variable_shapes(resnet.ResNet(depth, width), 224, batch=1)
  assert num_params(shapes['params']) == expected


def test_resnet18_first_block_has_projection_shortcut_like_reference():
  # The reference gives the first block of every group a 1x1 conv + BN
  # shortcut, also in group 1 where 64 -> 64 channels: 64·64 + 2·64 = 4,224
  # parameters more than torchvision's 11,176,512.
  params = variable_shapes(resnet.ResNet(18, cifar_stem=True), 32)['params']
  for group in (1, 2, 3, 4):
    assert 'shortcut' in params[f'block_group{group}_block0']
    assert 'shortcut' not in params[f'block_group{group}_block1']
  assert params['block_group1_block0']['shortcut']['conv']['kernel'].shape == (
      1, 1, 64, 64)
  # CIFAR stem: 3x3x3x64 instead of 7x7x3x64.
  assert num_params(params) == 11_180_736 - (7 * 7 - 3 * 3) * 3 * 64
  assert num_params(params) == 11_173_056


@pytest.mark.parametrize('width,expected', [(1, 35_215_584),
                                            (2, 140_306_048)])
def test_selective_kernel_param_count_matches_simclrv2(width, expected):
  # SimCLRv2 Table 1 lists ResNet-50 (1×+SK) 35M and (2×+SK) 140M parameters;
  # the exact values pin SK conv + ResNet-D stem and shortcut.
  shapes = variable_shapes(resnet.ResNet(50, width, sk_ratio=0.0625), 224,
                           batch=1)
  assert num_params(shapes['params']) == expected


@pytest.mark.parametrize('depth', [18, 50])
def test_forward_cifar_stem_output_width(depth):
  model = resnet.ResNet(depth, cifar_stem=True)
  variables = filled_variables(variable_shapes(model, 32))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, random_images(2))
  assert out.shape == (2, models.output_width(depth))
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize('depth', [34, 101, 152, 200])
def test_deep_forward_cifar_stem_output_width(depth):
  # Shape-level forward (eval_shape traces the whole network) keeps the test
  # fast; 18 and 50 run for real above.
  model = resnet.ResNet(depth, cifar_stem=True)
  shapes = variable_shapes(model, 32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 512 if depth == 34 else 2048)


@pytest.mark.slow
@pytest.mark.parametrize('depth', [34, 101, 152, 200])
def test_deep_forward_cifar_stem_runs(depth):
  # The real forward of the deep nets (compiling ResNet-200 takes a minute on
  # 2 cores, hence slow); the default run checks their shapes above.
  model = resnet.ResNet(depth, cifar_stem=True)
  variables = filled_variables(variable_shapes(model, 32))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, random_images(2))
  assert out.shape == (2, models.output_width(depth))
  assert np.all(np.isfinite(out))


def test_width_multiplier_scales_output():
  shapes = variable_shapes(resnet.ResNet(18, 2, cifar_stem=True), 32)
  out = jax.eval_shape(
      lambda v, x: resnet.ResNet(18, 2, cifar_stem=True).apply(
          v, x, train=False), shapes,
      jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 1024)


def test_fractional_width_multiplier_gives_int_channels():
  # Channels are int(base·w): at w = 0.375 the four groups have 24, 48, 96,
  # 192 channels, and 0.3 rounds 64·0.3 = 19.2 down to 19.
  params = variable_shapes(resnet.ResNet(18, 0.375, cifar_stem=True),
                           8)['params']
  assert params['stem']['conv']['kernel'].shape == (3, 3, 3, 24)
  assert [params[f'block_group{g}_block1']['conv2']['kernel'].shape[-1]
          for g in (1, 2, 3, 4)] == [24, 48, 96, 192]
  assert models.output_width(18, 0.375) == 192
  assert models.output_width(50, 0.25) == 4 * 128
  assert resnet.channels(64, 0.3) == 19
  out = jax.eval_shape(
      lambda v, x: resnet.ResNet(18, 0.375, cifar_stem=True).apply(
          v, x, train=False),
      variable_shapes(resnet.ResNet(18, 0.375, cifar_stem=True), 8),
      jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
  assert out.shape == (2, 192)


def test_stems_and_shortcuts_structure():
  imagenet = variable_shapes(resnet.ResNet(50), 64)['params']
  assert imagenet['stem']['conv']['kernel'].shape == (7, 7, 3, 64)
  cifar = variable_shapes(resnet.ResNet(50, cifar_stem=True), 32)['params']
  assert cifar['stem']['conv']['kernel'].shape == (3, 3, 3, 64)
  # ResNet-D stem: 3x3 convs 32, 32, 64 (·w).
  sk = variable_shapes(resnet.ResNet(50, 2, sk_ratio=0.0625), 64)['params']
  assert [sk['stem'][f'conv{i}']['kernel'].shape for i in range(3)] == [
      (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]
  # Stride on the bottleneck's 3x3 conv, projection only on first blocks.
  assert 'shortcut' in imagenet['block_group2_block0']
  assert 'shortcut' not in imagenet['block_group2_block1']
  # Convs have no bias: every `bias` leaf belongs to a BatchNorm.
  for path, _ in jax.tree_util.tree_leaves_with_path(imagenet):
    names = [p.key for p in path]
    if names[-1] == 'bias':
      assert 'bn' in names[-2], names


def test_bottleneck_strides_on_3x3_conv():
  # Spatial size halves inside the 3x3 conv (v1.5 as the reference), which
  # shows in the shapes of intermediate activations.
  block = resnet.BottleneckBlock(16, 2, use_projection=True)
  x = jnp.ones((1, 8, 8, 32))
  # Shapes only: eval_shape traces init and apply without compiling.
  _, state = jax.eval_shape(
      lambda x: block.apply(block.init(jax.random.PRNGKey(0), x, train=False),
                            x, train=False, capture_intermediates=True,
                            mutable=['intermediates']), x)
  inter = state['intermediates']
  assert inter['conv1']['__call__'][0].shape == (1, 8, 8, 16)
  assert inter['conv2']['__call__'][0].shape == (1, 4, 4, 16)


@pytest.mark.parametrize('block,kwargs,last_bn', [
    (resnet.BasicBlock, {}, 'bn2'),
    (resnet.BottleneckBlock, {}, 'bn3'),
    (resnet.BottleneckBlock, {'sk_ratio': 0.0625}, 'bn3'),
])
def test_last_batchnorm_gamma_zero_initialised(block, kwargs, last_bn):
  module = block(32, 2, use_projection=True, **kwargs)
  x = jnp.ones((2, 8, 8, 16))
  variables = jax.jit(lambda x: module.init(jax.random.PRNGKey(0), x,
                                            train=False))(x)
  params = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  scales = {k: v for k, v in params.items() if k.endswith('scale')}
  assert scales, params.keys()
  for name, value in scales.items():
    if name == f'{last_bn}/scale':
      np.testing.assert_array_equal(value, 0.0)
    else:
      np.testing.assert_array_equal(value, 1.0)
  # With γ = 0 the block starts as relu(shortcut(x)).
  y = module.apply(variables, x, train=False)
  out_width = 4 * 32 if block is resnet.BottleneckBlock else 32
  shortcut = resnet.ProjectionShortcut(
      out_width, 2, resnet_d=module.sk_ratio > 0).apply(
          {'params': variables['params']['shortcut'],
           'batch_stats': variables['batch_stats']['shortcut']}, x, False)
  np.testing.assert_allclose(y, jax.nn.relu(shortcut), atol=1e-6)


def test_selective_kernel_resnet_runs():
  # ImageNet stem + SK: ResNet-D stem, strided and stride-1 avg-pool shortcuts.
  model = resnet.ResNet(50, sk_ratio=0.0625)
  shapes = variable_shapes(model, 32)
  params = shapes['params']
  sk = params['block_group2_block0']['sk_conv']
  assert sk['conv']['kernel'].shape == (3, 3, 128, 256)   # two 3x3 streams
  assert sk['gate_conv1']['kernel'].shape == (1, 1, 128, 32)  # max(8, 32)
  assert sk['gate_conv2']['kernel'].shape == (1, 1, 32, 256)
  assert params['block_group2_block0']['shortcut']['conv']['kernel'].shape == (
      1, 1, 256, 512)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 2048)


@pytest.mark.slow
def test_selective_kernel_resnet_forward_is_finite():
  # The SK block runs for real in the zero-gamma test; this runs the whole
  # ResNet-50-SK (ResNet-D stem, both avg-pool shortcuts) in training mode.
  model = resnet.ResNet(50, sk_ratio=0.0625)
  variables = filled_variables(variable_shapes(model, 32))
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                            mutable=['batch_stats']))(
                                                variables, random_images(2))
  assert out.shape == (2, 2048)
  assert np.all(np.isfinite(out))


def test_resnet_d_avg_pool_shortcut_matches_reference_padding():
  # Stride 2: zero-pad (0, 1) then 2x2 VALID pool (pads count). Stride 1: SAME
  # pool whose padding is excluded from the average (TF avg_pool semantics).
  x = jnp.arange(9.0).reshape(1, 3, 3, 1)
  conv_identity = {'params': {'conv': {'kernel': jnp.ones((1, 1, 1, 1))},
                              'bn': {'scale': jnp.ones(1), 'bias': jnp.zeros(1)}},
                   'batch_stats': {'bn': {'mean': jnp.zeros(1),
                                          'var': jnp.ones(1) - 1e-5}}}
  s2 = resnet.ProjectionShortcut(1, 2, resnet_d=True).apply(
      conv_identity, x, False)
  # Windows [[0,1],[3,4]], [[2,pad],[5,pad]], [[6,7],[pad,pad]], [[8,p],[p,p]].
  np.testing.assert_allclose(s2[0, :, :, 0], [[2.0, 1.75], [3.25, 2.0]],
                             rtol=1e-5)
  s1 = resnet.ProjectionShortcut(1, 1, resnet_d=True).apply(
      conv_identity, x, False)
  np.testing.assert_allclose(s1[0, :, :, 0],
                             [[2.0, 3.0, 3.5], [5.0, 6.0, 6.5], [6.5, 7.5, 8.0]],
                             rtol=1e-5)


def remat_loss(module, variables, x):
  def loss(params):
    # train positionally: remat's static_argnums cannot see keywords.
    out, _ = module.apply({**variables, 'params': params}, x, True,
                          mutable=['batch_stats'])
    return jnp.sum(out ** 2)
  return loss


def test_remat_wraps_every_block_and_keeps_params():
  # Tracing only (no compile): the rematted backward holds one remat
  # primitive per residual block (8 in ResNet-18), none without remat, and
  # the parameter tree is the same (checkpoints stay interchangeable).
  plain = resnet.ResNet(18, cifar_stem=True)
  rematted = resnet.ResNet(18, cifar_stem=True, remat=True)
  shapes = variable_shapes(plain, 16)
  assert (jax.tree.structure(shapes) ==
          jax.tree.structure(variable_shapes(rematted, 16)))
  variables = filled_variables(shapes)
  x = random_images(2, 16)

  def num_remats(module):
    grad_fn = jax.grad(remat_loss(module, variables, x))
    return str(jax.make_jaxpr(grad_fn)(variables['params'])).count('remat2[')
  assert num_remats(rematted) == 8
  assert num_remats(plain) == 0


def test_remat_block_same_output_and_grads():
  # One block as ResNet wraps it (train passed positionally, static).
  x = random_images(2, 8)
  plain = resnet.BasicBlock(8, 2, use_projection=True)
  rematted = nn.remat(resnet.BasicBlock, static_argnums=(2,))(8, 2, True)
  variables = filled_variables(variable_shapes(plain, 8))
  l1, g1 = jax.jit(jax.value_and_grad(remat_loss(plain, variables, x)))(
      variables['params'])
  l2, g2 = jax.jit(jax.value_and_grad(remat_loss(rematted, variables, x)))(
      variables['params'])
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # Recomputation changes XLA's fusion and so the rounding: tolerance on
    # the scale of each gradient tensor (entries near 0 in a tensor of
    # magnitude ~20 differ in their 5th significant digit).
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(b))) + 1e-6)


@pytest.mark.slow
def test_remat_resnet_same_output_and_grads():
  x = random_images(2, 16)
  plain = resnet.ResNet(18, cifar_stem=True)
  rematted = resnet.ResNet(18, cifar_stem=True, remat=True)
  variables = filled_variables(variable_shapes(plain, 16))
  l1, g1 = jax.jit(jax.value_and_grad(remat_loss(plain, variables, x)))(
      variables['params'])
  l2, g2 = jax.jit(jax.value_and_grad(remat_loss(rematted, variables, x)))(
      variables['params'])
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # Recomputation changes XLA's fusion and so the rounding: tolerance on
    # the scale of each gradient tensor (entries near 0 in a tensor of
    # magnitude ~20 differ in their 5th significant digit).
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(b))) + 1e-6)


# ---------------------------------------------------------------------------
# Projection head.


@pytest.mark.parametrize('mode,num_layers,widths', [
    ('none', 2, [64]),
    ('linear', 2, [64, 16]),
    ('linear', 3, [64, 16]),
    ('nonlinear', 2, [64, 64, 16]),
    ('nonlinear', 3, [64, 64, 64, 16]),
])
def test_projection_head_shapes(mode, num_layers, widths):
  head = heads.ProjectionHead(mode, num_layers, out_dim=16)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
  variables = head.init(jax.random.PRNGKey(0), h, train=False)
  (z, hiddens), _ = head.apply(variables, h, train=True,
                               mutable=['batch_stats'])
  assert [x.shape[-1] for x in hiddens] == widths
  assert z.shape == (8, widths[-1])
  np.testing.assert_array_equal(hiddens[0], h)
  np.testing.assert_array_equal(hiddens[-1], z)
  params = variables.get('params', {})
  num_head_layers = len(widths) - 1
  assert sorted(params) == [f'layer_{j}' for j in range(num_head_layers)]
  for j in range(num_head_layers):
    layer = params[f'layer_{j}']
    assert set(layer['dense']) == {'kernel'}  # Dense without bias.
    last = j == num_head_layers - 1
    # Last BN has no centre (β); middle BNs have γ and β.
    assert set(layer['bn']) == ({'scale'} if last else {'scale', 'bias'})
    if not last:  # ReLU after middle layers.
      assert float(jnp.min(hiddens[j + 1])) >= 0.0
  if mode == 'nonlinear':
    # Kernels N(0, 0.01).
    std = float(jnp.std(params['layer_0']['dense']['kernel']))
    assert 0.009 < std < 0.011


def numpy_batch_norm(x, eps=1e-5):
  x = np.asarray(x, np.float64)
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def test_projection_head_moco_v3_options():
  """hidden_dim sets the middle layers' width; out_bn_scale=False leaves
  the output BN with nothing affine (MoCo v3's BatchNorm1d(affine=False)):
  z is the standardised last matmul (numpy, from the kernels)."""
  head = heads.ProjectionHead('nonlinear', 3, out_dim=8, hidden_dim=24,
                              out_bn_scale=False)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(16, 12)), jnp.float32)
  variables = head.init(jax.random.PRNGKey(0), h, train=False)
  params = variables['params']
  assert [params[f'layer_{j}']['dense']['kernel'].shape for j in range(3)] == [
      (12, 24), (24, 24), (24, 8)]
  assert 'bn' not in params['layer_2']  # No scale, no bias: no parameters.
  assert set(variables['batch_stats']['layer_2']['bn']) == {'mean', 'var'}
  (z, hiddens), _ = head.apply(variables, h, train=True,
                               mutable=['batch_stats'])
  x = np.asarray(hiddens[2], np.float64) @ np.asarray(
      params['layer_2']['dense']['kernel'], np.float64)
  np.testing.assert_allclose(z, numpy_batch_norm(x), rtol=1e-4, atol=1e-4)


def test_projection_head_without_batch_norm():
  """use_bn=False (MoCo v3's BN-free ablation): relu(relu(h·W0)·W1)·W2."""
  head = heads.ProjectionHead('nonlinear', 3, out_dim=8, hidden_dim=24,
                              use_bn=False)
  h = jnp.asarray(np.random.default_rng(1).normal(size=(4, 12)), jnp.float32)
  variables = head.init(jax.random.PRNGKey(0), h, train=False)
  assert 'batch_stats' not in variables
  w = [np.asarray(variables['params'][f'layer_{j}']['dense']['kernel'],
                  np.float64) for j in range(3)]
  z, _ = head.apply(variables, h, train=True)
  relu = lambda x: np.maximum(x, 0)
  want = relu(relu(np.asarray(h, np.float64) @ w[0]) @ w[1]) @ w[2]
  np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# SimCLRModel.

NUM_CLASSES = 16


def make_model(**kwargs):
  defaults = dict(resnet_depth=18, cifar_stem=True, num_proj_layers=3,
                  proj_out_dim=32, num_classes=NUM_CLASSES,
                  train_mode='pretrain', lineareval_while_pretraining=True)
  defaults.update(kwargs)
  return models.SimCLRModel(**defaults)


@pytest.fixture(scope='module')
def r18_variables():
  """Filled variables of the ResNet-18 SimCLRModel (same tree in all modes)."""
  return filled_variables(variable_shapes(make_model(), 16))


def test_simclr_model_outputs(r18_variables):
  model = make_model()
  out, _ = model.apply(r18_variables, random_images(4, 16), train=True,
                       mutable=['batch_stats'])
  h, z, logits = out['representation'], out['projection'], out['logits']
  assert (h.shape, z.shape, logits.shape) == ((4, 512), (4, 32),
                                              (4, NUM_CLASSES))
  assert {h.dtype, z.dtype, logits.dtype} == {jnp.dtype(jnp.float32)}
  assert set(r18_variables['params']) == {'resnet', 'projection_head',
                                          'supervised_head'}


def test_no_supervised_head_without_linear_eval():
  model = make_model(lineareval_while_pretraining=False, num_classes=None)
  shapes = variable_shapes(model, 16)
  assert 'supervised_head' not in shapes['params']
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes,
                       jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
  assert set(out) == {'representation', 'projection'}


def supervised_grads(model, variables, images, labels):
  def loss_fn(params):
    out, _ = model.apply({**variables, 'params': params}, images,
                         train=True, mutable=['batch_stats'])
    logits = out['logits']
    onehot = jax.nn.one_hot(labels, NUM_CLASSES)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
  return jax.jit(jax.grad(loss_fn))(variables['params'])


def global_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.parametrize('train_mode,backbone_gets_gradient', [
    ('pretrain', False),
    ('linear_eval', False),
    ('finetune', True),
    ('supervised', True),
])
def test_supervised_loss_gradient_reaches_backbone(r18_variables, train_mode,
                                                    backbone_gets_gradient):
  model = make_model(train_mode=train_mode)
  labels = jnp.arange(4) % NUM_CLASSES
  grads = supervised_grads(model, r18_variables, random_images(4, 16), labels)
  assert global_norm(grads['supervised_head']) > 0
  backbone_norm = global_norm(grads['resnet'])
  if backbone_gets_gradient:
    assert backbone_norm > 0
  else:
    assert backbone_norm == 0.0


def test_fine_tune_after_block_freezes_early_blocks(r18_variables):
  model = make_model(train_mode='finetune', fine_tune_after_block=2)
  images = random_images(4, 16)
  grads = supervised_grads(model, r18_variables, images, jnp.arange(4))
  frozen = ['stem'] + [f'block_group{g}_block{j}' for g in (1, 2)
                       for j in (0, 1)]
  for name, tree in grads['resnet'].items():
    if name in frozen:
      assert global_norm(tree) == 0.0, name
    else:
      assert global_norm(tree) > 0.0, name
  # Frozen blocks also keep their BatchNorm statistics (inference mode).
  _, state = model.apply(r18_variables, images, train=True,
                         mutable=['batch_stats'])
  before = r18_variables['batch_stats']['resnet']
  after = state['batch_stats']['resnet']
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert same == (name in frozen), name


@pytest.mark.parametrize('selector,width', [(0, 512), (1, 512), (2, 512),
                                            (3, 32)])
def test_ft_proj_selector_picks_head_layer(selector, width):
  model = make_model(train_mode='finetune', ft_proj_selector=selector)
  shapes = variable_shapes(model, 16)
  assert shapes['params']['supervised_head']['kernel'].shape == (
      width, NUM_CLASSES)
  variables = filled_variables(shapes, seed=selector)
  images = random_images(2, 16)
  out = model.apply(variables, images, train=False)
  h, logits = out['representation'], out['logits']
  _, hiddens = heads.ProjectionHead('nonlinear', 3, 32).apply(
      {'params': variables['params']['projection_head'],
       'batch_stats': variables['batch_stats']['projection_head']},
      h, train=False)
  sup = variables['params']['supervised_head']
  expected = hiddens[selector] @ sup['kernel'] + sup['bias']
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('train_mode', ['pretrain', 'linear_eval'])
def test_linear_head_reads_the_selected_head_layer_without_gradient(
    train_mode):
  """As the reference's hiddens_list[ft_proj_selector]: with selector 1 the
  linear head trained during pretraining (and in linear eval) reads the
  first projection layer's output, and its loss sends no gradient into the
  projection head or the backbone."""
  model = make_model(train_mode=train_mode, ft_proj_selector=1)
  variables = filled_variables(variable_shapes(model, 16), seed=3)
  images = random_images(2, 16)
  out = model.apply(variables, images, train=False)
  _, hiddens = heads.ProjectionHead('nonlinear', 3, 32).apply(
      {'params': variables['params']['projection_head'],
       'batch_stats': variables['batch_stats']['projection_head']},
      out['representation'], train=False)
  sup = variables['params']['supervised_head']
  np.testing.assert_allclose(out['logits'],
                             hiddens[1] @ sup['kernel'] + sup['bias'],
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(
      out['logits'], out['representation'] @ sup['kernel'] + sup['bias'],
      atol=1e-3)
  grads = supervised_grads(model, variables, images, jnp.arange(2))
  assert global_norm(grads['projection_head']) == 0.0
  assert global_norm(grads['resnet']) == 0.0
  assert global_norm(grads['supervised_head']) > 0.0


def test_bfloat16_forward_same_argmax_as_float32(r18_variables):
  """bf16 compute with f32 params gives the f32 argmax class on a fixed batch.

  The classifier is a nearest-prototype one built from the f32 model: class c's
  weight is the unit-normalised, batch-centred f32 representation of image c,
  so image c's f32 logit is largest for class c (cosine 1 vs < 1). The test
  checks this f32 margin is large (>= 0.1) against bf16's ~1% relative error,
  so it is robust to seeds yet fails if the bf16 path is broken (wrong casts,
  bf16 BN statistics, etc.). It runs through the real `supervised_head`.
  """
  images = random_images(NUM_CLASSES, 16, seed=1)
  def forward(model):
    # One compile per dtype; the f32 one runs twice (same shapes).
    return jax.jit(lambda v: model.apply(v, images, train=True,
                                         mutable=['batch_stats']))

  f32 = forward(make_model(train_mode='supervised'))
  bf16 = forward(make_model(train_mode='supervised', dtype=jnp.bfloat16))
  h32 = f32(r18_variables)[0]['representation']
  mean = jnp.mean(h32, axis=0)
  protos = (h32 - mean) / jnp.linalg.norm(h32 - mean, axis=1, keepdims=True)
  params = {**r18_variables['params'],
            'supervised_head': {'kernel': protos.T, 'bias': -mean @ protos.T}}
  variables = {**r18_variables, 'params': params}

  out32, _ = f32(variables)
  out16, state16 = bf16(variables)
  h32, logits32 = out32['representation'], out32['logits']
  h16, logits16 = out16['representation'], out16['logits']
  assert logits16.dtype == jnp.float32 and h16.dtype == jnp.float32
  # Running statistics stay float32 after a bf16 step (same TrainState types).
  assert {x.dtype for x in jax.tree.leaves(state16)} == {
      jnp.dtype(jnp.float32)}
  cosines = logits32 / jnp.linalg.norm(h32 - mean, axis=1, keepdims=True)
  top2 = jnp.sort(cosines, axis=1)[:, -2:]
  assert float(jnp.min(top2[:, 1] - top2[:, 0])) >= 0.1  # test is meaningful
  np.testing.assert_array_equal(jnp.argmax(logits32, 1), jnp.arange(16))
  np.testing.assert_array_equal(jnp.argmax(logits16, 1), jnp.argmax(logits32, 1))
  # bf16 really ran (differs from f32) and stayed close.
  rel = jnp.linalg.norm(h16 - h32) / jnp.linalg.norm(h32)
  assert 0 < float(rel) < 0.05


def test_bfloat16_params_stay_float32():
  shapes = variable_shapes(make_model(dtype=jnp.bfloat16), 16)
  dtypes = {x.dtype for x in jax.tree.leaves(shapes)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_create_model_from_config():
  config = config_lib.base_config()
  config.update(resnet_depth=50, width_multiplier=2, sk_ratio=0.0625,
                image_size=32, num_proj_layers=3, ft_proj_selector=1,
                train_mode='finetune', dtype='bfloat16')
  model = models.create_model(config, num_classes=10)
  assert model.cifar_stem and model.num_classes == 10
  assert model.dtype == jnp.bfloat16 and model.width_multiplier == 2
  assert model.ft_proj_selector == 1 and model.sk_ratio == 0.0625
  config.image_size = 224
  assert not models.create_model(config, 10).cifar_stem


def test_bad_config_fails_fast():
  with pytest.raises(ValueError, match='num_classes'):
    variable_shapes(make_model(num_classes=None), 16)
  with pytest.raises(ValueError, match='ft_proj_selector'):
    variable_shapes(make_model(train_mode='finetune', ft_proj_selector=4), 16)
  with pytest.raises(ValueError, match='depth'):
    variable_shapes(resnet.ResNet(42), 32)


# ----------------------------------------------------------------------------
# BatchNorm: nn.BatchNorm's variables and numbers, folded form.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('use_bias', [True, False])
def test_batch_norm_equals_flax_batch_norm(use_bias):
  rng = np.random.default_rng(0)
  # Channels with a large mean relative to their spread: the folded form must
  # not lose them to cancellation.
  x = jnp.asarray(rng.normal(3.0, 0.5, (6, 5, 4, 7)), jnp.float32)
  ours = resnet.BatchNorm(use_running_average=False, use_bias=use_bias)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9,
                         epsilon=1e-5, use_bias=use_bias)
  v_ours = ours.init(jax.random.PRNGKey(0), x)
  v_flax = flax_bn.init(jax.random.PRNGKey(0), x)
  assert (jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_flax))
  params = {'scale': jnp.asarray(rng.uniform(0.5, 2.0, 7), jnp.float32)}
  if use_bias:
    params['bias'] = jnp.asarray(rng.normal(size=7), jnp.float32)
  variables = {'params': params, 'batch_stats': v_flax['batch_stats']}

  def run(module, x, params):
    return module.apply({'params': params,
                         'batch_stats': variables['batch_stats']}, x,
                        mutable=['batch_stats'])

  (y1, s1), (y2, s2) = run(ours, x, params), run(flax_bn, x, params)
  np.testing.assert_allclose(y1, y2, atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1, s2)
  # By hand: batch mean and biased variance per channel, decay 0.9.
  mean, var = np.mean(x, (0, 1, 2)), np.var(x, (0, 1, 2))
  np.testing.assert_allclose(s1['batch_stats']['mean'], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(s1['batch_stats']['var'], 0.9 + 0.1 * var,
                             atol=1e-5)
  # Gradients with respect to the input and the parameters.
  weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  grad = lambda m: jax.grad(lambda x, p: jnp.sum(run(m, x, p)[0] * weights),
                            argnums=(0, 1))(x, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               grad(ours), grad(flax_bn))
  # Inference mode uses the running statistics.
  stats = {'mean': jnp.asarray(mean), 'var': jnp.asarray(var)}
  apply_eval = lambda m: m.apply({'params': params, 'batch_stats': stats}, x)
  np.testing.assert_allclose(
      apply_eval(resnet.BatchNorm(use_running_average=True, use_bias=use_bias)),
      apply_eval(nn.BatchNorm(use_running_average=True, epsilon=1e-5,
                              use_bias=use_bias)), atol=2e-5)
  # bfloat16 compute: within bf16 rounding of the float32 result.
  y16, _ = run(resnet.BatchNorm(use_running_average=False, use_bias=use_bias,
                                dtype=jnp.bfloat16), x.astype(jnp.bfloat16),
               params)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y2, atol=0.05,
                             rtol=0.02)


# ----------------------------------------------------------------------------
# 1×1 convs as matmuls (the CPU lowering).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('strides,padding', [((1, 1), 'SAME'),
                                             ((2, 2), ((0, 0), (0, 0))),
                                             ((1, 1), ((0, 0), (0, 0)))])
def test_conv_1x1_as_dot_equals_lax_conv(strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 6, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 5, 7)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  conv = lambda f: (lambda x, w: f(x, w, strides, padding, dimension_numbers=dn))
  ours, lax_conv = conv(resnet.conv_1x1_as_dot), conv(jax.lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, w), lax_conv(x, w), rtol=1e-5, atol=1e-5)
  # By hand: a 1×1 conv is a matmul over channels at the strided pixels.
  np.testing.assert_allclose(
      ours(x, w), np.asarray(x)[:, ::strides[0], ::strides[1]] @ np.asarray(w)[0, 0],
      rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               loss(ours)(x, w), loss(lax_conv)(x, w))
  # A 3×3 kernel or a padded 1×1 goes to lax.
  w3 = jnp.asarray(rng.normal(size=(3, 3, 5, 7)), jnp.float32)
  dn3 = jax.lax.conv_dimension_numbers(x.shape, w3.shape,
                                       ('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(
      resnet.conv_1x1_as_dot(x, w3, (1, 1), 'SAME', dimension_numbers=dn3),
      jax.lax.conv_general_dilated(x, w3, (1, 1), 'SAME',
                                   dimension_numbers=dn3), rtol=1e-6)
  padded = ((1, 0), (0, 1))
  np.testing.assert_allclose(
      resnet.conv_1x1_as_dot(x, w, (1, 1), padded, dimension_numbers=dn),
      jax.lax.conv_general_dilated(x, w, (1, 1), padded, dimension_numbers=dn),
      rtol=1e-6)


def test_resnet50_with_dots_equals_resnet50_with_convs(monkeypatch):
  model = resnet.ResNet(50)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 64, 64, 3)),
                  jnp.float32)
  variables = filled_variables(variable_shapes(model, 64))
  assert resnet.one_by_one_convs_as_dots()  # Tests run on CPU.
  apply = lambda: model.apply(variables, x, train=False)
  # A new function each time: make_jaxpr caches traces by function.
  count = lambda op: str(jax.make_jaxpr(lambda: apply())()).count(op)
  with_dots, convs_with_dots = apply(), count('conv_general_dilated')
  assert count('dot_general') == 16 * 2 + 4  # conv1, conv3 per block, shortcuts.
  monkeypatch.setattr(resnet, 'one_by_one_convs_as_dots', lambda: False)
  with_convs = apply()
  assert count('conv_general_dilated') == convs_with_dots + 36
  np.testing.assert_allclose(with_dots, with_convs, rtol=1e-4, atol=1e-5)


def test_teacher_model_takes_only_the_teacher_keys_from_the_config():
  # A ViT student with a remat, non-default head: the teacher is the
  # config.teacher ResNet with the defaults elsewhere, at the student's
  # input size (its stem) and dtype, as a fine-tuned classifier.
  config = config_lib.base_config()
  config.update(dict(model='vit', remat=True, proj_hidden_dim=96,
                     proj_head_bn=False, fine_tune_after_block=2,
                     train_mode='distill', image_size=32, dtype='bfloat16'))
  config.teacher.update(dict(resnet_depth=18, width_multiplier=0.5,
                             num_proj_layers=2, proj_out_dim=64,
                             ft_proj_selector=1))
  teacher = models.create_teacher_model(config, 10)
  defaults = models.SimCLRModel()
  assert (teacher.model, teacher.resnet_depth, teacher.width_multiplier,
          teacher.num_proj_layers, teacher.proj_out_dim,
          teacher.ft_proj_selector) == ('resnet', 18, 0.5, 2, 64, 1)
  assert (teacher.remat, teacher.proj_hidden_dim, teacher.proj_head_bn,
          teacher.fine_tune_after_block) == (
              defaults.remat, defaults.proj_hidden_dim,
              defaults.proj_head_bn, defaults.fine_tune_after_block)
  assert teacher.cifar_stem and teacher.dtype == jnp.bfloat16
  assert teacher.train_mode == 'finetune' and teacher.num_classes == 10
  assert not teacher.lineareval_while_pretraining
