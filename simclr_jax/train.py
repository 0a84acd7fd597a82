"""SimCLR training: the train state, the update step and the run.

`train_and_evaluate(config, workdir)` tells one run top to bottom:
  mesh -> data and model -> optimizer -> train state (fresh, resumed from the
  workdir, or from `init_checkpoint`) -> the jitted update step, compiled
  ahead of the loop -> writers and evaluators -> the loop, whose periodic jobs
  are named below (log, checkpoint, evaluate, preemption) -> one ending path
  for a finished and a preempted run.

Sharding: `jax.jit` over a 1-D 'data' Mesh (sharding.py). The batch is a global
array split on its leading axis, everything else is replicated, so BatchNorm
statistics are over the global batch by construction. The NT-Xent loss runs in
`jax.shard_map` over 'data': each device gathers the projections of all
devices and holds only its own rows of the logits, O(n·N) memory.

Determinism: the data order and augmentation are functions of (seed, step)
(data/pipeline.py), and the step RNG is `fold_in(state.rng, state.step)`, so a
run resumed from a checkpoint at step k continues bit for bit like a run that
never stopped.
"""
import time
from typing import Any, Callable, Dict, NamedTuple

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from simclr_jax import config as config_lib
from simclr_jax import distill
from simclr_jax import evaluators
from simclr_jax import grad_cache
from simclr_jax import losses
from simclr_jax import memory as memory_lib
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import preflight
from simclr_jax import sharding
from simclr_jax.data import device_augment
from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import preemption
from simclr_jax.runtime import progress
from simclr_jax.runtime import reporting
from simclr_jax.runtime import run_identity
from simclr_jax.runtime import save_watch


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm statistics and the run's base RNG key.

  memory: SimCLRv2's memory buffer (memory.py) when
    config.memory_buffer_size > 0, else {}; checkpointed.
  teacher: the frozen teacher's variables in train_mode='distill'
    (distill.py), else {}; read from teacher_checkpoint, not checkpointed.
  """
  batch_stats: Any
  rng: jax.Array
  memory: Any = struct.field(default_factory=dict)
  teacher: Any = struct.field(default_factory=dict)


class Result(NamedTuple):
  """What a run ends with: its state, the final evaluation, how it ended."""
  state: TrainState
  metrics: Dict[str, float]
  preempted: bool


# ----------------------------------------------------------------------------
# Train state.
# ----------------------------------------------------------------------------
def create_train_state(config, model, tx, rng) -> TrainState:
  """Initialises variables (on a dummy batch) and the optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  size = config.image_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = model.init(init_rng, dummy, train=False)
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}), rng=state_rng,
      memory=memory_lib.init_memory(config, model.apply, variables, dummy))
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
    params['supervised_head'] = jax.tree.map(np.zeros_like,
                                             params['supervised_head'])
  # Optimizer state restarts: its moments belong to the old objective.
  # Replicated like the rest (a step count made by jit would otherwise
  # sit on one device, and the compiled step would have to move it).
  params = sharding.replicate(params, mesh)
  replicated = sharding.replicated_sharding(mesh)
  batch_stats = sharding.replicate(batch_stats, mesh)
  return state.replace(
      params=params, batch_stats=batch_stats,
      memory=memory_lib.restart(state.memory, params, batch_stats),
      opt_state=jax.jit(state.tx.init, out_shardings=replicated)(params))


# ----------------------------------------------------------------------------
# The update step.
# ----------------------------------------------------------------------------
def make_contrastive_loss(config, mesh) -> Callable:
  """NT-Xent over the global batch, sharded: z [N, 2, d] -> (loss, metrics).

  Inside `shard_map` every device sees its n = N / D images; `nt_xent_loss`
  gathers the other devices' projections over 'data' and returns the mean
  over local anchors, so `pmean` gives the global mean. With the memory
  buffer, `(z, queue [K, d], mask [K])`: the queue is replicated, so each
  device holds its [n, 2N + K] logits only.
  """
  def local(z, *memory):
    queue, mask = memory or (None, None)
    loss, logits_ab, labels = losses.nt_xent_loss(
        z[:, 0], z[:, 1], temperature=config.temperature,
        hidden_norm=config.hidden_norm, axis_name=sharding.DATA_AXIS,
        memory=queue, memory_mask=mask)
    metrics = losses.contrastive_metrics(logits_ab, labels)
    return jax.lax.pmean((loss, metrics), sharding.DATA_AXIS)

  in_specs = P(sharding.DATA_AXIS)
  if config.memory_buffer_size:
    in_specs = (P(sharding.DATA_AXIS), P(), P())
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P())


def distort_on_device(images, keys, config):
  """color_augment='device': the config's colour jitter, grayscale and blur."""
  return device_augment.distort_views(
      images, keys, strength=config.color_jitter_strength,
      impl=config.augmentation_impl, blur=config.use_blur)


