"""train.py with SimCLRv2's memory buffer (memory.py) and distillation
(distill.py): each step's loss against numpy, the queue and momentum network
after each step, the sharded step against one device, exact resume.

The formulas themselves are tested in test_losses_v2.py; these tests pin
their wiring into the train step. Tiny runs as test_train.py: ResNet-18 at
8 px, global batch 16, under `jax.transfer_guard('disallow')`.
"""
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from simclr_jax import distill
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.data import pipeline
from simclr_jax.runtime import checkpoint

from test_losses_v2 import np_l2n
from test_losses_v2 import np_nt_xent_memory

NUM_CLASSES = 10
NUM_TRAIN = 4000


def fresh_state(config, model):
  """(host TrainState, learning-rate schedule). Initialised op by op: the
  jitted initialisation compiles for ~10 CPU-s, the ops are cached."""
  lr_fn = optim.create_learning_rate_schedule(config, NUM_TRAIN)
  tx = optim.create_optimizer(config, lr_fn)
  state = train.create_train_state(config, model, tx, jax.random.PRNGKey(0))
  return jax.device_get(state), lr_fn


def leaves_equal(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                           jax.tree.leaves(b))))


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance),
               jax.device_get(a), jax.device_get(b))


# ----------------------------------------------------------------------------
# Memory buffer.
# ----------------------------------------------------------------------------
def test_memory_step_loss_queue_and_momentum_network_match_numpy(tiny_config):
  """Three steps with K = 40 and 32 keys a step (the ring wraps at step 2):
  the loss is NT-Xent with the queue of before the step, the queue holds the
  momentum network's keys in push order, the momentum network is the EMA."""
  size, momentum = 40, 0.9  # 0.9: the average moves visibly in 3 steps.
  config = tiny_config('pretrain', memory_buffer_size=size,
                       memory_momentum=momentum,
                       lineareval_while_pretraining=False)
  model = models.create_model(config, NUM_CLASSES)
  state, lr_fn = fresh_state(config, model)
  mesh = sharding.create_mesh(jax.devices()[:1])
  step = train.make_train_step(model, config, lr_fn, mesh)
  forward = jax.jit(lambda variables, x: model.apply(
      variables, x, train=True, mutable=['batch_stats'])[0]['projection'])
  rng = np.random.default_rng(0)
  state = sharding.replicate(state, mesh)
  queue, pointer, pushed = np.zeros((size, 32)), 0, 0
  for t in range(3):
    batch = {'image': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
             'label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32)}
    before = jax.device_get(state)  # The step donates `state`.
    views = jax.device_put(batch['image'].reshape(32, 8, 8, 3))
    z = np.asarray(jax.device_get(forward(
        {'params': before.params, 'batch_stats': before.batch_stats}, views)))
    keys = np_l2n(np.asarray(jax.device_get(forward(
        {'params': before.memory['params'],
         'batch_stats': before.memory['batch_stats']}, views)), np.float64))
    valid = np.arange(size) < min(pushed, size)
    expected_loss = np_nt_xent_memory(z[0::2], z[1::2], queue, config.temperature,
                                      True, mask=valid)
    with jax.transfer_guard('disallow'):
      state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
    after = jax.device_get(state)
    np.testing.assert_allclose(metrics['contrastive_loss'], expected_loss,
                               rtol=1e-5)
    for key in keys:  # MoCo's queue, one key at a time.
      queue[pointer] = key
      pointer = (pointer + 1) % size
    pushed += len(keys)
    np.testing.assert_allclose(after.memory['queue'], queue, atol=1e-5)
    assert int(after.memory['pointer']) == pointer == 32 * (t + 1) % size
    assert int(after.memory['count']) == min(pushed, size)
    for what in ('params', 'batch_stats'):
      expected = jax.tree.map(
          lambda old, new: momentum * np.float64(old) + (1 - momentum) * new,
          before.memory[what], getattr(after, what))
      assert_trees_close(after.memory[what], expected, rtol=1e-5, atol=1e-7)
  # The online network trained; the momentum network lags behind it.
  assert not leaves_equal(after.params, after.memory['params'])


# ----------------------------------------------------------------------------
# Distillation.
# ----------------------------------------------------------------------------
# A teacher unlike the student in depth, width and selective kernels, with a
# 2-layer projection head whose first layer feeds its classifier (SimCLRv2's
# fine-tuning from layer 1).
BIG_TEACHER = dict(resnet_depth=34, width_multiplier=2, sk_ratio=0.0625,
                   proj_head_mode='nonlinear', num_proj_layers=2,
                   proj_out_dim=32, ft_proj_selector=1)
SAME_TEACHER = dict(BIG_TEACHER, resnet_depth=18, width_multiplier=1,
                    sk_ratio=0.0)


def distill_config(tiny_config, teacher, **overrides):
  # The student is the paper's: the ResNet and a classifier on h.
  overrides = dict(dict(teacher_checkpoint='/unused', distill_temperature=0.5),
                   **overrides)
  return tiny_config('distill', teacher=teacher, proj_head_mode='none',
                     ft_proj_selector=0, **overrides)


def teacher_variables(config, seed=1):
  """A teacher with informative logits: random weights, a classifier of
  scale 1 (not the fine-tuning init's 0.01) and non-trivial statistics."""
  teacher_model = models.create_teacher_model(config, NUM_CLASSES)
  size = config.image_size
  variables = jax.device_get(teacher_model.init(
      jax.random.PRNGKey(seed), jax.numpy.zeros((2, size, size, 3)),
      train=False))
  rng = np.random.default_rng(seed)
  head = variables['params']['supervised_head']
  head['kernel'] = rng.normal(size=head['kernel'].shape).astype(np.float32)
  variables['batch_stats'] = jax.tree.map(
      lambda x: (x + rng.uniform(0.0, 0.5, x.shape)).astype(np.float32),
      variables['batch_stats'])
  return teacher_model, {'params': variables['params'],
                         'batch_stats': variables['batch_stats']}


def test_distill_step_on_8_devices_equals_1_device_and_numpy(tiny_config):
  """Eq. (3) with α = 0.5: the step's loss is the numpy formula of the
  student's and the frozen teacher's logits; 8 devices give 1 device's
  loss, update and statistics."""
  alpha, tau = 0.5, 0.5
  config = distill_config(tiny_config, BIG_TEACHER, distill_alpha=alpha,
                          distill_labeled_split='train[:40]')
  model = models.create_model(config, NUM_CLASSES)
  teacher_model, teacher = teacher_variables(config)
  host_state, lr_fn = fresh_state(config, model)
  host_state = host_state.replace(teacher=teacher)
  rng = np.random.default_rng(0)
  batches = [{
      'image': rng.uniform(size=(16, 8, 8, 3)).astype(np.float32),
      'label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32),
      'labeled_image': rng.uniform(size=(16, 8, 8, 3)).astype(np.float32),
      'labeled_label': rng.integers(0, NUM_CLASSES, 16).astype(np.int32)}
             for _ in range(1)]

  def run(devices):
    mesh = sharding.create_mesh(devices)
    step = train.make_train_step(model, config, lr_fn, mesh, teacher_model)
    state, all_metrics = sharding.replicate(host_state, mesh), []
    with jax.transfer_guard('disallow'):
      for batch in batches:
        state, metrics = step(state, sharding.host_batch_to_global(batch, mesh))
        all_metrics.append(jax.device_get(metrics))
    return jax.device_get(state), all_metrics

  state8, metrics8 = run(jax.devices())
  state1, metrics1 = run(jax.devices()[:1])
  for m8, m1 in zip(metrics8, metrics1):
    for key in ('loss', 'distill_loss', 'teacher_agreement',
                'supervised_loss', 'grad_norm'):
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  assert_trees_close(state8.params, state1.params, rtol=1e-4, atol=1e-6)
  assert_trees_close(state8.batch_stats, state1.batch_stats, rtol=1e-4,
                     atol=1e-6)

  # Step 1 by hand: the student in training mode on the unlabeled and the
  # labeled images together, the teacher in inference mode.
  batch = batches[0]
  both = np.concatenate([batch['image'], batch['labeled_image']])
  student = np.float64(jax.device_get(jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats'])[0]['logits'])(
          {'params': host_state.params, 'batch_stats': host_state.batch_stats},
          jax.device_put(both))))
  teacher_logits = np.float64(jax.device_get(jax.jit(
      lambda v, x: teacher_model.apply(v, x, train=False)['logits'])(
          teacher, jax.device_put(batch['image']))))

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  p_teacher = np.exp(log_softmax(teacher_logits / tau))
  distill = -np.mean(np.sum(p_teacher * log_softmax(student[:16] / tau), -1))
  labeled = -np.mean(log_softmax(student[16:])[np.arange(16),
                                               batch['labeled_label']])
  head_l2 = config.weight_decay * 0.5 * np.sum(
      np.float64(host_state.params['supervised_head']['kernel']) ** 2)
  np.testing.assert_allclose(metrics1[0]['distill_loss'], distill, rtol=1e-5)
  np.testing.assert_allclose(metrics1[0]['supervised_loss'], labeled,
                             rtol=1e-5)
  np.testing.assert_allclose(
      metrics1[0]['loss'], (1 - alpha) * labeled + alpha * distill + head_l2,
      rtol=1e-5)
  # The teacher is frozen, its statistics untouched; the student's moved.
  assert leaves_equal(state1.teacher, teacher)
  assert not leaves_equal(state1.batch_stats, host_state.batch_stats)


