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
    ('unknown_nested_key', ['--config=' + DEMO, '--config.evals.knn=1'],
     ["--config.evals.knn", "unknown config key 'knn'"]),
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
    ('missing_init_checkpoint',
     ['--config=' + DEMO, '--config.train_mode=linear_eval',
      '--config.init_checkpoint=/no/such/run'],
     ["config.init_checkpoint='/no/such/run'", 'no such path']),
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
