"""checkpoint.py: exact round trip, keep-N, unreadable checkpoints skipped and
set aside (never deleted), half-written ones ignored, init_checkpoint merge."""
import glob
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import files


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: tuple
  rng: jax.Array


def make_state(step, scale=1.0):
  return State(
      step=jnp.asarray(step, jnp.int32),
      params={'resnet': {'conv': {'kernel': jnp.arange(
          4096, dtype=jnp.float32).reshape(64, 64) * scale + step}},
              'supervised_head': {'bias': jnp.full((10,), step, jnp.float32)}},
      batch_stats={'resnet': {'bn': {'mean': jnp.full((64,), 0.5 * step)}}},
      opt_state=({'trace': jnp.full((64, 64), -step, jnp.float32)},),
      rng=jax.random.PRNGKey(step))


def write_steps(workdir, steps, keep=10):
  manager = checkpoint.create_manager(str(workdir), keep=keep)
  for step in steps:
    assert checkpoint.save(manager, make_state(step))
  manager.wait_until_finished()
  manager.close()


def snapshot(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def restore(workdir, keep=10):
  manager = checkpoint.create_manager(str(workdir), keep=keep)
  state, step = checkpoint.restore_latest(manager, make_state(0))
  return manager, state, step


def assert_state_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_is_exact_and_keeps_n(tmp_path):
  write_steps(tmp_path, [10, 20, 30], keep=2)
  assert checkpoint.checkpoint_steps(str(tmp_path)) == (20, 30)
  manager, state, step = restore(tmp_path)
  assert step == 30
  assert_state_equal(state, make_state(30))
  # Saving a step that exists is a no-op, not an error.
  assert not checkpoint.save(manager, make_state(30))
  manager.close()


def test_empty_workdir_starts_fresh(tmp_path):
  manager, state, step = restore(tmp_path)
  assert step == 0
  assert_state_equal(state, make_state(0))
  manager.close()


def _array_files(step_dir):
  """The array data files of a step, largest first."""
  files = [f for f in glob.glob(os.path.join(step_dir, '**', 'd', '*'),
                                recursive=True) if os.path.isfile(f)]
  assert files, os.listdir(step_dir)
  return sorted(files, key=os.path.getsize, reverse=True)


def _truncate(step_dir):
  for path in _array_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_one(step_dir):
  os.remove(_array_files(step_dir)[0])


# TensorStore's failed read leaves an asyncio callback behind; harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', [_truncate, _delete_one],
                         ids=['truncated', 'deleted_array_file'])
def test_unreadable_newest_is_skipped_and_set_aside(tmp_path, damage, caplog):
  write_steps(tmp_path, [10, 20, 30])
  ckpt_dir = tmp_path / checkpoint.CHECKPOINT_DIR
  damage(str(ckpt_dir / '30'))
  # Files of an earlier, unrelated tool in the workdir and a half-written
  # step (a run killed mid-save) must survive untouched.
  (tmp_path / 'notes.txt').write_text('mine')
  half = ckpt_dir / '40.orbax-checkpoint-tmp-1234'
  half.mkdir()
  (half / 'partial').write_bytes(b'\x00' * 10)
  before = snapshot(tmp_path)

  with caplog.at_level(logging.ERROR):
    manager, state, step = restore(tmp_path)
  assert step == 20
  assert_state_equal(state, make_state(20))
  assert str(ckpt_dir / '30') in caplog.text  # Logged with its path.

  # Set aside, not deleted: every file is still there, under a new name.
  after = snapshot(tmp_path)
  moved = {k.replace(os.path.join('checkpoints', '30') + os.sep,
                     os.path.join('checkpoints', '30.corrupt') + os.sep): v
           for k, v in before.items()}
  assert after == moved
  assert checkpoint.checkpoint_steps(str(tmp_path)) == (10, 20)

  # The run goes on and writes step 30 again; it restores exactly.
  assert checkpoint.save(manager, make_state(30, scale=2.0))
  manager.wait_until_finished()
  manager.close()
  manager, state, step = restore(tmp_path)
  assert step == 30
  assert_state_equal(state, make_state(30, scale=2.0))
  assert (ckpt_dir / '30.corrupt').is_dir() and half.is_dir()
  manager.close()


def test_all_unreadable_raises_and_renames_nothing(tmp_path):
  """A model change (not a disk problem) fails every step: nothing moved."""
  write_steps(tmp_path, [10, 20])
  before = snapshot(tmp_path)
  manager = checkpoint.create_manager(str(tmp_path), keep=10)
  other_model = make_state(0).replace(
      params={'resnet': {'conv': {'kernel': jnp.zeros((32, 32))}}})
  with pytest.raises(Exception):
    checkpoint.restore_latest(manager, other_model)
  manager.close()
  assert snapshot(tmp_path) == before


