"""convert_tf2: a reference-shaped TF2 checkpoint -> our Flax tree, same outputs.

The TF side is written here from the reference's layer structure
(google-research/simclr `tf2/resnet.py`, `tf2/model.py`): tf.Modules whose
attribute names (`resnet_model`, `initial_conv_relu_max_pool`, `block_groups`,
`layers`, `projection_layers`, `conv_relu_dropblock_layers`,
`shortcut_layers`, `conv2d_bn_layers`, `conv2d`, `bn`, `_projection_head`,
`linear_layers`, `supervised_head`, ...) and list positions (variable-free
padding / pooling / dropblock layers included) give the same checkpoint keys
as the reference's Keras model, and whose forward pass is plain TF ops in
inference mode. It shares no code with our Flax model, so agreement of the
outputs checks the converter and the architecture together. SavedModels as
the reference exports them need its Keras layers themselves (Keras decides
their keys): `keras_reference_model` builds those. Then the command line:
one error line and exit code 2 for bad input, and an --out that is never
written over anything a conversion did not write.
"""
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import owned_output
from simclr_jax.tools import convert_tf2

EPS = 1e-5
# depth -> (block kind, blocks per group), as the reference's `model_params`.
RESNET_LAYERS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
                 50: ('bottleneck', (3, 4, 6, 3))}


class Vars(tf.Module):
  """A Keras layer's variables under their Keras names (kernel, gamma, ...)."""

  def __init__(self, **arrays):
    super().__init__()
    for name, value in arrays.items():
      setattr(self, name, tf.Variable(value.astype(np.float32)))


class NoVars(tf.Module):
  """A variable-free layer (padding, pooling, identity, dropblock)."""

  def __init__(self, op=None):
    super().__init__()
    self.op = op

  def __call__(self, x):
    if self.op == 'pad2':  # FixedPadding(2): (0, 1).
      return tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
    if self.op == 'maxpool':
      return tf.nn.max_pool2d(x, 3, 2, 'SAME')
    if self.op and self.op.startswith('avgpool'):
      stride = int(self.op[-1])
      return tf.nn.avg_pool2d(x, 2, stride, 'SAME' if stride == 1 else 'VALID')
    return x


class Conv2dFixedPadding(tf.Module):

  def __init__(self, rng, cin, cout, k, stride):
    super().__init__()
    self.k, self.stride = k, stride
    self.conv2d = Vars(kernel=rng.normal(0, (k * k * cin)**-0.5,
                                         (k, k, cin, cout)))

  def __call__(self, x):
    if self.stride > 1:
      total = self.k - 1
      pad = [total // 2, total - total // 2]
      x = tf.pad(x, [[0, 0], pad, pad, [0, 0]])
    return tf.nn.conv2d(x, self.conv2d.kernel, self.stride,
                        'SAME' if self.stride == 1 else 'VALID')


def _bn_vars(rng, c, center=True):
  arrays = dict(gamma=rng.uniform(0.2, 1.0, c),
                moving_mean=rng.normal(0, 0.1, c),
                moving_variance=rng.uniform(0.5, 1.5, c))
  if center:
    arrays['beta'] = rng.normal(0, 0.1, c)
  return Vars(**arrays)


class BatchNormRelu(tf.Module):

  def __init__(self, rng, c, relu=True, center=True):
    super().__init__()
    self.relu, self.center = relu, center
    self.bn = _bn_vars(rng, c, center)

  def __call__(self, x):
    bn = self.bn
    x = tf.nn.batch_normalization(x, bn.moving_mean, bn.moving_variance,
                                  bn.beta if self.center else None, bn.gamma,
                                  EPS)
    return tf.nn.relu(x) if self.relu else x


class SKConv2D(tf.Module):

  def __init__(self, rng, filters, stride, sk_ratio):
    super().__init__()
    mid = max(int(filters * sk_ratio), 32)
    self.conv2d_fixed_padding = Conv2dFixedPadding(rng, filters, 2 * filters,
                                                   3, stride)
    self.batch_norm_relu = BatchNormRelu(rng, 2 * filters)
    self.conv2d_0 = Vars(kernel=rng.normal(0, filters**-0.5,
                                           (1, 1, filters, mid)))
    self.batch_norm_relu_1 = BatchNormRelu(rng, mid)
    self.conv2d_1 = Vars(kernel=rng.normal(0, mid**-0.5,
                                           (1, 1, mid, 2 * filters)))

  def __call__(self, x):
    x = self.batch_norm_relu(self.conv2d_fixed_padding(x))
    streams = tf.stack(tf.split(x, 2, axis=3))
    pooled = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
    gate = self.batch_norm_relu_1(
        tf.nn.conv2d(pooled, self.conv2d_0.kernel, 1, 'SAME'))
    mixing = tf.nn.conv2d(gate, self.conv2d_1.kernel, 1, 'SAME')
    mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=3)), axis=0)
    return tf.reduce_sum(streams * mixing, 0)


