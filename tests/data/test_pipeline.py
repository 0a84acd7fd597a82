"""The tfds → two-view pipeline: shapes, determinism, exact resume, host shards.

Shapes and value ranges run under `tfds.testing.mock_data` (imagenet2012 at
224 px with blur, cifar10 at 32 px). mock_data ignores split slicing, so the
determinism and sharding tests use a tiny real tfds dataset written here
whose label is the example's index: every yielded example names itself.
"""
import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment_constants
from simclr_jax.data import pipeline

from conftest import small_config

NUM_TRAIN, NUM_TEST = 42, 23  # Not divisible by 4: uneven host shards.


def make_config(**overrides):
  """small_config on CIFAR-10-sized images (mocked or indexed datasets)."""
  settings = dict(dataset='cifar10', data_dir='', train_split='train',
                  eval_split='test', image_size=32, train_batch_size=4,
                  eval_batch_size=4, color_jitter_strength=0.5,
                  use_blur=False, cache_dataset=False)
  settings.update(overrides)
  return small_config(**settings)


@pytest.fixture(scope='module')
def indexed_dir(tmp_path_factory):
  """tfds dataset 'indexed_images': label == example index, 12×12 RGB."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  rng = np.random.default_rng(0)

  def split(n):
    return tf.data.Dataset.from_tensor_slices({
        'image': rng.integers(0, 256, (n, 12, 12, 3)).astype(np.uint8),
        'label': np.arange(n)})

  tfds.dataset_builders.store_as_tfds_dataset(
      name='indexed_images', version='1.0.0',
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(12, 12, 3)),
          'label': tfds.features.ClassLabel(num_classes=NUM_TRAIN)}),
      split_datasets={'train': split(NUM_TRAIN), 'test': split(NUM_TEST)},
      data_dir=data_dir, disable_shuffling=True)
  return data_dir


def indexed_config(data_dir, **overrides):
  settings = dict(dataset='indexed_images', data_dir=data_dir, image_size=16,
                  train_batch_size=8, eval_batch_size=8)
  settings.update(overrides)
  return make_config(**settings)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def train_batches(config, n, seed=0, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  it = pipeline.create_train_iterator(config, seed=seed, **kwargs)
  return take(it, n)


def assert_views(batch, n, size):
  image, label = batch['image'], batch['label']
  assert image.shape == (n, 2, size, size, 3) and image.dtype == np.float32
  assert label.shape == (n,) and label.dtype == np.int32
  assert image.min() >= 0.0 and image.max() <= 1.0
  for views in image:  # The two views of every image differ.
    assert np.abs(views[0] - views[1]).mean() > 1e-3


# ----------------------------------------------------------------------------
# Mock tfds datasets: shapes, dtype, range, labels.
# ----------------------------------------------------------------------------
def _raw_labels(name, split):
  ds = tfds.load(name, split=split)
  return sorted(int(ex['label']) for ex in ds.as_numpy_iterator())


def test_imagenet_224_with_blur_under_mock_data():
  config = make_config(dataset='imagenet2012', eval_split='validation',
                       image_size=224, train_batch_size=2, use_blur=True,
                       color_jitter_strength=1.0)
  with tfds.testing.mock_data(num_examples=4):
    batches = train_batches(config, 2)  # One epoch.
    raw = _raw_labels('imagenet2012', 'train')
  for batch in batches:
    assert_views(batch, 2, 224)
  assert sorted(np.concatenate([b['label'] for b in batches])) == raw


def test_cifar10_32_train_and_eval_under_mock_data():
  config = make_config()
  with tfds.testing.mock_data(num_examples=8):
    batches = train_batches(config, 2)
    raw_train = _raw_labels('cifar10', 'train')
    evals = list(pipeline.create_eval_iterator(
        config, process_index=0, process_count=1))
    raw_test = tfds.load('cifar10', split='test').as_numpy_iterator()
    raw_test = list(raw_test)
  for batch in batches:
    assert_views(batch, 4, 32)
  assert sorted(np.concatenate([b['label'] for b in batches])) == raw_train
  # Eval at 32 px: no centre crop, the decoded image itself, in order.
  assert len(evals) == 2 and all(b['mask'].all() for b in evals)
  images = np.concatenate([b['image'] for b in evals])
  np.testing.assert_allclose(
      images, np.stack([ex['image'] for ex in raw_test]) / 255.0, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in evals]),
                                [ex['label'] for ex in raw_test])


def test_color_on_device_ships_crops_and_keys(indexed_dir):
  """color_augment='device': the views are crop + flip + resize only (so
  grayscale-free and unjittered: equal to the host path at strength 0 without
  grayscale) and each carries a uint32 key that is a function of the seed."""
  config = indexed_config(indexed_dir, color_augment='device', use_blur=True)
  a, b = train_batches(config, 2, seed=4), train_batches(config, 2, seed=4)
  c = train_batches(config, 1, seed=5)
  host = train_batches(indexed_config(indexed_dir, color_jitter_strength=0.0),
                       2, seed=4)
  for x, y, h in zip(a, b, host):
    assert x['augment_key'].shape == (8, 2, 2)
    assert x['augment_key'].dtype == np.uint32
    np.testing.assert_array_equal(x['augment_key'], y['augment_key'])
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], h['label'])
    assert_views(x, 8, 16)
    # The host path at strength 0 still applies grayscale (p = 0.2); where
    # it did not, its views are exactly the device path's crops.
    colour = ~np.all(np.isclose(h['image'][..., 0], h['image'][..., 1]),
                     axis=(2, 3))
    assert colour.sum() > 8
    np.testing.assert_allclose(x['image'][colour], h['image'][colour],
                               atol=1e-6)
  keys = a[0]['augment_key'].reshape(-1, 2)
  assert len({tuple(k) for k in keys}) == len(keys)  # One key per view.
  assert not np.array_equal(a[0]['augment_key'], c[0]['augment_key'])


def test_random_crop_false_views_are_the_whole_image(indexed_dir):
  """random_crop=False: each view (before colour, here on the device) is the
  whole image resized like the eval view, or its mirror image."""
  config = indexed_config(indexed_dir, color_augment='device',
                          random_crop=False, train_split='train[:8]')
  (batch,) = train_batches(config, 1)
  whole = {}
  for b in pipeline.create_eval_iterator(
      indexed_config(indexed_dir, eval_split='train[:8]'), process_index=0,
      process_count=1):
    whole.update(zip(b['label'], b['image']))
  mirrored = 0
  for views, label in zip(batch['image'], batch['label']):
    for view in views:
      if np.allclose(view, whole[label], atol=1e-5):
        continue
      np.testing.assert_allclose(view, whole[label][:, ::-1], atol=1e-5)
      mirrored += 1
  assert 0 < mirrored < 16  # The flip still applies (p = 0.5).
  cropped, = train_batches(indexed_config(
      indexed_dir, color_augment='device', train_split='train[:8]'), 1)
  assert not np.allclose(cropped['image'], batch['image'], atol=1e-3)


def test_other_train_modes_give_one_view():
  config = make_config(train_mode='linear_eval')
  with tfds.testing.mock_data(num_examples=4):
    (batch,) = train_batches(config, 1)
  assert batch['image'].shape == (4, 32, 32, 3)
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0


def test_augmentation_impl_key_reaches_the_views():
  # simclrv1's brightness is additive, simclrv2's multiplicative: the same
  # seed gives other views, so the key is read (and not defaulted).
  with tfds.testing.mock_data(num_examples=4):
    v2, = train_batches(make_config(), 1)
    v1, = train_batches(make_config(augmentation_impl='simclrv1'), 1)
  assert not np.allclose(v1['image'], v2['image'])


def test_unknown_dataset_and_split_are_named(indexed_dir):
  with pytest.raises(ValueError, match='no_such_dataset'):
    pipeline.num_examples(make_config(dataset='no_such_dataset'), 'train')
  with pytest.raises(ValueError, match='validation'):
    pipeline.num_examples(indexed_config(indexed_dir), 'validation')
  assert pipeline.num_examples(indexed_config(indexed_dir), 'test') == NUM_TEST


# ----------------------------------------------------------------------------
# Determinism and exact resume.
# ----------------------------------------------------------------------------
def test_same_seed_same_batches_different_seed_different(indexed_dir):
  config = indexed_config(indexed_dir)
  a, b = train_batches(config, 3, seed=5), train_batches(config, 3, seed=5)
  c = train_batches(config, 3, seed=6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['label'], c[0]['label'])  # Order.
  first = {int(l): v for l, v in zip(a[0]['label'], a[0]['image'])}
  other = {int(l): v for b in c for l, v in zip(b['label'], b['image'])}
  for label in first.keys() & other.keys():  # Views of the same image.
    assert not np.allclose(first[label], other[label])


def test_start_step_resumes_exactly(indexed_dir):
  config = indexed_config(indexed_dir)
  # 42 examples, batch 8: batch 5 straddles the first epoch boundary.
  straight = train_batches(config, 8, seed=3)
  resumed = train_batches(config, 4, seed=3, start_step=4)
  for x, y in zip(straight[4:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_next_epoch_gives_new_views(indexed_dir):
  config = indexed_config(indexed_dir)
  batches = train_batches(config, 10, seed=1)  # 80 examples ≈ two epochs.
  seen = collections.defaultdict(list)
  for b in batches:
    for label, views in zip(b['label'], b['image']):
      seen[int(label)].append(views)
  repeated = [v for v in seen.values() if len(v) >= 2]
  assert len(repeated) > 20
  for v in repeated:
    assert not np.allclose(v[0], v[1])


# ----------------------------------------------------------------------------
# Per-host shards (process_count = 4, simulated).
# ----------------------------------------------------------------------------
def test_train_shards_are_disjoint_and_cover_the_split(indexed_dir):
  config = indexed_config(indexed_dir)  # Global batch 8: 2 per host.
  shards = []
  sizes = [pipeline.num_examples(config, s)
           for s in tfds.even_splits('train', n=4, drop_remainder=False)]
  assert sizes == [11, 11, 10, 10]
  for p, shard_size in enumerate(sizes):
    it = pipeline.create_train_iterator(config, seed=0, process_index=p,
                                        process_count=4)
    labels = np.concatenate([b['label'] for b in take(it, 6)])
    first_epoch = labels[:shard_size]
    assert len(set(first_epoch)) == len(first_epoch)
    shards.append(set(first_epoch.tolist()))
  assert sorted(len(s) for s in shards) == [10, 10, 11, 11]
  for i in range(4):
    for j in range(i):
      assert not shards[i] & shards[j]
  assert set().union(*shards) == set(range(NUM_TRAIN))


def test_views_do_not_depend_on_the_process_count(indexed_dir):
  config = indexed_config(indexed_dir)
  one = {int(l): v for b in train_batches(config, 5, seed=2)
         for l, v in zip(b['label'], b['image'])}
  it = pipeline.create_train_iterator(config, seed=2, process_index=1,
                                      process_count=4)
  four = {int(l): v for b in take(it, 3) for l, v in zip(b['label'], b['image'])}
  common = one.keys() & four.keys()
  assert common
  for label in common:
    np.testing.assert_array_equal(one[label], four[label])


@pytest.mark.parametrize('process_count', [1, 4])
def test_eval_sees_every_example_exactly_once(indexed_dir, process_count):
  config = indexed_config(indexed_dir)  # Global eval batch 8.
  labels, num_batches = [], set()
  for p in range(process_count):
    batches = list(pipeline.create_eval_iterator(
        config, process_index=p, process_count=process_count))
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (8 // process_count, 16, 16, 3)
      assert b['mask'].dtype == bool
      labels.extend(b['label'][b['mask']].tolist())
      np.testing.assert_array_equal(b['image'][~b['mask']], 0.0)
  assert len(num_batches) == 1  # Every host runs the same number of steps.
  assert sorted(labels) == list(range(NUM_TEST))


def test_batch_not_divisible_by_process_count_is_refused(indexed_dir):
  config = indexed_config(indexed_dir, train_batch_size=6)
  with pytest.raises(ValueError, match='train_batch_size=6'):
    pipeline.create_train_iterator(config, seed=0, process_index=0,
                                   process_count=4)


def test_unprepared_dataset_names_the_prepare_command(tmp_path):
  config = make_config(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'tfds build cifar10 --data_dir='):
    pipeline.num_examples(config, 'train')
  with tfds.testing.mock_data(num_examples=3):  # Mocked: counts as present.
    assert pipeline.num_examples(config, 'train') == 3


@pytest.mark.parametrize('mode', ['pretrain', 'linear_eval'])
def test_crop_area_min_reaches_the_crop(indexed_dir, mode):
  # crop_area_min = 1 leaves the whole (square) image: with no colour jitter
  # each view is the image itself, mirrored or not, in colour or grey. The
  # paper's 0.08 crops most views (a few draw the whole 12×12 image).
  builder = tfds.builder('indexed_images', data_dir=indexed_dir)
  source = {int(ex['label']): ex['image'] / 255.0 for ex in
            builder.as_dataset(split='train').as_numpy_iterator()}

  def is_whole_image(view, label):
    image = source[label]
    grey = (image @ np.asarray(augment_constants.GRAY_WEIGHTS))[..., None]
    return any(np.allclose(view, np.broadcast_to(c, view.shape), atol=1e-4)
               for c in (image, image[:, ::-1], grey, grey[:, ::-1]))

  whole = {}
  for area_min in (1.0, 0.08):
    config = indexed_config(indexed_dir, image_size=12, train_mode=mode,
                            color_jitter_strength=0.0, crop_area_min=area_min)
    batch, = train_batches(config, 1)
    views = batch['image'].reshape(-1, 12, 12, 3)
    labels = np.repeat(batch['label'], len(views) // len(batch['label']))
    whole[area_min] = [is_whole_image(v, int(l))
                       for v, l in zip(views, labels)]
  assert all(whole[1.0])
  assert sum(whole[0.08]) < len(whole[0.08]) / 2
