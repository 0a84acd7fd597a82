"""Test session setup and the fixtures the tests share.

Setup: 8 fake CPU devices, and TensorFlow kept off accelerators. XLA_FLAGS
must be set before jax is first imported, so it is done at import time of
this conftest, which pytest loads before any test module.

Fixtures:
  mnist_dir           a tfds data_dir holding the offline `mnist_offline`
                      dataset (real digits), built once per session;
  tiny_config         factory: the base config shrunk to seconds of work
                      (ResNet-18 at 8 px on mnist_offline), plus overrides
                      (`small_config`, importable, is the same without the
                      dataset);
  tiny_overrides      the same shrinkage as `--config.KEY=VALUE` flags, for
                      runs of `python -m simclr_jax.main` in a subprocess;
  read_events         {tag: {step: value}} of a workdir's TensorBoard scalars;
  no_implicit_transfers  `jax.transfer_guard('disallow')` around a test, so
                      an implicit host<->device transfer fails loudly.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]

# ResNet-18 (CIFAR stem) at 8 px on the offline digits: a step is a second.
TINY = dict(
    dataset="mnist_offline", train_split="train", eval_split="test[:160]",
    image_size=8, train_batch_size=16, eval_batch_size=80, train_epochs=0,
    train_steps=4, warmup_epochs=0.0, learning_rate=1.0, temperature=0.5,
    color_jitter_strength=0.5, use_blur=False, resnet_depth=18,
    num_proj_layers=2, proj_out_dim=32, cache_dataset=True,
    checkpoint_every_steps=2, log_every_steps=2, num_profile_steps=0)


def small_config(mode="pretrain", **overrides):
  """The base config shrunk by TINY (data_dir ''), `mode`, then overrides.

  Modes other than pretrain train a classifier with momentum SGD. Locked.
  """
  from simclr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.update(TINY, train_mode=mode)
  if mode != "pretrain":
    config.update(optimizer="momentum", learning_rate=0.1,
                  lineareval_while_pretraining=False)
  config.update(overrides)
  return config_lib.lock(config)


def config_file(name: str) -> str:
  """Path of configs/<name>.py."""
  return str(REPO / "configs" / f"{name}.py")


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top,unused-import
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds.builder("mnist_offline", data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope="session")
def tiny_config(request):
  """factory(mode='pretrain', **overrides) -> small_config on mnist_dir.

  The data_dir is the session's mnist_dir unless an override names another
  dataset or data_dir.
  """
  def make(mode="pretrain", **overrides):
    if overrides.get("dataset", "mnist_offline") == "mnist_offline":
      overrides.setdefault("data_dir", request.getfixturevalue("mnist_dir"))
    return small_config(mode, **overrides)
  return make


@pytest.fixture(scope="session")
def tiny_overrides():
  """factory(**overrides) -> ['--config.KEY=VALUE', ...] of TINY + overrides."""
  def make(**overrides):
    return [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
  return make


@pytest.fixture(scope="session")
def read_events():
  def read(workdir):
    """{tag: {step: float or None}} from a run's TensorBoard event files."""
    import glob  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tags = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          number = None
          if value.HasField("tensor") and not value.tensor.string_val:
            array = tf.make_ndarray(value.tensor)
            if array.size == 1:
              number = float(array.reshape(-1)[0])
          tags.setdefault(value.tag, {})[event.step] = number
    return tags
  return read


@pytest.fixture
def no_implicit_transfers():
  import jax  # pylint: disable=g-import-not-at-top
  with jax.transfer_guard("disallow"):
    yield
