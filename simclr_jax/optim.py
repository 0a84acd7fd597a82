"""Optimizers and learning-rate schedule (reference `tf2/lars_optimizer.py`,
`tf2/model.py`). Built from optax transformations only; which parameters are
decayed, adapted or frozen is decided here, from their pytree paths.

LARS, classic momentum, per parameter tensor w with gradient g:
  g <- g + wd·w                                     (unless excluded)
  trust = eeta·‖w‖/‖g‖ if ‖w‖ > 0 and ‖g‖ > 0 else 1  (unless excluded)
  v <- m·v + lr·trust·g;   w <- w − v                (Nesterov: w − (m·v + lr·trust·g))
Excluded (plain momentum, no decay, no trust ratio): biases, every BatchNorm
parameter and the supervised head (`lars_exclusion_mask`). The learning rate
sits inside the momentum buffer, as in the reference; `optax.lars` is exactly
this chain (add_decayed_weights, masked trust ratio, scale_by_learning_rate,
trace).

Weight decay of the supervised head: the reference adds `wd·Σ ½‖W‖²` over its
kernels to the loss (`supervised_head_l2`); train.py does that in every mode
but `adamw` (`loss_weight_decay`).
For `momentum` and `adam` the reference puts `wd·½‖w‖²` of every non-BatchNorm
weight into the loss; here that is `add_decayed_weights` (the same gradient)
on every non-BatchNorm leaf except the supervised head's kernel, which the
loss term already covers.

AdamW (Loshchilov & Hutter, ICLR 2019), for Vision Transformers as MoCo v3
(Chen, Xie & He, ICCV 2021) trains them: w <- w − lr·(m̂/(√v̂ + ε) + wd·w),
β 0.9/0.999, ε 1e-8 (PyTorch's AdamW, which their code uses; the decay is
multiplied by lr, as their appendix says of their TF code too). The decay
reaches every parameter that trains, as theirs (`torch.optim.AdamW(model.
parameters())` decays biases, LayerNorm, BatchNorm, class token alike; their
frozen patch projection has no gradient and so no update): here that is every
leaf but the frozen ones, the supervised head included.

Frozen parameters (`trainable_labels`): linear_eval's backbone and head,
finetune's blocks up to `fine_tune_after_block`, and a ViT's frozen random
patch projection in every mode get no update at all (`optax.set_to_zero`):
their gradient is zero already, but decay (LARS's, AdamW's) and momentum
would still move them. `grad_clip_norm > 0` clips the global gradient norm
before the optimizer.

Schedule: scaled = lr·B/256 (linear) or lr·√B (sqrt); warmup =
round(warmup_epochs·N_ex // B); total = train_steps or N_ex·epochs // B + 1;
lr(t) = t/warmup·scaled for t < warmup, then cosine from scaled to 0 over
total − warmup steps (0 afterwards).
"""
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from simclr_jax import config as config_lib
from simclr_jax.models import vit

SUPERVISED_HEAD = 'supervised_head'
# tf.keras.optimizers.Adam's default, which the reference uses.
KERAS_ADAM_EPSILON = 1e-7
# torch.optim.AdamW's defaults, which MoCo v3's ViT training uses.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPSILON = 1e-8
# BatchNorm module names in simclr_jax.models (bn, bn1, gate_bn, ...) and
# Flax's default names (BatchNorm_0).
_BATCH_NORM_MODULE = re.compile(r'(^|_)bn\d*$|batch_?norm', re.IGNORECASE)


def _path_names(path) -> list:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def _is_batch_norm(names) -> bool:
  return (names[-1] == 'scale' or
          any(_BATCH_NORM_MODULE.search(n) for n in names[:-1]))


def lars_exclusion_mask(params) -> Any:
  """Pytree of bools, True where LARS skips decay and trust ratio.

  Excluded, from the leaf's path (the reference's ['batch_normalization',
  'bias', 'head_supervised'] name substrings): a `bias` leaf, any BatchNorm
  parameter (`scale`, or a leaf under a BatchNorm module), and everything
  under `supervised_head`.
  """
  def excluded(path, _):
    names = _path_names(path)
    return (names[-1] == 'bias' or _is_batch_norm(names) or
            SUPERVISED_HEAD in names)
  return jax.tree_util.tree_map_with_path(excluded, params)


