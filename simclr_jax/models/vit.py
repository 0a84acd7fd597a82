"""Vision Transformer backbones for SimCLR, with the MoCo v3 stability options.

The encoder is the standard ViT (Dosovitskiy et al., "An Image is Worth 16x16
Words", ICLR 2021): non-overlapping p×p patches, each linearly projected to
`hidden_size`; a class token or global average pooling; a position
embedding; `depth` pre-LayerNorm blocks of multi-head self-attention and a
GELU MLP of width `mlp_ratio·hidden_size`, each added to the residual
stream; a final LayerNorm. `__call__` returns the representation h (the
class token's or the tokens' mean, after the final LayerNorm); there is no
classifier, SimCLR puts its projection head on h.

Options from MoCo v3 (Chen, Xie, He, "An Empirical Study of Training
Self-Supervised Vision Transformers", ICCV 2021), which found that
contrastive ViT training, SimCLR included, suffers accuracy-costing
instabilities whose gradient spikes appear first in the patch projection:
- `frozen_patch_embedding`: the patch projection stays a fixed random layer
  (their "trick for improving stability": smoother training curves, +1.7
  points of linear accuracy at lr 1.5e-4). Implemented as a
  stop_gradient on its kernel and bias, so its gradient is exactly zero; its
  parameters keep their path `.../patch_embedding/{kernel,bias}` so the
  optimizer can leave them out altogether (`frozen_patch_embedding_mask`):
  AdamW's decoupled weight decay would otherwise still shrink them.
- `position_embedding='sincos2d'`: the fixed 2-D sin-cos embedding of their
  reference code (not a parameter); learned embeddings were slightly worse
  there (76.1 vs 76.5 % for ViT-B/16).
The rest of the recipe (AdamW with lr·batch/256, warmup + cosine, weight
decay 0.1, BatchNorm in the projection head) is optimizer and head business.

Initialisation follows the ViT authors' JAX code (big_vision): dense kernels
Xavier-uniform, the query, key and value projections each on their own
[hidden, hidden] fan (as MoCo v3 also does, rather than one [hidden,
3·hidden] fan); attention biases zero; MLP biases N(0, 1e-6); the patch
projection LeCun-normal on its fan-in p·p·3 (Flax's convolution default)
with zero bias; the class token zero; a learned position embedding
N(0, 1/hidden). MoCo v3's PyTorch release differs in small ways (Xavier
for the patch projection, N(0, 1e-6) class token, zero MLP biases).
LayerNorm epsilon 1e-6 (both). GELU is the exact (erf) form. No dropout:
SimCLR pretraining uses none.

`dtype` is the compute dtype of the matmuls; parameters are float32. The
residual stream, LayerNorm and the attention softmax stay in float32:
2·depth branch outputs are summed into the stream, and bfloat16's 8-bit
mantissa would round small updates of large activations away.
"""
import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LAYER_NORM_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTShape:
  """Width, depth and heads of one ViT size."""
  hidden_size: int
  depth: int
  num_heads: int


# Sizes: ViT paper Table 1 (Base, Large; MLP width 4·hidden) and DeiT
# (Touvron et al. 2021) Table 1 (Tiny, Small), the same as big_vision;
# 'mu' is big_vision's micro size (width 32, one block, 2 heads), for tests
# and CPU demos. MoCo v3's ViT-S uses 12 heads instead of 6; heads change
# neither the parameter count nor the FLOPs (`vit_from_variant(...,
# num_heads=12)`).
VIT_VARIANTS = {
    'mu': ViTShape(hidden_size=32, depth=1, num_heads=2),
    'Ti': ViTShape(hidden_size=192, depth=12, num_heads=3),
    'S': ViTShape(hidden_size=384, depth=12, num_heads=6),
    'B': ViTShape(hidden_size=768, depth=12, num_heads=12),
    'L': ViTShape(hidden_size=1024, depth=24, num_heads=16),
}
# 4: the usual patch for CIFAR-size (32 px) images.
PATCH_SIZES = (4, 8, 14, 16, 32)
POOLINGS = ('token', 'gap')
POSITION_EMBEDDINGS = ('learned', 'sincos2d')


def parse_vit_variant(name: str) -> dict[str, int]:
  """'S/16' -> dict(hidden_size=384, depth=12, num_heads=6, patch_size=16)."""
  match = re.fullmatch(r'([A-Za-z]+)/(\d+)', str(name).strip())
  size, patch = (match.group(1), int(match.group(2))) if match else (None, None)
  if size not in VIT_VARIANTS or patch not in PATCH_SIZES:
    raise ValueError(
        f'Unknown ViT variant {name!r}: expected SIZE/PATCH with SIZE one of '
        f'{", ".join(VIT_VARIANTS)} and PATCH one of '
        f'{", ".join(map(str, PATCH_SIZES))} (e.g. \'S/16\').')
  return dict(dataclasses.asdict(VIT_VARIANTS[size]), patch_size=patch)


