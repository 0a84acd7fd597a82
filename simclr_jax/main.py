r"""Entry point: `python -m simclr_jax.main --config=configs/X.py --workdir=DIR`.

Parses flags, joins the multi-host job when there is one, checks the input
(before anything compiles or touches a checkpoint), takes the workdir's lock,
logs where it runs, and hands over to `train.train_and_evaluate`. Override any
config field on the command line: `--config.train_epochs=800`.

Bad input ends the run with one line on stderr, `simclr_jax: error: ...`, and
exit code 2: a missing or broken config file, an unknown or mistyped override,
an invalid config value (configlib.validate), an unknown dataset or split, a
dataset that is not prepared (the line gives the `tfds build` command), a
workdir that cannot be written or that another live run holds, an
`init_checkpoint` that is missing or whose shapes do not fit the model.
The workdir and init_checkpoint may be URLs (gs://bucket/run): they are then
checked through TensorFlow's filesystems, the workdir by writing and deleting
a probe file (see workdir_lock.py for what the lock can promise there).
A non-finite loss or gradient stops training with one line naming the step
and exit code 3 (the newest checkpoint is still finite; do not just restart).
"""
import difflib
import os
import runpy
import socket
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from simclr_jax import configlib
from simclr_jax import workdir_lock

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Directory for checkpoints, TensorBoard logs and exports; '
                    'a run resumes from the newest checkpoint found here.')
flags.DEFINE_enum(
    'multihost', 'auto', ['auto', 'yes', 'no'],
    "Call jax.distributed.initialize(): 'auto' does when the environment is "
    'a multi-host job (TPU pod slice, SLURM, Open MPI, or '
    'JAX_COORDINATOR_ADDRESS set).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for a hand-started multi-process '
                    'run (with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Processes in a hand-started run.')
flags.DEFINE_integer('process_id', None, 'This process in a hand-started run.')
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_BAD_INPUT = 2
# Non-finite loss or gradients: restarting would replay the same steps, so a
# supervisor that restarts preempted runs should not restart on this code.
EXIT_NONFINITE = 3


class BadInput(Exception):
  """Input that cannot run; the message is the one line the user sees."""


