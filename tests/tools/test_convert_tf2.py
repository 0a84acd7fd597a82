"""convert_tf2: a reference-shaped TF2 checkpoint -> our Flax tree, same outputs.

The TF side is written here from the reference's layer structure
(google-research/simclr `tf2/resnet.py`, `tf2/model.py`): tf.Modules whose
attribute names (`resnet_model`, `initial_conv_relu_max_pool`, `block_groups`,
`layers`, `projection_layers`, `conv_relu_dropblock_layers`, `conv2d`, `bn`,
`_projection_head`, `linear_layers`, `supervised_head`, ...) and list positions
(variable-free padding / pooling / dropblock layers included) give the same
checkpoint keys as the reference's Keras model, and whose forward pass is
plain TF ops in inference mode. It shares no code with our Flax model, so
agreement of the outputs checks the converter and the architecture together.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.runtime import checkpoint
from simclr_jax.tools import convert_tf2

EPS = 1e-5
BOTTLENECK_LAYERS = {50: (3, 4, 6, 3)}


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


class BottleneckBlock(tf.Module):

  def __init__(self, rng, cin, filters, stride, use_projection, sk_ratio):
    super().__init__()
    self.projection_layers = []
    if use_projection:
      if sk_ratio > 0:  # ResNet-D shortcut.
        if stride > 1:
          self.projection_layers.append(NoVars('pad2'))
        self.projection_layers.append(NoVars(f'avgpool{stride}'))
        self.projection_layers.append(
            Conv2dFixedPadding(rng, cin, 4 * filters, 1, 1))
      else:
        self.projection_layers.append(
            Conv2dFixedPadding(rng, cin, 4 * filters, 1, stride))
      self.projection_layers.append(
          BatchNormRelu(rng, 4 * filters, relu=False))
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

  def __init__(self, rng, cin, filters, blocks, stride, sk_ratio):
    super().__init__()
    self.layers = [BottleneckBlock(rng, cin, filters, stride, True, sk_ratio)]
    self.layers += [BottleneckBlock(rng, 4 * filters, filters, 1, False,
                                    sk_ratio) for _ in range(1, blocks)]

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
    cin = 64 * w
    self.block_groups = []
    for g, blocks in enumerate(BOTTLENECK_LAYERS[depth]):
      filters = 64 * w * 2**g
      self.block_groups.append(BlockGroup(rng, cin, filters, blocks,
                                          1 if g == 0 else 2, sk_ratio))
      cin = 4 * filters

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
    if num_proj_layers:
      self._projection_head = ProjectionHead(rng, 2048 * width,
                                             num_proj_layers, out_dim)
    self.supervised_head = SupervisedHead(rng, 2048 * width, num_classes)

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
  h, z, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      flax_vars, jnp.asarray(images))
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
  """A SavedModel directory as released: `r50_1x_sk1/saved_model/`.

  Its `variables/variables` is an object-graph checkpoint of the saved root,
  which keeps the model under `model`. Unless `full`, only that file is
  written (tf.train.Checkpoint.write, the same format), because
  tf.saved_model.save costs ~10 s more; the slow command-line test writes the
  whole SavedModel.
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
  with pytest.raises(convert_tf2.ConversionError, match='basic-block'):
    convert_tf2.convert(_fake_variables((2, 2, 2, 2)))
  with pytest.raises(convert_tf2.ConversionError, match='block groups'):
    convert_tf2.convert(_fake_variables((2, 2, 2)))
  tf.train.Checkpoint(w=tf.Variable(1.0)).save(str(tmp_path / 'other' / 'c'))
  with pytest.raises(convert_tf2.ConversionError, match='one model'):
    convert_tf2.read_tf_checkpoint(str(tmp_path / 'other'))
  with pytest.raises(convert_tf2.ConversionError, match='neither'):
    convert_tf2.read_tf_checkpoint(str(tmp_path))
