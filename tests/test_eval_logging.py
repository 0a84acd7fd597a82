"""A pretraining run on the offline dataset logs kNN and few-shot curves.

Runs `train.train_and_evaluate` (tiny: ResNet-18 at 8 px, batch 8, 2 steps,
evaluators every step on 80 train / 40 test images) and reads its TensorBoard
log back with TensorBoard's event reader: `knn/top1`, `fewshot/{1,5}shot_top1`
and the linear head's `eval/top1` each form a curve (one point per
evaluation), and the last kNN point equals the kNN evaluator run again on the
state the run returned.
"""
import importlib.util
import pathlib

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config():
  spec = importlib.util.spec_from_file_location(
      'demo_config', REPO / 'configs' / 'demo.py')
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  with config.unlocked():
    config.image_size = 8
    config.train_batch_size = 8
    config.eval_batch_size = 40
    config.train_steps = 2
    config.warmup_epochs = 0.0
    config.log_every_steps = 1
    config.eval_every_steps = 1
    config.checkpoint_every_steps = 100
    config.probe_train_examples = 0
    config.eval_split = 'test[:40]'
    config.evals.knn = dict(every_steps=1, k=20, bank_split='train[:80]')
    config.evals.fewshot = dict(every_steps=1, shots=(1, 5),
                                train_split='train[:80]')
  return config


def read_scalars(logdir):
  """{tag: {step: value}} of the scalar summaries in logdir's event files."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()['tensors']:
    events = accumulator.Tensors(tag)
    values = {e.step: np.asarray(
        tensor_util.make_ndarray(e.tensor_proto))
              for e in events}
    if all(v.ndim == 0 and v.dtype.kind == 'f' for v in values.values()):
      scalars[tag] = {step: float(v) for step, v in values.items()}
  return scalars


def test_pretraining_logs_knn_and_fewshot_curves(tmp_path):
  from simclr_jax import evaluators
  from simclr_jax import models
  from simclr_jax import sharding
  from simclr_jax import train
  from simclr_jax.data import pipeline

  config = _tiny_config()
  state = train.train_and_evaluate(config, str(tmp_path))

  scalars = read_scalars(tmp_path)
  for tag in ('knn/top1', 'fewshot/1shot_top1', 'fewshot/5shot_top1',
              'eval/top1', 'contrastive_loss'):
    assert tag in scalars, sorted(scalars)
  for tag in ('knn/top1', 'fewshot/1shot_top1', 'fewshot/5shot_top1',
              'eval/top1'):
    curve = scalars[tag]
    assert sorted(curve) == [1, 2], (tag, curve)  # Every step, and at the end.
    assert all(0.0 <= v <= 1.0 for v in curve.values()), (tag, curve)
  assert sorted(scalars['contrastive_loss']) == [1, 2]

  # The logged value is the evaluator's: rerun kNN on the final state.
  num_classes = pipeline.num_classes(config)
  mesh = sharding.create_mesh()
  model = models.create_model(config, num_classes)
  (knn,) = evaluators.create_evaluators(
      {'evals': {'knn': config.evals.knn}, 'train_split': config.train_split,
       'eval_split': config.eval_split},
      train.make_feature_fn(model, mesh), mesh=mesh, num_classes=num_classes,
      data_fn=evaluators._pipeline_data_fn(config))  # pylint: disable=protected-access
  again = dict(knn.run(state))
  assert again['knn/top1'] == pytest.approx(scalars['knn/top1'][2], abs=1e-6)