def _projection_layers(rng, cin, cout, stride, sk_ratio):
  """A first block's projection shortcut (ResNet-D when sk_ratio > 0)."""
  layers = []
  if sk_ratio > 0:  # ResNet-D shortcut.
    if stride > 1:
      layers.append(NoVars('pad2'))
    layers.append(NoVars(f'avgpool{stride}'))
    layers.append(Conv2dFixedPadding(rng, cin, cout, 1, 1))
  else:
    layers.append(Conv2dFixedPadding(rng, cin, cout, 1, stride))
  layers.append(BatchNormRelu(rng, cout, relu=False))
  return layers


class ResidualBlock(tf.Module):
  """The reference's basic block (ResNet-18/34): its lists are named
  `conv2d_bn_layers` and `shortcut_layers`, and have no dropblock layers."""
  expansion = 1

  def __init__(self, rng, cin, filters, stride, use_projection, sk_ratio):
    super().__init__()
    self.shortcut_layers = (
        _projection_layers(rng, cin, filters, stride, sk_ratio)
        if use_projection else [])
    self.conv2d_bn_layers = [
        Conv2dFixedPadding(rng, cin, filters, 3, stride),
        BatchNormRelu(rng, filters),
        Conv2dFixedPadding(rng, filters, filters, 3, 1),
        BatchNormRelu(rng, filters, relu=False)]

  def __call__(self, x):
    shortcut = x
    for layer in self.shortcut_layers:
      shortcut = layer(shortcut)
    for layer in self.conv2d_bn_layers:
      x = layer(x)
    return tf.nn.relu(x + shortcut)


class BottleneckBlock(tf.Module):
  expansion = 4

  def __init__(self, rng, cin, filters, stride, use_projection, sk_ratio):
    super().__init__()
    self.projection_layers = (
        _projection_layers(rng, cin, 4 * filters, stride, sk_ratio)
        if use_projection else [])
    self.shortcut_dropblock = NoVars()
    layers = [Conv2dFixedPadding(rng, cin, filters, 1, 1),
              BatchNormRelu(rng, filters), NoVars()]
    if sk_ratio > 0:
      layers.append(SKConv2D(rng, filters, stride, sk_ratio))
    else:
      layers += [Conv2dFixedPadding(rng, filters, filters, 3, stride),
                 BatchNormRelu(rng, filters)]
    layers += [NoVars(), Conv2dFixedPadding(rng, filters, 4 * filters, 1, 1),
               BatchNormRelu(rng, 4 * filters, relu=False), NoVars()]
    self.conv_relu_dropblock_layers = layers

  def __call__(self, x):
    shortcut = x
    for layer in self.projection_layers:
      shortcut = layer(shortcut)
    for layer in self.conv_relu_dropblock_layers:
      x = layer(x)
    return tf.nn.relu(x + shortcut)


class BlockGroup(tf.Module):

  def __init__(self, rng, block, cin, filters, blocks, stride, sk_ratio):
    super().__init__()
    cout = block.expansion * filters
    self.layers = [block(rng, cin, filters, stride, True, sk_ratio)]
    self.layers += [block(rng, cout, filters, 1, False, sk_ratio)
                    for _ in range(1, blocks)]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class Resnet(tf.Module):

  def __init__(self, rng, depth, width, sk_ratio, cifar_stem):
    super().__init__()
    w = width
    if cifar_stem:
      stem = [Conv2dFixedPadding(rng, 3, 64 * w, 3, 1), NoVars(),
              BatchNormRelu(rng, 64 * w), NoVars()]
    else:
      if sk_ratio > 0:
        stem = [Conv2dFixedPadding(rng, 3, 32 * w, 3, 2),
                BatchNormRelu(rng, 32 * w),
                Conv2dFixedPadding(rng, 32 * w, 32 * w, 3, 1),
                BatchNormRelu(rng, 32 * w),
                Conv2dFixedPadding(rng, 32 * w, 64 * w, 3, 1)]
      else:
        stem = [Conv2dFixedPadding(rng, 3, 64 * w, 7, 2)]
      stem += [NoVars(), BatchNormRelu(rng, 64 * w), NoVars('maxpool'),
               NoVars()]
    self.initial_conv_relu_max_pool = stem
    kind, layers = RESNET_LAYERS[depth]
    block = ResidualBlock if kind == 'basic' else BottleneckBlock
    cin = 64 * w
    self.block_groups = []
    for g, blocks in enumerate(layers):
      filters = 64 * w * 2**g
      self.block_groups.append(BlockGroup(rng, block, cin, filters, blocks,
                                          1 if g == 0 else 2, sk_ratio))
      cin = block.expansion * filters
    self.output_width = cin

  def __call__(self, x):
    for layer in self.initial_conv_relu_max_pool + self.block_groups:
      x = layer(x)
    return tf.reduce_mean(x, [1, 2])


class LinearLayer(tf.Module):

  def __init__(self, rng, cin, cout, use_bias=True, use_bn=False):
    super().__init__()
    self.use_bn = use_bn
    dense = dict(kernel=rng.normal(0, cin**-0.5, (cin, cout)))
    if use_bias and not use_bn:
      dense['bias'] = rng.normal(0, 0.1, cout)
    self.dense = Vars(**dense)
    if use_bn:
      self.bn_relu = BatchNormRelu(rng, cout, relu=False, center=use_bias)

  def __call__(self, x):
    y = tf.matmul(x, self.dense.kernel)
    if self.use_bn:
      return self.bn_relu(y)
    return y + self.dense.bias