def make_train_step(model, config, learning_rate_fn, mesh,
                    teacher_model=None, micro_batch_loop='auto') -> Callable:
  """The jitted update: (state, global batch) -> (state, metrics).

  pretrain batch: image [N, 2, H, W, 3], label [N] (and augment_key
  [N, 2, 2] with color_augment='device': the step applies the colour jitter,
  grayscale and blur itself); other modes: image [N, H, W, 3]; distill with
  distill_alpha < 1 also labeled_image [N, H, W, 3] and labeled_label [N].
  The state buffers are donated (updated in place). distill needs
  `teacher_model` and the teacher's variables in `state.teacher`. With
  config.micro_batch_size the gradient is the gradient cache's
  (grad_cache.py): the same loss over the global batch, computed m images
  per device at a time, BatchNorm statistics per micro-batch, looping over
  them as `micro_batch_loop` says (grad_cache.unrolled_backward).
  """
  pretrain = config.train_mode == 'pretrain'
  distilling = config.train_mode == 'distill'
  with_memory = pretrain and config.memory_buffer_size > 0
  contrastive_loss = make_contrastive_loss(config, mesh)
  color_on_device = pretrain and config.color_augment == 'device'
  if config.micro_batch_size:  # The gradient cache (grad_cache.py).
    micro_batch_gradients = grad_cache.make_micro_batch_gradients(
        model, config, mesh, contrastive_loss,
        distort=(lambda x, keys: distort_on_device(x, keys, config))
        if color_on_device else None, loop=micro_batch_loop)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    images, labels = batch['image'], batch['label']
    if color_on_device:
      images = distort_on_device(images, batch['augment_key'], config)
    if pretrain:
      # [N, 2, ...] -> [2N, ...]: image i's views at rows 2i, 2i+1, so each
      # device keeps the views of its own images (no resharding).
      n = images.shape[0]
      images = images.reshape((2 * n,) + images.shape[2:])
      labels = jnp.repeat(labels, 2)
    memory_args = ()
    if with_memory:  # Keys and queue from before this update, as MoCo.
      keys = memory_lib.momentum_keys(
          model.apply, state.memory, images, hidden_norm=config.hidden_norm,
          rngs={'dropout': step_rng})
      memory_args = memory_lib.loss_args(state.memory)
    if distilling:
      images, teacher = distill.student_images_and_teacher_logits(
          teacher_model, state.teacher, batch)

    def loss_fn(params):
      outputs, new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images,
          train=True, mutable=['batch_stats'], rngs={'dropout': step_rng})
      loss, metrics = 0.0, {}
      if pretrain:
        con_loss, con_metrics = contrastive_loss(
            outputs['projection'].reshape(n, 2, -1), *memory_args)
        loss += con_loss
        metrics.update(contrastive_loss=con_loss, **con_metrics)
      if distilling:
        loss, distill_metrics = distill.objective(outputs['logits'], teacher,
                                                  batch, config)
        metrics.update(distill_metrics)
        loss += optim.supervised_head_l2(params, config.weight_decay)
      elif 'logits' in outputs:
        # Linear head on both views (pretrain) or the classifier (others).
        logits = outputs['logits']
        sup_loss = losses.softmax_cross_entropy(logits, labels)
        metrics['supervised_loss'] = sup_loss
        metrics['supervised_acc'] = jnp.mean(
            losses.topk_correct(logits, labels, 1))
        loss += sup_loss + optim.supervised_head_l2(
            params, optim.loss_weight_decay(config))
      metrics['loss'] = loss
      return loss, (metrics, new_vars['batch_stats'])

    if config.micro_batch_size:
      grads, (metrics, batch_stats) = micro_batch_gradients(
          state, batch, step_rng, *memory_args)
    else:
      grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
          state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if with_memory:
      new_state = new_state.replace(memory=memory_lib.advance(
          state.memory, {'params': new_state.params,
                         'batch_stats': new_state.batch_stats},
          keys, config.memory_momentum))
    metrics.update(learning_rate=learning_rate_fn(state.step),
                   weight_norm=optax.global_norm(state.params),
                   grad_norm=optax.global_norm(grads))
    if config.skip_nonfinite_steps:
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
# The loop's periodic jobs.
# ----------------------------------------------------------------------------
def is_time(step: int, every: int, total: int) -> bool:
  """A periodic job is due every `every` steps and at the last step."""
  return step == total or (every > 0 and step % every == 0)


FINITE_METRICS = ('loss', 'grad_norm')


