"""Bad input to `python -m simclr_jax.main`: one error line, exit code 2, before
anything compiles, and the checkpoints already in the workdir untouched.

Most cases run the real entry point in a subprocess; they all fail before
TensorFlow is imported, so each takes about a second. The dataset and
init_checkpoint checks need TensorFlow and the model: one subprocess shows the
end-to-end path (an unprepared dataset); test_preflight.py calls the checks
in-process.
"""
import hashlib
import os
import socket
import subprocess
import sys

import pytest

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import workdir_lock

from conftest import config_file
from conftest import REPO

DEMO = config_file('demo')
PREFIX = 'simclr_jax: error: '


def _snapshot(directory):
  """{relative path: (size, mtime_ns, sha1)} of every file under directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digest = hashlib.sha1(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns,
                                               digest)
  return out


@pytest.fixture
def workdir(tmp_path):
  """A workdir holding a (fake) finished checkpoint of an earlier run."""
  wd = tmp_path / 'run'
  step_dir = wd / checkpoint.CHECKPOINT_DIR / '50' / 'state'
  step_dir.mkdir(parents=True)
  (step_dir / 'array_data').write_bytes(b'\x00\x01' * 1000)
  (step_dir / '_METADATA').write_text('{}')
  return wd


def _run_main(*args, env=None):
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', *args], cwd=REPO,
      env=full_env, capture_output=True, text=True, timeout=180)


def _assert_one_error_line(result, *fragments):
  errors = [l for l in result.stderr.splitlines() if l.startswith(PREFIX)]
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert len(errors) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope='module')
def bad_configs(tmp_path_factory):
  d = tmp_path_factory.mktemp('configs')
  (d / 'no_get_config.py').write_text('x = 1\n')
  (d / 'raises.py').write_text('def get_config():\n  return 1 / 0\n')
  return d


# Rejected while absl and config_flags parse (absl's FLAGS parse once per
# process, so each case is its own `python -m simclr_jax.main`; under a
# second each, as nothing heavy is imported before parsing).
PARSE_CASES = [
    ('missing_file', ['--config=configs/no_such.py'],
     ["--config='configs/no_such.py'", 'No such file']),
    ('empty_config', ['--config='],
     ["--config=''", 'empty string']),
    ('no_get_config', ['--config={cfg}/no_get_config.py'],
     ['no_get_config.py', 'defines no get_config()']),
    ('get_config_raises', ['--config={cfg}/raises.py'],
     ['raises.py', 'cannot be loaded', 'ZeroDivisionError']),
    ('unknown_key', ['--config=' + DEMO, '--config.tempreature=0.2'],
     ["--config.tempreature: unknown config key 'tempreature'",
      'did you mean temperature']),
    ('unknown_key_space_form', ['--config', DEMO, '--config.tempreature',
                                '0.2'],
     ["unknown config key 'tempreature'"]),
    ('unknown_nested_key', ['--config=' + DEMO, '--config.evals.fewshot=1'],
     ["--config.evals.fewshot", "unknown config key 'fewshot'"]),
    ('override_without_config', ['--config.temperature=0.2'],
     ['--config.temperature overrides a config key', 'no --config=FILE']),
    ('override_before_config', ['--config.temperature=0.2',
                                '--config=' + DEMO],
     ['--config.temperature', 'before a value for --config']),
    ('wrong_type', ['--config=' + DEMO, '--config.train_batch_size=lots'],
     ['--config.train_batch_size=lots', "invalid literal for int()"]),
]


@pytest.mark.parametrize('name,args,fragments', PARSE_CASES,
                         ids=[c[0] for c in PARSE_CASES])
def test_bad_config_file_or_key(name, args, fragments, bad_configs, tmp_path):
  del name
  args = [a.format(cfg=bad_configs) for a in args]
  result = _run_main(*args, f'--workdir={tmp_path / "run"}')
  _assert_one_error_line(result, *fragments)
  assert not (tmp_path / 'run').exists()


# The real entry point in a subprocess. (name, extra args, fragments the
# error line must contain).
CLI_CASES = [
    ('bad_image_size', ['--config=' + DEMO, '--config.image_size=4'],
     ['config.image_size=4 is invalid', 'stem', '>= 8']),
    ('unknown_model', ['--config=' + DEMO, '--config.resnet_depth=19'],
     ['config.resnet_depth=19', 'expected one of 18, 34, 50']),
    ('batch_not_divisible_by_devices',
     ['--config=' + DEMO, '--config.train_batch_size=100'],
     ['config.train_batch_size=100', 'divisible by the device count 8']),
    ('nonfinite_float', ['--config=' + DEMO, '--config.learning_rate=nan'],
     ['config.learning_rate=nan is invalid', 'finite number']),
    ('missing_init_checkpoint',
     ['--config=' + DEMO, '--config.train_mode=linear_eval',
      '--config.init_checkpoint=/no/such/run'],
     ["config.init_checkpoint='/no/such/run'", 'no such path']),
    ('bad_vit_variant',
     ['--config=' + config_file('vit_s16_simclr'), '--config.vit_variant=S/17'],
     ["config.vit_variant='S/17' is invalid: expected SIZE/PATCH with SIZE "
      "one of mu, Ti, S, B, L and PATCH one of 4, 8, 14, 16, 32"]),
    ('resnet_key_with_a_vit',
     ['--config=' + config_file('vit_s16_simclr'), '--config.sk_ratio=0.0625'],
     ["config.sk_ratio=0.0625 is invalid: it configures the other backbone "
      "(config.model='vit')"]),
    ('missing_teacher_checkpoint',
     ['--config=' + config_file('demo_v2_distill_1pct'),
      '--config.teacher_checkpoint=/no/such/finetune'],
     ["config.teacher_checkpoint='/no/such/finetune'", 'no such path']),
]


@pytest.mark.parametrize('name,args,fragments', CLI_CASES,
                         ids=[c[0] for c in CLI_CASES])
def test_bad_input_exits_2_with_one_line(name, args, fragments, workdir):
  del name
  before = _snapshot(workdir)
  result = _run_main(*args, f'--workdir={workdir}')
  _assert_one_error_line(result, *fragments)
  assert _snapshot(workdir) == before
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


def test_workdir_that_cannot_be_created(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  result = _run_main('--config=' + DEMO, f'--workdir={blocker}/run')
  _assert_one_error_line(result, f"--workdir='{blocker}/run'",
                         'cannot be created')


def test_workdir_held_by_a_live_run_is_refused(workdir):
  """A second run on the same workdir stops, naming the owner's host and pid."""
  owner = workdir_lock.WorkdirLock(str(workdir), heartbeat_s=0).acquire()
  try:
    before = _snapshot(workdir)
    result = _run_main('--config=' + DEMO, f'--workdir={workdir}')
    _assert_one_error_line(result, 'is in use by pid', str(os.getpid()),
                           socket.gethostname())
    assert _snapshot(workdir) == before  # The owner's lock file included.
  finally:
    owner.release()


