"""tfds → SimCLR views → host-local numpy batches, one shard per JAX process.

Train stream of one process:

  raw records of this process's shard (tfds.even_splits; images left encoded)
    → [cache]
    → epoch e: shuffle with a seed that is a function of (seed, e, process)
    → epochs concatenated, skip(start_step · host_batch mod epoch) — skipped
      records are read but never decoded
    → decode once, two views (pretrain) or crop + flip (other modes), seeded
      by (seed, epoch, global example index, view)
    → batch(host_batch, drop_remainder) → prefetch → numpy.

So the data order and every random draw are a function of (seed, step) only:
`create_train_iterator(config, seed=s, start_step=k)` yields exactly the
batches that a fresh iterator yields after k batches. A given image in a
given epoch gets the same two views whatever the number of processes.

Eval: each process reads its shard once, centre-crops, and pads to a batch
count that is the same on every process (padding has mask=False), so every
example of the split is seen exactly once across hosts and all hosts run the
same number of eval steps (they meet in the same collectives).

Batches are dicts of numpy arrays, ready for
`jax.make_array_from_process_local_data`:
  pretrain train:  image float32 [n, 2, H, W, 3], label int32 [n]
                   (+ augment_key uint32 [n, 2, 2] with color_augment='device':
                   the views are then only cropped, flipped and resized, and
                   the train step applies device_augment.distort_views)
  other train:     image float32 [n, H, W, 3],    label int32 [n]
  eval:            image float32 [n, H, W, 3],    label int32 [n], mask bool [n]
with n = global batch // process_count. Labels are the tfds labels (−1 for
stl10's 'unlabelled' split).
"""
import functools
import math
import os
from typing import Callable, Iterator, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import augment
from simclr_jax.data import augment_constants
# Registers the offline `mnist_offline` builder with tfds.
from simclr_jax.data import mnist_offline  # pylint: disable=unused-import

OFFLINE_DATASETS = ('mnist_offline',)  # Prepared on first use: no network.
AUTOTUNE = tf.data.AUTOTUNE
# tfds.testing.mock_data patches this method; see _under_mock_data. Read from
# the class __dict__: attribute access returns a fresh wrapper object each
# time (tfds decorates it), so `DatasetBuilder.download_and_prepare is x`
# is always False.
_REAL_DOWNLOAD_AND_PREPARE = tfds.core.DatasetBuilder.__dict__[
    'download_and_prepare']


# ----------------------------------------------------------------------------
# Config and dataset checks: all raised before any tf.data work.
# ----------------------------------------------------------------------------
def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in '
                     f'[0, process_count={process_count}).')
  return process_index, process_count


def _host_batch_size(global_batch_size, process_count, key):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'config.{key}={global_batch_size} must be a positive '
                     f'multiple of the process count {process_count}.')
  return global_batch_size // process_count


def _data_dir(config):
  return os.path.expanduser(config.data_dir) if config.data_dir else None


def _under_mock_data():
  """True inside tfds.testing.mock_data (it fakes every dataset as present)."""
  current = tfds.core.DatasetBuilder.__dict__['download_and_prepare']
  return current is not _REAL_DOWNLOAD_AND_PREPARE


def get_builder(config):
  """The tfds builder of config.dataset, checked to be prepared.

  Raises:
    ValueError: unknown dataset name, or a dataset that is not prepared in
      config.data_dir (the message gives the command that prepares it).
  """
  name = config.dataset
  if not name:
    raise ValueError('config.dataset is empty; give a tfds dataset name, '
                     "e.g. 'cifar10', 'imagenet2012' or 'mnist_offline'.")
  data_dir = _data_dir(config)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f'Unknown dataset {name!r} (config.dataset): not a tfds dataset '
        "name (e.g. 'cifar10', 'imagenet2012', 'imagenet2012_subset/1pct', "
        "'stl10', 'mnist_offline').") from e
  if 'image' not in builder.info.features or 'label' not in builder.info.features:
    raise ValueError(f"Dataset {name!r} has no 'image' and 'label' features; "
                     f'it has {sorted(builder.info.features.keys())}.')
  if not _under_mock_data() and not builder.is_prepared():
    if name in OFFLINE_DATASETS:
      builder.download_and_prepare()  # Seconds, from an installed package.
    else:
      where = data_dir or '~/tensorflow_datasets'
      manual = (f' (ImageNet needs its tar files in {where}/downloads/manual '
                'first)') if name.startswith('imagenet2012') else ''
      raise ValueError(
          f'Dataset {name!r} is not prepared in data_dir={where}. Prepare it '
          f'with: tfds build {name} --data_dir={where}{manual}')
  return builder