def _fail(message: str) -> None:
  print(f'simclr_jax: error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).replace('\\n', ' ').split())
  return text or type(error).__name__


# ----------------------------------------------------------------------------
# The config file and its overrides, checked before absl parses them (its own
# messages are multi-line or name the wrong thing, e.g. an unknown key as an
# "unknown flag").
# ----------------------------------------------------------------------------
def _argv_config(argv):
  """(config spec, [(key, value or None)]) of `--config` and its overrides."""
  spec, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    name, eq, value = arg.partition('=')
    if name in ('--config', '-config'):
      spec = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    for prefix in ('--config.', '-config.', '--noconfig.', '-noconfig.'):
      if name.startswith(prefix):
        overrides.append((name[len(prefix):], value if eq else None))
  return spec, overrides


def load_config_file(spec: str):
  """get_config() of `spec` ('path' or 'path:argument'), or BadInput."""
  path, arg = spec, None
  if not os.path.isfile(path) and ':' in spec:
    path, arg = spec.split(':', 1)
  if not os.path.isfile(path):
    raise BadInput(f'--config={spec!r}: no such file (expected a Python file '
                   'defining get_config(), e.g. configs/demo.py).')
  try:
    module = runpy.run_path(path)
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(f'--config={spec!r} cannot be loaded: '
                   f'{type(e).__name__}: {_one_line(e)}') from e
  get_config = module.get('get_config')
  if not callable(get_config):
    raise BadInput(f'--config={spec!r} does not define get_config(); a config '
                   'file is a Python file with `def get_config(): ...` that '
                   'returns an ml_collections.ConfigDict.')
  try:
    return get_config(arg) if arg is not None else get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(f'--config={spec!r}: get_config() failed: '
                   f'{type(e).__name__}: {_one_line(e)}') from e


def _lookup(config, dotted_key):
  """config's value at 'a.b.c', or KeyError naming the keys that exist there."""
  node, path = config, []
  for part in dotted_key.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      where = 'config' + ''.join(f'.{p}' for p in path)
      raise KeyError((part, where, keys))
    node, path = node[part], path + [part]
  return node


def check_overrides(config, overrides) -> None:
  """Every `--config.KEY` names an existing key; BadInput names the first one that does not."""
  for key, _ in overrides:
    try:
      _lookup(config, key)
    except KeyError as e:
      part, where, keys = e.args[0]
      close = difflib.get_close_matches(part, keys, n=3)
      hint = (f'did you mean {", ".join(close)}?' if close else
              f'{where} has {", ".join(sorted(keys)) or "no keys"}.')
      raise BadInput(f'--config.{key}: unknown config key {part!r} in '
                     f'{where}; {hint}') from None


def _type_error_message(config, error) -> str:
  """absl's 'flag --config.K=V: detail' -> names K, V and K's type."""
  text = _one_line(error)
  prefix = 'flag --config.'
  if text.startswith(prefix) and '=' in text and ': ' in text:
    assignment, detail = text[len(prefix):].split(': ', 1)
    key, value = assignment.split('=', 1)
    try:
      expected = type(_lookup(config, key)).__name__
    except KeyError:
      expected = None
    if expected:
      return (f'--config.{key}={value!r} has the wrong type: config.{key} is '
              f'{expected} ({detail}).')
  return text


def parse_flags(argv):
  """absl's parser, but every bad flag or config is one line and exit 2."""
  spec, overrides = _argv_config(argv)
  config = None
  try:
    if spec:
      config = load_config_file(spec)
      check_overrides(config, overrides)
  except BadInput as e:
    _fail(str(e))
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(_type_error_message(config, e) if config is not None
          else _one_line(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(f'bad --config override: {_one_line(e)}')


def load_config():
  """FLAGS.config (config_flags loads the file lazily, on first access)."""
  try:
    config = FLAGS.config
    config.get('train_mode')
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__cause__ or e
    _fail(f'--config={FLAGS["config"].config_filename!r} cannot be loaded: '
          f'{_one_line(cause)}')
  return config


# ----------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------
def _is_multihost_environment() -> bool:
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for size_var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(env.get(size_var, '1') or 1) > 1:
      return True
  # A TPU pod slice lists every worker of the slice.
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def initialize_distributed() -> None:
  """Joins the multi-process job, if this is one; a no-op on one host."""
  if FLAGS.coordinator_address:
    # CPU processes need a collectives backend to talk to each other; the
    # setting only concerns the CPU backend, so it is harmless elsewhere.
    # (Asking jax for its backend here would initialise it too early.)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.multihost == 'yes' or (
      FLAGS.multihost == 'auto' and _is_multihost_environment()):
    jax.distributed.initialize()  # Reads the cluster from the environment.


# ----------------------------------------------------------------------------
# Checks of the world outside the config: workdir, dataset, init_checkpoint.
# Each raises BadInput with the line to print.
# ----------------------------------------------------------------------------
def check_workdir(workdir: str) -> None:
  """The workdir exists (or can be made) and is writable."""
  if workdir_lock.is_remote(workdir):
    _check_remote_workdir(workdir)
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise BadInput(f'--workdir={workdir!r} exists and is not a directory.')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} cannot be created: '
                   f'{e.strerror}.') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise BadInput(f'--workdir={workdir!r} is not writable.')
  # os.access trusts permission bits; a read-only mount or a full disk only
  # shows on an actual write.
  probe = os.path.join(workdir, f'.simclr_jax_write_test.{os.getpid()}')
  try:
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise BadInput(f'--workdir={workdir!r} is not writable: '
                   f'{e.strerror}.') from None


def _check_remote_workdir(workdir: str) -> None:
  """A URL workdir (gs://...): permissions only show on an actual write.

  tf.io.gfile, as etils.epath uses for gs:// (os calls would make a local
  `gs:/bucket/...` directory). An unknown scheme, a missing bucket or missing
  credentials all fail here, before the lock and any compile.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  probe = (f'{workdir.rstrip("/")}/.simclr_jax_write_test.'
           f'{socket.gethostname()}.{os.getpid()}')
  try:
    if gfile.exists(workdir) and not gfile.isdir(workdir):
      raise BadInput(f'--workdir={workdir!r} exists and is not a directory.')
    gfile.makedirs(workdir)
    with gfile.GFile(probe, 'w') as f:
      f.write('ok')
    gfile.remove(probe)
  except BadInput:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # tf.errors.* (NotFound, PermissionDenied, Unimplemented scheme, ...).
    raise BadInput(f'--workdir={workdir!r} is not writable: '
                   f'{type(e).__name__}: {_one_line(e)}') from None


def check_remote_init_checkpoint(config) -> None:
  """configlib's existence check of init_checkpoint, for a URL."""
  path = config.get('init_checkpoint')
  if not path or not workdir_lock.is_remote(path):
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    exists = tf.io.gfile.exists(path)
  except Exception as e:  # pylint: disable=broad-except
    raise BadInput(f'config.init_checkpoint={path!r} cannot be read: '
                   f'{type(e).__name__}: {_one_line(e)}') from None
  if not exists:
    raise BadInput(f'config.init_checkpoint={path!r} is invalid: no such '
                   'path.')


