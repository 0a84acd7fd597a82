"""ResNet v1 backbones for SimCLR (depths 18-200, width multiplier, SK, CIFAR stem).

Follows the reference release's `tf2/resnet.py` (google-research/simclr):
- post-activation ResNet v1; bottleneck blocks put the stride on the 3x3 conv
  ("v1.5"), basic blocks on their first 3x3 conv;
- conv kernels have no bias, init VarianceScaling(1, fan_in, truncated normal);
- BatchNorm momentum 0.9 (the reference's batch_norm_decay), eps 1e-5; the last
  BN of every residual branch has gamma initialised to zero, so every block starts
  as the identity on its shortcut;
- strided convs pad explicitly with (k-1)//2 before / the rest after, then VALID
  (the reference's `Conv2dFixedPadding`), stride-1 convs use SAME;
- `sk_ratio > 0` (SimCLRv2): the bottleneck's 3x3 conv becomes a selective-kernel
  conv, the ImageNet stem becomes the ResNet-D stem (three 3x3 convs) and the
  projection shortcut becomes avg-pool + 1x1 conv (ResNet-D);
- `cifar_stem`: a single 3x3 stride-1 conv and no max-pool.

As in the reference, the first block of every block group has a projection
shortcut (1x1 conv + BN), also where the shape does not change (block group 1
of the basic-block ResNet-18/34). That makes ResNet-18 4,224 parameters larger
than torchvision's (11,180,736 backbone parameters with the ImageNet stem); the
bottleneck networks' first blocks change the channel count anyway (ResNet-50
1x: 23,508,032).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BATCH_NORM_DECAY = 0.9
BATCH_NORM_EPSILON = 1e-5

# depth -> (block kind, blocks per group), as the reference's `model_params`.
RESNET_LAYERS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}

conv_kernel_init = nn.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal')


def channels(base: int, width_multiplier: float) -> int:
  """int(base·w): a layer's channel count at width multiplier w.

  The paper's multipliers are integers (1x, 2x, 4x); a fraction (e.g. 0.5)
  gives the narrower networks that a small dataset on a CPU can afford.
  """
  return max(int(base * width_multiplier), 1)


def output_width(depth: int, width_multiplier: float = 1) -> int:
  """Width of the pooled representation: 512·w (18/34) or 2048·w (50+)."""
  kind, _ = RESNET_LAYERS[depth]
  return channels(512, width_multiplier) * (1 if kind == 'basic' else 4)


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all axes but the last, computed as x·mul + add.

  Same variables (params `scale`, `bias`; batch_stats `mean`, `var`), the same
  statistics (float32, Var = E[x²] − E[x]², clipped at 0) and the same
  running-average update as `nn.BatchNorm(momentum, epsilon)`. The difference
  is only the form of the normalisation: Flax computes (x − mean)·mul + bias
  on the whole activation, we fold mean and bias into one per-channel add, so
  XLA keeps only x for the backward pass (less memory; README, performance).
  The normalisation runs in float32 and is cast to `dtype`: in bfloat16, x·mul
  and −mean·mul would cancel.
  """
  use_running_average: bool
  momentum: float = BATCH_NORM_DECAY
  epsilon: float = BATCH_NORM_EPSILON
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Any = nn.initializers.ones
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    scale = (self.param('scale', self.scale_init, features, jnp.float32)
             if self.use_scale else 1.0)
    bias = (self.param('bias', nn.initializers.zeros, features, jnp.float32)
            if self.use_bias else 0.0)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features,
                                 jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features,
                                jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axes) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        decay = self.momentum
        running_mean.value = decay * running_mean.value + (1 - decay) * mean
        running_var.value = decay * running_var.value + (1 - decay) * var
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    add = bias - mean * mul
    return (x.astype(jnp.float32) * mul + add).astype(self.dtype)


