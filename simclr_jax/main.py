r"""Entry point: `python -m simclr_jax.main --config=configs/X.py --workdir=DIR`.

Flags -> preflight checks -> `train.train_and_evaluate`. Override any config
field on the command line: `--config.train_epochs=800`. A run ends with one
summary line on stdout, or one line on stderr, `simclr_jax: error: ...`, and
the exit code says what happened (README, "Failure and resume"):
  0  finished;
  1  an unexpected error (a bug: the traceback is in the log);
  2  bad input, found before anything compiled or a checkpoint was touched
     (preflight.py); a directory the run created for it is removed again if
     it is still empty;
  3  a non-finite loss or gradient (the newest checkpoint is still finite,
     but rerunning would repeat the same steps);
  4  a checkpoint could not be written (disk full, directory not writable):
     rerunning fails the same way until that is fixed; the earlier
     checkpoints are intact;
  75 stopped early by SIGTERM (preemption) after saving a checkpoint at the
     current step: rerun the same command to resume (EX_TEMPFAIL of
     sysexits.h, "try again later").
"""
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from simclr_jax import preflight
from simclr_jax.runtime import files
from simclr_jax.runtime import quiet_logs
from simclr_jax.runtime import reporting
from simclr_jax.runtime import workdir_lock

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
# A checkpoint could not be written: restarting fails the same way until
# space is freed or the directory is writable again.
EXIT_CHECKPOINT_WRITE = 4
# Preempted (SIGTERM): a checkpoint of the current step is saved; the same
# command resumes. launch/*.sh rerun or requeue on this code alone.
EXIT_PREEMPTED = 75


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  print(f'simclr_jax: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl and config_flags parse; a bad flag or config is one line, exit 2."""
  try:
    rest = FLAGS(argv)
    # config_flags loads the file lazily: load it now, while errors are
    # still about the command line.
    FLAGS.config.get('train_mode')
    return rest
  except flags.UnrecognizedFlagError as e:
    if e.flagname.startswith('config.'):
      _fail(f'--{e.flagname} overrides a config key, but no --config=FILE '
            'comes before it (e.g. --config=configs/demo.py).')
    _fail(preflight.one_line(e))
  except flags.Error as e:
    _fail(_first_and_last_line(e))
  except (AttributeError, KeyError) as e:
    text = str(e.args[0] if e.args else e)
    if 'get_config' in text:
      _fail(f'--config={_config_file(argv)!r} defines no get_config(); a '
            'config file is a Python file with `def get_config(): ...` '
            'returning an ml_collections.ConfigDict.')
    # config_flags applying an override to a key the config does not have;
    # its message names the key (and may suggest one).
    key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text).group(1)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    flag = next((a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.') and
                 key in a.split('=')[0].split('.')), '--config.*')
    _fail(f'{flag}: unknown config key {key!r}' +
          (f'; did you mean {suggestion.group(1)}?' if suggestion else '.'))
  except Exception as e:  # pylint: disable=broad-except
    # A config file that does not load (missing, empty path, raises).
    message = _first_and_last_line(e).replace(
        'Configuration is not available because of an earlier failure to '
        'load: ', '')
    _fail(f'--config={_config_file(argv)!r} cannot be loaded: '
          f'{type(e).__name__}: {message}')


def _config_file(argv) -> str:
  """The --config value as given (for an error about a file that failed)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return ''



def _first_and_last_line(error) -> str:
  """A message that may hold a traceback (a config file that raised), as
  one line: its first line and the exception's own last line."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  if len(lines) <= 2:
    return ' '.join(lines) or type(error).__name__
  return f'{lines[0]} ... {lines[-1]}'


def initialize_distributed() -> None:
  """Joins the multi-process job, if this is one; a no-op on one host."""
  if FLAGS.coordinator_address:
    # CPU processes need a collectives backend to talk to each other; the
    # setting only concerns the CPU backend, so it is harmless elsewhere.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  elif FLAGS.multihost == 'yes' or (
      FLAGS.multihost == 'auto' and _is_multihost_environment()):
    jax.distributed.initialize()  # Reads the cluster from the environment.