class ProjectionHead(tf.Module):

  def __init__(self, rng, cin, num_layers, out_dim):
    super().__init__()
    self.linear_layers = [
        LinearLayer(rng, cin, cin if j < num_layers - 1 else out_dim,
                    use_bias=j < num_layers - 1, use_bn=True)
        for j in range(num_layers)]

  def __call__(self, x):
    for j, layer in enumerate(self.linear_layers):
      x = layer(x)
      if j < len(self.linear_layers) - 1:
        x = tf.nn.relu(x)
    return x


class SupervisedHead(tf.Module):

  def __init__(self, rng, cin, num_classes):
    super().__init__()
    self.linear_layer = LinearLayer(rng, cin, num_classes)

  def __call__(self, x):
    return self.linear_layer(x)


class Model(tf.Module):
  """The reference Model: resnet_model, _projection_head, supervised_head."""

  def __init__(self, seed, depth=50, width=1, sk_ratio=0.0, cifar_stem=False,
               num_proj_layers=3, out_dim=128, num_classes=10):
    super().__init__()
    rng = np.random.default_rng(seed)
    self.resnet_model = Resnet(rng, depth, width, sk_ratio, cifar_stem)
    self.num_proj_layers = num_proj_layers
    features = self.resnet_model.output_width
    if num_proj_layers:
      self._projection_head = ProjectionHead(rng, features, num_proj_layers,
                                             out_dim)
    self.supervised_head = SupervisedHead(rng, features, num_classes)

  def __call__(self, x):
    h = self.resnet_model(x)
    z = self._projection_head(h) if self.num_proj_layers else h
    return h.numpy(), z.numpy(), self.supervised_head(h).numpy()


def _check_outputs(tf_model, flax_vars, model_kwargs, size):
  images = np.random.default_rng(1).uniform(0, 1, (2, size, size, 3))
  images = images.astype(np.float32)
  h_tf, z_tf, logits_tf = tf_model(tf.constant(images))
  model = convert_tf2.build_model(model_kwargs)
  # jit: op-by-op dispatch of a ResNet-50 is slower than compiling it.
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      flax_vars, jnp.asarray(images))
  h, z, logits = out['representation'], out['projection'], out['logits']
  scale = np.abs(h_tf).max()
  assert 0.05 < scale < 100  # The test network is neither dead nor exploding.
  np.testing.assert_allclose(h, h_tf, rtol=0, atol=1e-4)
  np.testing.assert_allclose(z, z_tf, rtol=0, atol=1e-4)
  np.testing.assert_allclose(logits, logits_tf, rtol=0, atol=1e-4)


def test_r50_v2_head_training_checkpoint(tmp_path):
  """ResNet-50 1x (ImageNet stem), 3-layer head, from a tf.train.Checkpoint."""
  tf_model = Model(seed=0)
  ckpt = tf.train.Checkpoint(model=tf_model, step=tf.Variable(7))
  prefix = ckpt.save(str(tmp_path / 'tf' / 'ckpt'))
  variables = convert_tf2.read_tf_checkpoint(str(tmp_path / 'tf'))  # Newest.
  assert 'resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel' in variables
  assert any(k.startswith('_projection_head/linear_layers/2/') for k in variables)
  flax_vars, kwargs = convert_tf2.convert(variables)
  assert kwargs == dict(
      resnet_depth=50, width_multiplier=1, sk_ratio=0.0, cifar_stem=False,
      proj_head_mode='nonlinear', num_proj_layers=3, proj_out_dim=128,
      num_classes=10, train_mode='pretrain', lineareval_while_pretraining=True)
  # 23,508,032 backbone parameters, as the reference's model.
  backbone = sum(x.size for x in jax.tree.leaves(flax_vars['params']['resnet']))
  assert backbone == 23_508_032
  _check_outputs(tf_model, flax_vars, kwargs, size=64)
  assert prefix.endswith('ckpt-1')


def _save_sk_saved_model(directory, full=False):
  """A model directory laid out as released: `r50_1x_sk1/saved_model/`.

  Its `variables/variables` is an object-graph checkpoint of the saved root,
  which keeps the model under `model`. Unless `full`, only that file is
  written (tf.train.Checkpoint.write, the same format), because
  tf.saved_model.save costs ~10 s more; the slow command-line test writes the
  whole SavedModel. The model here is made of tf.Modules, whose variables a
  SavedModel keys by attribute path; the positional keys of the reference's
  Keras layers are tested in test_keras_saved_model_as_the_reference_exports.
  """
  tf_model = Model(seed=2, sk_ratio=0.0625, num_proj_layers=2, out_dim=64,
                   num_classes=5)
  saved_model = directory / 'r50_1x_sk1' / 'saved_model'
  if full:
    root = tf.Module()
    root.model = tf_model
    tf.saved_model.save(root, str(saved_model))
  else:
    tf.train.Checkpoint(model=tf_model).write(
        str(saved_model / 'variables' / 'variables'))
  return tf_model, str(directory / 'r50_1x_sk1')