def vit_from_variant(name: str, **options) -> 'VisionTransformer':
  """`VisionTransformer` of a named variant; `options` set or override fields."""
  return VisionTransformer(**{**parse_vit_variant(name), **options})


def sincos_2d_position_embedding(grid_height: int, grid_width: int,
                                 width: int,
                                 temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding, [grid_height·grid_width, width].

  Patches are numbered row by row. With D = width, k = 0..D/4-1 and
  ω_k = temperature^(-k/(D/4)), the patch in row r, column c gets
  [sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]: half the channels per axis,
  each half sine then cosine. This is the table of MoCo v3's reference code
  as it lands on row-major patches (big_vision's sincos2d has the column
  half first and ω_k = temperature^(-k/(D/4-1))).
  """
  if width % 4:
    raise ValueError(f'The sin-cos position embedding needs hidden_size '
                     f'divisible by 4, got {width}.')
  quarter = width // 4
  omega = 1.0 / temperature**(np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width),
                           indexing='ij')
  row_angles = rows.reshape(-1, 1) * omega
  col_angles = cols.reshape(-1, 1) * omega
  table = np.concatenate([np.sin(row_angles), np.cos(row_angles),
                          np.sin(col_angles), np.cos(col_angles)], axis=1)
  return table.astype(np.float32)


class PatchEmbedding(nn.Module):
  """Linear projection of non-overlapping p×p patches: [N,H,W,C] -> [N,h·w,D].

  The kernel is stored as a [p, p, C, D] convolution kernel (the usual ViT
  checkpoint layout) and applied as one matmul on the flattened patches.
  `frozen`: stop_gradient on kernel and bias (MoCo v3's random patch
  projection).
  """
  patch_size: int
  hidden_size: int
  frozen: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    n, height, width, channels = images.shape
    p = self.patch_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (p, p, channels, self.hidden_size), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.hidden_size,),
                      jnp.float32)
    if self.frozen:
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    patches = images.reshape(n, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
        n, (height // p) * (width // p), p * p * channels)
    tokens = jnp.dot(patches.astype(self.dtype),
                     kernel.reshape(p * p * channels, -1).astype(self.dtype))
    return tokens + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention; logits and softmax in float32."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    projection = functools.partial(
        nn.DenseGeneral, (self.num_heads, head_dim),
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
        param_dtype=jnp.float32)
    query, key, value = (projection(name=name)(x)
                         for name in ('query', 'key', 'value'))
    # jax.nn's XLA attention accumulates the logits in float32 (also for
    # bfloat16 inputs) and takes the softmax in float32.
    attended = jax.nn.dot_product_attention(query, key, value)
    return nn.DenseGeneral(hidden, axis=(-2, -1),
                           kernel_init=nn.initializers.xavier_uniform(),
                           dtype=self.dtype, param_dtype=jnp.float32,
                           name='out')(attended)


class MlpBlock(nn.Module):
  """Dense(mlp_ratio·D) -> GELU -> Dense(D)."""
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1]
    dense = functools.partial(
        nn.Dense, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
        param_dtype=jnp.float32)
    x = dense(self.mlp_ratio * hidden, name='dense1')(x)
    x = nn.gelu(x, approximate=False)
    return dense(hidden, name='dense2')(x)


def layer_norm(name: str):
  """LayerNorm computed and returned in float32 (float32 parameters)."""
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)); x stays float32."""
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layer_norm('norm1')(x).astype(self.dtype)
    x = x + SelfAttention(self.num_heads, dtype=self.dtype,
                          name='attention')(y).astype(jnp.float32)
    y = layer_norm('norm2')(x).astype(self.dtype)
    return x + MlpBlock(self.mlp_ratio, dtype=self.dtype,
                        name='mlp')(y).astype(jnp.float32)


class VisionTransformer(nn.Module):
  """ViT encoder; `__call__(images [N,H,W,C], train)` -> h [N, hidden] float32.

  Attributes:
    patch_size: side p of the square patches; H and W must be multiples.
    hidden_size, depth, num_heads: width D, number of blocks, heads
      (D divisible by heads).
    mlp_ratio: MLP width over D.
    pooling: 'token' (a class token, prepended, whose output is h) or 'gap'
      (the mean of the patch tokens after the final LayerNorm, as
      big_vision). MoCo v3 uses the class token; its ablation reports
      average pooling as good as the class token only without the final
      LayerNorm, and much worse with it (76.3 vs 69.7 %, ViT-B/16).
    position_embedding: 'learned' (a parameter `position_embedding`,
      [1, tokens, D], covering the class token too, as ViT's Eq. 1) or
      'sincos2d' (fixed; the class token gets none, i.e. zeros, as MoCo v3).
    frozen_patch_embedding: MoCo v3's fixed random patch projection.
    dtype: compute dtype of the matmuls; parameters and h are float32.
    remat: recompute each block's activations in the backward pass
      (`nn.remat` per block), trading compute for activation memory.
    fine_tune_after_block: the ResNet's option in blocks of the ViT: the
      output of stage k goes through stop_gradient, so stages 0..k get no
      gradient. Stage 0 is the embedding (patch projection, class token,
      position embedding), stage k in 1..depth is encoder block k (the
      parameters `block{k-1}`), and the final LayerNorm belongs to the last
      stage, so k = depth freezes the whole encoder. -1 trains everything.

  `train` is accepted for the SimCLR model's calling convention; nothing in
  the encoder depends on it (no dropout, no BatchNorm).

  Parameter tree: `patch_embedding/{kernel,bias}`, `class_token` ('token'),
  `position_embedding` ('learned'), `block{i}/{norm1,attention,norm2,mlp}`
  with `attention/{query,key,value,out}` and `mlp/{dense1,dense2}`,
  `final_norm`.
  """
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  pooling: str = 'token'
  position_embedding: str = 'learned'
  frozen_patch_embedding: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  fine_tune_after_block: int = -1

  def _check(self, image_height: int, image_width: int):
    if self.pooling not in POOLINGS:
      raise ValueError(f'Unknown ViT pooling {self.pooling!r}; expected one '
                       f'of {POOLINGS}.')
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f'Unknown ViT position_embedding '
                       f'{self.position_embedding!r}; expected one of '
                       f'{POSITION_EMBEDDINGS}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'ViT hidden_size {self.hidden_size} is not divisible '
                       f'by num_heads {self.num_heads}.')
    if image_height % self.patch_size or image_width % self.patch_size:
      raise ValueError(f'Image size {image_height}x{image_width} is not '
                       f'divisible by the ViT patch size {self.patch_size}.')
    if not -1 <= self.fine_tune_after_block <= self.depth:
      raise ValueError(f'ViT fine_tune_after_block='
                       f'{self.fine_tune_after_block} is not in [-1, '
                       f'{self.depth}] (0: embedding, 1..{self.depth}: '
                       'blocks).')

  @nn.compact
  def __call__(self, images, train: bool):
    del train  # Same function in training and evaluation.
    n, image_height, image_width, _ = images.shape
    self._check(image_height, image_width)
    x = PatchEmbedding(self.patch_size, self.hidden_size,
                       frozen=self.frozen_patch_embedding, dtype=self.dtype,
                       name='patch_embedding')(
                           jnp.asarray(images, self.dtype))
    x = x.astype(jnp.float32)
    if self.position_embedding == 'sincos2d':
      x = x + sincos_2d_position_embedding(
          image_height // self.patch_size, image_width // self.patch_size,
          self.hidden_size)
    if self.pooling == 'token':
      class_token = self.param('class_token', nn.initializers.zeros,
                               (1, 1, self.hidden_size), jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(class_token, (n, 1, self.hidden_size)), x], axis=1)
    if self.position_embedding == 'learned':
      x = x + self.param(
          'position_embedding',
          nn.initializers.normal(stddev=self.hidden_size**-0.5),
          (1, x.shape[1], self.hidden_size), jnp.float32)

    x = self._freeze_through(0, x)

    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, dtype=self.dtype,
                name=f'block{i}')(x)
      if i + 1 < self.depth:
        x = self._freeze_through(i + 1, x)
    x = self._freeze_through(self.depth, layer_norm('final_norm')(x))
    return x[:, 0] if self.pooling == 'token' else jnp.mean(x, axis=1)

  def _freeze_through(self, stage: int, x):
    """stop_gradient on the output of `stage` if it is the last frozen one."""
    return jax.lax.stop_gradient(x) if stage == self.fine_tune_after_block else x


def frozen_patch_embedding_mask(params) -> Any:
  """Pytree of bools like `params`: True on the patch embedding's leaves.

  For a model built with `frozen_patch_embedding=True`, give these leaves
  no update at all (e.g. `optax.multi_transform` with `optax.set_to_zero()`
  for them): their gradient is zero already, but decoupled weight decay
  would still move them.
  """
  def is_patch_embedding(path, _):
    return any(getattr(key, 'key', None) == 'patch_embedding' for key in path)
  return jax.tree_util.tree_map_with_path(is_patch_embedding, params)