class TrainMetrics:
  """The per-step metrics since the last log: finite check, means, speed.

  Reading them costs a few scalars; the loop does it before logging and
  before every checkpoint, so parameters made non-finite are never saved.
  """

  def __init__(self, writer, config, start_step: int):
    self.writer, self.config = writer, config
    self.pending, self.first_step = [], start_step + 1
    self.last_time = time.perf_counter()
    self.skipped = 0  # Non-finite steps skipped by this process.
    self.last_means = {}  # The latest logged means (the run's summary).

  def add(self, metrics) -> None:
    self.pending.append(metrics)

  def exclude(self, seconds: float) -> None:
    """Keeps time spent outside training steps (evaluation) out of the speed."""
    self.last_time += seconds

  def check_finite(self):
    """(stacked numpy metrics, finite mask) of the pending steps.

    Raises FloatingPointError naming the first non-finite step and metric,
    unless config.skip_nonfinite_steps (the train step skipped them).
    """
    if not self.pending:
      return {}, np.ones(0, bool)
    stacked = jax.device_get(
        jax.tree.map(lambda *xs: jnp.stack(xs), *self.pending))
    finite = np.ones(len(self.pending), bool)
    for name in FINITE_METRICS:
      if name in stacked:
        finite &= np.isfinite(stacked[name])
    if not self.config.skip_nonfinite_steps and not finite.all():
      i = int(np.argmin(finite))
      name = next(n for n in FINITE_METRICS
                  if n in stacked and not np.isfinite(stacked[n][i]))
      raise FloatingPointError(
          f'non-finite {name} ({stacked[name][i]}) at step '
          f'{self.first_step + i}; stopped before saving it, so the newest '
          'checkpoint holds finite parameters. '
          'config.skip_nonfinite_steps=True skips such steps.')
    return stacked, finite

  def write(self, step: int) -> None:
    """Means of the pending steps, images/s and step time, to the writer."""
    if not self.pending:
      return
    stacked, finite = self.check_finite()
    self.skipped += int(np.sum(~finite))
    means = {k: float(np.mean(v[finite])) if finite.any() else float('nan')
             for k, v in stacked.items()}
    steps = len(self.pending)
    elapsed = max(time.perf_counter() - self.last_time, 1e-9)
    images_per_s = steps * self.config.train_batch_size / elapsed
    means.update(skipped_nonfinite_steps=self.skipped,
                 images_per_sec=images_per_s,
                 images_per_sec_per_device=images_per_s / jax.device_count(),
                 step_time_s=elapsed / steps)
    self.writer.write_scalars(step, means)
    self.last_means = means
    self.pending, self.first_step = [], step + 1
    self.last_time = time.perf_counter()


def write_first_views(writer, config, batch, start_step: int) -> None:
  """hparams and a grid of the augmented views at step 0 (as trained on)."""
  if start_step:
    return
  writer.write_hparams(reporting.flat_hparams(config))
  views = batch['image'][:8]
  if 'augment_key' in batch:  # color_augment='device'.
    views = jax.jit(lambda x, k: distort_on_device(x, k, config))(
        jax.device_put(views), jax.device_put(batch['augment_key'][:8]))
  writer.write_images(0, {'augmented_views': reporting.view_grid(
      jax.device_get(views))})


def record_run_identity(config, workdir, data, state, start_step) -> None:
  """Writes the run's identity before its first save (runtime/run_identity.py).

  A resumed run keeps the record it was started with (preflight.check_resume
  compared it); a workdir from before the record existed gets this run's.
  """
  if start_step and run_identity.read(workdir) is not None:
    return
  identity = run_identity.of_run(
      config, data.num_classes,
      {'params': state.params, 'batch_stats': state.batch_stats})
  try:
    run_identity.write(workdir, identity)
  except OSError as e:
    raise save_watch.CheckpointWriteError(
        f'the run identity could not be written to '
        f'{run_identity.path(workdir)}: {save_watch.describe(e)}.') from e