SK_KWARGS = dict(resnet_depth=50, width_multiplier=1, sk_ratio=0.0625,
                 cifar_stem=False, proj_head_mode='nonlinear',
                 num_proj_layers=2, proj_out_dim=64, num_classes=5,
                 train_mode='pretrain', lineareval_while_pretraining=True)


def test_r50_sk_saved_model_loads_as_init_checkpoint(tmp_path):
  """ResNet-50 SK (v2: ResNet-D stem and shortcuts), 2-layer head, from a
  SavedModel directory; the output loads through checkpoint.load_pretrained."""
  tf_model, path = _save_sk_saved_model(tmp_path)
  out = tmp_path / 'flax'
  summary = convert_tf2.run(path, str(out))
  assert 'ResNet-50 1x sk_ratio=0.0625 (ImageNet stem)' in summary
  assert '--config.sk_ratio=0.0625' in summary
  loaded = checkpoint.load_pretrained(str(out))
  target = jax.eval_shape(lambda: convert_tf2.build_model(SK_KWARGS).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
  for what in ('params', 'batch_stats'):
    checkpoint.check_shapes(target[what], loaded[what], reinit=(), what=what)
  _check_outputs(tf_model, loaded, SK_KWARGS, size=32)


@pytest.mark.slow
def test_command_line(tmp_path):
  _, path = _save_sk_saved_model(tmp_path, full=True)
  result = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.tools.convert_tf2',
       f'--tf_checkpoint={path}', f'--out={tmp_path / "flax"}'],
      capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Use with: --config.resnet_depth=50' in result.stdout
  loaded = checkpoint.load_pretrained(str(tmp_path / 'flax'))
  assert loaded['params']['resnet']['stem']['conv0']['kernel'].shape == (
      3, 3, 3, 32)
  result = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.tools.convert_tf2',
       f'--tf_checkpoint={tmp_path}', f'--out={tmp_path / "x"}'],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert result.stderr.strip().endswith('holds neither a SavedModel nor a '
                                        'checkpoint.')


def _fake_variables(depth_layers, extra=()):
  """A minimal reference-shaped variable dict (shapes only matter)."""
  z = lambda *s: np.zeros(s, np.float32)
  bn = lambda p, c: {f'{p}/bn/{n}': z(c) for n in
                     ('gamma', 'beta', 'moving_mean', 'moving_variance')}
  v = {'resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel': z(3, 3, 3, 64)}
  v.update(bn('resnet_model/initial_conv_relu_max_pool/2', 64))
  for g, blocks in enumerate(depth_layers):
    for b in range(blocks):
      p = f'resnet_model/block_groups/{g}/layers/{b}/conv2d_bn_layers'
      v[f'{p}/0/conv2d/kernel'] = z(3, 3, 64, 64)
      v.update(bn(f'{p}/1', 64))
  v.update(dict.fromkeys(extra, z(1)))
  return v


def test_unsupported_checkpoints_fail_clearly(tmp_path):
  with pytest.raises(convert_tf2.ConversionError, match='basic block'):
    convert_tf2.convert(_fake_variables((2, 2, 2, 2)))  # One conv a block.
  with pytest.raises(convert_tf2.ConversionError, match='block groups'):
    convert_tf2.convert(_fake_variables((2, 2, 2)))
  tf.train.Checkpoint(w=tf.Variable(1.0)).save(str(tmp_path / 'other' / 'c'))
  with pytest.raises(convert_tf2.ConversionError, match='one model'):
    convert_tf2.read_tf_checkpoint(str(tmp_path / 'other'))
  with pytest.raises(convert_tf2.ConversionError, match='neither'):
    convert_tf2.read_tf_checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------
# Basic-block ResNets (18/34).
# ----------------------------------------------------------------------------
# name -> (depth, cifar_stem, sk_ratio, image size)
BASIC_BLOCK_CASES = {
    'r18_cifar': (18, True, 0.0, 8),
    'r18_imagenet': (18, False, 0.0, 32),
    'r18_imagenet_resnet_d': (18, False, 0.0625, 32),
    'r34_cifar_resnet_d': (34, True, 0.0625, 8),
}


