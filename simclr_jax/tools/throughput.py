"""Input-pipeline throughput: two-view SimCLR images per second on this host.

    python -m simclr_jax.tools.throughput --image_size=224 [--blur] [--reference]

Feeds in-memory JPEG-encoded random 256×256 images (as an ImageNet-style
record stream would, minus the file reads) through exactly the two-view
preprocessing of the training pipeline (`pipeline.two_view_fn`) in a tf.data
map with the pipeline's options (AUTOTUNE, private thread pool, ordered
output), batches them, and counts views per second after a warm-up.

`reference=True` runs instead a replica of the reference release's pipeline
(google-research/simclr tf2/data_util.py + data.py: decode, convert to float,
crop + bicubic resize, flip, colour jitter with stateful random ops, twice;
its blur runs on the accelerator, so it has none here) on the same images, so
the two figures can be compared on the same machine under the same load.

The images are smooth random fields plus noise by default (JPEG size ≈ a
photograph's at this resolution); `--content=noise` gives i.i.d. pixels, whose
JPEGs are 2-3× larger and decoding-bound.

Two figures are printed: views/s of wall time (what a host delivers, but on
a shared host it depends on the other processes' load) and views per
CPU-second of this process (the work per view, comparable across loads).

`color_on_device=True` (`--color_on_device`) times the host side of
`color_augment='device'`: decode, crop, flip, resize and the views' keys; the
colour jitter, grayscale and blur then run in the train step.

The README's performance section gives the figures measured with it.
"""
import functools
import os
import statistics
import time

import numpy as np
import tensorflow as tf

from simclr_jax.data import pipeline

SOURCE_SIZE = 256


