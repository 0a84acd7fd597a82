"""Test session setup: 8 fake CPU devices, and TensorFlow kept off accelerators.

XLA_FLAGS must be set before jax is first imported, so it is done at import
time of this conftest, which pytest loads before any test module.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
