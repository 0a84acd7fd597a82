"""Paths that are local or URLs: os for local paths, tf.io.gfile for URLs.

A workdir may be a URL (gs://bucket/run; `ram://` in tests). os calls on
one would make a local `gs:/bucket/...` directory, so every path operation
on a workdir goes through these helpers. tf.io.gfile is what etils.epath
(Orbax's file layer) uses for gs:// when TensorFlow is installed; it is
imported only for URLs, as TensorFlow takes seconds to import.
"""
import os
from typing import List


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


def entries_under(directory: str) -> List[str]:
  """Relative paths of everything under `directory`, sorted (links not
  followed)."""
  walk = gfile().walk if is_remote(directory) else os.walk
  entries = []
  for root, dirs, names in walk(directory):
    entries += [os.path.relpath(os.path.join(root, n.rstrip('/')), directory)
                for n in list(dirs) + list(names)]
  return sorted(entries)
