"""A pretraining run on the offline dataset logs kNN and few-shot curves.

Runs `train.train_and_evaluate` (tiny: ResNet-18 at 8 px, batch 8, 2 steps,
evaluators every step on 80 train / 40 test images; no implicit host
transfer) and reads its TensorBoard log back: `knn/top1`, `fewshot/{1,5}shot_top1`
and the linear head's `eval/top1` each form a curve (one point per
evaluation), and the last kNN point equals the kNN evaluator run again on the
state the run returned.
"""
import jax
import pytest

from simclr_jax import evaluators
from simclr_jax import models
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.data import pipeline


def _tiny_config(tiny_config):
  config = tiny_config(train_batch_size=8, eval_batch_size=40, train_steps=2,
                       log_every_steps=1, eval_every_steps=1,
                       checkpoint_every_steps=100, eval_split='test[:40]')
  with config.unlocked():
    config.evals.knn = dict(every_steps=1, k=20, bank_split='train[:80]')
    config.evals.fewshot = dict(every_steps=1, shots=(1, 5),
                                train_split='train[:80]')
  return config


def test_pretraining_logs_knn_and_fewshot_curves(tmp_path, tiny_config,
                                                 read_events):
  config = _tiny_config(tiny_config)
  data = pipeline.create_data(config)
  with jax.transfer_guard('disallow'):
    state = train.train_and_evaluate(config, str(tmp_path), data=data).state

  scalars = read_events(str(tmp_path))
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
  mesh = sharding.create_mesh()
  model = models.create_model(config, data.num_classes)
  knn_only = config.copy_and_resolve_references()
  with knn_only.unlocked():
    del knn_only.evals['fewshot']
  (knn,) = evaluators.create_evaluators(
      knn_only, evaluators.make_predict_fn(model, mesh), mesh=mesh,
      num_classes=data.num_classes, data_fn=data.eval_batches)
  again = dict(knn.run(state))
  assert again['knn/top1'] == pytest.approx(scalars['knn/top1'][2], abs=1e-6)
