"""Evaluators run during and after training, one module each, found by name
from `config.evals` (common.create_evaluators): kNN monitor, few-shot ridge
probe, the supervised head's top-1/top-5, the linear probe."""
from simclr_jax.evaluators.common import create_evaluators
from simclr_jax.evaluators.common import make_predict_fn
from simclr_jax.evaluators.common import run_evaluators

__all__ = ['create_evaluators', 'make_predict_fn', 'run_evaluators']