def test_labeled_batches_come_with_each_distill_batch(tiny_config):
  config = distill_config(tiny_config, SAME_TEACHER, distill_alpha=0.5,
                          distill_labeled_split='train[:40]')
  data = pipeline.create_data(config)
  stream = data.train_batches(0)
  batches = [next(stream) for _ in range(4)]
  assert batches[0]['labeled_image'].shape == (16, 8, 8, 3)
  # A function of the step: resuming at step 3 gives the 4th batch again.
  resumed = next(data.train_batches(3))
  for key in ('image', 'labeled_image', 'labeled_label'):
    np.testing.assert_array_equal(resumed[key], batches[3][key])
  # 40 labeled images: over 4 batches of 16 every one shows up.
  labels = pipeline.create_eval_iterator(
      distill_config(tiny_config, SAME_TEACHER, eval_split='train[:40]'))
  assert sorted(np.concatenate([b['labeled_label'] for b in batches])[:40]
                ) == sorted(np.concatenate([b['label'][b['mask']]
                                            for b in labels]))


def save_teacher(path, teacher):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, teacher)
    checkpointer.wait_until_finished()


def sigterm_at_batch(data, index):
  def train_batches(start_step):
    for i, batch in enumerate(data.train_batches(start_step),
                              start=start_step):
      if i == index:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  return data._replace(train_batches=train_batches)