def create_evaluators(config, model, mesh, data, init_state) -> list:
  """config.evals, plus the supervised head's top-1/5 as `eval`."""
  extra = []
  if model.has_supervised_head():
    extra.append(('eval', 'linear_head', dict(
        every_steps=config.eval_every_steps, query_split='')))
  return evaluators.create_evaluators(
      config, evaluators.make_predict_fn(model, mesh), mesh=mesh,
      num_classes=data.num_classes, data_fn=data.eval_batches,
      random_state_fn=init_state,
      extra=extra)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data=None, model=None) -> Result:
  """Trains per `config.train_mode`, resuming from `workdir` if it holds a run.

  `data` (pipeline.Data) and `model` default to the config's; tests pass
  their own. Given `data`, the config is taken as checked (main.py ran
  preflight.py); without it (a notebook), the checks run here first and a
  bad config raises preflight.BadInput before anything is written.
  """
  checked = data is not None
  if not checked:
    preflight.check_config(config)
    preflight.check_devices(config)
    data = preflight.check_dataset(config)
    preflight.check_teacher_checkpoint(config, data.num_classes)
  model = model or models.create_model(config, data.num_classes)
  if not checked:
    preflight.check_resume(config, workdir, data, model)
  lead_host = jax.process_index() == 0
  mesh = sharding.create_mesh()
  logging.info('Mesh: %s', mesh)

  # --- Optimizer and schedule ---------------------------------------------
  learning_rate_fn = optim.create_learning_rate_schedule(
      config, data.num_train_examples)
  total_steps = config_lib.config_schedule_steps(
      config, data.num_train_examples)['total_steps']
  tx = optim.create_optimizer(config, learning_rate_fn)

  # --- Train state: fresh, resumed, or from init_checkpoint ---------------
  # The key is made inside jit: a constant of the program, not a transfer.
  init_state = jax.jit(
      lambda: create_train_state(config, model, tx,
                                 jax.random.PRNGKey(config.seed)),
      out_shardings=sharding.replicated_sharding(mesh))
  state = init_state()
  manager = checkpoint.create_manager(workdir, keep=config.keep_checkpoints)
  saves = save_watch.SaveWatch(manager)
  state, start_step = checkpoint.restore_latest(manager, state)
  if start_step == 0 and config.init_checkpoint:
    state = load_init_checkpoint(state, config, mesh)
  teacher_model = None
  if config.train_mode == 'distill':  # Frozen: read again at every start.
    teacher_model = models.create_teacher_model(config, data.num_classes)
    state = state.replace(
        teacher=distill.load_teacher(config, teacher_model, mesh))
  parameter_overview.log_parameter_overview(
      state.params, msg='Parameters', jax_logging_process=0)

  # --- Update step, compiled ahead of the loop (its cost is logged) -------
  batches = data.train_batches(start_step)
  batch = next(batches)
  compile_start = time.perf_counter()
  train_step = make_train_step(model, config, learning_rate_fn, mesh,
                               teacher_model).lower(
      state, sharding.host_batch_to_global(batch, mesh)).compile()
  compile_time = time.perf_counter() - compile_start
  preflight.check_step_memory(train_step)  # Before the first step.
  record_run_identity(config, workdir, data, state, start_step)

  # --- Writers, progress, evaluators --------------------------------------
  writer = metric_writers.create_default_writer(
      workdir, just_logging=not lead_host)
  write_first_views(writer, config, batch, start_step)
  writer.write_scalars(start_step, {'compile_time_s': compile_time})
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps,
                                           writer=writer, every_secs=60.0)]
  if lead_host and config.num_profile_steps > 0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.num_profile_steps))
  evals = create_evaluators(config, model, mesh, data, init_state)
  train_metrics = TrainMetrics(writer, config, start_step)
  # The console's progress line, from process 0 only.
  progress_line = progress.ProgressLine(
      total_steps=total_steps, batch_size=config.train_batch_size,
      start_step=start_step) if lead_host else None
  logging.info('Training steps %d..%d (compile %.1f s).', start_step + 1,
               total_steps, compile_time)

  # --- Loop ----------------------------------------------------------------
  step, preempted = start_step, False
  with preemption.PreemptionWatch(on_exit=saves.wait) as watch:
    while step < total_steps and not preempted:
      batch = batch if batch is not None else next(batches)
      with jax.profiler.StepTraceAnnotation('train', step_num=step + 1):
        state, metrics = train_step(
            state, sharding.host_batch_to_global(batch, mesh))
      step, batch = step + 1, None
      saves.check()  # A failed background save stops the run here.
      train_metrics.add(metrics)
      for hook in hooks:
        hook(step)
      if progress_line:
        progress_line.update(step, metrics)
      if is_time(step, config.log_every_steps, total_steps):
        train_metrics.write(step)
      if is_time(step, config.checkpoint_every_steps, total_steps):
        train_metrics.check_finite()
        saves.save(state)
      if step < total_steps:
        eval_start = time.perf_counter()
        results = evaluators.run_evaluators(evals, state, step)
        if results:
          writer.write_scalars(step, results)
          train_metrics.exclude(time.perf_counter() - eval_start)
          if progress_line:
            progress_line.exclude(time.perf_counter() - eval_start)
      preempted = watch.should_stop(step)

    # --- The end: finished, or preempted (save now, resume later) -----------
    final = {}
    if preempted:
      train_metrics.write(step)
      saves.save(state, force=True)
      logging.warning('Stopped at step %d for preemption; checkpoint saved.',
                      step)
    else:
      final = evaluators.run_evaluators(evals, state, step, force=True)
      writer.write_scalars(step, final)
      saves.save(state)
    saves.wait()
  manager.close()
  if not preempted and config.train_mode == 'pretrain':
    checkpoint.export_backbone(state, f'{workdir}/{checkpoint.BACKBONE_DIR}')
  writer.flush()
  return Result(state, {**train_metrics.last_means, **final}, preempted)
