"""Orbax's per-save INFO lines (a dozen per checkpoint: directories created,
throughput, thread hand-offs) moved below the default verbosity.

They are shown again with `--verbosity=1`. Orbax's warnings and errors are
always shown, but without their tracebacks (also shown with
`--verbosity=1`): a failed save is reported by the run in one line
(runtime/save_watch.py), and Orbax logs the same exception from two threads.
Orbax logs through absl, so the filter sits on absl's logger and recognises
Orbax's records by the file that logged them.
"""
import logging as std_logging
import os

from absl import logging

_ORBAX_DIR = os.sep + 'orbax' + os.sep


class OrbaxInfoFilter(std_logging.Filter):
  """Below absl verbosity 1: drops Orbax's records below WARNING and the
  tracebacks of the others."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (_ORBAX_DIR not in (record.pathname or '')
        or logging.get_verbosity() >= 1):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    record.exc_info, record.exc_text = None, None
    return True


_FILTER = OrbaxInfoFilter()


def hide_orbax_info() -> None:
  """Installs the filter on absl's logger (idempotent)."""
  logger = logging.get_absl_logger()
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)