def random_jpegs(num_images, size=SOURCE_SIZE, *, seed=0, quality=90,
                 content='smooth'):
  """`num_images` JPEG-encoded random [size, size, 3] images (bytes).

  content: 'smooth' (a random low-frequency field plus pixel noise: about
  the JPEG size of a photograph) or 'noise' (i.i.d. uniform pixels: 2-3×
  larger files, decoding-bound).
  """
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(num_images):
    if content == 'noise':
      image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      images.append(tf.io.encode_jpeg(image, quality=quality).numpy())
      continue
    coarse = rng.uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [size, size], method='bicubic')[0].numpy()
    image = smooth + rng.normal(0.0, 12.0, smooth.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    images.append(tf.io.encode_jpeg(image, quality=quality).numpy())
  return images


# ----------------------------------------------------------------------------
# The reference release's two-view preprocessing (tf2/data_util.py), verbatim
# in behaviour; only used as the yardstick.
# ----------------------------------------------------------------------------
def _reference_random_apply(fn, p, x):
  return tf.cond(tf.random.uniform([]) < p, lambda: fn(x), lambda: x)


def _reference_color_jitter(image, strength):
  b = c = s = 0.8 * strength
  h = 0.2 * strength

  def apply_transform(i, x):
    brightness = lambda: x * tf.random.uniform([], max(1.0 - b, 0.0), 1.0 + b)
    contrast = lambda: tf.image.random_contrast(x, 1 - c, 1 + c)
    saturation = lambda: tf.image.random_saturation(x, 1 - s, 1 + s)
    hue = lambda: tf.image.random_hue(x, h)
    return tf.cond(i < 2, lambda: tf.cond(i < 1, brightness, contrast),
                   lambda: tf.cond(i < 3, saturation, hue))

  perm = tf.random.shuffle(tf.range(4))
  for i in range(4):
    image = tf.clip_by_value(apply_transform(perm[i], image), 0.0, 1.0)
  return image


def _reference_view(image, size):
  image = tf.image.convert_image_dtype(image, tf.float32)
  begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
      tf.shape(image), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=100,
      use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize([image], [size, size], method='bicubic')[0]
  image = tf.image.random_flip_left_right(image)

  def distort(x):
    x = _reference_random_apply(
        functools.partial(_reference_color_jitter, strength=1.0), 0.8, x)
    gray = lambda y: tf.tile(tf.image.rgb_to_grayscale(y), [1, 1, 3])
    return _reference_random_apply(gray, 0.2, x)

  image = distort(image)
  return tf.clip_by_value(tf.reshape(image, [size, size, 3]), 0.0, 1.0)


def _reference_two_views(encoded, size):
  image = tf.io.decode_jpeg(encoded, channels=3)
  return tf.stack([_reference_view(image, size) for _ in range(2)])


# ----------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------
def measure_input_throughput(image_size, *, num_images=512, batch_size=64,
                             seconds=10.0, warmup_batches=4, blur=None,
                             reference=False, color_jitter_strength=1.0,
                             repeats=1, seed=0,
                             color_on_device=False,
                             source_size=SOURCE_SIZE, content='smooth'):
  """Two-view views/second of the training preprocessing at `image_size`.

  Args:
    image_size: output side in pixels (224 for ImageNet, 32 for CIFAR).
    num_images: distinct JPEGs kept in memory (cycled).
    source_size: side of the square source JPEGs (256; 32 mimics CIFAR).
    content: 'smooth' or 'noise' source images (see `random_jpegs`).
    batch_size: images per batch (each gives 2 views).
    seconds: timed duration of one repeat, after `warmup_batches`.
    blur: the gaussian blur of the pipeline; default on above 32 px, as the
      ImageNet configs use it.
    reference: time the reference release's preprocessing instead.
    repeats: timed repeats; the best and median are reported (the host is
      shared, so the best is the least disturbed one).
    color_on_device: the host side of color_augment='device': crop, flip
      and resize only, plus each view's key (colour and blur run in the
      train step, device_augment.py).

  Returns:
    dict with views_per_s (best), views_per_s_median, views_per_s_per_core,
    all repeats, and the settings used.
  """
  if blur is None:
    blur = image_size > 32
  jpegs = random_jpegs(num_images, source_size, seed=seed, content=content)
  if reference:
    preprocess = lambda encoded, _: _reference_two_views(encoded, image_size)
  else:
    two_views = pipeline.two_view_fn(
        image_size, color_jitter_strength=color_jitter_strength,
        use_blur=blur, impl='simclrv2', color_on_device=color_on_device)
    base_seed = tf.constant([seed, 0], tf.int64)
    preprocess = lambda encoded, index: two_views(
        encoded, tf.random.experimental.stateless_fold_in(base_seed, index))

  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().enumerate()
  ds = ds.map(tf.autograph.experimental.do_not_convert(
      lambda i, encoded: preprocess(encoded, i)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  ds = ds.with_options(pipeline.tf_data_options(deterministic=True))
  it = iter(ds)
  for _ in range(warmup_batches):
    next(it)
  rates, cpu_rates = [], []
  for _ in range(repeats):
    views = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
      batch = next(it)
      images = batch[0] if isinstance(batch, tuple) else batch  # (views, keys)
      views += 2 * int(images.shape[0])
    rates.append(views / (time.perf_counter() - start))
    cpu_rates.append(views / (time.process_time() - cpu_start))
  cores = os.cpu_count() or 1
  best = max(rates)
  return {
      'pipeline': ('reference' if reference else
                   'simclr_jax' + (' (colour on device)' if color_on_device
                                   else '')),
      'image_size': image_size,
      'views_per_s': best,
      'views_per_s_median': statistics.median(rates),
      'views_per_s_per_core': best / cores,
      'rates': rates,
      # Views per CPU-second of this process: what one fully available core
      # would give. On a shared host it is the fairer figure to compare.
      'views_per_cpu_s': max(cpu_rates),
      'cpu_rates': cpu_rates,
      'cores': cores,
      'blur': bool(blur) and not reference and not color_on_device,
      'color_on_device': bool(color_on_device) and not reference,
      'batch_size': batch_size,
      'num_images': num_images,
      'source': f'in-memory {content} JPEG {source_size}x{source_size}',
      'seconds_per_repeat': seconds,
  }


def format_result(r):
  return (f"{r['pipeline']:>10} {r['image_size']:>4} px blur={r['blur']!s:5} "
          f"{r['views_per_s']:9.0f} views/s best, "
          f"{r['views_per_s_median']:9.0f} median of {len(r['rates'])}, "
          f"{r['views_per_s_per_core']:8.0f} per core ({r['cores']} cores); "
          f"{r['views_per_cpu_s']:7.0f} per CPU-second; "
          f"batch {r['batch_size']}, {r['source']}")


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--source_size', type=int, default=SOURCE_SIZE)
  parser.add_argument('--content', default='smooth', choices=('smooth', 'noise'))
  parser.add_argument('--blur', dest='blur', action='store_true', default=None)
  parser.add_argument('--no_blur', dest='blur', action='store_false')
  parser.add_argument('--reference', action='store_true',
                      help='also time the reference release pipeline')
  parser.add_argument('--color_on_device', action='store_true',
                      help="also time the host side of color_augment='device' "
                      '(crop, flip, resize; colour and blur in the train step)')
  args = parser.parse_args(argv)
  kwargs = dict(num_images=args.num_images, batch_size=args.batch_size,
                seconds=args.seconds, repeats=args.repeats,
                source_size=args.source_size, content=args.content)
  ours = measure_input_throughput(args.image_size, blur=args.blur, **kwargs)
  print(format_result(ours), flush=True)
  if args.color_on_device:
    device = measure_input_throughput(args.image_size, blur=args.blur,
                                      color_on_device=True, **kwargs)
    print(format_result(device), flush=True)
  if args.reference:
    ref = measure_input_throughput(args.image_size, reference=True, **kwargs)
    print(format_result(ref))
    for r in [ours] + ([device] if args.color_on_device else []):
      print(f"ratio {r['pipeline']} / reference: "
            f"{r['views_per_s'] / ref['views_per_s']:.2f}x wall, "
            f"{r['views_per_cpu_s'] / ref['views_per_cpu_s']:.2f}x per "
            f"CPU-second")


if __name__ == '__main__':
  main()
