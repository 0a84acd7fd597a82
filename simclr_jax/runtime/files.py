"""Paths that are local or URLs: os for local paths, tf.io.gfile for URLs.

A workdir may be a URL (gs://bucket/run; `ram://` in tests). os calls on
one would make a local `gs:/bucket/...` directory, so every path operation
on a workdir goes through these helpers. tf.io.gfile is what etils.epath
(Orbax's file layer) uses for gs:// when TensorFlow is installed; it is
imported only for URLs, as TensorFlow takes seconds to import.
"""
import os
import shutil
from typing import List
import uuid


def is_remote(path) -> bool:
  """A URL (gs://bucket/run; ram:// in tests) rather than a local path."""
  return '://' in str(path)


def gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def abspath(path: str) -> str:
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def isdir(path: str) -> bool:
  return gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def exists(path: str) -> bool:
  return gfile().exists(path) if is_remote(path) else os.path.exists(path)


def listdir(path: str) -> List[str]:
  if is_remote(path):
    # GCS lists subdirectories as 'name/'.
    return [name.rstrip('/') for name in gfile().listdir(path)]
  return os.listdir(path)


def rename(src: str, dst: str) -> None:
  if is_remote(src):
    gfile().rename(src, dst)
  else:
    os.rename(src, dst)


def remove_tree(path: str) -> None:
  if is_remote(path):
    gfile().rmtree(path)
  else:
    shutil.rmtree(path)


def entries_under(directory: str) -> List[str]:
  """Relative paths of everything under `directory`, sorted (links not
  followed)."""
  walk = gfile().walk if is_remote(directory) else os.walk
  entries = []
  for root, dirs, names in walk(directory):
    entries += [os.path.relpath(os.path.join(root, n.rstrip('/')), directory)
                for n in list(dirs) + list(names)]
  return sorted(entries)


def read_text(path: str) -> str:
  """The file's text; FileNotFoundError when it does not exist."""
  if is_remote(path):
    if not gfile().exists(path):
      raise FileNotFoundError(path)
    with gfile().GFile(path) as f:
      return f.read()
  with open(path) as f:
    return f.read()


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a file of our own beside `path`, then renames it over
  `path`: a reader never sees half a file, and a failed write leaves no
  temporary file behind."""
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  if is_remote(path):
    try:
      with gfile().GFile(tmp, 'w') as f:
        f.write(text)
      gfile().rename(tmp, path, overwrite=True)
    finally:
      if gfile().exists(tmp):
        gfile().remove(tmp)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def free_bytes(path: str):
  """Free bytes on the filesystem holding `path` (or its nearest existing
  parent); None for a URL or when unknown."""
  if is_remote(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def missing_dirs(path: str) -> List[str]:
  """`path` and its ancestors that do not exist yet, deepest first (what a
  makedirs of `path` would create); [] for a URL."""
  if is_remote(path):
    return []
  missing, path = [], os.path.abspath(path)
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def remove_empty_dirs(dirs: List[str]) -> None:
  """Removes each of `dirs` (deepest first) that is an empty directory.

  For a run refused before training: it removes only what it created
  (`missing_dirs` before it started) and only if nothing is in it, so a
  file someone put there meanwhile keeps it.
  """
  for path in dirs:
    try:
      os.rmdir(path)  # Fails on a non-empty directory: that one stays.
    except OSError:
      pass