def _is_multihost_environment() -> bool:
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for size_var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(env.get(size_var, '1') or 1) > 1:
      return True
  # A TPU pod slice lists every worker of the slice.
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def print_ending(config, workdir: str, result) -> None:
  """A run's last lines: the summary, then (config.demo_plot) the path of
  the picture drawn from its event files."""
  print(reporting.summary_line(config, workdir, int(result.state.step),
                               result.metrics, preempted=result.preempted),
        flush=True)
  if config.demo_plot and not result.preempted:
    from simclr_jax.runtime import plots  # pylint: disable=g-import-not-at-top
    print(f'simclr_jax: wrote {plots.write_demo_plot(workdir)}', flush=True)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}.')
  run(FLAGS.config, FLAGS.workdir)


def run(config, workdir: str) -> None:
  """Checks, trains and reports; exits (SystemExit) unless it finished.

  A run refused before training (exit code 2) removes the directories it
  created for the workdir again, if nothing was put in them.
  """
  quiet_logs.hide_orbax_info()
  new_dirs = files.missing_dirs(os.path.join(workdir, 'checkpoints'))
  try:
    _check_train_report(config, workdir)
  except SystemExit as e:
    if e.code == EXIT_BAD_INPUT and jax.process_index() == 0:
      files.remove_empty_dirs(new_dirs)
    if e.code == EXIT_CHECKPOINT_WRITE:
      # When a step directory cannot be made, Orbax's writer threads wait
      # for it until their 5-minute timeout, and the interpreter would wait
      # for them before exiting. Everything is reported and released.
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      _hard_exit(e.code)
    raise


_hard_exit = os._exit  # pylint: disable=protected-access


def _check_train_report(config, workdir: str) -> None:
  """Checks, trains and reports; exits with the code of how it ended."""
  try:
    # The config first: a typo must not cost a multi-host rendezvous.
    preflight.check_config(config)
    initialize_distributed()
    preflight.check_devices(config)
    preflight.check_workdir(workdir)
  except preflight.BadInput as e:
    _fail(str(e))

  # One run per workdir: a second run would interleave its checkpoints and
  # retention deletes with ours. On a pod, process 0 holds it for all hosts.
  lock = workdir_lock.WorkdirLock(workdir)
  lead_host = jax.process_index() == 0
  if lead_host:
    try:
      lock.acquire()
    except workdir_lock.WorkdirLockedError as e:
      _fail(preflight.one_line(e))
  try:
    # Imported here so that `--help` and bad input answer without loading
    # the training code.
    from simclr_jax import models  # pylint: disable=g-import-not-at-top
    from simclr_jax import train  # pylint: disable=g-import-not-at-top
    from simclr_jax.runtime import save_watch  # pylint: disable=g-import-not-at-top
    try:
      data = preflight.check_dataset(config)
      model = models.create_model(config, data.num_classes)
      preflight.check_init_checkpoint(config, workdir, model)
      preflight.check_resume(config, workdir, data, model)
      preflight.check_teacher_checkpoint(config, data.num_classes)
    except preflight.BadInput as e:
      _fail(str(e))
    logging.info('JAX %s, backend %s; process %d of %d; %d local / %d '
                 'devices; workdir %s; config:\n%s', jax.__version__,
                 jax.default_backend(), jax.process_index(),
                 jax.process_count(), jax.local_device_count(),
                 jax.device_count(), workdir, config)
    try:
      result = train.train_and_evaluate(config, workdir, data=data,
                                        model=model)
    except preflight.BadInput as e:  # The compiled step does not fit.
      _fail(str(e))
    except FloatingPointError as e:
      logging.exception('Training stopped.')
      _fail(preflight.one_line(e), EXIT_NONFINITE)
    except save_watch.CheckpointWriteError as e:
      _fail(preflight.one_line(e), EXIT_CHECKPOINT_WRITE)
    if lead_host:
      print_ending(config, workdir, result)
    if result.preempted:
      sys.exit(EXIT_PREEMPTED)
  finally:
    if lead_host:
      lock.release()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