# ----------------------------------------------------------------------------
# Checks that need TensorFlow / the model.
# ----------------------------------------------------------------------------
def test_unprepared_dataset_prints_the_tfds_command(workdir, tmp_path):
  data_dir = tmp_path / 'tfds'
  data_dir.mkdir()
  before = _snapshot(workdir)
  result = _run_main('--config=' + DEMO, '--config.dataset=cifar10',
                     f'--config.data_dir={data_dir}', f'--workdir={workdir}')
  _assert_one_error_line(result, "'cifar10' is not prepared",
                         f'tfds build cifar10 --data_dir={data_dir}')
  assert _snapshot(workdir) == before
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


# ----------------------------------------------------------------------------
# URL workdirs (gs://...): checked through tf.io.gfile, never through os
# (which would make a local `gs:/bucket/...` directory). TensorFlow's
# in-memory `ram://` filesystem stands in for GCS.
# ----------------------------------------------------------------------------
def test_unwritable_remote_workdir_exits_2_and_creates_nothing_local(tmp_path):
  """An unknown scheme stands in for a bucket without write access."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', '--config=' + DEMO,
       '--workdir=nosuch://bucket/run'], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=180)
  _assert_one_error_line(result, "--workdir='nosuch://bucket/run' is not "
                         'writable', 'nosuch')
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# How a run ends: the exit code, one line, and what is left behind. main.run
# in-process on the tiny config, with training replaced by each outcome.
# ----------------------------------------------------------------------------
@pytest.fixture
def in_process(monkeypatch):
  """main with training faked: {'outcome': ..., 'hard_exit': [...]}."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from simclr_jax import main  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  logger = logging.get_absl_logger()
  monkeypatch.setattr(logger, 'filters', list(logger.filters))
  monkeypatch.setattr(main, 'initialize_distributed', lambda: None)
  state = {'hard_exit': []}

  def hard_exit(code):
    state['hard_exit'].append(code)
    raise SystemExit(code)
  monkeypatch.setattr(main, '_hard_exit', hard_exit)

  def fake_train(config, workdir, **_):
    outcome = state['outcome']
    if isinstance(outcome, BaseException):
      raise outcome
    if callable(outcome):
      return outcome(workdir)
    return outcome
  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  state['main'] = main
  return state


def _result(step, preempted):
  import types  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  return train.Result(types.SimpleNamespace(step=step), {'loss': 1.5},
                      preempted)


