"""Bad input to `python -m simclr_jax.main`: one error line, exit code 2, before
anything compiles, and the checkpoints already in the workdir untouched.

Most cases run the real entry point in a subprocess; they all fail before
TensorFlow is imported, so each takes about a second. The dataset and
init_checkpoint checks need TensorFlow and the model: one subprocess shows the
end-to-end path (an unprepared dataset), the rest call main's checks
in-process.
"""
import hashlib
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from simclr_jax import checkpoint
from simclr_jax import configlib
from simclr_jax import main
from simclr_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')
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


# Rejected before absl parses the flags: checked in-process (no subprocess).
PARSE_CASES = [
    ('missing_file', ['--config=configs/no_such.py'],
     ["--config='configs/no_such.py'", 'no such file']),
    ('no_get_config', ['--config={cfg}/no_get_config.py'],
     ['no_get_config.py', 'does not define get_config()']),
    ('get_config_raises', ['--config={cfg}/raises.py'],
     ['raises.py', 'get_config() failed', 'ZeroDivisionError']),
    ('unknown_key', ['--config=' + DEMO, '--config.tempreature=0.2'],
     ["unknown config key 'tempreature'", 'did you mean temperature']),
    ('unknown_key_space_form', ['--config', DEMO, '--config.tempreature',
                                '0.2'],
     ["unknown config key 'tempreature'"]),
    ('unknown_nested_key', ['--config=' + DEMO, '--config.evals.knn=1'],
     ["--config.evals.knn", "unknown config key 'knn' in config.evals"]),
]


@pytest.mark.parametrize('name,args,fragments', PARSE_CASES,
                         ids=[c[0] for c in PARSE_CASES])
def test_bad_config_file_or_key(name, args, fragments, bad_configs, capsys):
  del name
  args = [a.format(cfg=bad_configs) for a in args]
  with pytest.raises(SystemExit) as exit_info:
    main.parse_flags(['main', *args, '--workdir=/unused'])
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(PREFIX), lines
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# The real entry point in a subprocess. (name, extra args, fragments the
# error line must contain).
CLI_CASES = [
    ('wrong_type', ['--config=' + DEMO, '--config.train_batch_size=lots'],
     ["--config.train_batch_size='lots'", 'wrong type',
      'config.train_batch_size is int']),
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


def test_workdir_that_is_not_writable(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('root writes through permission bits')
  wd = tmp_path / 'ro'
  wd.mkdir()
  wd.chmod(0o555)
  try:
    with pytest.raises(main.BadInput, match='not writable'):
      main.check_workdir(str(wd))
  finally:
    wd.chmod(0o755)


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


def test_batch_not_divisible_by_process_count():
  config = configlib.lock(ml_collections.ConfigDict(
      dict(configlib.base_config(), train_batch_size=96, eval_batch_size=96)))
  with pytest.raises(configlib.ConfigError, match='process count 5'):
    configlib.validate(config, device_count=1, process_count=5,
                       check_dataset=False)


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


def _demo_config(**overrides):
  config = main.load_config_file(DEMO)
  with config.unlocked():
    config.update(overrides)
  return config


def test_unknown_dataset_and_split():
  with pytest.raises(main.BadInput, match="Unknown dataset 'no_such_set'"):
    main.check_dataset(_demo_config(dataset='no_such_set'))
  with pytest.raises(main.BadInput,
                     match=r"Unknown split 'valid'.*\['test', 'train'\]"):
    main.check_dataset(_demo_config(eval_split='valid'))
  with pytest.raises(configlib.ConfigError, match="config.dataset='no_such_set"):
    configlib.validate(_demo_config(dataset='no_such_set'), device_count=1)


def _abstract_variables(config, num_classes=10):
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = models.create_model(config, num_classes)
  size = config.image_size
  return jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))


def _save_variables(path, variables, *, bad_path=None):
  """Writes zeros shaped like `variables` (one leaf widened) as a backbone."""
  def zeros(p, leaf):
    shape = tuple(leaf.shape)
    if checkpoint._path_str(p) == bad_path:  # pylint: disable=protected-access
      shape = shape[:-1] + (shape[-1] + 1,)
    return np.zeros(shape, leaf.dtype)
  tree = jax.tree_util.tree_map_with_path(zeros, {
      'params': variables['params'],
      'batch_stats': variables['batch_stats']})
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def test_init_checkpoint_shape_mismatch_names_the_path(tmp_path):
  pretrain = _demo_config()
  variables = _abstract_variables(pretrain)
  bad = 'resnet/block_group2_block0/conv1/kernel'
  _save_variables(str(tmp_path / 'bad'), variables, bad_path='params/' + bad)
  _save_variables(str(tmp_path / 'good'), variables)

  linear = _demo_config(train_mode='linear_eval',
                        init_checkpoint=str(tmp_path / 'bad'))
  empty = tmp_path / 'empty_workdir'
  with pytest.raises(main.BadInput, match=(
      f"does not fit the model: .*params path '{bad}' has shape "
      r'\(3, 3, 64, 129\) in the checkpoint but \(3, 3, 64, 128\)')):
    main.check_init_checkpoint(linear, str(empty), num_classes=10)

  # The same file with the right shapes passes; so does a workdir that
  # already holds a checkpoint (the run resumes and never reads it).
  linear.init_checkpoint = str(tmp_path / 'good')
  main.check_init_checkpoint(linear, str(empty), num_classes=10)

  linear.init_checkpoint = str(tmp_path)  # No checkpoint there.
  with pytest.raises(main.BadInput, match='no Orbax checkpoint'):
    main.check_init_checkpoint(linear, str(empty), num_classes=10)


# ----------------------------------------------------------------------------
# URL workdirs (gs://...): checked through tf.io.gfile, never through os
# (which would make a local `gs:/bucket/...` directory). TensorFlow's
# in-memory `ram://` filesystem stands in for GCS.
# ----------------------------------------------------------------------------
def test_remote_workdir_is_probed_with_a_write(tmp_path, monkeypatch):
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  url = f'ram://main_test/{tmp_path.name}/run'
  main.check_workdir(url)
  assert gfile.isdir(url) and gfile.listdir(url) == []  # Probe deleted.
  with gfile.GFile(f'{url}/a_file', 'w') as f:
    f.write('x')
  with pytest.raises(main.BadInput, match='exists and is not a directory'):
    main.check_workdir(f'{url}/a_file')
  assert os.listdir(tmp_path) == []  # Nothing local named after the URL.

  config = ml_collections.ConfigDict({'init_checkpoint': f'{url}/missing'})
  with pytest.raises(main.BadInput, match=r"init_checkpoint='ram://.*' is "
                     'invalid: no such path'):
    main.check_remote_init_checkpoint(config)
  config.init_checkpoint = url
  main.check_remote_init_checkpoint(config)
  gfile.rmtree(url)


def test_unwritable_remote_workdir_exits_2_and_creates_nothing_local(tmp_path):
  """An unknown scheme stands in for a bucket without write access."""
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', '--config=' + DEMO,
       '--workdir=nosuch://bucket/run'], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=180)
  _assert_one_error_line(result, "--workdir='nosuch://bucket/run' is not "
                         'writable', 'nosuch')
  assert os.listdir(tmp_path) == []
