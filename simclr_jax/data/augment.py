"""SimCLR image augmentations as pure, statelessly seeded TensorFlow ops.

Semantics follow the reference release (google-research/simclr `tf2/data_util.py`,
the paper's Appendix A); every random draw comes from a `tf.random.stateless_*` op whose
seed is derived from the caller's `seed` (an int32/int64 tensor of shape [2]),
so the same (seed, image) gives the same view on any machine, in any tf.data
thread, in any order. Sub-seeds are split off with
`tf.random.experimental.stateless_split`, one per random decision.

Per training view, in order:
  1. random crop (`sample_distorted_bounding_box`: min_object_covered 0.1, aspect
     ratio ∈ [3/4, 4/3]·(width/height), area ∈ [area_min, 1] (the paper's
     area_min 0.08), 100 attempts, whole image as fallback), bicubic resize
     to height × width;
  2. horizontal flip with p = 0.5;
  3. with p = 0.8 colour jitter of strength s, the four ops in a random order,
     each followed by a clip to [0, 1]:
       brightness  x·U[max(1 − 0.8s, 0), 1 + 0.8s]   ('simclrv2')
                   x + U[−0.8s, 0.8s]               ('simclrv1')
       contrast    (x − mean)·U[1 − 0.8s, 1 + 0.8s] + mean
       saturation  S·U[1 − 0.8s, 1 + 0.8s] in HSV
       hue         H + U[−0.2s, 0.2s] in HSV;
  4. grayscale (kept as 3 channels) with p = 0.2;
  5. (blur=True) gaussian blur with p = 0.5, σ ~ U[0.1, 2], kernel size
     2·((height // 10) // 2) + 1, separable.
Eval: centre crop of 0.875 of the shorter side (aspect-preserving) + bicubic
resize. Outputs are float32 [height, width, 3] in [0, 1].

Deliberate deviations from the reference, each for a stated reason:
  * The blur is normalised at the borders (each output pixel is a weighted mean
    of the pixels inside the image) instead of zero-padded: the reference's
    zero padding darkens a frame of ~height/20 pixels, so a constant image
    would not stay constant. Inside the image it is the same blur.
  * The blur is applied per view with its own σ (the reference draws one σ
    per batch, an artefact of batching it on the accelerator).
  * The bicubic resize overshoots slightly; we clip right after it, so the
    colour ops see a valid image (the reference clips only after each jitter op).
"""
import functools

import tensorflow as tf

from simclr_jax.data import augment_constants as C


def _hide_accelerators_from_tf():
  """TF only ever runs on the host CPU here: keep it off the GPUs and TPUs,
  so that tf.data never allocates accelerator memory that JAX needs."""
  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      # RuntimeError: TF already initialised its devices (it was used before
      # this import); ValueError: this TF build has no such device type.
      pass


_hide_accelerators_from_tf()