def test_retention_deletes_only_its_own_old_steps(tmp_path):
  ckpt_dir = tmp_path / checkpoint.CHECKPOINT_DIR
  ckpt_dir.mkdir()
  (ckpt_dir / 'README').write_text('keep me')
  (ckpt_dir / 'best').mkdir()
  write_steps(tmp_path, [1, 2, 3, 4], keep=2)
  assert sorted(os.listdir(ckpt_dir)) == ['3', '4', 'README', 'best']


def test_merge_pretrained_names_first_mismatch():
  target = make_state(0).params
  pretrained = jax.tree.map(np.asarray, make_state(5).params)
  merged = checkpoint.merge_pretrained(target, pretrained)
  np.testing.assert_array_equal(merged['resnet']['conv']['kernel'],
                                pretrained['resnet']['conv']['kernel'])
  # The supervised head keeps its fresh initialisation.
  np.testing.assert_array_equal(merged['supervised_head']['bias'],
                                target['supervised_head']['bias'])
  bad = {'resnet': {'conv': {'kernel': np.zeros((64, 65))}}}
  with pytest.raises(ValueError, match=r"'resnet/conv/kernel' has shape "
                     r'\(64, 65\) in the checkpoint but \(64, 64\)'):
    checkpoint.check_shapes(target, bad)
  with pytest.raises(ValueError, match="'resnet/conv/kernel' of the model is "
                     'missing'):
    checkpoint.merge_pretrained(target, {'resnet': {}})


def test_init_checkpoint_is_checked_both_ways(caplog):
  """A parameter the checkpoint has and the model lacks (a deeper or wider
  network) is named like a missing one; under a re-initialised subtree it
  is allowed, and the load logs that subtree."""
  target = make_state(0).params
  pretrained = jax.tree.map(np.asarray, make_state(5).params)
  deeper = {**pretrained, 'resnet': {**pretrained['resnet'],
                                     'block2': {'kernel': np.zeros((3, 3))}}}
  for check in (checkpoint.check_shapes, checkpoint.merge_pretrained):
    with pytest.raises(ValueError, match=(
        r"params path 'resnet/block2/kernel' of the checkpoint is not in the "
        r'model \(1 such path')):
      check(target, deeper)
  other_head = {**pretrained, 'supervised_head': {
      'bias': np.zeros(10, np.float32), 'kernel': np.zeros((5, 10))}}
  checkpoint.check_shapes(target, other_head)
  with caplog.at_level(logging.INFO):
    merged = checkpoint.merge_pretrained(target, other_head)
  assert ('params of supervised_head initialised afresh on purpose'
          in caplog.text)
  np.testing.assert_array_equal(merged['supervised_head']['bias'],
                                target['supervised_head']['bias'])
  # Nothing re-initialised: every path must match.
  with pytest.raises(ValueError, match="'supervised_head/kernel' of the "
                     'checkpoint is not in the model'):
    checkpoint.check_shapes(target, other_head, reinit=())


def test_export_backbone_loads_as_init_checkpoint(tmp_path):
  state = make_state(7)
  path = checkpoint.export_backbone(state, str(tmp_path / 'backbone'))
  loaded = checkpoint.load_pretrained(path)
  assert set(loaded['params']) == {'resnet'}  # Heads dropped.
  np.testing.assert_array_equal(loaded['params']['resnet']['conv']['kernel'],
                                np.asarray(state.params['resnet']['conv']
                                           ['kernel']))
  shapes = checkpoint.pretrained_shapes(path)
  assert shapes['params']['resnet']['conv']['kernel'].shape == (64, 64)
  # A workdir designates its newest step.
  write_steps(tmp_path / 'run', [3, 9])
  assert checkpoint.resolve_checkpoint_path(str(tmp_path / 'run')).endswith(
      os.path.join('checkpoints', '9', 'state'))


