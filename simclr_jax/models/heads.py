"""Projection head and linear classifier (reference `tf2/model.py`).

Projection head g(h) (SimCLR §2.1, SimCLRv2 §2):
- `none`: z = h.
- `linear`: z = BN_nocentre(W h).
- `nonlinear` with L = num_proj_layers: L-1 times `x <- relu(BN(W x))` with W
  of `hidden_dim` outputs (0: the width of h, the reference's square
  layers), then `z = BN_nocentre(W x)` with proj_out_dim outputs.
Dense layers have no bias (the following BN has one, except the last, which has
neither bias nor centre: the loss l2-normalises z, so a shift would only move
the origin); kernels N(0, 0.01) as the reference.

MoCo v3's head for ViT (Chen, Xie & He 2021, §5 and its `moco/builder.py`):
3 layers, hidden 4096, output 256, BN after every layer "following SimCLR",
the output BN without scale either (`out_bn_scale=False`: nothing affine
after the last matmul). `use_bn=False` drops every BN (their BN-free
ablation); the layers stay bias-free as theirs.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.resnet import BatchNorm

HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


class DenseBN(nn.Module):
  """Dense (no bias) -> BatchNorm (centre optional) -> optional ReLU."""
  features: int
  use_bn_bias: bool = True
  relu: bool = False
  dtype: Any = jnp.float32
  use_bn: bool = True
  use_bn_scale: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, use_bias=False, kernel_init=HEAD_KERNEL_INIT,
                 dtype=self.dtype, param_dtype=jnp.float32, name='dense')(x)
    if self.use_bn:
      x = BatchNorm(use_running_average=not train, use_bias=self.use_bn_bias,
                    use_scale=self.use_bn_scale, dtype=self.dtype,
                    name='bn')(x)
    return nn.relu(x) if self.relu else x


class ProjectionHead(nn.Module):
  """Projection head; returns `(projection, hiddens)`.

  `hiddens[0]` is the head's input h, `hiddens[j]` the output of layer j
  (after its ReLU for middle layers), so `hiddens[ft_proj_selector]` is the
  input of the fine-tuning classifier (reference `ProjectionHead.call`).
  `hiddens[-1]` is the projection. Layers are named `layer_{j}`, each with
  `dense` and `bn` (no `bn` with use_bn=False; the last `bn` has no
  `scale` with out_bn_scale=False). Outputs are in `dtype`.
  """
  mode: str
  num_layers: int
  out_dim: int
  dtype: Any = jnp.float32
  hidden_dim: int = 0
  use_bn: bool = True
  out_bn_scale: bool = True

  @nn.compact
  def __call__(self, h, train: bool):
    hiddens = [h]
    if self.mode == 'none':
      return h, hiddens
    if self.mode == 'linear':
      z = DenseBN(self.out_dim, use_bn_bias=False, dtype=self.dtype,
                  use_bn=self.use_bn, use_bn_scale=self.out_bn_scale,
                  name='layer_0')(h, train)
      hiddens.append(z)
      return z, hiddens
    if self.mode != 'nonlinear':
      raise ValueError(f'Unknown proj_head_mode {self.mode!r}; '
                       "expected 'none', 'linear' or 'nonlinear'.")
    if self.num_layers < 1:
      raise ValueError(f'num_proj_layers must be >= 1, got {self.num_layers}.')
    x = h
    hidden = self.hidden_dim or h.shape[-1]
    for j in range(self.num_layers):
      last = j == self.num_layers - 1
      x = DenseBN(self.out_dim if last else hidden,
                  use_bn_bias=not last, relu=not last, dtype=self.dtype,
                  use_bn=self.use_bn,
                  use_bn_scale=self.out_bn_scale or not last,
                  name=f'layer_{j}')(x, train)
      hiddens.append(x)
    return x, hiddens
