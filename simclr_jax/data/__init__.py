"""Input pipeline: tfds datasets, SimCLR augmentations, per-host sharding.

Importing this package
  * hides every GPU/TPU from TensorFlow, so that tf.data never allocates
    accelerator memory that JAX needs (TF only ever runs on the host CPU here);
  * registers the offline tfds dataset `mnist_offline` (see mnist_offline.py).
"""
import tensorflow as tf


def _hide_accelerators_from_tf():
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      # RuntimeError: TF already initialised its devices (e.g. it was used
      # before this import); ValueError: this TF build has no such device type.
      pass


_hide_accelerators_from_tf()

# Registers `mnist_offline` with tfds (subclassing GeneratorBasedBuilder does).
from simclr_jax.data import mnist_offline  # pylint: disable=g-import-not-at-top,wrong-import-position