@pytest.mark.parametrize('case', sorted(BASIC_BLOCK_CASES))
def test_basic_block_training_checkpoint(tmp_path, case):
  """ResNet-18/34: the first block of every group has a projection shortcut
  (group 1's too), as in our ResNet; the converted model gives the
  reference-shaped model's outputs. With sk_ratio > 0 a basic-block network
  has no SK conv, only the ResNet-D stem and shortcuts; with the CIFAR stem
  the shortcut's list position is all that tells."""
  depth, cifar_stem, sk_ratio, size = BASIC_BLOCK_CASES[case]
  tf_model = Model(seed=3, depth=depth, sk_ratio=sk_ratio,
                   cifar_stem=cifar_stem, num_proj_layers=2, out_dim=32,
                   num_classes=4)
  tf.train.Checkpoint(model=tf_model).save(str(tmp_path / 'ckpt'))
  variables = convert_tf2.read_tf_checkpoint(str(tmp_path))
  assert ('resnet_model/block_groups/0/layers/0/shortcut_layers/'
          f'{1 if sk_ratio else 0}/conv2d/kernel') in variables  # After a pool.
  flax_vars, kwargs = convert_tf2.convert(variables)
  assert kwargs == dict(
      resnet_depth=depth, width_multiplier=1, sk_ratio=sk_ratio,
      cifar_stem=cifar_stem, proj_head_mode='nonlinear', num_proj_layers=2,
      proj_out_dim=32, num_classes=4, train_mode='pretrain',
      lineareval_while_pretraining=True)
  if depth == 18 and not sk_ratio:  # As models/resnet.py counts them.
    backbone = sum(x.size for x in
                   jax.tree.leaves(flax_vars['params']['resnet']))
    assert backbone == (11_173_056 if cifar_stem else 11_180_736)
  _check_outputs(tf_model, flax_vars, kwargs, size=size)


