"""quiet_logs.py: Orbax's per-save INFO lines only with --verbosity=1."""
import logging as std_logging

from absl import logging
import jax.numpy as jnp
import pytest

from simclr_jax.runtime import checkpoint
from simclr_jax.runtime import quiet_logs


@pytest.fixture
def absl_logger(monkeypatch):
  """absl's logger with its filters and verbosity restored afterwards."""
  logger = logging.get_absl_logger()
  monkeypatch.setattr(logger, 'filters', list(logger.filters))
  verbosity = logging.get_verbosity()
  yield logger
  logging.set_verbosity(verbosity)


def _orbax_records(caplog, workdir):
  caplog.clear()
  with caplog.at_level(std_logging.DEBUG):
    manager = checkpoint.create_manager(str(workdir), keep=2)
    checkpoint.save(manager, _State(3))
    manager.close()
  return [r for r in caplog.records if '/orbax/' in r.pathname]


class _State:
  def __init__(self, step):
    self.step = jnp.asarray(step, jnp.int32)
    self.params = {'w': jnp.ones(4)}
    self.batch_stats, self.opt_state, self.rng = {}, (), jnp.zeros(2)


def test_orbax_info_only_with_verbosity_1(absl_logger, caplog, tmp_path):
  logging.set_verbosity(logging.INFO)
  assert _orbax_records(caplog, tmp_path / 'before')  # Today: a dozen lines.
  quiet_logs.hide_orbax_info()
  quiet_logs.hide_orbax_info()  # Idempotent.
  assert absl_logger.filters.count(quiet_logs._FILTER) == 1  # pylint: disable=protected-access
  assert _orbax_records(caplog, tmp_path / 'quiet') == []
  logging.set_verbosity(1)  # --verbosity=1
  assert _orbax_records(caplog, tmp_path / 'verbose')
  # Our own INFO lines and Orbax's errors (without traceback) stay.
  logging.set_verbosity(logging.INFO)
  record = std_logging.LogRecord('absl', std_logging.ERROR,
                                 '/x/orbax/checkpoint/a.py', 1, 'failed',
                                 (), (OSError, OSError('x'), None))
  assert quiet_logs._FILTER.filter(record) and record.exc_info is None  # pylint: disable=protected-access
  ours = std_logging.LogRecord('absl', std_logging.INFO,
                               '/x/simclr_jax/train.py', 1, 'step', (), None)
  assert quiet_logs._FILTER.filter(ours)  # pylint: disable=protected-access
