"""SimCLR training: pretraining, linear evaluation, fine-tuning, supervised.

One run, top to bottom, in `train_and_evaluate(config, workdir)`:
  mesh -> input pipeline -> model and optimizer -> train state (fresh, from
  `init_checkpoint`, or resumed from the workdir) -> jitted update step ->
  writers and periodic actions -> loop (log, checkpoint, evaluate, preemption)
  -> final evaluation, backbone export and the demo's linear probe.

Sharding: `jax.jit` over a 1-D 'data' Mesh (sharding.py). The batch is a global
array split on its leading axis, everything else is replicated, so BatchNorm
statistics are over the global batch by construction. The NT-Xent loss runs in
`jax.shard_map` over 'data': each device gathers the projections of all
devices and holds only its own rows of the logits, O(n·N) memory (DESIGN §3).

Determinism: the data order and augmentation are functions of (seed, step)
(data/pipeline.py), and the step RNG is `fold_in(state.rng, state.step)`, so a
run resumed from a checkpoint at step k continues bit for bit like a run that
never stopped.
"""
import functools
import re
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from simclr_jax import checkpoint
from simclr_jax import configlib
from simclr_jax import device_augment
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm statistics and the run's base RNG key."""
  batch_stats: Any
  rng: jax.Array


# ----------------------------------------------------------------------------
# Model, optimizer, state.
# ----------------------------------------------------------------------------
def trainable_labels(params, config) -> Any:
  """'train' or 'frozen' per parameter leaf, decided by its path.

  linear_eval: only `supervised_head` trains. finetune with
  `fine_tune_after_block = k >= 0`: the stem (block 0) and block groups 1..k
  stay fixed. The model already stops their gradients; freezing them in the
  optimizer too keeps weight decay and momentum from moving them.
  """
  mode, after = config.train_mode, config.fine_tune_after_block

  def label(path, _):
    names = [str(getattr(k, 'key', k)) for k in path]
    if mode == 'linear_eval':
      return 'train' if 'supervised_head' in names else 'frozen'
    if mode == 'finetune' and after >= 0 and names[0] == 'resnet':
      match = re.match(r'block_group(\d+)', names[1])
      block = int(match.group(1)) if match else 0  # 0: the stem.
      return 'frozen' if block <= after else 'train'
    return 'train'

  return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """optim.create_optimizer, with the frozen parameters' updates set to zero."""
  tx = optim.create_optimizer(config, learning_rate_fn)
  if config.train_mode in ('linear_eval', 'finetune'):
    tx = optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        functools.partial(trainable_labels, config=config))
  return tx


def create_train_state(config, model, tx, rng) -> TrainState:
  """Initialises variables (on a dummy batch) and the optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  size = config.image_size
  variables = model.init(init_rng, jnp.zeros((2, size, size, 3), jnp.float32),
                         train=False)
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}), rng=state_rng)
  # A strongly typed int32 step: the same type after restore and after +1.
  return state.replace(step=jnp.zeros((), jnp.int32))


def load_init_checkpoint(state: TrainState, config, mesh) -> TrainState:
  """Backbone (and projection head) from `config.init_checkpoint`.

  The supervised head keeps its fresh initialisation (zeros with
  `zero_init_logits_layer`). A projection head absent from the checkpoint
  (an exported backbone) is allowed when the classifier does not read it.
  """
  pretrained = checkpoint.load_pretrained(config.init_checkpoint)
  reinit = checkpoint.init_checkpoint_reinit(config, pretrained['params'])
  params = checkpoint.merge_pretrained(state.params, pretrained['params'],
                                       reinit=reinit, what='params')
  batch_stats = checkpoint.merge_pretrained(
      state.batch_stats, pretrained['batch_stats'], reinit=reinit,
      what='batch_stats')
  if config.zero_init_logits_layer and 'supervised_head' in params:
    params = dict(params)
    params['supervised_head'] = jax.tree.map(jnp.zeros_like,
                                             params['supervised_head'])
  # Optimizer state restarts: its moments belong to the old objective.
  return sharding.replicate(
      state.replace(params=params, batch_stats=batch_stats,
                    opt_state=state.tx.init(params)), mesh)


# ----------------------------------------------------------------------------
# The update step.
# ----------------------------------------------------------------------------
def make_contrastive_loss(config, mesh) -> Callable:
  """NT-Xent over the global batch, sharded: z [N, 2, d] -> (loss, metrics).

  Inside `shard_map` every device sees its n = N / D images; `nt_xent_loss`
  gathers the other devices' projections over 'data' and returns the mean
  over local anchors, so `pmean` gives the global mean.
  """
  def local(z):
    loss, logits_ab, labels = losses.nt_xent_loss(
        z[:, 0], z[:, 1], temperature=config.temperature,
        hidden_norm=config.hidden_norm, axis_name=sharding.DATA_AXIS)
    metrics = losses.contrastive_metrics(logits_ab, labels)
    return jax.lax.pmean((loss, metrics), sharding.DATA_AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=P(sharding.DATA_AXIS),
                       out_specs=P())


def distort_on_device(images, keys, config):
  """color_augment='device': the config's colour jitter, grayscale and blur."""
  return device_augment.distort_views(
      images, keys, strength=config.color_jitter_strength,
      impl=config.augmentation_impl, blur=config.use_blur)