def test_distill_resumes_from_its_checkpoint_bitwise_exact(tiny_config,
                                                          tmp_path):
  """What a restart does, step by step: the student's state from its
  checkpoint, the teacher read again from teacher_checkpoint, the data
  (unlabeled and labeled) from the step on: 2 + 2 steps equal 4 straight.
  (train_and_evaluate's own restart after SIGTERM: the slow test below.)"""
  teacher_dir = str(tmp_path / 'teacher')
  config = distill_config(tiny_config, SAME_TEACHER,
                          teacher_checkpoint=teacher_dir, distill_alpha=0.5,
                          distill_labeled_split='train[:40]')
  model = models.create_model(config, NUM_CLASSES)
  teacher_model, teacher = teacher_variables(config)
  save_teacher(teacher_dir, teacher)
  host_state, lr_fn = fresh_state(config, model)
  mesh = sharding.create_mesh(jax.devices()[:1])
  step = train.make_train_step(model, config, lr_fn, mesh, teacher_model)
  data = pipeline.create_data(config)

  def start(state):
    return state.replace(teacher=distill.load_teacher(config, teacher_model,
                                                      mesh))

  def run(state, start_step, steps):
    batches = data.train_batches(start_step)
    with jax.transfer_guard('disallow'):
      for _ in range(steps):
        state, _ = step(state, sharding.host_batch_to_global(next(batches),
                                                             mesh))
    return state

  straight = jax.device_get(run(start(sharding.replicate(host_state, mesh)),
                                0, 4))
  manager = checkpoint.create_manager(str(tmp_path / 'run'), keep=2)
  checkpoint.save(manager, run(start(sharding.replicate(host_state, mesh)),
                               0, 2))
  manager.wait_until_finished()
  restored, start_step = checkpoint.restore_latest(
      manager, sharding.replicate(host_state, mesh))
  assert start_step == 2 and restored.teacher == {}  # Not in the checkpoint.
  resumed = jax.device_get(run(start(restored), 2, 2))
  for field in ('params', 'batch_stats', 'opt_state', 'rng', 'step'):
    assert leaves_equal(getattr(resumed, field), getattr(straight, field)), (
        field)
  assert leaves_equal(resumed.teacher, teacher)
  saved = ocp.PyTreeCheckpointer().metadata(os.path.join(
      str(tmp_path / 'run'), 'checkpoints', '2', 'state')).item_metadata
  assert set(saved.tree) == set(checkpoint.STATE_KEYS)
  manager.close()