def test_export_backbone_replaces_only_a_previous_export(tmp_path):
  """A resumed or finished run exports again over its own export; anything
  else at the path is left exactly as it was, and the export refused."""
  path = tmp_path / 'run' / 'backbone'
  checkpoint.export_backbone(make_state(3), str(path))
  checkpoint.export_backbone(make_state(8), str(path))
  kernel = checkpoint.load_pretrained(str(path))['params']['resnet']['conv'][
      'kernel']
  np.testing.assert_array_equal(
      kernel, np.asarray(make_state(8).params['resnet']['conv']['kernel']))
  # An empty directory is written into.
  (tmp_path / 'empty').mkdir()
  checkpoint.export_backbone(make_state(3), str(tmp_path / 'empty'))

  user_dir = tmp_path / 'mine'
  (user_dir / 'd').mkdir(parents=True)
  (user_dir / 'notes.txt').write_text('not an export')
  (user_dir / 'd' / 'data').write_bytes(b'1234')
  amended = tmp_path / 'amended'  # An export someone added a file to.
  checkpoint.export_backbone(make_state(3), str(amended))
  (amended / 'README').write_text('added by hand')
  write_steps(tmp_path / 'other_run', [4])  # Orbax, but a training state.
  state_item = tmp_path / 'other_run' / 'checkpoints' / '4' / 'state'
  (tmp_path / 'a_file').write_text('a file')
  for target, match in ((user_dir, 'not written by'), (amended, 'README'),
                        (state_item, 'not written by'),
                        (tmp_path / 'a_file', 'not a directory')):
    before = snapshot(target) if target.is_dir() else target.read_bytes()
    with pytest.raises(FileExistsError, match=match):
      checkpoint.export_backbone(make_state(9), str(target))
    assert before == (snapshot(target) if target.is_dir() else
                      target.read_bytes())


# ----------------------------------------------------------------------------
# Remote paths (gs://...): listing, resolving and setting aside go through
# tf.io.gfile; TensorFlow's in-memory `ram://` filesystem stands in for GCS.
# (Orbax itself cannot write to ram://: etils.epath does not know the scheme.)
# ----------------------------------------------------------------------------
@pytest.fixture
def ram_run(tmp_path):
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
  url = f'ram://checkpoint_test/{tmp_path.name}/run'
  ckpt = f'{url}/{checkpoint.CHECKPOINT_DIR}'
  for step in (3, 9):
    gfile.makedirs(f'{ckpt}/{step}/state')
  gfile.makedirs(f'{ckpt}/12.orbax-checkpoint-tmp-1700000000')
  with gfile.GFile(f'{ckpt}/README', 'w') as f:
    f.write('not a step')
  with gfile.GFile(f'{ckpt}/3/{checkpoint.COMMIT_FILE}', 'w') as f:
    f.write('')
  yield url, gfile
  try:
    gfile.rmtree(url)
  except Exception:  # pylint: disable=broad-except
    pass  # ram:// renames a directory's entry but not its children's.


def test_remote_listing_and_resolve(ram_run, monkeypatch):
  url, _ = ram_run
  assert checkpoint.checkpoint_steps(url) == (3, 9)
  assert checkpoint.latest_step(url) == 9
  assert checkpoint.checkpoint_steps(url + '/nothing_here') == ()
  assert checkpoint.resolve_checkpoint_path(url + '/') == (
      f'{url}/checkpoints/9/state')
  assert checkpoint.resolve_checkpoint_path(f'{url}/checkpoints/3') == (
      f'{url}/checkpoints/3/state')
  with pytest.raises(FileNotFoundError, match='ram://'):
    checkpoint.resolve_checkpoint_path(url + '/missing')
  assert not os.path.exists('ram:')  # No local directory named after the URL.
  # Where Orbax commits steps with a marker file (gs://), a step without it
  # is half-written.
  monkeypatch.setattr(checkpoint, 'COMMIT_FILE_PREFIXES', ('ram://',))
  assert checkpoint.checkpoint_steps(url) == (3,)
  assert checkpoint.resolve_checkpoint_path(url) == (
      f'{url}/checkpoints/3/state')


def test_remote_set_aside_renames_never_deletes(ram_run):
  url, gfile = ram_run

  class FakeManager:
    directory = f'{url}/{checkpoint.CHECKPOINT_DIR}'
    reload = lambda self: None  # pylint: disable=unnecessary-lambda-assignment

  gfile.makedirs(f'{url}/checkpoints/9.corrupt')
  checkpoint._set_aside(FakeManager(), 9)  # pylint: disable=protected-access
  assert sorted(gfile.listdir(f'{url}/checkpoints')) == [
      '12.orbax-checkpoint-tmp-1700000000', '3', '9.corrupt', '9.corrupt.1',
      'README']
  assert checkpoint.checkpoint_steps(url) == (3,)
  assert files.abspath('gs://bucket/run/') == 'gs://bucket/run'
