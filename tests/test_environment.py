"""The installed stack: the test session sees 8 CPU devices and TF sees no accelerator."""
import importlib.metadata
import pathlib

import jax


def test_eight_fake_cpu_devices():
  devices = jax.devices()
  assert len(devices) == 8, devices
  assert all(d.platform == "cpu" for d in devices)


def test_tensorflow_sees_no_accelerator():
  from simclr_jax.data import pipeline  # noqa: F401  (hides accelerators from TF)
  import tensorflow as tf
  assert tf.config.get_visible_devices("GPU") == []
  assert tf.config.get_visible_devices("TPU") == []


def test_installed_versions_match_requirements():
  root = pathlib.Path(__file__).resolve().parents[1]
  for line in (root / "requirements.txt").read_text().splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    name, version = line.split("==")
    assert importlib.metadata.version(name) == version, name