def l2_decay_mask(params) -> Any:
  """True where momentum/adam add wd·w to the gradient (the reference's l2
  loss over non-BatchNorm weights), minus the supervised head's kernel, whose
  decay `supervised_head_l2` adds to the loss."""
  def decayed(path, _):
    names = _path_names(path)
    if _is_batch_norm(names):
      return False
    return not (SUPERVISED_HEAD in names and names[-1] == 'kernel')
  return jax.tree_util.tree_map_with_path(decayed, params)


def loss_weight_decay(config) -> float:
  """The wd of `supervised_head_l2` in the loss: config.weight_decay, or 0
  for adamw, whose decoupled decay covers the head."""
  return 0.0 if config.optimizer == 'adamw' else config.weight_decay


def _negate(mask_fn):
  return lambda params: jax.tree.map(lambda x: not x, mask_fn(params))


def lars(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float,
         momentum: float = 0.9, eeta: float = 1e-3,
         nesterov: bool = False) -> optax.GradientTransformation:
  """LARS with classic momentum as the reference (formula in the module doc).

  Decay and trust ratio apply where `lars_exclusion_mask` is False.
  """
  included = _negate(lars_exclusion_mask)
  return optax.lars(learning_rate, weight_decay=weight_decay,
                    weight_decay_mask=included, trust_coefficient=eeta,
                    eps=0.0, trust_ratio_mask=included, momentum=momentum,
                    nesterov=nesterov)


def scale_learning_rate(base_learning_rate: float, batch_size: int,
                        scaling: str = 'linear') -> float:
  """lr·B/256 (linear) or lr·√B (sqrt)."""
  if scaling == 'linear':
    return base_learning_rate * batch_size / 256.
  if scaling == 'sqrt':
    return base_learning_rate * batch_size ** 0.5
  raise ValueError(f"Unknown learning_rate_scaling {scaling!r}; "
                   "expected 'linear' or 'sqrt'.")


def warmup_cosine(base_learning_rate: float, *, batch_size: int,
                  num_examples: int, train_epochs: float, warmup_epochs: float,
                  scaling: str = 'linear', train_steps: int = 0
                  ) -> optax.Schedule:
  """Linear warmup then cosine decay to 0 (reference WarmUpAndCosineDecay).

  If the run is shorter than the warmup (total <= warmup), the cosine part
  lasts one step, so the rate drops to 0 after the warmup (the reference would
  divide by zero or a negative count there).
  """
  scaled = scale_learning_rate(base_learning_rate, batch_size, scaling)
  steps = config_lib.schedule_steps(
      batch_size=batch_size, num_examples=num_examples,
      train_epochs=train_epochs, warmup_epochs=warmup_epochs,
      train_steps=train_steps)
  warmup = steps['warmup_steps']
  decay_steps = max(steps['total_steps'] - warmup, 1)
  cosine = optax.cosine_decay_schedule(scaled, decay_steps, alpha=0.0)
  if warmup == 0:
    return cosine
  return optax.join_schedules(
      [optax.linear_schedule(0.0, scaled, warmup), cosine], [warmup])


def create_learning_rate_schedule(config, num_examples: int) -> optax.Schedule:
  """warmup_cosine from the config's keys."""
  return warmup_cosine(
      config.learning_rate,
      batch_size=config.train_batch_size,
      num_examples=num_examples,
      train_epochs=config.train_epochs,
      warmup_epochs=config.warmup_epochs,
      scaling=config.learning_rate_scaling,
      train_steps=config.train_steps)


