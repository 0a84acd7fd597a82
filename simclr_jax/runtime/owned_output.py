"""Directories the project writes whole (an exported backbone, a converted
checkpoint): written over only when the project wrote them.

A writer leaves a marker file in the directory naming itself and listing
everything it wrote. A later write may replace the directory only when the
marker is its own and the directory holds nothing else; a directory with a
user's files in it (`--out=.`, a training workdir, a typo) is refused, never
deleted.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

from simclr_jax.runtime import files

MARKER_FILE = 'simclr_jax_output.json'


def refusal(path: str, writer: str) -> Optional[str]:
  """Why `writer` must not write `path`; None when it may.

  It may write where nothing is, into an empty directory, and over its own
  earlier output that nothing was added to.
  """
  if not files.exists(path):
    return None
  if not files.isdir(path):
    return f'{path} exists and is not a directory'
  if not files.listdir(path):
    return None
  marker = os.path.join(path, MARKER_FILE)
  try:
    with files.gfile().GFile(marker) if files.is_remote(path) else open(
        marker) as f:
      record = json.load(f)
    written, owner = set(record['written']), record['written_by']
  except (OSError, ValueError, KeyError, TypeError):
    return f'{path} has no {MARKER_FILE}: it was not written by {writer}'
  if owner != writer:
    return f'{path} was written by {owner}, not {writer}'
  extra = sorted(set(files.entries_under(path)) - written - {MARKER_FILE})
  if extra:
    return f'{path} holds {extra[0]!r}, which {writer} did not write'
  return None


def write_marker(path: str, writer: str,
                 record: Optional[Mapping[str, Any]] = None) -> None:
  """Records `writer` and everything now under `path` in its marker file."""
  entries = [e for e in files.entries_under(path) if e != MARKER_FILE]
  marker = os.path.join(path, MARKER_FILE)
  text = json.dumps({'written_by': writer, **(record or {}),
                     'written': entries}, indent=1)
  if files.is_remote(path):
    with files.gfile().GFile(marker, 'w') as f:
      f.write(text)
  else:
    with open(marker, 'w') as f:
      f.write(text)


class OutputRefused(ValueError):
  """The output path may not be written (the message says why)."""


def check_local_output(path: str, writer: str, *, overwrite: bool) -> str:
  """`path` made absolute, or OutputRefused: it must be absent or empty, or
  with `overwrite` hold `writer`'s earlier output and nothing else."""
  if files.is_remote(path):
    raise OutputRefused(f'{path}: expected a local directory.')
  path = os.path.abspath(path)
  if not os.path.lexists(path):
    return path
  if os.path.islink(path) or not os.path.isdir(path):
    raise OutputRefused(f'{path} exists and is not a directory.')
  if not os.listdir(path):
    return path
  if not overwrite:
    raise OutputRefused(f'{path} is not empty; --overwrite replaces an '
                        f'earlier output of {writer} there, nothing else.')
  problem = refusal(path, writer)
  if problem:
    raise OutputRefused(f'{path} is not an earlier output of {writer} '
                        f'({problem}); not replacing it, even with '
                        '--overwrite.')
  return path


def write_local_output(path: str, write: Callable[[str], None], *,
                       writer: str, overwrite: bool = False,
                       record: Optional[Mapping[str, Any]] = None) -> str:
  """Writes a directory whole at `path` (absolute path returned).

  `write(directory)` fills a hidden directory beside `path`; the marker file
  (with `record`) is added and the directory renamed to `path`. An earlier
  output there (allowed by `check_local_output`) is replaced only then. On
  any failure the hidden directory is removed and `path` is left as it was,
  so an interrupted write never leaves a `path` that looks finished.
  """
  path = check_local_output(path, writer, overwrite=overwrite)
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-',
                               dir=parent)
  except OSError as e:
    raise OutputRefused(f'{path} cannot be written ({e}).') from None
  try:
    written = os.path.join(staging, 'output')
    write(written)
    write_marker(written, writer, record)
    check_local_output(path, writer, overwrite=overwrite)  # Again: time passed.
    previous = os.path.join(staging, 'previous')
    # An empty directory is replaced by the rename itself.
    replacing = os.path.isdir(path) and bool(os.listdir(path))
    if replacing:
      os.rename(path, previous)
    try:
      os.rename(written, path)
    except OSError:
      if replacing:
        try:
          os.rename(previous, path)
        except OSError:
          staging = None  # It holds the earlier output now: keep it.
      raise
  finally:
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
  return path