# ----------------------------------------------------------------------------
# SavedModels as the reference's run.py exports them: Keras layers.
# ----------------------------------------------------------------------------
def keras_reference_model(keras):
  """The reference's Keras model class, made of `keras`'s layers.

  Written here from the reference's layer structure (`tf2/resnet.py`,
  `tf2/model.py`; basic blocks and the CIFAR stem only): the same nesting of
  Keras layers and lists, attribute names, list positions (variable-free
  layers included) and order of construction, which decide how Keras tracks
  and a SavedModel keys the variables. BatchNorm as the reference's: decay
  0.9, epsilon 1e-5. `keras` is TF's own (Keras 3) or `tf_keras` (Keras 2,
  which the released models were written with).
  """
  layers = keras.layers

  class BatchNormRelu(layers.Layer):

    def __init__(self, relu=True, init_zero=False, center=True, **kwargs):
      super().__init__(**kwargs)
      self.relu = relu
      self.bn = layers.BatchNormalization(
          momentum=0.9, epsilon=EPS, center=center,
          gamma_initializer='zeros' if init_zero else 'ones')

    def call(self, inputs, training):
      inputs = self.bn(inputs, training=training)
      return tf.nn.relu(inputs) if self.relu else inputs

  class FixedPadding(layers.Layer):

    def __init__(self, kernel_size, **kwargs):
      super().__init__(**kwargs)
      self.kernel_size = kernel_size

    def call(self, inputs, training):
      total = self.kernel_size - 1
      pad = [total // 2, total - total // 2]
      return tf.pad(inputs, [[0, 0], pad, pad, [0, 0]])

  class Conv2dFixedPadding(layers.Layer):

    def __init__(self, filters, kernel_size, strides, **kwargs):
      super().__init__(**kwargs)
      self.fixed_padding = FixedPadding(kernel_size) if strides > 1 else None
      self.conv2d = layers.Conv2D(
          filters, kernel_size, strides, use_bias=False,
          padding='same' if strides == 1 else 'valid')

    def call(self, inputs, training):
      if self.fixed_padding:
        inputs = self.fixed_padding(inputs, training=training)
      return self.conv2d(inputs)

  class IdentityLayer(layers.Layer):

    def call(self, inputs, training):
      return tf.identity(inputs)

  class ResidualBlock(layers.Layer):

    def __init__(self, filters, strides, use_projection=False, **kwargs):
      super().__init__(**kwargs)
      # Both lists exist before either is filled, the shortcut filled first.
      self.conv2d_bn_layers = []
      self.shortcut_layers = []
      if use_projection:
        self.shortcut_layers.append(Conv2dFixedPadding(filters, 1, strides))
        self.shortcut_layers.append(BatchNormRelu(relu=False))
      self.conv2d_bn_layers.append(Conv2dFixedPadding(filters, 3, strides))
      self.conv2d_bn_layers.append(BatchNormRelu())
      self.conv2d_bn_layers.append(Conv2dFixedPadding(filters, 3, 1))
      self.conv2d_bn_layers.append(BatchNormRelu(relu=False, init_zero=True))

    def call(self, inputs, training):
      shortcut = inputs
      for layer in self.shortcut_layers:
        shortcut = layer(shortcut, training=training)
      for layer in self.conv2d_bn_layers:
        inputs = layer(inputs, training=training)
      return tf.nn.relu(inputs + shortcut)

  class BlockGroup(layers.Layer):

    def __init__(self, filters, blocks, strides, **kwargs):
      super().__init__(**kwargs)
      self.layers = [ResidualBlock(filters, strides, use_projection=True)]
      for _ in range(1, blocks):
        self.layers.append(ResidualBlock(filters, 1))

    def call(self, inputs, training):
      for layer in self.layers:
        inputs = layer(inputs, training=training)
      return inputs

  class Resnet(layers.Layer):

    def __init__(self, blocks_per_group, **kwargs):
      super().__init__(**kwargs)
      self.initial_conv_relu_max_pool = [
          Conv2dFixedPadding(64, 3, 1), IdentityLayer(name='initial_conv'),
          BatchNormRelu(), IdentityLayer(name='initial_max_pool')]
      self.block_groups = []
      for g, blocks in enumerate(blocks_per_group):
        self.block_groups.append(
            BlockGroup(64 * 2**g, blocks, 1 if g == 0 else 2,
                       name=f'block_group{g + 1}'))

    def call(self, inputs, training):
      for layer in self.initial_conv_relu_max_pool + self.block_groups:
        inputs = layer(inputs, training=training)
      return tf.reduce_mean(inputs, [1, 2])

  class LinearLayer(layers.Layer):

    def __init__(self, num_classes, use_bias=True, use_bn=False, **kwargs):
      super().__init__(**kwargs)
      self.num_classes, self.use_bias, self.use_bn = (num_classes, use_bias,
                                                      use_bn)
      if use_bn:
        self.bn_relu = BatchNormRelu(relu=False, center=use_bias)

    def build(self, input_shape):
      # The Dense layer is made at build time, after the BN above.
      self.dense = layers.Dense(self.num_classes,
                                use_bias=self.use_bias and not self.use_bn)
      super().build(input_shape)

    def call(self, inputs, training):
      inputs = self.dense(inputs)
      if self.use_bn:
        inputs = self.bn_relu(inputs, training=training)
      return inputs

  class ProjectionHead(layers.Layer):

    def __init__(self, width, num_layers, out_dim, **kwargs):
      super().__init__(**kwargs)
      self.linear_layers = [
          LinearLayer(width if j < num_layers - 1 else out_dim,
                      use_bias=j < num_layers - 1, use_bn=True,
                      name=f'nl_{j}')
          for j in range(num_layers)]

    def call(self, inputs, training):
      for j, layer in enumerate(self.linear_layers):
        inputs = layer(inputs, training=training)
        if j < len(self.linear_layers) - 1:
          inputs = tf.nn.relu(inputs)
      return inputs

  class SupervisedHead(layers.Layer):

    def __init__(self, num_classes, **kwargs):
      super().__init__(name='head_supervised', **kwargs)
      self.linear_layer = LinearLayer(num_classes)

    def call(self, inputs, training):
      return self.linear_layer(inputs, training=training)

  class ReferenceModel(keras.Model):
    """resnet_model, _projection_head, supervised_head; returns (h, z, logits).

    Like the reference's Model it overrides __call__ itself, so Keras never
    builds the model as a whole.
    """

    def __init__(self, blocks_per_group, num_proj_layers, out_dim, num_classes,
                 **kwargs):
      super().__init__(**kwargs)
      self.resnet_model = Resnet(blocks_per_group)
      self._projection_head = ProjectionHead(512, num_proj_layers, out_dim)
      self.supervised_head = SupervisedHead(num_classes)

    def __call__(self, inputs, training):
      h = self.resnet_model(inputs, training=training)
      return (h, self._projection_head(h, training=training),
              self.supervised_head(h, training=training))

  return ReferenceModel


def _export_as_the_reference(model, directory):
  """tf.saved_model.save of the root object the reference's run.py exports:
  `model`, `trainable_variables_list` and a traced __call__."""

  class SavedRoot(tf.Module):

    def __init__(self, model):
      super().__init__()
      self.model = model
      self.trainable_variables_list = model.trainable_variables

    @tf.function
    def __call__(self, inputs, trainable):
      return self.model(inputs, training=trainable)

  root = SavedRoot(model)
  spec = tf.TensorSpec([None, None, None, 3], tf.float32)
  for trainable in (True, False):
    root.__call__.get_concrete_function(spec, trainable=trainable)
  tf.saved_model.save(root, str(directory))


def _randomize(variables, rng):
  """Gives every variable values from which each layer's mistakes show."""
  for v in variables:
    name = v.name.split('/')[-1].split(':')[0]
    shape = tuple(v.shape)
    if name == 'kernel':
      value = rng.normal(0, np.prod(shape[:-1])**-0.5, shape)
    elif name in ('gamma', 'moving_variance'):
      value = rng.uniform(0.2 if name == 'gamma' else 0.5,
                          1.0 if name == 'gamma' else 1.5, shape)
    else:  # beta, moving_mean, bias
      value = rng.normal(0, 0.1, shape)
    v.assign(value.astype(np.float32))


@pytest.mark.parametrize('keras_name', ['keras', 'tf_keras'])
def test_keras_saved_model_as_the_reference_exports(tmp_path, keras_name):
  """A SavedModel written as the reference's run.py writes it (Keras layers,
  `saved_model/<step>/` in the model_dir) keys its variables by position,
  not name; the converter reads their names from the object graph, and our
  model reproduces the Keras model's features, projection and logits.

  `tf_keras` (Keras 2, the released models' Keras) runs where it is
  installed; TF's own Keras 3 always.
  """
  keras = (tf.keras if keras_name == 'keras' else
           pytest.importorskip('tf_keras'))
  model = keras_reference_model(keras)(
      blocks_per_group=(2, 2, 2, 2), num_proj_layers=2, out_dim=16,
      num_classes=5)
  images = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 3))
  images = tf.constant(images.astype(np.float32))
  model(images, training=False)  # Builds every layer.
  _randomize(model.variables, np.random.default_rng(5))
  h_tf, z_tf, logits_tf = (x.numpy() for x in model(images, training=False))
  export = tmp_path / 'run' / 'saved_model' / '1200'  # run.py: <global step>
  _export_as_the_reference(model, export)

  keys = set(tf.train.load_checkpoint(
      str(export / 'variables' / 'variables')).get_variable_to_shape_map())
  assert 'trainable_variables_list/0/.ATTRIBUTES/VARIABLE_VALUE' in keys
  assert not any(k.endswith('conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE')
                 for k in keys)  # No kernel is keyed by its name.
  summary = convert_tf2.run(str(export), str(tmp_path / 'flax'))
  assert 'ResNet-18 1x sk_ratio=0.0 (CIFAR stem), projection head 2 layers, ' \
         'supervised head 5' in summary
  # The model_dir designates its newest export.
  (tmp_path / 'run' / 'saved_model' / '600').mkdir()
  (tmp_path / 'run' / 'saved_model' / '600' / 'saved_model.pb').write_bytes(
      b'')
  assert convert_tf2.resolve_tf_checkpoint(str(tmp_path / 'run')) == str(
      export / 'variables' / 'variables')
  loaded = checkpoint.load_pretrained(str(tmp_path / 'flax'))
  kwargs = dict(resnet_depth=18, width_multiplier=1, sk_ratio=0.0,
                cifar_stem=True, proj_head_mode='nonlinear', num_proj_layers=2,
                proj_out_dim=16, num_classes=5, train_mode='pretrain',
                lineareval_while_pretraining=True)
  out = convert_tf2.build_model(kwargs).apply(
      loaded, jnp.asarray(images.numpy()), train=False)
  h, z, logits = out['representation'], out['projection'], out['logits']
  for ours, keras_out in ((h, h_tf), (z, z_tf), (logits, logits_tf)):
    scale = np.abs(keras_out).max()
    assert 0.05 < scale < 100  # Neither dead nor exploding.
    np.testing.assert_allclose(ours, keras_out, rtol=0, atol=1e-5 * scale)