def _split(seed, num):
  """`num` independent sub-seeds (each shape [2]) of a shape-[2] seed."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _uniform(seed, minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval)


def _random_apply(fn, p, image, seed):
  """fn(image) with probability p, else image (a real branch: no wasted work)."""
  return tf.cond(_uniform(seed) < p, lambda: fn(image), lambda: image)


def to_float(image):
  """uint8 [0, 255] → float32 [0, 1]; float inputs are taken to be in [0, 1]."""
  if image.dtype == tf.uint8:
    return tf.cast(image, tf.float32) * (1.0 / 255.0)
  return tf.cast(image, tf.float32)


def _ensure_rgb(image):
  """Grayscale [H, W, 1] → [H, W, 3] (MNIST); RGB passes through."""
  if image.shape.rank == 3 and image.shape[-1] == 1:
    return tf.tile(image, [1, 1, 3])
  return image


def _resize_bicubic(image, height, width):
  """Bicubic resize to [height, width]; float32 in [0, 1] out.

  A uint8 image is resized as uint8 (ResizeBicubic reads it directly and
  returns float32), so the 1/255 scaling runs on the smaller output.
  """
  scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
  image = tf.image.resize(image, [height, width],
                          method=tf.image.ResizeMethod.BICUBIC)
  return tf.clip_by_value(image * scale, 0.0, 1.0)


def _resize_if_needed(image, height, width):
  """Resizes only when the size differs (CIFAR at 32 px stays bit-exact)."""
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  resized = tf.cond(same, lambda: to_float(image),
                    lambda: _resize_bicubic(image, height, width))
  return tf.ensure_shape(resized, [height, width, None])


# ----------------------------------------------------------------------------
# Crop.
# ----------------------------------------------------------------------------
def sample_crop_window(image_shape, height, width, *, seed,
                       area_min=C.CROP_AREA_RANGE[0]):
  """The random crop window of `random_crop_and_resize`, as (offset, size).

  Args:
    image_shape: int tensor [3], the (H, W, C) of the source image.
    height, width: the output size (its aspect ratio scales the aspect range,
      as in the reference).
    seed: shape-[2] int tensor.
    area_min: the smallest crop area, a fraction of the image in (0, 1].

  Returns:
    (offset [y, x], size [h, w]) int32 tensors; area h·w/(H·W) ∈ [area_min, 1],
    aspect w/h ∈ [3/4, 4/3]·width/height up to integer rounding, or the whole
    image when 100 attempts fail.
  """
  aspect = width / height
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_size=image_shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=C.CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=tuple(r * aspect for r in C.CROP_ASPECT_RANGE),
      area_range=(area_min, C.CROP_AREA_RANGE[1]),
      max_attempts=C.CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def center_crop_window(image_height, image_width, height, width,
                       crop_proportion=C.CROP_PROPORTION):
  """(offset [y, x], size [h, w]) of the eval centre crop.

  The crop has the output's aspect ratio width/height and spans
  `crop_proportion` of the image along the side where that is the binding
  constraint (for a square output: 0.875 of the shorter side).
  """
  aspect = width / height
  image_height_f = tf.cast(image_height, tf.float32)
  image_width_f = tf.cast(image_width, tf.float32)
  wider_than_image = aspect > image_width_f / image_height_f
  crop_height = tf.cast(tf.math.rint(tf.where(
      wider_than_image, crop_proportion / aspect * image_width_f,
      crop_proportion * image_height_f)), tf.int32)
  crop_width = tf.cast(tf.math.rint(tf.where(
      wider_than_image, crop_proportion * image_width_f,
      crop_proportion * aspect * image_height_f)), tf.int32)
  # At least one pixel: a tiny image (a side of 1-2 px) would round to an
  # empty crop, which the resize rejects; real images never get here.
  crop_height, crop_width = tf.maximum(crop_height, 1), tf.maximum(
      crop_width, 1)
  offset_height = (image_height - crop_height + 1) // 2
  offset_width = (image_width - crop_width + 1) // 2
  return (tf.stack([offset_height, offset_width]),
          tf.stack([crop_height, crop_width]))


def center_crop_and_resize(image, height, width,
                           crop_proportion=C.CROP_PROPORTION):
  shape = tf.shape(image)
  offset, size = center_crop_window(shape[0], shape[1], height, width,
                                    crop_proportion)
  return _resize_bicubic(crop_window(image, offset, size), height, width)


# ----------------------------------------------------------------------------
# Colour.
# ----------------------------------------------------------------------------
def random_flip_left_right(image, *, seed):
  """Mirror with p = 0.5; a real branch (the tf.image op computes both)."""
  return tf.cond(_uniform(seed) < C.FLIP_PROB, lambda: tf.reverse(image, [1]),
                 lambda: image)


def random_brightness(image, strength, *, seed, impl='simclrv2'):
  """simclrv2: x·U[max(1 − 0.8s, 0), 1 + 0.8s]; simclrv1: x + U[−0.8s, 0.8s]."""
  draw = _uniform(seed, *C.jitter_ranges(strength, impl)['brightness'])
  return image * draw if impl == 'simclrv2' else image + draw


def to_grayscale(image):
  """ITU-R 601 luma (tf.image.rgb_to_grayscale), kept as 3 equal channels."""
  return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def color_jitter(image, strength, *, seed, impl='simclrv2'):
  """Brightness, contrast, saturation, hue of strength s, in random order.

  Ops whose strength is 0 are the identity (as in the reference); the image is
  clipped to [0, 1] after each op.
  """
  ranges = C.jitter_ranges(strength, impl)
  order_seed, b_seed, c_seed, s_seed, h_seed = _split(seed, 5)

  def brightness(x):
    return (random_brightness(x, strength, seed=b_seed, impl=impl)
            if strength else x)

  def contrast(x):
    return (tf.image.adjust_contrast(x, _uniform(c_seed, *ranges['contrast']))
            if strength else x)

  # TF's own HSV kernels. (XLA-compiled ones are 2× faster in isolation but
  # cost more CPU inside tf.data, measured with throughput.py; not used.)
  def saturation(x):
    return (tf.image.adjust_saturation(
        x, _uniform(s_seed, *ranges['saturation'])) if strength else x)

  def hue(x):
    return (tf.image.adjust_hue(x, _uniform(h_seed, *ranges['hue']))
            if strength else x)

  ops = (brightness, contrast, saturation, hue)

  # A uniformly random order of the four ops: argsort of 4 uniforms. (One
  # tf.switch_case over the 24 orders runs no faster and takes 6× as long to
  # trace.)
  order = tf.argsort(tf.random.stateless_uniform([4], order_seed))
  for i in range(4):
    image = tf.switch_case(order[i],
                           [functools.partial(op, image) for op in ops])
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def random_color_distortion(image, strength, *, seed, impl='simclrv2'):
  """Colour jitter with p = 0.8, then grayscale with p = 0.2 (independent)."""
  jitter_seed, apply_jitter_seed, gray_seed = _split(seed, 3)
  jitter = functools.partial(color_jitter, strength=strength, seed=jitter_seed,
                             impl=impl)
  image = _random_apply(jitter, C.JITTER_PROB, image, apply_jitter_seed)
  return _random_apply(to_grayscale, C.GRAYSCALE_PROB, image, gray_seed)


# ----------------------------------------------------------------------------
# Blur.
# ----------------------------------------------------------------------------
def _blur_matrix(length, sigma, radius):
  """[length, length] banded gaussian: row i holds the weights of output i.

  Rows are normalised over the pixels inside the image, so the blur is a
  weighted mean and a constant image stays constant (see module docstring).
  """
  idx = tf.range(length)
  d = tf.cast(idx[None, :] - idx[:, None], tf.float32)
  w = tf.exp(-tf.square(d) / (2.0 * tf.square(sigma)))
  w = tf.where(tf.abs(d) <= radius, w, 0.0)
  return w / tf.reduce_sum(w, axis=1, keepdims=True)


def gaussian_blur(image, sigma, kernel_size):
  """Separable gaussian blur of a [H, W, C] float image (odd kernel_size).

  Written as two matrix products with banded matrices, B_h · X · B_wᵀ per
  channel, which on CPU is faster than a depthwise convolution with a
  23-tap kernel and gives the border normalisation for free.
  """
  radius = kernel_size // 2
  shape = tf.shape(image)
  h, w, c = shape[0], shape[1], shape[2]
  blur_h = _blur_matrix(h, sigma, radius)
  blur_w = _blur_matrix(w, sigma, radius)
  # Vertical: [H, H] @ [H, W·C].
  x = tf.reshape(tf.matmul(blur_h, tf.reshape(image, [h, -1])), [h, w, c])
  # Horizontal: [H·C, W] @ [W, W]ᵀ on the channel-major layout.
  x = tf.reshape(tf.transpose(x, [0, 2, 1]), [-1, w])
  x = tf.matmul(x, blur_w, transpose_b=True)
  return tf.transpose(tf.reshape(x, [h, c, w]), [0, 2, 1])


def random_blur(image, height, *, seed):
  """With p = 0.5, gaussian blur with σ ~ U[0.1, 2], kernel from `height`."""
  kernel_size = C.blur_kernel_size(height)
  if kernel_size <= 1:
    return image  # Below 20 px the kernel is a single tap: the identity.
  apply_seed, sigma_seed = _split(seed, 2)
  blur = lambda x: gaussian_blur(x, _uniform(sigma_seed, *C.BLUR_SIGMA_RANGE),
                                 kernel_size)
  return tf.clip_by_value(_random_apply(blur, C.BLUR_PROB, image, apply_seed),
                          0.0, 1.0)


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------
def preprocess_for_train(image, height, width, *, seed,
                         color_jitter_strength=1.0, crop=True, flip=True,
                         impl='simclrv2', blur=False, color_distort=True,
                         crop_area_min=C.CROP_AREA_RANGE[0]):
  """One random training view of `image` (module docstring).

  Args:
    image: [H, W, C] uint8 (0..255) or float (0..1), C ∈ {1, 3}.
    height, width: output size (python ints).
    seed: shape-[2] int32/int64 tensor; the view is a pure function of it.
    color_jitter_strength: s of the colour jitter.
    crop: random crop + bicubic resize (else only resized to the output size).
    flip: random horizontal flip, p = 0.5.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    blur: gaussian blur with p = 0.5 (ImageNet yes, CIFAR no).
    color_distort: colour jitter + grayscale. False gives the crop + flip only
      preprocessing used to train linear eval / fine-tuning / supervised.
    crop_area_min: the random crop's smallest area, a fraction of the image.

  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  C.jitter_ranges(color_jitter_strength, impl)  # Checks impl.
  crop_seed, finish_seed = view_seeds(seed)
  image = _ensure_rgb(image)
  if crop:
    offset, size = sample_crop_window(tf.shape(image), height, width,
                                      seed=crop_seed, area_min=crop_area_min)
    image = crop_window(image, offset, size)
  return finish_view(image, height, width, seed=finish_seed,
                     color_jitter_strength=color_jitter_strength, flip=flip,
                     impl=impl, blur=blur, color_distort=color_distort,
                     always_resize=crop)