def make_train_step(model, config, learning_rate_fn, mesh) -> Callable:
  """The jitted update: (state, global batch) -> (state, metrics).

  pretrain batch: image [N, 2, H, W, 3], label [N] (and augment_key
  [N, 2, 2] with color_augment='device': the step applies the colour jitter,
  grayscale and blur itself); other modes: image [N, H, W, 3]. The state
  buffers are donated (updated in place).
  """
  mode = config.train_mode
  contrastive_loss = make_contrastive_loss(config, mesh)
  color_on_device = (mode == 'pretrain' and configlib.get_override(
      config, 'color_augment', 'host') == 'device')
  skip_nonfinite = configlib.get_override(config, 'skip_nonfinite_steps', False)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    images, labels = batch['image'], batch['label']
    if color_on_device:
      images = distort_on_device(images, batch['augment_key'], config)
    if mode == 'pretrain':
      # [N, 2, ...] -> [2N, ...]: image i's views at rows 2i, 2i+1, so each
      # device keeps the views of its own images (no resharding).
      n = images.shape[0]
      images = images.reshape((2 * n,) + images.shape[2:])
      labels = jnp.repeat(labels, 2)

    def loss_fn(params):
      (_, z, logits), new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': step_rng})
      loss, metrics = 0.0, {}
      if mode == 'pretrain':
        con_loss, con_metrics = contrastive_loss(z.reshape(n, 2, -1))
        loss += con_loss
        metrics.update(contrastive_loss=con_loss, **con_metrics)
      if logits is not None:
        # Linear head on both views (pretrain) or the classifier (others).
        sup_loss = losses.softmax_cross_entropy(logits, labels)
        metrics['supervised_loss'] = sup_loss
        metrics['supervised_acc'] = jnp.mean(
            losses.topk_correct(logits, labels, 1))
        loss += sup_loss + optim.supervised_head_l2(
            params, config.weight_decay)
      metrics['loss'] = loss
      return loss, (metrics, new_vars['batch_stats'])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics.update(learning_rate=learning_rate_fn(state.step),
                   weight_norm=optax.global_norm(state.params),
                   grad_norm=optax.global_norm(grads))
    if skip_nonfinite:
      # A non-finite loss or gradient leaves params, batch statistics and
      # optimizer state as they were; the step (and so the data) moves on.
      finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(
          metrics['grad_norm'])
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               new_state, state.replace(step=new_state.step))
    return new_state, metrics

  replicated = sharding.replicated_sharding(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated, sharding.data_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


# ----------------------------------------------------------------------------
# Evaluation: top-1/top-5, features for evaluators, the linear probe.
# ----------------------------------------------------------------------------
def _variables(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _make_output_fn(model, mesh, index: int) -> Callable:
  """fn(state, host-local images) -> output `index` of SimCLRModel, global.

  The output stays sharded on 'data' (each device keeps the rows it
  computed); the host batch must split evenly over the local devices.
  """
  apply = jax.jit(
      lambda v, x: model.apply(v, x, train=False)[index],
      in_shardings=(sharding.replicated_sharding(mesh),
                    sharding.data_sharding(mesh)),
      out_shardings=sharding.data_sharding(mesh))
  return lambda state, images: apply(
      _variables(state), sharding.host_batch_to_global(images, mesh))


def make_logits_fn(model, mesh) -> Callable:
  """logits(state, host-local images) -> global [N, classes] array."""
  return _make_output_fn(model, mesh, 2)


def make_feature_fn(model, mesh) -> Callable:
  """features(state, host-local images) -> representations h, global [N, d]."""
  return _make_output_fn(model, mesh, 0)


def make_eval_step(model, mesh) -> Callable:
  """Masked sums over a global eval batch: top-1, top-5 correct and count."""
  def eval_step(state, batch):
    logits = model.apply(_variables(state), batch['image'], train=False)[2]
    mask = batch['mask'].astype(jnp.float32)
    return {'top1': jnp.sum(losses.topk_correct(logits, batch['label'], 1)
                            * mask),
            'top5': jnp.sum(losses.topk_correct(logits, batch['label'], 5)
                            * mask),
            'count': jnp.sum(mask)}
  replicated = sharding.replicated_sharding(mesh)
  return jax.jit(eval_step,
                 in_shardings=(replicated, sharding.data_sharding(mesh)),
                 out_shardings=replicated)


def evaluate(eval_step, state, config, mesh) -> Dict[str, float]:
  """Top-1 and top-5 of the supervised head over the whole eval split."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  totals = None
  for batch in pipeline.create_eval_iterator(config):
    sums = eval_step(state, sharding.host_batch_to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'eval/top1': float(totals['top1']) / count,
          'eval/top5': float(totals['top5']) / count,
          'eval/num_examples': float(totals['count'])}


PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def linear_probe_accuracy(state, feature_fn, config, mesh, *,
                          num_classes: int) -> float:
  """Test accuracy of a ridge-regression probe on frozen, l2-normalised h.

  Features of the first `probe_train_examples` train images (eval-style
  preprocessing) and of the whole eval split; λ picked from PROBE_L2_GRID on
  a tenth of the train features held out, then refitted on all of them. The
  ridge solve is `evaluators.ridge_predict` (the few-shot evaluator's).
  `feature_fn=None` probes the raw pixels instead (a reference point).
  """
  from simclr_jax import evaluators  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def split_features(split):
    split_config = config.copy_and_resolve_references()
    with split_config.unlocked():
      split_config.eval_split = split
    batches = pipeline.create_eval_iterator(split_config)
    if feature_fn is None:
      xs, ys = zip(*[(b['image'][b['mask']], b['label'][b['mask']])
                     for b in batches])
      x = np.concatenate(xs).reshape(-1, np.prod(xs[0].shape[1:]))
      x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
      return x, np.concatenate(ys)
    feats = evaluators.extract_features(state, feature_fn, batches, mesh)
    x, y, m = (np.asarray(jax.device_get(a)) for a in feats)
    x, y, m = x.reshape(-1, x.shape[-1]), y.reshape(-1), m.reshape(-1)
    return x[m], y[m]

  n = config.probe_train_examples
  train_split = config.train_split
  if '[' not in train_split:  # Read only the examples the probe uses.
    train_split = f'{train_split}[:{n}]'
  train_x, train_y = split_features(train_split)
  train_x, train_y = train_x[:n], train_y[:n]
  test_x, test_y = split_features(config.eval_split)

  def accuracy(fit_x, fit_y, x, y, l2):
    pred = evaluators.ridge_predict(jnp.asarray(fit_x), jnp.asarray(fit_y),
                                    jnp.asarray(x), num_classes=num_classes,
                                    l2_reg=l2)
    return float(np.mean(np.asarray(pred) == y))

  held = len(train_x) // 10
  best_l2 = max(PROBE_L2_GRID, key=lambda l2: accuracy(
      train_x[held:], train_y[held:], train_x[:held], train_y[:held], l2))
  return accuracy(train_x, train_y, test_x, test_y, best_l2)


# ----------------------------------------------------------------------------
# Logging helpers.
# ----------------------------------------------------------------------------
def view_grid(images, max_images: int = 8) -> np.ndarray:
  """[1, n·H, v·W, 3] grid: one row per image, its v views side by side."""
  x = np.clip(np.asarray(images[:max_images], np.float32), 0.0, 1.0)
  if x.ndim == 4:  # [n, H, W, 3]: one view per image.
    x = x[:, None]
  n, v, h, w, c = x.shape
  return x.transpose(0, 2, 1, 3, 4).reshape(1, n * h, v * w, c)


def flat_hparams(config) -> Dict[str, Any]:
  """Scalar config values with dotted keys, for TensorBoard's hparams."""
  out = {}
  def visit(prefix, value):
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    elif isinstance(value, (bool, int, float, str)):
      out[prefix[:-1]] = value
    else:
      out[prefix[:-1]] = str(value)
  visit('', config.to_dict() if hasattr(config, 'to_dict') else config)
  return out


class PreemptionWatch:
  """Turns SIGTERM (a preempted VM) into a flag the loop polls between steps."""

  def __init__(self, on_exit: Optional[Callable[[], Any]] = None):
    self.requested = False
    self._previous = None
    # Called when the loop ends, normally or by an exception (a non-finite
    # loss): lets an in-flight checkpoint save complete before the process
    # exits, so the newest good checkpoint is not lost with it.
    self._on_exit = on_exit

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Signal %d: saving a checkpoint and stopping.', signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self._on_exit is not None:
      self._on_exit()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must stop at the same step to save together.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # Preemption service not enabled.
        return False
    return self.requested


FINITE_METRICS = ('loss', 'grad_norm')


def check_finite(pending, first_step: int, *, skip: bool):
  """Checks the loss and gradient norm of each step since the last log.

  `pending`: the per-step metrics (device scalars) of steps first_step, ...
  Reading them costs a few scalars; the loop does it before logging and
  before every checkpoint, so parameters made non-finite are never saved.

  Returns:
    (stacked metrics as numpy [num_steps], boolean mask of finite steps).
  Raises:
    FloatingPointError naming the first non-finite step and metric, unless
    `skip` (config.skip_nonfinite_steps: the train step skipped them).
  """
  stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
  finite = np.ones(len(pending), bool)
  for name in FINITE_METRICS:
    if name in stacked:
      finite &= np.isfinite(stacked[name])
  if not skip and not finite.all():
    i = int(np.argmin(finite))
    name = next(n for n in FINITE_METRICS
                if n in stacked and not np.isfinite(stacked[n][i]))
    raise FloatingPointError(
        f'non-finite {name} ({stacked[name][i]}) at step {first_step + i}; '
        'stopped before saving it, so the newest checkpoint holds finite '
        'parameters. config.skip_nonfinite_steps=True skips such steps.')
  return stacked, finite


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> TrainState:
  """Trains per `config.train_mode`, resuming from `workdir` if it holds a run."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  lead_host = jax.process_index() == 0
  # Before anything is compiled or written: a bad config must not touch the
  # workdir's checkpoints (main.py checks too; this covers Colab callers).
  configlib.validate(config, device_count=jax.device_count(),
                     process_count=jax.process_count(), check_dataset=False)

  # --- Mesh ------------------------------------------------------------------
  mesh = sharding.create_mesh()
  logging.info('Mesh: %s', mesh)

  # --- Input pipeline (sizes) ------------------------------------------------
  num_train_examples = pipeline.num_examples(config, config.train_split)
  num_classes = pipeline.num_classes(config)

  # --- Model and optimizer ---------------------------------------------------
  model = models.create_model(config, num_classes)
  learning_rate_fn = optim.create_learning_rate_schedule(
      config, num_train_examples)
  derived = configlib.steps_from_config(config, num_train_examples)
  total_steps = derived['total_steps']
  tx = create_optimizer(config, learning_rate_fn)
  logging.info('%d train examples, %d classes; %s', num_train_examples,
               num_classes, derived)

  # --- Train state: fresh, from init_checkpoint, or resumed ------------------
  replicated = sharding.replicated_sharding(mesh)
  init_state = jax.jit(functools.partial(create_train_state, config, model, tx),
                       out_shardings=replicated)
  state = init_state(jax.random.PRNGKey(config.seed))
  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
  state, start_step = checkpoint.restore_latest(manager, state)
  if start_step == 0 and config.init_checkpoint:
    state = load_init_checkpoint(state, config, mesh)
  parameter_overview.log_parameter_overview(
      state.params, msg='Parameters', jax_logging_process=0)

  # --- Update step (compiled ahead of the loop, so its cost is measured) ----
  train_iter = pipeline.create_train_iterator(
      config, seed=config.seed, start_step=start_step)
  first_batch = next(train_iter)
  compile_start = time.perf_counter()
  train_step = make_train_step(model, config, learning_rate_fn, mesh).lower(
      state, sharding.host_batch_to_global(first_batch, mesh)).compile()
  compile_time = time.perf_counter() - compile_start
  has_head = model.has_supervised_head()
  eval_step = make_eval_step(model, mesh) if has_head else None

  # --- Writers, periodic actions, evaluators ---------------------------------
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not lead_host)
  if start_step == 0:
    writer.write_hparams(flat_hparams(config))
    views = first_batch['image'][:8]
    if 'augment_key' in first_batch:  # color_augment='device': as trained on.
      views = distort_on_device(views, first_batch['augment_key'][:8], config)
    writer.write_images(0, {'augmented_views': view_grid(np.asarray(views))})
  writer.write_scalars(start_step, {'compile_time_s': compile_time})
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer, every_secs=60.0)]
  if lead_host and config.num_profile_steps > 0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.num_profile_steps))
  feature_fn = make_feature_fn(model, mesh)
  from simclr_jax import evaluators  # pylint: disable=g-import-not-at-top
  plugins = evaluators.create_evaluators(
      config, feature_fn, logits_fn=make_logits_fn(model, mesh) if has_head
      else None, mesh=mesh, num_classes=num_classes)

  def run_evals(step, *, final=False):
    """Top-1/5 every eval_every_steps, plugins on their own schedules."""
    results = {}
    top1_due = config.eval_every_steps and step % config.eval_every_steps == 0
    if eval_step and (final or top1_due):
      results.update(evaluate(eval_step, state, config, mesh))
    results.update(evaluators.run_evaluators(plugins, state, step,
                                             force=final))
    if results:
      writer.write_scalars(step, results)
    return results

  # --- Loop --------------------------------------------------------------------
  logging.info('Training steps %d..%d (compile %.1f s).', start_step + 1,
               total_steps, compile_time)
  pending, batch = [], first_batch
  last_log_time, last_log_step = time.perf_counter(), start_step
  skip_nonfinite = configlib.get_override(config, 'skip_nonfinite_steps', False)
  skipped_steps = 0  # Non-finite steps skipped by this process.
  step = start_step
  with PreemptionWatch(on_exit=manager.wait_until_finished) as preemption:
    while step < total_steps:
      if batch is None:
        batch = next(train_iter)
      with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
        state, metrics = train_step(
            state, sharding.host_batch_to_global(batch, mesh))
      step, batch = step + 1, None
      pending.append(metrics)
      for hook in hooks:
        hook(step)

      if step % config.log_every_steps == 0 or step == total_steps:
        stacked, finite = check_finite(pending, last_log_step + 1,
                                       skip=skip_nonfinite)
        skipped_steps += int(np.sum(~finite))
        means = {k: float(np.mean(v[finite])) if finite.any() else float('nan')
                 for k, v in stacked.items()}
        means['skipped_nonfinite_steps'] = skipped_steps
        elapsed = time.perf_counter() - last_log_time
        images_per_s = ((step - last_log_step) * config.train_batch_size
                        / max(elapsed, 1e-9))
        means['images_per_sec'] = images_per_s
        means['images_per_sec_per_device'] = images_per_s / jax.device_count()
        means['step_time_s'] = elapsed / (step - last_log_step)
        writer.write_scalars(step, means)
        pending, last_log_time, last_log_step = [], time.perf_counter(), step

      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        if pending:  # Steps since the last log: check before saving.
          check_finite(pending, last_log_step + 1, skip=skip_nonfinite)
        checkpoint.save(manager, state)
      if step < total_steps:
        eval_start = time.perf_counter()
        if run_evals(step):  # Keep eval time out of the step time.
          last_log_time += time.perf_counter() - eval_start
      if preemption.should_stop(step):
        if pending:
          check_finite(pending, last_log_step + 1, skip=skip_nonfinite)
        checkpoint.save(manager, state, force=True)
        manager.wait_until_finished()
        logging.warning('Stopped at step %d for preemption; checkpoint saved.',
                        step)
        manager.close()
        writer.flush()
        return state

  # --- Final evaluation, export, probe ---------------------------------------
  run_evals(step, final=True)
  checkpoint.save(manager, state)
  manager.wait_until_finished()
  manager.close()
  if config.train_mode == 'pretrain':
    checkpoint.export_backbone(state, f'{workdir}/{checkpoint.BACKBONE_DIR}')
  if config.probe_train_examples:
    probe = linear_probe_accuracy(state, feature_fn, config, mesh,
                                  num_classes=num_classes)
    random_state = init_state(jax.random.PRNGKey(config.seed))
    random_probe = linear_probe_accuracy(random_state, feature_fn, config,
                                         mesh, num_classes=num_classes)
    pixel_probe = linear_probe_accuracy(None, None, config, mesh,
                                        num_classes=num_classes)
    writer.write_scalars(step, {'probe/pretrained_top1': probe,
                                'probe/random_init_top1': random_probe,
                                'probe/raw_pixels_top1': pixel_probe})
    if lead_host:
      # A random ResNet with zero-initialised last BN γ per block is little
      # more than its stem and strided 1x1 shortcuts: the raw pixels are the
      # fairer reference, printed beside it.
      print(f'Linear probe test accuracy ({config.dataset}, '
            f'{config.eval_split}): pretrained {probe:.2%} vs random init '
            f'{random_probe:.2%} (step {step}; raw pixels: '
            f'{pixel_probe:.2%}).', flush=True)
  writer.flush()
  return state
