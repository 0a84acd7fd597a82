"""Checkpoints: one Orbax layout for resuming, for init_checkpoint and for export.

Layout under a run's workdir:

  workdir/checkpoints/<step>/state/...   the training state (every
      `checkpoint_every_steps`, newest `keep_checkpoints` kept):
      {'step': int32 [], 'params': ..., 'batch_stats': ...,
       'opt_state': ..., 'rng': uint32 [2]}
      plus 'memory': {'params', 'batch_stats', 'queue', 'pointer',
      'count'} with SimCLRv2's memory buffer (memory.py);
  workdir/backbone/...                   exported parameters alone, for use
      elsewhere: {'params': ..., 'batch_stats': ...} without the heads;
      a later export replaces it, but nothing else is written over.

Saves are asynchronous (training continues while the arrays are written) and
atomic: Orbax writes into a temporary directory and renames it when complete,
so `latest_step()` only ever sees finished checkpoints. All hosts call save and
restore; Orbax coordinates who writes what. A half-written step (the process
was killed mid-save) stays an `<step>.orbax-checkpoint-tmp-*` directory that
resuming ignores; a finished step that no longer reads (truncated or deleted
array files) is skipped for the previous one and renamed `<step>.corrupt`.
Nothing is deleted except by the keep-N retention of numbered steps and
a new backbone export replacing the previous one.

Remote workdirs (a URL: `gs://bucket/run`; `ram://` in tests): Orbax reaches
them through etils.epath; the listing, existence checks and renames here use
tf.io.gfile (what epath itself uses for gs:// when TensorFlow is installed,
and it also serves `ram://`, which the tests use as a fake remote filesystem).
GCS has no atomic directory rename, so Orbax marks a finished step there with
a `commit_success.txt` file instead; a numbered step directory on gs:// that
lacks it is half-written and is not counted. Setting an unreadable step aside
on gs:// is a copy-and-delete of its objects (slow for a big step, but
rare). runtime/files.py picks os or tf.io.gfile per path.
"""
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from simclr_jax.runtime import files
from simclr_jax.runtime import owned_output

CHECKPOINT_DIR = 'checkpoints'
BACKBONE_DIR = 'backbone'
EXPORT_WRITER = 'simclr_jax backbone export'
# Saved state items, in the order of the docstring above.
STATE_KEYS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')
# Top-level parameter collections that are heads, not backbone.
HEAD_PREFIXES = ('projection_head', 'supervised_head', 'head')
# URL prefixes where Orbax finalizes a step with this file, not a rename
# (orbax atomicity_defaults: CommitFileTemporaryPath for GCS).
COMMIT_FILE_PREFIXES = ('gs://',)
COMMIT_FILE = 'commit_success.txt'


def create_manager(workdir: str, *, keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  """The run's CheckpointManager on `workdir/checkpoints`, keeping `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(
      os.path.join(files.abspath(workdir), CHECKPOINT_DIR),
      options=options, item_names=('state',))


def state_to_tree(state) -> Dict[str, Any]:
  """The saved items of a TrainState (a plain dict: a stable on-disk layout).

  The memory buffer only when on, so runs without it keep the v1 layout. A
  distillation teacher is never saved: it is read from its own checkpoint.
  """
  tree = {k: getattr(state, k) for k in STATE_KEYS}
  if getattr(state, 'memory', None):
    tree['memory'] = state.memory
  return tree


def save(manager: ocp.CheckpointManager, state, *, force: bool = False
         ) -> bool:
  """Starts an asynchronous save of `state` at `state.step`; returns started."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return False
  return manager.save(
      step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_to_tree(state))),
      force=force)


def restore_latest(manager: ocp.CheckpointManager, state) -> Tuple[Any, int]:
  """Restores the newest complete and readable checkpoint into `state`.

  `state` may be concrete or abstract (`jax.ShapeDtypeStruct`s with
  shardings, e.g. from `jax.eval_shape`); restored arrays take its shardings.

  A checkpoint that fails to read (a truncated or deleted array file: the disk
  filled up, a copy was interrupted) is logged with its path and skipped for
  the next older one; once an older one has restored, the unreadable ones are
  renamed `<step>.corrupt` (kept for inspection, never deleted, and out of
  the way of this run's next save at that step). If none restores, the first
  error is raised and nothing is renamed: then the cause is more likely the
  config (another model) than the files.

  Returns:
    (state, step): the restored state, or the given one and 0 if the
    directory holds no complete checkpoint.
  """
  abstract = jax.tree.map(_abstract, state_to_tree(state))
  unreadable, first_error = [], None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax/TensorStore raise plain Exceptions for unreadable arrays.
      logging.error('Checkpoint %s cannot be read (%s: %s); trying the '
                    'previous one.', _step_dir(manager, step),
                    type(e).__name__, ' '.join(str(e).split())[:500])
      unreadable.append(step)
      first_error = first_error or e
      continue
    for bad in unreadable:
      _set_aside(manager, bad)
    logging.info('Resumed from %s at step %d.', _step_dir(manager, step), step)
    return state.replace(**restored['state']), int(step)
  if first_error is not None:
    raise first_error
  return state, 0