def check_dataset(config) -> int:
  """Dataset known and prepared, splits exist; returns the number of classes.

  data/pipeline.py words the errors (a dataset that is not prepared gets the
  `tfds build` command that prepares it).
  """
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    pipeline.num_examples(config, config.train_split)
    if config.get('eval_split'):
      pipeline.num_examples(config, config.eval_split)
    return pipeline.num_classes(config)
  except ValueError as e:
    raise BadInput(f'{_one_line(e)}') from None


def check_init_checkpoint(config, workdir: str, num_classes: int) -> None:
  """init_checkpoint exists and fits the model, path by path (shapes only).

  Skipped when the workdir holds a checkpoint: the run resumes from it and
  does not read init_checkpoint.
  """
  from simclr_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if not config.init_checkpoint or checkpoint.latest_step(workdir) is not None:
    return
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    pretrained = checkpoint.pretrained_shapes(config.init_checkpoint)
  except (OSError, ValueError) as e:
    raise BadInput(f'config.init_checkpoint={config.init_checkpoint!r} cannot '
                   f'be read: {_one_line(e)}') from None
  model = models.create_model(config, num_classes)
  size = config.image_size
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((2, size, size, 3), jnp.float32),
                         train=False))
  reinit = checkpoint.init_checkpoint_reinit(config, pretrained['params'])
  try:
    for what in ('params', 'batch_stats'):
      checkpoint.check_shapes(variables.get(what, {}), pretrained[what],
                              reinit=reinit, what=what)
  except ValueError as e:
    raise BadInput(f'config.init_checkpoint={config.init_checkpoint!r} does '
                   f'not fit the model: {_one_line(e)}') from None


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}.')
  config = load_config()
  workdir = FLAGS.workdir

  try:
    # Cheap checks first: a typo must not cost a multi-host rendezvous, nor
    # the seconds it takes to import TensorFlow for the dataset checks.
    # configlib checks that a local init_checkpoint exists (os.path); a URL
    # is checked after the rendezvous, with TensorFlow's filesystems.
    configlib.validate(
        config, device_count=1, process_count=1, check_dataset=False,
        check_paths=not workdir_lock.is_remote(config.init_checkpoint))
    initialize_distributed()
    configlib.validate(config, device_count=jax.device_count(),
                       process_count=jax.process_count(),
                       check_dataset=False, check_paths=False)
    check_workdir(workdir)
    check_remote_init_checkpoint(config)
  except (configlib.ConfigError, BadInput) as e:
    _fail(_one_line(e))

  # One run per workdir: a second run would interleave its checkpoints and
  # retention deletes with ours. On a pod, process 0 holds it for all hosts.
  lock = workdir_lock.WorkdirLock(workdir)
  lead_host = jax.process_index() == 0
  if lead_host:
    try:
      lock.acquire()
    except workdir_lock.WorkdirLockedError as e:
      _fail(_one_line(e))
  try:
    try:
      num_classes = check_dataset(config)
      check_init_checkpoint(config, workdir, num_classes)
    except (configlib.ConfigError, BadInput) as e:
      _fail(_one_line(e))

    logging.info('JAX %s, backend %s; process %d of %d; %d local / %d '
                 'devices: %s', jax.__version__, jax.default_backend(),
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices())
    logging.info('workdir: %s', workdir)
    logging.info('config:\n%s', config)
    # Imported here so that `--help` and bad input answer without loading
    # the training code.
    from simclr_jax import train  # pylint: disable=g-import-not-at-top
    try:
      train.train_and_evaluate(config, workdir)
    except FloatingPointError as e:
      logging.exception('Training stopped.')
      print(f'simclr_jax: error: {_one_line(e)}', file=sys.stderr, flush=True)
      sys.exit(EXIT_NONFINITE)
  finally:
    if lead_host:
      lock.release()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