def _outcomes():
  from simclr_jax import preflight  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import save_watch  # pylint: disable=g-import-not-at-top
  return {
      'finished': (_result(4, False), None,
                   'simclr_jax: pretrain done at step 4: loss 1.5'),
      'preempted': (_result(3, True), 75,
                    'simclr_jax: pretrain preempted (resume with the same '
                    'command) at step 3'),
      'nonfinite': (FloatingPointError('non-finite loss (nan) at step 3'), 3,
                    'simclr_jax: error: non-finite loss (nan) at step 3'),
      'checkpoint_write': (save_watch.CheckpointWriteError(
          'the checkpoint of step 6 could not be written to /w/6: OSError: '
          'No space left on device (0 B free there)'), 4,
                           'simclr_jax: error: the checkpoint of step 6'),
      'too_big': (preflight.BadInput('the compiled train step needs 9 GiB'),
                  2, 'simclr_jax: error: the compiled train step needs 9'),
  }


@pytest.mark.parametrize('name', ['finished', 'preempted', 'nonfinite',
                                  'checkpoint_write', 'too_big'])
def test_each_ending_has_its_exit_code_and_one_line(name, in_process,
                                                    tiny_config, tmp_path,
                                                    capsys):
  outcome, code, line = _outcomes()[name]
  in_process['outcome'] = outcome
  workdir = tmp_path / 'new' / 'run'  # Made by this run.
  if code is None:
    in_process['main'].run(tiny_config('pretrain'), str(workdir))
  else:
    with pytest.raises(SystemExit) as exit_:
      in_process['main'].run(tiny_config('pretrain'), str(workdir))
    assert exit_.value.code == code
  out, err = capsys.readouterr()
  shown = [l for l in (out + err).splitlines() if l.startswith('simclr_jax:')]
  assert len(shown) == 1 and shown[0].startswith(line), (out, err)
  assert not (workdir / workdir_lock.LOCK_NAME).exists()  # Released.
  # Exit 4 does not wait for Orbax's writer threads (see main.run).
  assert in_process['hard_exit'] == ([4] if code == 4 else [])
  # Refused before training (2): the directories it made are gone again.
  assert (tmp_path / 'new').exists() == (code != 2)


def test_refused_run_keeps_a_directory_someone_wrote_into(in_process,
                                                          tiny_config,
                                                          tmp_path):
  from simclr_jax import preflight  # pylint: disable=g-import-not-at-top

  def write_then_refuse(workdir):
    with open(os.path.join(workdir, 'notes.txt'), 'w') as f:
      f.write('mine')
    raise preflight.BadInput('the compiled train step needs 9 GiB')
  in_process['outcome'] = write_then_refuse
  workdir = tmp_path / 'new' / 'run'
  with pytest.raises(SystemExit) as exit_:
    in_process['main'].run(tiny_config('pretrain'), str(workdir))
  assert exit_.value.code == 2
  assert os.listdir(workdir) == ['notes.txt']
  # An existing, empty workdir is not this run's to remove.
  existing = tmp_path / 'existing'
  existing.mkdir()
  in_process['outcome'] = preflight.BadInput('too big')
  with pytest.raises(SystemExit):
    in_process['main'].run(tiny_config('pretrain'), str(existing))
  assert existing.is_dir()


def test_resuming_another_runs_workdir_is_refused_before_training(
    in_process, tiny_config, tmp_path, capsys):
  """A supervised run on a pretraining workdir: one line naming train_mode
  and both values, exit 2, training never starts, nothing is touched; Orbax's
  INFO lines are hidden from here on."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import quiet_logs  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import run_identity  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pretrain = tiny_config('pretrain')
  workdir = tmp_path / 'run'
  step_dir = workdir / checkpoint.CHECKPOINT_DIR / '4' / 'state'
  step_dir.mkdir(parents=True)
  (step_dir / 'array_data').write_bytes(b'\x00' * 64)
  model = models.create_model(pretrain, 10)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False))
  run_identity.write(str(workdir), run_identity.of_run(pretrain, 10,
                                                       variables))
  before = _snapshot(workdir)
  in_process['outcome'] = AssertionError('training must not start')
  with pytest.raises(SystemExit) as exit_:
    in_process['main'].run(tiny_config('supervised'), str(workdir))
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert (f"{PREFIX}--workdir='{workdir}' holds another run (config."
          "train_mode='pretrain' in the workdir's run, 'supervised' in this "
          "one)") in err
  assert _snapshot(workdir) == before
  from absl import logging  # pylint: disable=g-import-not-at-top
  assert quiet_logs._FILTER in logging.get_absl_logger().filters  # pylint: disable=protected-access


def test_readme_lists_every_exit_code():
  from simclr_jax import main  # pylint: disable=g-import-not-at-top
  text = (REPO / 'README.md').read_text()
  section = text[text.index('## Failure and resume'):]
  section = section[:section.index('\n## ', 1)]
  codes = {0, 1} | {v for k, v in vars(main).items()
                    if k.startswith('EXIT_')}
  assert codes == {0, 1, 2, 3, 4, 75}
  for code in codes:
    assert f'\n| {code} |' in section, code