def base_optimizer(config, learning_rate_fn: optax.ScalarOrSchedule
                   ) -> optax.GradientTransformation:
  """`config.optimizer`: lars | momentum | adam (reference `build_optimizer`).

  - lars: `lars()` with config.momentum, weight_decay, lars_eeta.
  - momentum: SGD with momentum, Nesterov as the reference always uses
    (config.nesterov, on by default), lr inside the momentum buffer as Keras
    SGD; l2 decay on `l2_decay_mask`.
  - adam: Adam on the gradient plus the same l2 decay (an l2 loss, not
    AdamW), ε = 1e-7 as Keras's Adam. (Keras adds ε to √v before the bias
    correction, optax after it: the two differ only while √v̂ is near ε.)
  - adamw: decoupled weight decay on every leaf (module doc); frozen leaves
    are taken out by `create_optimizer`.
  """
  name = config.optimizer
  weight_decay = config.weight_decay
  if name == 'lars':
    return lars(learning_rate_fn, weight_decay=weight_decay,
                momentum=config.momentum, eeta=config.lars_eeta)
  if name == 'momentum':
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=l2_decay_mask),
        optax.scale_by_learning_rate(learning_rate_fn),
        optax.trace(decay=config.momentum, nesterov=config.nesterov))
  if name == 'adam':
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=l2_decay_mask),
        optax.adam(learning_rate_fn, eps=KERAS_ADAM_EPSILON))
  if name == 'adamw':
    return optax.adamw(learning_rate_fn, b1=ADAMW_BETAS[0], b2=ADAMW_BETAS[1],
                       eps=ADAMW_EPSILON, weight_decay=weight_decay)
  raise ValueError(f"Unknown optimizer {name!r}; expected one of "
                   f"{config_lib.OPTIMIZERS}.")


def _backbone_stage(names, vit_depth: int) -> int:
  """The fine_tune_after_block stage of a backbone leaf.

  ResNet: 0 the stem, g for `block_group{g}_*`. ViT (models/vit.py): 0 the
  patch projection, class token and position embedding, i + 1 for
  `block{i}`, and the final LayerNorm with the last block (`vit_depth`).
  """
  if names[0] == 'resnet':
    match = re.match(r'block_group(\d+)', names[1])
    return int(match.group(1)) if match else 0
  if names[1] == 'final_norm':
    return vit_depth
  match = re.fullmatch(r'block(\d+)', names[1])
  return int(match.group(1)) + 1 if match else 0


def _frozen_patch_embedding(config) -> bool:
  return config.model == 'vit' and config.vit_frozen_patch_embedding


def trainable_labels(params, config) -> Any:
  """'train' or 'frozen' per parameter leaf, decided by its path.

  linear_eval: only `supervised_head` trains. finetune with
  `fine_tune_after_block = k >= 0`: backbone stages 0..k stay fixed
  (`_backbone_stage`; ViT with k = depth: all of it). A ViT's frozen patch
  projection (`vit/patch_embedding`) in every mode. The model already stops
  their gradients; freezing them in the optimizer too keeps weight decay
  and momentum from moving them.
  """
  mode, after = config.train_mode, config.fine_tune_after_block
  frozen_patches = _frozen_patch_embedding(config)
  vit_depth = 0
  if config.model == 'vit':
    vit_depth = vit.parse_vit_variant(config.vit_variant)['depth']

  def label(path, _, patch_embedding):
    names = _path_names(path)
    if mode == 'linear_eval':
      return 'train' if SUPERVISED_HEAD in names else 'frozen'
    if frozen_patches and patch_embedding:
      return 'frozen'
    if mode == 'finetune' and after >= 0 and names[0] in ('resnet', 'vit'):
      stage = _backbone_stage(names, vit_depth)
      return 'frozen' if stage <= after else 'train'
    return 'train'

  return jax.tree_util.tree_map_with_path(
      label, params, vit.frozen_patch_embedding_mask(params))


def create_optimizer(config, learning_rate_fn: optax.ScalarOrSchedule
                     ) -> optax.GradientTransformation:
  """`base_optimizer`, with the frozen parameters set to zero, after
  clipping the gradient's global norm to `grad_clip_norm` if > 0."""
  tx = base_optimizer(config, learning_rate_fn)
  if (config.train_mode in ('linear_eval', 'finetune')
      or _frozen_patch_embedding(config)):
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: trainable_labels(params, config))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def supervised_head_l2(params, weight_decay: float) -> jax.Array:
  """wd·Σ ½‖W‖² over the supervised head's kernels (reference
  `add_weight_decay` for LARS; tf.nn.l2_loss is ½‖W‖²). 0 without a head."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = _path_names(path)
    if SUPERVISED_HEAD in names and names[-1] == 'kernel':
      total += 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return weight_decay * total