# ----------------------------------------------------------------------------
# The command line: bad input is one line and exit code 2; --out is never
# written over anything a conversion did not write.
# ----------------------------------------------------------------------------
def _start_converter(*args):
  """`python -m simclr_jax.tools.convert_tf2 ARGS`, started, not awaited."""
  env = {k: v for k, v in os.environ.items()
         # The converter itself must keep TensorFlow's C++ logging quiet.
         if k != 'TF_CPP_MIN_LOG_LEVEL'}
  return subprocess.Popen(
      [sys.executable, '-m', 'simclr_jax.tools.convert_tf2', *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**env, 'JAX_PLATFORMS': 'cpu'})


def _finish(process):
  stdout, stderr = process.communicate(timeout=300)
  return process.returncode, stdout, stderr


def _assert_one_error_line(result, *names):
  returncode, stdout, stderr = result
  assert returncode == 2, stderr[-3000:]
  assert stdout == ''
  lines = stderr.splitlines()
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith('convert_tf2: error: '), lines[0]
  for name in names:
    assert str(name) in lines[0]


@pytest.fixture(scope='module')
def r18_checkpoint(tmp_path_factory):
  """A reference-shaped ResNet-18 (CIFAR stem) training checkpoint directory."""
  directory = tmp_path_factory.mktemp('r18')
  tf_model = Model(seed=6, depth=18, cifar_stem=True, num_proj_layers=2,
                   out_dim=16, num_classes=3)
  tf.train.Checkpoint(model=tf_model).save(str(directory / 'ckpt'))
  return tf_model, directory


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, r18_checkpoint):
  _, r18 = r18_checkpoint
  # .index of random bytes.
  (tmp_path / 'garbage').mkdir()
  (tmp_path / 'garbage' / 'ckpt-1.index').write_bytes(
      np.random.default_rng(0).bytes(4096))
  (tmp_path / 'garbage' / 'ckpt-1.data-00000-of-00001').write_bytes(b'x')
  # A reference-shaped checkpoint whose data file lost its second half.
  (tmp_path / 'truncated').mkdir()
  for name in os.listdir(r18):
    if name.startswith('ckpt-1.'):
      data = (r18 / name).read_bytes()
      if '.data-' in name:
        data = data[:len(data) // 2]
      (tmp_path / 'truncated' / name).write_bytes(data)
  # Neither a SavedModel nor a checkpoint.
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'notes.txt').write_text('not a checkpoint')
  # A checkpoint of something else.
  tf.train.Checkpoint(w=tf.Variable(1.0)).save(str(tmp_path / 'other' / 'c'))
  # SavedModels without variables: none to save, and the directory deleted.
  tf.saved_model.save(tf.Module(), str(tmp_path / 'no_vars'))
  tf.saved_model.save(tf.Module(), str(tmp_path / 'deleted' / 'saved_model'))
  shutil.rmtree(tmp_path / 'deleted' / 'saved_model' / 'variables')

  # --tf_checkpoint -> what the one error line must name. Those that TF
  # reads run as the command (one process each, all at once: most of each
  # one's time is imports); those decided by the directory layout alone
  # run in this process.
  command_cases = {
      'garbage/ckpt-1': 'garbage/ckpt-1.index',
      'truncated/ckpt-1': 'truncated/ckpt-1.data-00000-of-00001',
      'other': 'other/c-1.index',
      'no_vars': 'no_vars/variables/variables.index',
      'missing': 'missing',
  }
  processes = {
      case: _start_converter(f'--tf_checkpoint={tmp_path / case}',
                             f'--out={tmp_path / "out" / case}')
      for case in command_cases}
  processes['no flags'] = _start_converter(f'--out={tmp_path}')
  for case, name in (('empty', 'empty'), ('deleted', 'deleted/saved_model')):
    with pytest.raises(convert_tf2.ConversionError,
                       match=re.escape(str(tmp_path / name))):
      convert_tf2.run(str(tmp_path / case), str(tmp_path / 'out' / case))
  for case, process in processes.items():
    _assert_one_error_line(
        _finish(process),
        '--tf_checkpoint' if case == 'no flags' else
        tmp_path / command_cases[case])
  assert not (tmp_path / 'out').exists()


