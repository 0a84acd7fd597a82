"""SimCLRv2's third stage: distillation with unlabeled examples.

SimCLRv2 (Chen et al., NeurIPS 2020, §2 and §3) trains a student on the
unlabeled training images to match a frozen, fine-tuned teacher:
  L = −mean_x Σ_y P_T(y|x; τ) log P_S(y|x; τ)                      (Eq. 2)
optionally adding the labeled cross-entropy (Eq. 3, weight 1 − α). τ = 0.1
for self-distillation (student and teacher of the same architecture,
without the projection head), 1.0 for big-to-small; crop and flip only;
LARS (momentum 0.9) for 400 epochs.

Here the teacher (`config.teacher_checkpoint`, the architecture of
`config.teacher`) lives in the TrainState's `teacher` field: replicated on
the devices, read once from its checkpoint at every start (so not written
into the student's checkpoints), and run in inference mode inside the same
jitted, sharded step as the student: its BatchNorm uses its own running
statistics, which nothing updates; there is no second pass over the data and
no logits on disk. Give a checkpoint step directory as teacher_checkpoint to
pin the teacher if its run may still write newer checkpoints.
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import losses
from simclr_jax import sharding
from simclr_jax.runtime import checkpoint

# The teacher's checkpoint provides every variable, classifier included.
NOTHING_REINITIALISED = ()


def abstract_teacher_variables(teacher_model, config) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of the teacher as shapes (nothing allocated)."""
  size = config.image_size
  return jax.eval_shape(lambda: teacher_model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3), jnp.float32),
      train=False))


def check_teacher(config, teacher_model, num_classes: int,
                  pretrained_shapes: Dict[str, Any]) -> None:
  """Raises ValueError (one line) unless the checkpoint fits the teacher.

  `pretrained_shapes` is checkpoint.pretrained_shapes(teacher_checkpoint).
  The classifier is checked first, for a message that names the classes.
  """
  head = pretrained_shapes['params'].get('supervised_head')
  if head is None:
    raise ValueError('it has no supervised_head: a teacher is a fine-tuned '
                     "(train_mode='finetune') run, not a pretraining one")
  width = head['kernel'].shape[-1]
  if width != num_classes:
    raise ValueError(
        f'its classifier has {width} classes but config.dataset='
        f'{config.dataset!r} has {num_classes}')
  variables = abstract_teacher_variables(teacher_model, config)
  for what in ('params', 'batch_stats'):
    checkpoint.check_shapes(
        variables.get(what, {}), pretrained_shapes[what],
        reinit=NOTHING_REINITIALISED, what=what)


def load_teacher(config, teacher_model, mesh) -> Dict[str, Any]:
  """The teacher's {'params', 'batch_stats'}, replicated on the mesh."""
  pretrained = checkpoint.load_pretrained(config.teacher_checkpoint)
  variables = abstract_teacher_variables(teacher_model, config)
  loaded = {}
  for what in ('params', 'batch_stats'):
    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          variables.get(what, {}))
    loaded[what] = checkpoint.merge_pretrained(
        target, pretrained[what], reinit=NOTHING_REINITIALISED, what=what)
  return sharding.replicate(loaded, mesh)


def teacher_logits(teacher_model, teacher_variables, images) -> jax.Array:
  """[B, C] float32 logits of the frozen teacher, BatchNorm in inference."""
  logits = teacher_model.apply(teacher_variables, images, train=False)['logits']
  return jax.lax.stop_gradient(logits.astype(jnp.float32))


def student_images_and_teacher_logits(teacher_model, teacher_variables,
                                      batch) -> Tuple[jax.Array, jax.Array]:
  """(the student's input, the teacher's [B, C] logits on batch['image']).

  With a labeled batch (distill_alpha < 1) the student's input is the
  unlabeled images followed by the labeled ones: one pass, one set of
  BatchNorm statistics; `objective` splits its logits again.
  """
  images = batch['image']
  teacher = teacher_logits(teacher_model, teacher_variables, images)
  if 'labeled_image' in batch:
    images = jnp.concatenate([images, batch['labeled_image']])
  return images, teacher


def objective(logits: jax.Array, teacher: jax.Array, batch, config
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """(loss, metrics) of Eq. (2), or of Eq. (3) when `batch` has labels.

  Args:
    logits: the student's on `student_images_and_teacher_logits`'s input:
      [B, C], or [B + B_L, C] with a labeled batch.
    teacher: [B, C] of the teacher on the unlabeled images.
    batch: the train batch (labeled_label [B_L] when distill_alpha < 1).
    config: distill_temperature (τ), distill_alpha (α).
  """
  tau = config.distill_temperature
  unlabeled = teacher.shape[0]
  student_logits = logits[:unlabeled]
  distill = losses.distillation_loss(student_logits, teacher, temperature=tau)
  metrics = {'distill_loss': distill,
             'teacher_agreement': jnp.mean(
                 (jnp.argmax(student_logits, -1) == jnp.argmax(teacher, -1))
                 .astype(jnp.float32))}
  if 'labeled_label' not in batch:
    return distill, metrics
  labeled_logits, labels = logits[unlabeled:], batch['labeled_label']
  loss = losses.distillation_loss_with_labels(
      student_logits, teacher, labeled_logits, labels, temperature=tau,
      alpha=config.distill_alpha)
  metrics['supervised_loss'] = losses.softmax_cross_entropy(labeled_logits,
                                                            labels)
  metrics['supervised_acc'] = jnp.mean(
      losses.topk_correct(labeled_logits, labels, 1))
  return loss, metrics
