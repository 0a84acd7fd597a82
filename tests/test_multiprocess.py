"""Two real JAX processes on localhost train together (multi-host).

Each process has 2 fake CPU devices (4 in the global mesh), joins the job
with `jax.distributed.initialize`, and runs `train.train_and_evaluate` for 3
steps on the offline MNIST set at 8 px, each reading its own shard, in one
shared workdir (as hosts of a pod share a bucket). Then:
- both processes end with bit-identical parameters and BN statistics (the
  batch is global, gradients and statistics are all-reduced);
- only process 0 wrote TensorBoard event files;
- the checkpoint written by both processes together is there once.

Run as a script (`python tests/test_multiprocess.py worker ...`) this file is
the worker.
"""
import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
TIMEOUT_S = 600


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def worker(process_id, port, workdir, out):
  """One process of the job; writes its final variables to `out` (.npz)."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                             num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  import runpy  # pylint: disable=g-import-not-at-top
  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 4
  config = runpy.run_path(os.path.join(ROOT, 'configs', 'demo.py'))[
      'get_config']()
  with config.unlocked():
    config.image_size = 8
    config.width_multiplier = 0.25
    config.train_batch_size = 8  # 2 images per device, 4 per process.
    config.train_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.proj_out_dim = 16
    config.num_proj_layers = 1
    config.lineareval_while_pretraining = False
    config.num_profile_steps = 0
    del config.evals['probe']  # The demo's end-of-run probe: not needed here.
  state = train.train_and_evaluate(config, workdir).state
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  flat = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  flat['step'] = np.asarray(state.step.addressable_data(0))
  np.savez(out, **flat)
  jax.distributed.shutdown()


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  workdir = str(tmp / 'workdir')
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  procs, logs, outs = [], [], []
  for i in range(2):
    outs.append(str(tmp / f'vars{i}.npz'))
    logs.append(open(tmp / f'log{i}.txt', 'w+'))
    procs.append(subprocess.Popen(
        [sys.executable, __file__, 'worker', str(i), str(port), workdir,
         outs[i]], env=env, cwd=ROOT, stdout=logs[i],
        stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  assert codes == [0, 0], '\n\n'.join(t[-3000:] for t in texts)
  return workdir, [dict(np.load(o)) for o in outs]


def test_both_processes_end_with_identical_variables(two_process_run):
  _, (first, second) = two_process_run
  assert int(first['step']) == 3
  assert first.keys() == second.keys() and len(first) > 10
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_only_process_0_writes_event_files(two_process_run):
  workdir, _ = two_process_run
  events = glob.glob(os.path.join(workdir, '**', 'events.out.tfevents.*'),
                     recursive=True)
  assert len(events) == 1, events


def test_checkpoint_written_once(two_process_run):
  workdir, _ = two_process_run
  steps = [d for d in os.listdir(workdir) if d.isdigit()]
  found = glob.glob(os.path.join(workdir, '**', '3'), recursive=True)
  assert steps == ['3'] or found, os.listdir(workdir)


if __name__ == '__main__' and sys.argv[1:2] == ['worker']:
  worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