def view_seeds(seed):
  """(crop seed, finish seed) of a view's seed: the crop window is drawn
  from the first, everything after the crop (`finish_view`) from the second."""
  return _split(seed, 2)


def device_key(seed):
  """uint32 [2]: raw threefry key for the view's on-device colour and blur
  (`device_augment.distort_view`), a pure function of the view's finish seed."""
  return tf.random.stateless_uniform([2], _split(seed, 4)[3], minval=None,
                                     maxval=None, dtype=tf.uint32)


def crop_window(image, offset, size):
  """image[y:y+h, x:x+w] for offset (y, x), size (h, w)."""
  return tf.slice(image, tf.concat([offset, [0]], 0),
                  tf.concat([size, [-1]], 0))


def finish_view(image, height, width, *, seed, color_jitter_strength=1.0,
                flip=True, impl='simclrv2', blur=False, color_distort=True,
                always_resize=True):
  """A training view from its crop: flip, resize, colour, blur.

  The flip runs before the resize: on the uint8 crop it moves fewer bytes,
  and a bicubic resize with half-pixel centres commutes with a mirror, so
  the view is the same as flipping afterwards. `always_resize=False` keeps
  an image that already has the output size bit-exact (no crop, CIFAR).
  """
  flip_seed, color_seed, blur_seed = _split(seed, 3)
  if flip:
    image = random_flip_left_right(image, seed=flip_seed)
  image = (_resize_bicubic(image, height, width) if always_resize
           else _resize_if_needed(image, height, width))
  if color_distort:
    image = random_color_distortion(image, color_jitter_strength,
                                    seed=color_seed, impl=impl)
  if blur:
    image = random_blur(image, height, seed=blur_seed)
  # Every op above already clips to [0, 1] (resize, each jitter op, blur) and
  # grayscale's weights sum to < 1, so no final clip pass is needed.
  return tf.ensure_shape(image, [height, width, 3])


def preprocess_for_eval(image, height, width, crop=True):
  """Eval view: centre crop 0.875 + bicubic resize; float32 [h, w, 3] in [0, 1].

  `crop=False` (the pipeline passes it for image_size ≤ 32, as the reference
  does) skips the crop but still resizes to height × width when the size
  differs (MNIST 28 px → 32 px).
  """
  image = _ensure_rgb(image)
  if crop:
    image = center_crop_and_resize(image, height, width)
  else:
    image = _resize_if_needed(image, height, width)
  image = tf.clip_by_value(image, 0.0, 1.0)
  return tf.ensure_shape(image, [height, width, 3])