@pytest.mark.slow  # Three tiny runs: ~2 CPU-minutes.
def test_distill_run_sigterm_and_resume_is_bitwise_exact(tiny_config,
                                                         tmp_path):
  teacher_dir = str(tmp_path / 'teacher')
  config = distill_config(tiny_config, SAME_TEACHER,
                          teacher_checkpoint=teacher_dir,
                          checkpoint_every_steps=4, keep_checkpoints=5)
  _, teacher = teacher_variables(config)
  save_teacher(teacher_dir, teacher)
  data = pipeline.create_data(config)
  with jax.transfer_guard('disallow'):
    straight = train.train_and_evaluate(config, str(tmp_path / 'straight'),
                                        data=data)
  assert int(straight.state.step) == 4 and 'eval/top1' in straight.metrics
  stopped_dir = str(tmp_path / 'stopped')
  stopped = train.train_and_evaluate(config, stopped_dir,
                                     data=sigterm_at_batch(data, 2))
  assert stopped.preempted and checkpoint.checkpoint_steps(stopped_dir) == (3,)
  resumed = train.train_and_evaluate(config, stopped_dir, data=data)
  assert int(resumed.state.step) == 4 and not resumed.preempted
  for field in ('params', 'batch_stats', 'opt_state', 'rng'):
    assert leaves_equal(getattr(resumed.state, field),
                        getattr(straight.state, field)), field
  assert leaves_equal(resumed.state.teacher, teacher)
  # The teacher is read from its own checkpoint, never saved with the
  # student's.
  saved = ocp.PyTreeCheckpointer().metadata(
      os.path.join(stopped_dir, 'checkpoints', '4', 'state')).item_metadata
  assert set(saved.tree) == set(checkpoint.STATE_KEYS)


# ----------------------------------------------------------------------------
# Distillation reaches its teacher.
# ----------------------------------------------------------------------------
# The classifier on h, for teacher and student alike (SimCLRv2's student).
ON_H = dict(proj_head_mode='none', ft_proj_selector=0)
FEW_LABELS = 'train[:500]'  # 1/8 of the 4,000 train digits, ~50 a class.


@pytest.mark.slow  # Runs of 200 and 300 steps at batch 64: ~20 CPU-minutes.
def test_student_distilled_from_a_frozen_teacher_reaches_its_accuracy(
    tiny_config, tmp_path):
  """SimCLRv2's finding (§3, Fig. 8) that self-distillation on unlabeled
  images does not hurt and usually helps, at the offline scale: a teacher
  trained on 500 labels, then a student of its architecture from scratch on
  all 4,000 train images without their labels (Eq. 2 at τ = 1); both scored
  on the 1,000 test digits. Adam at 2e-3 (0.008·B/256): the tiny config's
  momentum SGD at 0.1·B/256 leaves a teacher near chance in this many steps.
  Measured on one CPU device: teacher 68.8 %, student 69.1 %."""
  common = dict(ON_H, eval_split='test', eval_batch_size=200,
                train_batch_size=64, optimizer='adam', learning_rate=0.008,
                weight_decay=0.0, checkpoint_every_steps=1000,
                log_every_steps=1000)
  teacher_dir = str(tmp_path / 'teacher')
  teacher = train.train_and_evaluate(
      tiny_config('supervised', train_split=FEW_LABELS, train_steps=200,
                  **common), teacher_dir)
  student = train.train_and_evaluate(
      tiny_config('distill', teacher=dict(SAME_TEACHER, **ON_H),
                  teacher_checkpoint=teacher_dir, distill_temperature=1.0,
                  train_steps=300, **common), str(tmp_path / 'student'))
  teacher_top1 = teacher.metrics['eval/top1']
  assert teacher_top1 > 0.5  # A teacher worth distilling (measured: 68.8 %).
  assert student.metrics['eval/top1'] >= teacher_top1, (
      student.metrics['eval/top1'], teacher_top1)