def batch_norm(x, train: bool, *, name: str, relu: bool = True,
               zero_init: bool = False, dtype: Any = jnp.float32):
  """BatchNorm (+ ReLU) with the reference's decay, epsilon and gamma init.

  Called inside a parent's `nn.compact` method, so the layer is a direct child
  of that parent (param path `.../name/scale`).
  """
  x = BatchNorm(
      use_running_average=not train,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      dtype=dtype,
      name=name)(x)
  return nn.relu(x) if relu else x


def conv_1x1_as_dot(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None,
                    feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for an unpadded 1×1 NHWC conv, as a matmul.

  A 1×1 conv with stride s is x[:, ::s, ::s] @ W; XLA:CPU runs that dot
  1.6-3× faster than the same convolution, forward and backward (measured
  on ResNet-50 shapes). Anything else goes to lax.conv_general_dilated.
  """
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ('NHWC', 'HWIO', 'NHWC'))
  unpadded = padding == 'SAME' or all(tuple(p) == (0, 0) for p in padding)
  if (rhs.shape[:2] != (1, 1) or feature_group_count != 1 or not unpadded or
      any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())) or
      dimension_numbers != nhwc):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  sh, sw = window_strides
  return jnp.einsum('nhwc,co->nhwo', lhs[:, ::sh, ::sw, :], rhs[0, 0],
                    precision=precision)


def one_by_one_convs_as_dots() -> bool:
  """True where `conv_1x1_as_dot` is the faster lowering: XLA:CPU. On GPU
  and TPU the convolution libraries already run 1×1 convs as GEMMs."""
  return jax.default_backend() == 'cpu'


def fixed_padding_conv(x, features: int, kernel_size: int, strides: int = 1, *,
                       name: str, dtype: Any = jnp.float32):
  """Conv without bias; explicit (k-1)//2 | k-1-(k-1)//2 padding when strided.

  Matches the reference's `Conv2dFixedPadding`: the padding of a strided conv
  does not depend on the input size (TF's SAME would pad (0, 1) on even inputs).
  1×1 convs run as matmuls on CPU (`conv_1x1_as_dot`); the parameter is the
  same [1, 1, in, out] kernel either way.
  """
  if strides > 1:
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    padding = ((pad_beg, pad_total - pad_beg),) * 2
  else:
    padding = 'SAME'
  as_dot = kernel_size == 1 and one_by_one_convs_as_dots()
  return nn.Conv(
      features, (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      use_bias=False,
      kernel_init=conv_kernel_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      conv_general_dilated=conv_1x1_as_dot if as_dot else None,
      name=name)(x)


class SelectiveKernelConv(nn.Module):
  """Selective-kernel 3x3 conv (Li et al. 2019, arXiv:1903.06586), as SimCLRv2.

  Two 3x3 streams are computed by one conv with 2·filters outputs (+BN+ReLU) and
  split. A gate from the global average of their sum,
  `a = softmax_streams(W2 · relu(BN(W1 · mean_hw(s1 + s2))))`, mixes them:
  `y = a1 * s1 + a2 * s2`. W1 has `max(int(filters·sk_ratio), 32)` outputs.
  """
  filters: int
  strides: int
  sk_ratio: float
  min_dim: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = fixed_padding_conv(x, 2 * self.filters, 3, self.strides, name='conv',
                           dtype=self.dtype)
    x = batch_norm(x, train, name='bn', dtype=self.dtype)
    streams = jnp.stack(jnp.split(x, 2, axis=-1))  # [2, B, H, W, C]
    global_features = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2),
                               keepdims=True)
    mid_dim = max(int(self.filters * self.sk_ratio), self.min_dim)
    gate = fixed_padding_conv(global_features, mid_dim, 1, name='gate_conv1',
                              dtype=self.dtype)
    gate = batch_norm(gate, train, name='gate_bn', dtype=self.dtype)
    mixing = fixed_padding_conv(gate, 2 * self.filters, 1, name='gate_conv2',
                                dtype=self.dtype)
    mixing = jnp.stack(jnp.split(mixing, 2, axis=-1))  # [2, B, 1, 1, C]
    # Softmax in float32: the gate decides the mix of two large activations.
    mixing = jax.nn.softmax(mixing.astype(jnp.float32), axis=0)
    return jnp.sum(streams * mixing.astype(streams.dtype), axis=0)


class ProjectionShortcut(nn.Module):
  """1x1 conv + BN shortcut; with ResNet-D (sk_ratio > 0) avg-pool first.

  ResNet-D (He et al. 2019, arXiv:1812.01187) moves the stride from the 1x1 conv
  to a 2x2 average pool so no input pixel is skipped. As in the reference, a
  strided pool pads (0, 1) with zeros that count in the average, a stride-1 pool
  uses SAME padding that does not count.
  """
  features: int
  strides: int
  resnet_d: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.resnet_d:
      if self.strides > 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = nn.avg_pool(x, (2, 2), strides=(self.strides,) * 2, padding='VALID')
      else:
        x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)),
                        count_include_pad=False)
      x = fixed_padding_conv(x, self.features, 1, 1, name='conv',
                           dtype=self.dtype)
    else:
      x = fixed_padding_conv(x, self.features, 1, self.strides, name='conv',
                           dtype=self.dtype)
    return batch_norm(x, train, relu=False, name='bn', dtype=self.dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convs: `relu(x_short + BN(conv(relu(BN(conv(x))))))`.

  `use_projection`: the shortcut is a 1x1 conv + BN (the first block of each
  group, as the reference), else the identity.
  """
  filters: int
  strides: int
  use_projection: bool = False
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if self.use_projection:
      shortcut = ProjectionShortcut(self.filters, self.strides,
                                    resnet_d=self.sk_ratio > 0,
                                    dtype=self.dtype, name='shortcut')(x, train)
    y = fixed_padding_conv(x, self.filters, 3, self.strides, name='conv1',
                           dtype=self.dtype)
    y = batch_norm(y, train, name='bn1', dtype=self.dtype)
    y = fixed_padding_conv(y, self.filters, 3, 1, name='conv2',
                           dtype=self.dtype)
    y = batch_norm(y, train, relu=False, zero_init=True, name='bn2',
                   dtype=self.dtype)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """1x1 (filters) -> 3x3 (filters, strided; SK if sk_ratio > 0) -> 1x1 (4·filters).

  `use_projection` as in BasicBlock.
  """
  filters: int
  strides: int
  use_projection: bool = False
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if self.use_projection:
      shortcut = ProjectionShortcut(4 * self.filters, self.strides,
                                    resnet_d=self.sk_ratio > 0,
                                    dtype=self.dtype, name='shortcut')(x, train)
    y = fixed_padding_conv(x, self.filters, 1, 1, name='conv1',
                           dtype=self.dtype)
    y = batch_norm(y, train, name='bn1', dtype=self.dtype)
    if self.sk_ratio > 0:
      # The SK conv carries its own BN + ReLU on the streams.
      y = SelectiveKernelConv(self.filters, self.strides, self.sk_ratio,
                              dtype=self.dtype, name='sk_conv')(y, train)
    else:
      y = fixed_padding_conv(y, self.filters, 3, self.strides, name='conv2',
                           dtype=self.dtype)
      y = batch_norm(y, train, name='bn2', dtype=self.dtype)
    y = fixed_padding_conv(y, 4 * self.filters, 1, 1, name='conv3',
                           dtype=self.dtype)
    y = batch_norm(y, train, relu=False, zero_init=True, name='bn3',
                   dtype=self.dtype)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet v1 returning the global-average-pooled representation, float32.

  Attributes:
    depth: 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck blocks).
    width_multiplier: w > 0; channels are int(64·w) ... int(512·w) (·4 for
      bottleneck blocks), so 0.5 halves the network.
    sk_ratio: > 0 turns on selective kernels, the ResNet-D stem and shortcut.
    cifar_stem: 3x3 stride-1 stem conv and no max-pool (images <= 32 px).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
    fine_tune_after_block: as the reference's flag: the output of block k
      (0 = stem, 1..4 = block groups) goes through stop_gradient, so blocks
      0..k get no gradient, and those blocks run BatchNorm in inference mode
      (the reference makes them non-trainable Keras layers, which do the same).
      -1 trains everything.
    remat: wrap every residual block in `nn.remat` (saves activation memory for
      wide models at the cost of recomputing the forward pass).

  Parameter tree: `stem` (`conv`/`bn`, or `conv0..2`/`bn0..2` for ResNet-D),
  `block_group{g}_block{j}` (g = 1..4) with `conv1..3`, `bn1..3` (basic
  blocks: `conv1..2`, `bn1..2`), optional `shortcut/{conv,bn}`, and for SK
  bottlenecks `sk_conv/{conv,bn,gate_conv1,gate_bn,gate_conv2}` in place of
  `conv2`/`bn2`.
  """
  depth: int
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  fine_tune_after_block: int = -1
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in RESNET_LAYERS:
      raise ValueError(f'Unsupported ResNet depth {self.depth}; '
                       f'choose one of {sorted(RESNET_LAYERS)}.')
    kind, layers = RESNET_LAYERS[self.depth]
    block_cls = BasicBlock if kind == 'basic' else BottleneckBlock
    if self.remat:
      # argnum 0 is the module itself, 2 is `train` (a Python bool).
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    w = self.width_multiplier
    x = jnp.asarray(x, self.dtype)

    # Block 0: the stem. A block index <= fine_tune_after_block is frozen.
    stem_train = train and self.fine_tune_after_block < 0
    x = Stem(channels(64, w), cifar_stem=self.cifar_stem, resnet_d=self.sk_ratio > 0,
             dtype=self.dtype, name='stem')(x, stem_train)
    if self.fine_tune_after_block == 0:
      x = jax.lax.stop_gradient(x)

    for group, (num_blocks, filters) in enumerate(
        zip(layers, [channels(c, w) for c in (64, 128, 256, 512)]), start=1):
      group_train = train and self.fine_tune_after_block < group
      for j in range(num_blocks):
        strides = 2 if (group > 1 and j == 0) else 1
        x = block_cls(filters, strides, use_projection=j == 0,
                      sk_ratio=self.sk_ratio,
                      dtype=self.dtype,
                      name=f'block_group{group}_block{j}')(x, group_train)
      if self.fine_tune_after_block == group:
        x = jax.lax.stop_gradient(x)

    # Pool in float32: a mean over up to 56x56 positions loses bits in bf16.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class Stem(nn.Module):
  """CIFAR: 3x3/1 conv-BN-ReLU. ImageNet: 7x7/2 conv-BN-ReLU, 3x3/2 max-pool.

  ResNet-D (sk_ratio > 0, ImageNet stem): the 7x7 conv becomes three 3x3 convs
  (32·w/2, stride 2; 32·w, 1; 64·w, 1) with BN-ReLU between them.
  """
  features: int
  cifar_stem: bool
  resnet_d: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.cifar_stem:
      x = fixed_padding_conv(x, self.features, 3, 1, name='conv',
                           dtype=self.dtype)
      return batch_norm(x, train, name='bn', dtype=self.dtype)
    if self.resnet_d:
      x = fixed_padding_conv(x, self.features // 2, 3, 2, name='conv0',
                           dtype=self.dtype)
      x = batch_norm(x, train, name='bn0', dtype=self.dtype)
      x = fixed_padding_conv(x, self.features // 2, 3, 1, name='conv1',
                           dtype=self.dtype)
      x = batch_norm(x, train, name='bn1', dtype=self.dtype)
      x = fixed_padding_conv(x, self.features, 3, 1, name='conv2',
                           dtype=self.dtype)
      x = batch_norm(x, train, name='bn2', dtype=self.dtype)
    else:
      x = fixed_padding_conv(x, self.features, 7, 2, name='conv',
                           dtype=self.dtype)
      x = batch_norm(x, train, name='bn', dtype=self.dtype)
    # Max-pool SAME: lax pads (total//2, rest) with -inf, as TF's SAME does.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