def _step_dir(manager, step) -> str:
  return os.path.join(str(manager.directory), str(step))


def _set_aside(manager, step) -> None:
  """Renames an unreadable step directory to `<step>.corrupt[.N]`."""
  if jax.process_index() == 0:
    src = _step_dir(manager, step)
    dst, n = src + '.corrupt', 0
    while files.exists(dst):
      n += 1
      dst = f'{src}.corrupt.{n}'
    files.rename(src, dst)
    logging.error('Set the unreadable checkpoint aside: %s -> %s', src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
  manager.reload()


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=getattr(x, 'sharding', None))


# ----------------------------------------------------------------------------
# init_checkpoint: start linear eval / fine-tuning from a pretraining run.
# ----------------------------------------------------------------------------
def _numeric_subdirs(path: str) -> Iterable[int]:
  """Finished step directories: numbered, and committed where GCS needs it."""
  needs_commit_file = path.startswith(COMMIT_FILE_PREFIXES)
  for name in files.listdir(path):
    step_dir = os.path.join(path, name)
    if not re.fullmatch(r'\d+', name) or not files.isdir(step_dir):
      continue
    if needs_commit_file and not files.exists(
        os.path.join(step_dir, COMMIT_FILE)):
      continue  # Half-written: Orbax has not committed it.
    yield int(name)


def resolve_checkpoint_path(path: str) -> str:
  """Finds the Orbax item directory that `path` designates.

  Accepted: a run's workdir, its `checkpoints/` directory (newest step), one
  step directory, or an exported backbone directory.
  """
  path = files.abspath(path)
  if not files.isdir(path):
    raise FileNotFoundError(f'init_checkpoint {path!r} is not a directory.')
  if files.isdir(os.path.join(path, CHECKPOINT_DIR)):
    path = os.path.join(path, CHECKPOINT_DIR)
  steps = sorted(_numeric_subdirs(path))
  if steps:
    path = os.path.join(path, str(steps[-1]))
  if files.isdir(os.path.join(path, 'state')):
    path = os.path.join(path, 'state')
  return path


