"""SimCLR model: backbone f (ResNet or ViT), projection head g, classifier.

`h = f(x)`, `z = g(h)` (contrastive loss on z), and an optional linear
classifier named `supervised_head` (LARS exclusion and weight decay decided by
that name, see optim.py). The classifier reads the output of projection-head
layer `ft_proj_selector` (0 = h), as the reference's `hiddens_list[
ft_proj_selector]` (`tf2/model.py` `Model.__call__`), per train_mode:
- pretrain: through stop_gradient if lineareval_while_pretraining, so the
  linear-eval labels never shape the network; else no classifier.
- linear_eval: backbone and projection head frozen (stop_gradient, BatchNorm in
  inference mode, as the reference's finetune with fine_tune_after_block=4).
- finetune: gradients flow into the network except for the blocks frozen by
  `fine_tune_after_block`.
- supervised: a classifier on h, everything trained.
- distill: as finetune with nothing frozen (SimCLRv2's student; with
  ft_proj_selector 0 and no projection head, the paper's "same architecture
  as the teacher, excluding the projection head").

The backbone is `config.model`'s, its parameters under that name: a ResNet
(`resnet`) or a Vision Transformer (`vit`; h is the class token or the mean
token after the final LayerNorm). Neither has a classifier of its own and
both give h in float32, so the head, the classifier, the evaluators and the
checkpoint export treat them alike.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import config as config_lib
from simclr_jax.models import vit
from simclr_jax.models.heads import ProjectionHead
from simclr_jax.models.resnet import output_width
from simclr_jax.models.resnet import ResNet

# The field defaults are the config's (one definition of each default).
_DEFAULTS = config_lib.base_config()


class SimCLRModel(nn.Module):
  """Backbone + projection head + optional `supervised_head`.

  `__call__(images, train)` -> a dict of named float32 outputs:
    'representation': h, the backbone's pooled output [N, width];
    'projection': z = g(h) [N, proj_out_dim], what NT-Xent compares;
    'logits': the supervised head's [N, num_classes], absent when no
      classifier is built (pretrain without lineareval_while_pretraining).

  `fine_tune_after_block` only acts in finetune mode (the reference rejects it
  in pretraining; linear_eval freezes the whole backbone anyway).
  """
  model: str = _DEFAULTS.model
  resnet_depth: int = _DEFAULTS.resnet_depth
  width_multiplier: float = _DEFAULTS.width_multiplier
  sk_ratio: float = _DEFAULTS.sk_ratio
  cifar_stem: bool = False  # Derived: image_size <= 32.
  vit_variant: str = _DEFAULTS.vit_variant
  vit_num_heads: int = _DEFAULTS.vit_num_heads
  vit_pooling: str = _DEFAULTS.vit_pooling
  vit_position_embedding: str = _DEFAULTS.vit_position_embedding
  vit_frozen_patch_embedding: bool = _DEFAULTS.vit_frozen_patch_embedding
  proj_head_mode: str = _DEFAULTS.proj_head_mode
  num_proj_layers: int = _DEFAULTS.num_proj_layers
  proj_out_dim: int = _DEFAULTS.proj_out_dim
  proj_hidden_dim: int = _DEFAULTS.proj_hidden_dim
  proj_head_bn: bool = _DEFAULTS.proj_head_bn
  proj_out_bn_scale: bool = _DEFAULTS.proj_out_bn_scale
  ft_proj_selector: int = _DEFAULTS.ft_proj_selector
  num_classes: Optional[int] = None
  train_mode: str = _DEFAULTS.train_mode
  lineareval_while_pretraining: bool = _DEFAULTS.lineareval_while_pretraining
  fine_tune_after_block: int = _DEFAULTS.fine_tune_after_block
  dtype: Any = jnp.dtype(_DEFAULTS.dtype)
  remat: bool = _DEFAULTS.remat

  def has_supervised_head(self) -> bool:
    return self.train_mode != 'pretrain' or self.lineareval_while_pretraining

  def backbone(self, freeze_after: Optional[int]) -> nn.Module:
    """The backbone f; `freeze_after` is its fine_tune_after_block, or
    None for all of it (linear_eval)."""
    if self.model == 'vit':
      shape = vit.parse_vit_variant(self.vit_variant)
      return vit.VisionTransformer(
          **{**shape, 'num_heads': self.vit_num_heads or shape['num_heads']},
          pooling=self.vit_pooling,
          position_embedding=self.vit_position_embedding,
          frozen_patch_embedding=self.vit_frozen_patch_embedding,
          dtype=self.dtype, remat=self.remat,
          fine_tune_after_block=(shape['depth'] if freeze_after is None
                                 else freeze_after),
          name='vit')
    if self.model != 'resnet':
      raise ValueError(f'Unknown model {self.model!r}; expected one of '
                       f'{config_lib.MODELS}.')
    return ResNet(self.resnet_depth, self.width_multiplier,
                  sk_ratio=self.sk_ratio, cifar_stem=self.cifar_stem,
                  dtype=self.dtype,
                  fine_tune_after_block=(4 if freeze_after is None
                                         else freeze_after),
                  remat=self.remat, name='resnet')

  @nn.compact
  def __call__(self, images, train: bool):
    if self.train_mode not in config_lib.TRAIN_MODES:
      raise ValueError(f'Unknown train_mode {self.train_mode!r}; '
                       f'expected one of {config_lib.TRAIN_MODES}.')
    if self.has_supervised_head() and not self.num_classes:
      raise ValueError(f'train_mode={self.train_mode!r} (lineareval_while_'
                       f'pretraining={self.lineareval_while_pretraining}) '
                       'builds a supervised_head and needs num_classes > 0.')
    frozen = self.train_mode == 'linear_eval'
    if frozen:
      freeze_after = None  # All of it.
    elif self.train_mode == 'finetune':
      freeze_after = self.fine_tune_after_block
    else:
      freeze_after = -1

    h = self.backbone(freeze_after)(images, train)
    projection, hiddens = ProjectionHead(
        self.proj_head_mode, self.num_proj_layers, self.proj_out_dim,
        dtype=self.dtype, hidden_dim=self.proj_hidden_dim,
        use_bn=self.proj_head_bn, out_bn_scale=self.proj_out_bn_scale,
        name='projection_head')(h, train and not frozen)
    if not 0 <= self.ft_proj_selector < len(hiddens):
      raise ValueError(f'ft_proj_selector={self.ft_proj_selector} but the '
                       f'{self.proj_head_mode!r} head has {len(hiddens) - 1} '
                       'layers.')

    outputs = {'representation': h.astype(jnp.float32),
               'projection': projection.astype(jnp.float32)}
    if self.has_supervised_head():
      if self.train_mode == 'supervised':
        head_input = h
      elif self.train_mode in ('finetune', 'distill'):
        head_input = hiddens[self.ft_proj_selector]
      else:  # pretrain with linear eval, or linear_eval: frozen features.
        head_input = jax.lax.stop_gradient(hiddens[self.ft_proj_selector])
      logits = nn.Dense(self.num_classes,
                        kernel_init=nn.initializers.normal(stddev=0.01),
                        dtype=self.dtype, param_dtype=jnp.float32,
                        name='supervised_head')(head_input)
      outputs['logits'] = logits.astype(jnp.float32)
    return outputs


def create_model(config, num_classes: Optional[int] = None) -> SimCLRModel:
  """Builds a SimCLRModel from the config's keys.

  Args:
    config: the experiment config (ml_collections.ConfigDict).
    num_classes: width of the supervised head (the dataset's classes).
  """
  return SimCLRModel(
      model=config.model,
      resnet_depth=config.resnet_depth,
      width_multiplier=config.width_multiplier,
      sk_ratio=config.sk_ratio,
      cifar_stem=config.image_size <= 32,
      vit_variant=config.vit_variant,
      vit_num_heads=config.vit_num_heads,
      vit_pooling=config.vit_pooling,
      vit_position_embedding=config.vit_position_embedding,
      vit_frozen_patch_embedding=config.vit_frozen_patch_embedding,
      proj_head_mode=config.proj_head_mode,
      num_proj_layers=config.num_proj_layers,
      proj_out_dim=config.proj_out_dim,
      proj_hidden_dim=config.proj_hidden_dim,
      proj_head_bn=config.proj_head_bn,
      proj_out_bn_scale=config.proj_out_bn_scale,
      ft_proj_selector=config.ft_proj_selector,
      num_classes=num_classes,
      train_mode=config.train_mode,
      lineareval_while_pretraining=config.lineareval_while_pretraining,
      fine_tune_after_block=config.fine_tune_after_block,
      dtype=jnp.dtype(config.dtype),
      remat=config.remat,
  )


def representation_width(config) -> int:
  """Width of h for the config's backbone (ResNet: 512·w or 2048·w; ViT: its
  hidden size)."""
  if config.model == 'vit':
    return vit.parse_vit_variant(config.vit_variant)['hidden_size']
  return output_width(config.resnet_depth, config.width_multiplier)


def create_teacher_model(config, num_classes: int) -> SimCLRModel:
  """The frozen teacher of train_mode='distill': `config.teacher`'s
  architecture as a fine-tuned classifier (run with train=False).

  The teacher's keys overlay the defaults, not the student's config: a key
  that `config.teacher` does not name is the default's whatever the student
  sets (e.g. a ViT student still has a ResNet teacher); the input size and
  dtype are the student's.
  """
  teacher = config_lib.base_config()
  teacher.update(config.teacher.to_dict())
  teacher.update(dict(image_size=config.image_size, dtype=config.dtype,
                      train_mode='finetune',
                      lineareval_while_pretraining=False))
  return create_model(teacher, num_classes)