def _check_split(builder, split):
  """Raises ValueError naming `split` when the dataset does not have it."""
  if not split:
    raise ValueError(f'Empty split for dataset {builder.info.full_name!r}.')
  if not builder.info.splits:  # tfds.testing.mock_data: splits are unknown.
    return
  try:
    builder.info.splits[split]
  except (ValueError, KeyError) as e:
    raise ValueError(
        f'Unknown split {split!r} for dataset {builder.info.full_name!r}; it '
        f'has {sorted(builder.info.splits.keys())}.') from e


def _split_size(builder, split):
  if builder.info.splits:
    return builder.info.splits[split].num_examples
  # tfds.testing.mock_data: no split metadata, count the (fake) records.
  return int(_raw_dataset(builder, split).reduce(0, lambda n, _: n + 1))


def _shard_splits(split, process_count):
  """The per-process sub-splits of `split` (disjoint, covering it)."""
  return tfds.even_splits(split, n=process_count, drop_remainder=False)


def num_examples(config, split):
  """Number of examples in `split` of config.dataset."""
  builder = get_builder(config)
  _check_split(builder, split)
  return _split_size(builder, split)


def num_classes(config):
  """Number of classes of config.dataset's 'label' feature."""
  return get_builder(config).info.features['label'].num_classes


# ----------------------------------------------------------------------------
# tf.data building blocks.
# ----------------------------------------------------------------------------
def tf_data_options(deterministic):
  """tf.data options for throughput on a host that feeds accelerators.

  `deterministic=True` makes parallel map/interleave emit elements in input
  order. Exact resume needs it in training (batch k must hold the same
  examples on every run); the price is head-of-line blocking: one slow
  element (a large JPEG) holds back the finished ones behind it, which
  prefetching and AUTOTUNE's parallelism mostly hide. The reference turns it
  off and so cannot resume a data stream exactly.
  """
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  # Our own thread pool, sized to the cores, so tf.data neither competes with
  # the process's other TF work nor is starved by it; each element's ops run
  # single-threaded (parallelism comes from many elements at once).
  options.threading.private_threadpool_size = os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options


def _raw_dataset(builder, split):
  """(encoded image bytes, label) records of `split`, in file order."""
  read_config = tfds.ReadConfig(
      options=tf_data_options(deterministic=True), try_autocache=False)
  ds = builder.as_dataset(
      split=split, shuffle_files=False, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()})
  return ds.map(lambda ex: (ex['image'], ex['label']))