def load_pretrained(path: str) -> Dict[str, Any]:
  """Reads params and batch_stats (numpy) from a checkpoint or exported backbone."""
  item = resolve_checkpoint_path(path)
  checkpointer = ocp.PyTreeCheckpointer()
  # Read as host numpy arrays: the pretraining run's device layout (another
  # mesh, another host count) says nothing about this one's.
  metadata = checkpointer.metadata(item).item_metadata
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
  tree = checkpointer.restore(
      item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  missing = [k for k in ('params', 'batch_stats') if k not in tree]
  if missing:
    raise ValueError(f'init_checkpoint {item!r} has no {missing[0]!r}; '
                     'expected a simclr_jax checkpoint or exported backbone.')
  logging.info('Loaded pretrained weights from %s.', item)
  return {k: jax.tree.map(np.asarray, tree[k])
          for k in ('params', 'batch_stats')}


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _pick_pretrained(target, pretrained, *, reinit, what):
  """f(path, target_leaf) -> the pretrained leaf (or None: keep the target's).

  Raises ValueError naming the first path missing or of another shape.
  """
  flat_pre = {_path_str(p): v
              for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}

  def pick(path, leaf):
    name = _path_str(path)
    if _is_reinit(name, reinit):
      return None
    if name not in flat_pre:
      raise ValueError(
          f'init_checkpoint: {what} path {name!r} of the model is missing '
          'from the checkpoint.')
    value = flat_pre[name]
    if tuple(value.shape) != tuple(leaf.shape):
      raise ValueError(
          f'init_checkpoint: {what} path {name!r} has shape '
          f'{tuple(value.shape)} in the checkpoint but {tuple(leaf.shape)} in '
          'the model.')
    return value

  return pick


def _is_reinit(name: str, reinit) -> bool:
  return any(part in reinit for part in name.split('/'))


def _check_no_extra(target, pretrained, *, reinit, what) -> None:
  """Raises ValueError naming the first checkpoint path the model lacks.

  A deeper or wider network, or another head, would otherwise load only in
  part, silently. Paths under `reinit` (subtrees the mode initialises
  afresh on purpose) may be extra.
  """
  names = {_path_str(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
  extra = [n for n in sorted(
      _path_str(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(pretrained)[0])
           if n not in names and not _is_reinit(n, reinit)]
  if extra:
    raise ValueError(
        f'init_checkpoint: {what} path {extra[0]!r} of the checkpoint is not '
        f'in the model ({len(extra)} such path(s)): it holds another '
        'architecture; set the model keys to the ones it was trained with.')


def init_checkpoint_reinit(config, pretrained_params: Mapping[str, Any]
                           ) -> Tuple[str, ...]:
  """Parameter subtrees that init_checkpoint does not provide (fresh init).

  The supervised head is always new. A projection head missing from the
  checkpoint (an exported backbone) is allowed when the classifier does not
  read it. `pretrained_params` is the checkpoint's 'params' tree (arrays or
  shapes); the result is merge_pretrained's / check_shapes' `reinit`.
  """
  reinit = ('supervised_head',)
  head_unused = config.ft_proj_selector == 0
  if 'projection_head' not in pretrained_params and head_unused:
    reinit += ('projection_head',)
  return reinit


def merge_pretrained(target: Mapping[str, Any], pretrained: Mapping[str, Any],
                     *, reinit: Tuple[str, ...] = ('supervised_head',),
                     what: str = 'params') -> Any:
  """Takes every leaf of `target` from `pretrained`, except subtrees in `reinit`.

  Leaves whose path contains a name in `reinit` (the new classifier) keep the
  target's fresh initialisation, and the log lists them. Any other leaf must
  exist in `pretrained` with the same shape, and every pretrained leaf
  outside `reinit` must exist in the target; the first path that does not
  is named in the error.
  """
  pick = _pick_pretrained(target, pretrained, reinit=reinit, what=what)

  def merge(path, leaf):
    value = pick(path, leaf)
    return leaf if value is None else np.asarray(value, dtype=leaf.dtype)

  merged = jax.tree_util.tree_map_with_path(merge, target)
  _check_no_extra(target, pretrained, reinit=reinit, what=what)
  names = [_path_str(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]]
  fresh = [r for r in reinit if any(r in n.split('/') for n in names)]
  if fresh:
    logging.info('init_checkpoint: %s of %s initialised afresh on purpose '
                 '(not read from the checkpoint).', what, ', '.join(fresh))
  return merged


def check_shapes(target: Mapping[str, Any], pretrained: Mapping[str, Any],
                 *, reinit: Tuple[str, ...] = ('supervised_head',),
                 what: str = 'params') -> None:
  """merge_pretrained's checks alone, on shapes (abstract trees work).

  `target` from `jax.eval_shape(model.init, ...)` and `pretrained` from
  `pretrained_shapes(path)`: no array is read or allocated.
  """
  pick = _pick_pretrained(target, pretrained, reinit=reinit, what=what)
  jax.tree_util.tree_map_with_path(pick, target)
  _check_no_extra(target, pretrained, reinit=reinit, what=what)


def pretrained_shapes(path: str) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of a checkpoint as ShapeDtypeStructs (metadata only)."""
  item = resolve_checkpoint_path(path)
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(item)
    metadata = getattr(getattr(metadata, 'item_metadata', None), 'tree',
                       None)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{item!r} is not a readable Orbax checkpoint '
                     f'({type(e).__name__}: {e})') from None
  if not metadata:
    raise ValueError(f'no Orbax checkpoint in {item!r} (expected a pretraining '
                     'workdir, its checkpoints/ or step directory, or an '
                     'exported backbone).')
  missing = [k for k in ('params', 'batch_stats') if k not in metadata]
  if missing:
    raise ValueError(f'{item!r} has no {missing[0]!r}; expected a simclr_jax '
                     'checkpoint or exported backbone.')
  return {k: jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), metadata[k])
          for k in ('params', 'batch_stats')}


# ----------------------------------------------------------------------------
# Export of the backbone alone.
# ----------------------------------------------------------------------------
def backbone_only(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """Drops the head subtrees (projection and supervised heads)."""
  return {k: v for k, v in tree.items()
          if not any(k.startswith(p) for p in HEAD_PREFIXES)}


def export_backbone(state, path: str) -> str:
  """Writes {'params', 'batch_stats'} of the backbone to `path` (synchronous).

  The result loads with `load_pretrained(path)` or as `init_checkpoint`.
  A previous export at `path` is replaced; anything else there is left
  untouched and raises FileExistsError (runtime/owned_output.py).
  """
  path = files.abspath(path)
  refusal = owned_output.refusal(path, EXPORT_WRITER)
  if refusal:
    raise FileExistsError(
        f'Not exporting the backbone: {refusal}. Move it away and run the '
        'same command again: it resumes from the final checkpoint and '
        'exports.')
  if jax.process_count() > 1:
    # Every process has looked before the primary one replaces anything.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('export_backbone_checked')
  tree = {'params': backbone_only(state.params),
          'batch_stats': backbone_only(state.batch_stats)}
  checkpointer = ocp.StandardCheckpointer()
  # Orbax writes a temporary directory and renames it when complete; with
  # force it first removes what is at `path`: nothing, an empty directory or
  # a previous export, as checked above.
  checkpointer.save(path, tree, force=files.exists(path))
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    owned_output.write_marker(path, EXPORT_WRITER)
  logging.info('Exported backbone parameters to %s.', path)
  return path


def checkpoint_steps(workdir: str) -> Tuple[int, ...]:
  """Steps of the complete checkpoints under `workdir` (for tests and tools)."""
  return committed_steps(os.path.join(workdir, CHECKPOINT_DIR))


def committed_steps(directory: str) -> Tuple[int, ...]:
  """Steps of the complete checkpoints in a checkpoints `directory`."""
  if not files.isdir(directory):
    return ()
  return tuple(sorted(_numeric_subdirs(directory)))


def latest_step(workdir: str) -> Optional[int]:
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None