def _snapshot(directory):
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
          for p in sorted(directory.rglob('*'))}


def _leftovers(parent):
  return [name for name in os.listdir(parent) if '.tmp-' in name]


def test_out_is_never_written_over_other_files(tmp_path, r18_checkpoint):
  tf_model, r18 = r18_checkpoint
  # A previous conversion, from another checkpoint of the same network.
  other = tmp_path / 'other_ckpt'
  tf.train.Checkpoint(model=Model(seed=7, depth=18, cifar_stem=True,
                                  num_proj_layers=2, out_dim=16,
                                  num_classes=3)).save(str(other / 'ckpt'))
  previous = tmp_path / 'previous'
  convert_tf2.run(str(other), str(previous))
  assert (previous / owned_output.MARKER_FILE).is_file()
  # A user's directory, and a previous conversion someone added a file to.
  user_dir = tmp_path / 'workdir'
  (user_dir / 'checkpoints').mkdir(parents=True)
  (user_dir / 'notes.txt').write_text('mine')
  (user_dir / 'checkpoints' / 'state').write_bytes(b'\x00' * 100)
  amended = tmp_path / 'amended'
  shutil.copytree(previous, amended)
  (amended / 'd' / 'README').write_text('added by hand')
  before = {d: _snapshot(d) for d in (user_dir, amended)}

  processes = [
      (user_dir, _start_converter(f'--tf_checkpoint={r18}',
                                  f'--out={user_dir}')),
      (user_dir, _start_converter(f'--tf_checkpoint={r18}',
                                  f'--out={user_dir}', '--overwrite')),
      (amended, _start_converter(f'--tf_checkpoint={r18}',
                                 f'--out={amended}', '--overwrite')),
      (previous, _start_converter(f'--tf_checkpoint={r18}',
                                  f'--out={previous}')),  # No --overwrite.
  ]
  for out, process in processes:
    _assert_one_error_line(_finish(process), out)
  for directory, snapshot in before.items():
    assert _snapshot(directory) == snapshot
  assert 'README' in str(_finish(_start_converter(
      f'--tf_checkpoint={r18}', f'--out={amended}', '--overwrite'))[2])

  # --overwrite replaces a previous conversion, and only its files.
  returncode, stdout, stderr = _finish(_start_converter(
      f'--tf_checkpoint={r18}', f'--out={previous}', '--overwrite'))
  assert returncode == 0, stderr[-3000:]
  assert f'-> {previous}' in stdout
  loaded = checkpoint.load_pretrained(str(previous))
  np.testing.assert_array_equal(
      loaded['params']['resnet']['stem']['conv']['kernel'],
      tf_model.resnet_model.initial_conv_relu_max_pool[0].conv2d.kernel.numpy())
  assert not _leftovers(tmp_path)
  # An empty directory (made for it beforehand) is written into.
  (tmp_path / 'empty').mkdir()
  convert_tf2.run(str(r18), str(tmp_path / 'empty'))
  assert checkpoint.load_pretrained(str(tmp_path / 'empty'))['params']


def test_failed_write_leaves_out_as_it_was(tmp_path, r18_checkpoint,
                                           monkeypatch):
  """Written beside --out and renamed when complete: a failure midway leaves
  neither a half-written --out nor temporary files."""
  _, r18 = r18_checkpoint
  out = tmp_path / 'flax'
  convert_tf2.run(str(r18), str(out))
  before = _snapshot(out)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real_save = ocp.StandardCheckpointer.save

  def save_then_fail(self, directory, *args, **kwargs):
    real_save(self, directory, *args, **kwargs)
    self.wait_until_finished()
    raise OSError('No space left on device (simulated)')

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', save_then_fail)
  with pytest.raises(OSError, match='simulated'):
    convert_tf2.run(str(r18), str(out), overwrite=True)
  with pytest.raises(OSError, match='simulated'):
    convert_tf2.run(str(r18), str(tmp_path / 'new'))
  assert _snapshot(out) == before
  assert not (tmp_path / 'new').exists()
  assert not _leftovers(tmp_path)