def decode_image(encoded):
  """JPEG/PNG/… bytes → uint8 [H, W, 3]; grayscale (MNIST) becomes 3 channels."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _graph_fn(fn):
  """Marks a tf.data map function as plain graph code: autograph would
  otherwise re-convert every nested augmentation function, which takes
  seconds per pipeline (the code has no Python control flow on tensors)."""
  return tf.autograph.experimental.do_not_convert(fn)


def _seed_tensor(seed):
  return tf.constant([seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF], tf.int64)


def _fold_in(seed, *data):
  for d in data:
    seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
  return seed


def two_view_fn(image_size, *, color_jitter_strength, use_blur, impl,
                color_on_device=False, random_crop=True,
                crop_area_min=augment_constants.CROP_AREA_RANGE[0]):
  """(encoded image, seed [2]) → two SimCLR views, float32 [2, S, S, 3].

  The record is decoded once and both views are cropped from it;
  `random_crop=False` (the paper's Figure 5 ablation) takes the whole image
  for both (flip, resize and colour still apply).
  `color_on_device=True` stops after crop, flip and resize and returns
  (views, keys): keys are uint32 [2, 2], each view's raw threefry key for
  `device_augment.distort_view`, drawn from the view's seed, so the colour
  and blur the train step applies are a function of the same (seed, epoch,
  example, view) as the host path's.
  """
  # Everything after the crop, traced once and called for both views:
  # tracing the colour ops per view cost seconds per pipeline.
  finish = tf.function(functools.partial(
      augment.finish_view, height=image_size, width=image_size,
      color_jitter_strength=color_jitter_strength, impl=impl,
      blur=use_blur and not color_on_device,
      color_distort=not color_on_device), autograph=False)

  def two_views(encoded, seed):
    view_seeds = [augment.view_seeds(s) for s in
                  tf.unstack(tf.random.experimental.stateless_split(seed, 2))]
    image = decode_image(encoded)
    crops = [augment.crop_window(image, *augment.sample_crop_window(
        tf.shape(image), image_size, image_size, seed=s[0],
        area_min=crop_area_min))
             if random_crop else image for s in view_seeds]
    views = tf.stack([finish(crop, seed=s[1])
                      for crop, s in zip(crops, view_seeds)])
    if not color_on_device:
      return views
    keys = tf.stack([augment.device_key(s[1]) for s in view_seeds])
    return views, keys

  return two_views


def _train_preprocess_fn(config, pretrain):
  """(encoded, seed) → dict of the training example's image(s) (and keys)."""
  size = int(config.image_size)
  if pretrain:
    on_device = config.color_augment == 'device'
    two_views = two_view_fn(
        size, color_jitter_strength=float(config.color_jitter_strength),
        use_blur=bool(config.use_blur), impl=config.augmentation_impl,
        color_on_device=on_device, random_crop=bool(config.random_crop),
        crop_area_min=float(config.crop_area_min))
    if on_device:
      def views_and_keys(encoded, seed):
        views, keys = two_views(encoded, seed)
        return {'image': views, 'augment_key': keys}
      return views_and_keys
    return lambda encoded, seed: {'image': two_views(encoded, seed)}

  def crop_and_flip(encoded, seed):
    # linear_eval / finetune / supervised: crop + flip only (reference).
    return {'image': augment.preprocess_for_train(
        decode_image(encoded), size, size, seed=seed, color_distort=False,
        crop_area_min=float(config.crop_area_min))}

  return crop_and_flip


# ----------------------------------------------------------------------------
# Public iterators.
# ----------------------------------------------------------------------------
def create_train_iterator(config, *, seed, start_step=0, process_index=None,
                          process_count=None):
  """Infinite iterator of this process's training batches (see module doc).

  Args:
    config: the experiment config (dataset, data_dir, train_split,
      image_size, train_batch_size (global), train_mode, the augmentation's
      keys, cache_dataset, shuffle_buffer_size).
    seed: python int; with the step it determines every batch.
    start_step: the first batch yielded is batch `start_step` of the stream.
    process_index, process_count: this process's shard; default
      jax.process_index() / jax.process_count().
  """
  process_index, process_count = _process(process_index, process_count)
  train_mode = config.train_mode
  host_batch = _host_batch_size(int(config.train_batch_size), process_count,
                                'train_batch_size')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  builder = get_builder(config)
  split = config.train_split
  _check_split(builder, split)
  shards = _shard_splits(split, process_count)
  shard_sizes = [_split_size(builder, s) for s in shards]
  shard_size = shard_sizes[process_index]
  if shard_size == 0:
    raise ValueError(f'Split {split!r} has no examples for process '
                     f'{process_index} of {process_count}.')
  # Global index of this shard's first example (even_splits are contiguous).
  shard_offset = sum(shard_sizes[:process_index])
  preprocess = _train_preprocess_fn(config, train_mode == 'pretrain')
  size = int(config.image_size)
  # The reference's buffer: host batch × 50 at <= 32 px, × 10 above.
  buffer_size = int(config.shuffle_buffer_size or
                    host_batch * (50 if size <= 32 else 10))
  buffer_size = max(1, min(buffer_size, shard_size))
  base_seed = _seed_tensor(int(seed))

  records = _raw_dataset(builder, shards[process_index])
  if config.cache_dataset:
    records = records.cache()
  records = records.enumerate()  # (index within the shard, (bytes, label)).

  def one_epoch(epoch):
    shuffle_seed = tf.random.stateless_uniform(
        [], _fold_in(base_seed, 1, epoch, process_index),
        minval=None, maxval=None, dtype=tf.int64)
    shuffled = records.shuffle(buffer_size, seed=shuffle_seed,
                               reshuffle_each_iteration=False)
    return shuffled.map(lambda i, ex: (epoch, i, ex[0], ex[1]))

  @_graph_fn
  def decode_and_augment(epoch, index, encoded, label):
    view_seed = _fold_in(base_seed, 2, epoch, shard_offset + index)
    return {**preprocess(encoded, view_seed),
            'label': tf.cast(label, tf.int32)}

  # Element j of this process's stream is example j % shard_size of epoch
  # j // shard_size; batch k holds elements [k·n, (k+1)·n).
  start_epoch, skip = divmod(start_step * host_batch, shard_size)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = ds.flat_map(one_epoch)
  ds = ds.skip(skip)  # Before decoding: skipped records cost only a read.
  ds = ds.map(decode_and_augment, num_parallel_calls=AUTOTUNE,
              deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  ds = ds.prefetch(AUTOTUNE)
  ds = ds.with_options(tf_data_options(deterministic=True))
  return ds.as_numpy_iterator()


def create_eval_iterator(config, *, process_index=None, process_count=None):
  """Finite iterator over this process's part of config.eval_split.

  Every example of the split appears exactly once over all processes with
  mask=True; padding rows (zeros, label 0) have mask=False. All processes yield
  the same number of batches, ceil(largest shard / host batch).
  """
  process_index, process_count = _process(process_index, process_count)
  host_batch = _host_batch_size(int(config.eval_batch_size), process_count,
                                'eval_batch_size')
  builder = get_builder(config)
  split = config.eval_split
  _check_split(builder, split)
  shards = _shard_splits(split, process_count)
  shard_sizes = [_split_size(builder, s) for s in shards]
  num_batches = math.ceil(max(shard_sizes) / host_batch)
  num_padding = num_batches * host_batch - shard_sizes[process_index]
  size = int(config.image_size)
  crop = size > 32  # The reference skips the centre crop for CIFAR-sized images.

  @_graph_fn
  def decode_and_preprocess(encoded, label):
    image = augment.preprocess_for_eval(decode_image(encoded), size, size,
                                        crop=crop)
    return {'image': image, 'label': tf.cast(label, tf.int32),
            'mask': tf.constant(True)}

  ds = _raw_dataset(builder, shards[process_index])
  if config.cache_dataset:
    ds = ds.cache()
  ds = ds.map(decode_and_preprocess, num_parallel_calls=AUTOTUNE,
              deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([size, size, 3], tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False)}).repeat(num_padding)
  ds = ds.concatenate(padding).batch(host_batch, drop_remainder=True)
  ds = ds.prefetch(AUTOTUNE).with_options(tf_data_options(deterministic=True))
  return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------
# What training reads.
# ----------------------------------------------------------------------------
class Data(NamedTuple):
  """A dataset as training sees it: its sizes and its batch iterators.

  train_batches(start_step): this process's training batches from that step.
  eval_batches(split): a finite iterator of eval batches over any split.
  """
  num_train_examples: int
  num_classes: int
  train_batches: Callable[[int], Iterator[dict]]
  eval_batches: Callable[[str], Iterator[dict]]


def create_data(config) -> Data:
  """The config's dataset, checked: known, prepared, its splits exist.

  Raises ValueError (one line for the user) when it is not usable.
  """
  train_size = num_examples(config, config.train_split)
  if config.eval_split:
    num_examples(config, config.eval_split)
  train_batches = lambda start_step: create_train_iterator(
      config, seed=config.seed, start_step=start_step)
  if config.train_mode == 'distill' and config.distill_alpha < 1:
    train_batches = _with_labeled_batches(config, train_batches)

  def eval_batches(split):
    split_config = config.copy_and_resolve_references()
    with split_config.unlocked():
      split_config.eval_split = split
    return create_eval_iterator(split_config)

  return Data(
      num_train_examples=train_size, num_classes=num_classes(config),
      train_batches=train_batches, eval_batches=eval_batches)


def _with_labeled_batches(config, train_batches):
  """SimCLRv2's Eq. (3): each distillation batch also carries a batch of
  the labeled split (crop + flip), labeled_image and labeled_label, of the
  same size and drawn by the same (seed, step) rule, so resuming is exact."""
  labeled = config.copy_and_resolve_references()
  with labeled.unlocked():
    labeled.dataset = config.distill_labeled_dataset or config.dataset
    labeled.train_split = config.distill_labeled_split
    labeled.train_mode = 'finetune'  # The crop + flip path.
  num_examples(labeled, labeled.train_split)  # Known and prepared.

  def with_labeled(start_step):
    pairs = zip(train_batches(start_step), create_train_iterator(
        labeled, seed=config.seed, start_step=start_step))
    for batch, extra in pairs:
      yield {**batch, 'labeled_image': extra['image'],
             'labeled_label': extra['label']}

  return with_labeled
