"""Statistical and exact tests of the SimCLR augmentations.

Each property is read off the output pixels of a synthetic image whose pixels
encode their own coordinates, and compared with values computed here
independently (numpy / closed form), not with the functions under test.
"""
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import augment
from simclr_jax.data import augment_constants

N_DRAWS = 300


def coordinate_image(height, width):
  """float32 [H, W, 3]: channel 0 = y/(H−1), channel 1 = x/(W−1), 2 = 0.25.

  Linear ramps: bicubic interpolation reproduces them exactly away from the
  border, so a crop's position and size can be read back from the output.
  """
  y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width),
                     indexing='ij')
  return np.stack([y, x, np.full_like(x, 0.25)], -1).astype(np.float32)


def colour_image(size=16, seed=0):
  """A saturated, non-gray random colour image with values in [0.1, 0.9]."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0.1, 0.9, (size, size, 3)).astype(np.float32)


def seeds(n, offset=0):
  return [tf.constant([offset, i], tf.int64) for i in range(n)]


def read_window(out, src_height, src_width):
  """(top, left, height, width) in source pixels of the crop behind `out`.

  With half-pixel centres, output pixel j of an axis samples source coordinate
  top + (j + 0.5)·h/out_h − 0.5, and the ramp's value there is that
  coordinate / (src − 1). Two interior pixels give h and top.
  """
  out_h, out_w = out.shape[:2]

  def axis(values, src, n):
    j1, j2 = n // 4, (3 * n) // 4
    coord = values * (src - 1)
    extent = (coord[j2] - coord[j1]) * n / (j2 - j1)
    start = coord[j1] - (j1 + 0.5) * extent / n + 0.5
    return start, extent

  top, h = axis(out[:, out_w // 2, 0], src_height, out_h)
  left, w = axis(out[out_h // 2, :, 1], src_width, out_w)
  return top, left, h, w


# ----------------------------------------------------------------------------
# Crop.
# ----------------------------------------------------------------------------
def test_random_crop_area_and_aspect_ranges():
  src_h, src_w, out = 240, 200, 64
  image = tf.constant(coordinate_image(src_h, src_w))
  crop = tf.function(lambda s: augment.preprocess_for_train(
      image, out, out, seed=s, flip=False, color_distort=False))
  areas, aspects = [], []
  for s in seeds(N_DRAWS):
    top, left, h, w = read_window(crop(s).numpy(), src_h, src_w)
    assert -0.51 <= top and top + h <= src_h + 0.51
    assert -0.51 <= left and left + w <= src_w + 0.51
    areas.append(h * w / (src_h * src_w))
    aspects.append(w / h)
  areas, aspects = np.array(areas), np.array(aspects)
  # Integer window sides: up to one pixel of rounding on each side.
  area_slack = 2.0 / min(src_h, src_w) + 1e-3
  is_fallback = np.abs(areas - 1) < area_slack  # Whole image after 100 tries.
  assert np.all(areas >= 0.08 - area_slack) and np.all(areas <= 1 + area_slack)
  aspect_slack = 0.04
  ok = (aspects >= 3 / 4 - aspect_slack) & (aspects <= 4 / 3 + aspect_slack)
  assert np.all(ok | is_fallback)
  # The ranges are actually used: small crops, wide and tall ones.
  assert areas.min() < 0.15 and areas.max() > 0.9
  assert aspects.min() < 0.8 and aspects.max() > 1.25
  # Inception-style sampling: mean area ≈ (0.08 + 1)/2 before rejection.
  assert 0.35 < areas.mean() < 0.7


def test_crop_area_min_bounds_the_window_area():
  src = 100
  window = tf.function(lambda s: augment.sample_crop_window(
      tf.constant([src, src, 3]), 32, 32, seed=s, area_min=0.5)[1])
  areas = np.array([np.prod(window(s).numpy()) / src**2
                    for s in seeds(N_DRAWS)])
  slack = 2.0 / src + 1e-3  # Integer sides: a pixel of rounding each.
  assert areas.min() >= 0.5 - slack and areas.max() <= 1 + slack
  assert areas.min() < 0.55  # The range is used down to its bottom.


def test_crop_window_matches_pixels():
  """sample_crop_window returns the window that the crop actually takes."""
  src_h, src_w, out = 180, 220, 48
  image = tf.constant(coordinate_image(src_h, src_w))
  for s in seeds(5, offset=7):
    crop_seed = augment.view_seeds(s)[0]
    offset, size = augment.sample_crop_window(
        tf.constant([src_h, src_w, 3]), out, out, seed=crop_seed)
    top, left, h, w = read_window(augment.preprocess_for_train(
        image, out, out, seed=s, flip=False, color_distort=False).numpy(),
                                  src_h, src_w)
    np.testing.assert_allclose([top, left, h, w],
                               [*offset.numpy(), *size.numpy()], atol=0.02)


def test_flip_probability_and_mirror():
  image = tf.constant(coordinate_image(32, 32))
  view = tf.function(lambda s: augment.preprocess_for_train(
      image, 32, 32, seed=s, crop=False, color_distort=False))
  flipped = []
  for s in seeds(N_DRAWS):
    out = view(s).numpy()
    if np.allclose(out, image.numpy()):
      flipped.append(False)
    else:
      np.testing.assert_allclose(out, image.numpy()[:, ::-1], atol=1e-6)
      flipped.append(True)
  assert abs(np.mean(flipped) - 0.5) < 4 * math.sqrt(0.25 / N_DRAWS)


def test_flip_before_resize_equals_flip_after():
  """The crop is mirrored before the bicubic resize; that commutes."""
  rng = np.random.default_rng(1)
  image = tf.constant(rng.integers(0, 256, (37, 53, 3)), tf.uint8)
  a = augment._resize_bicubic(tf.reverse(image, [1]), 64, 48)  # pylint: disable=protected-access
  b = tf.reverse(augment._resize_bicubic(image, 64, 48), [1])  # pylint: disable=protected-access
  np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------
# Colour.
# ----------------------------------------------------------------------------
def _gray(x):
  y = x @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  return np.repeat(y[..., None], 3, -1)


def test_jitter_and_grayscale_probabilities():
  """Jitter with p = 0.8, then (independently) grayscale with p = 0.2."""
  x = colour_image()
  view = tf.function(lambda s: augment.preprocess_for_train(
      tf.constant(x), 16, 16, seed=s, crop=False, flip=False))
  gray, jittered = [], []
  for s in seeds(N_DRAWS):
    out = view(s).numpy()
    is_gray = np.abs(out - out[..., :1]).max() < 1e-6
    untouched = np.allclose(out, x, atol=1e-6) or np.allclose(out, _gray(x),
                                                              atol=1e-4)
    gray.append(is_gray)
    jittered.append(not untouched)
  tol = lambda p: 4 * math.sqrt(p * (1 - p) / N_DRAWS)  # 4 binomial sd.
  assert abs(np.mean(gray) - 0.2) < tol(0.2)
  assert abs(np.mean(jittered) - 0.8) < tol(0.8)


@pytest.mark.parametrize('impl,strength,lo,hi', [
    ('simclrv2', 1.0, 0.2, 1.8),
    ('simclrv2', 0.5, 0.6, 1.4),
    ('simclrv2', 1.5, 0.0, 2.2),  # max(1 − 0.8s, 0) clamps at 0.
    ('simclrv1', 1.0, -0.8, 0.8),
    ('simclrv1', 0.5, -0.4, 0.4),
])
def test_brightness_factor_range(impl, strength, lo, hi):
  """simclrv2: x·U[max(1−0.8s, 0), 1+0.8s]; simclrv1: x + U[−0.8s, 0.8s]."""
  x = tf.fill([4, 4, 3], 0.25)
  brightness = tf.function(lambda s: augment.random_brightness(
      x, strength, seed=s, impl=impl))
  outs = np.array([brightness(s).numpy() for s in seeds(N_DRAWS)])
  # One factor per draw, the same for every pixel.
  assert np.ptp(outs.reshape(N_DRAWS, -1), axis=1).max() < 1e-6
  factors = outs[:, 0, 0, 0] / 0.25 if impl == 'simclrv2' else (
      outs[:, 0, 0, 0] - 0.25)
  span = hi - lo
  assert factors.min() >= lo - 1e-6 and factors.max() <= hi + 1e-6
  # P(no draw in the bottom / top 3 % of the range) = 0.97^300 ≈ 1e-4.
  assert factors.min() < lo + 0.03 * span and factors.max() > hi - 0.03 * span
  assert abs(factors.mean() - (lo + hi) / 2) < 4 * span / math.sqrt(
      12 * N_DRAWS)


def test_unknown_impl_is_rejected():
  with pytest.raises(ValueError, match='simclrv2'):
    augment.preprocess_for_train(tf.zeros([8, 8, 3]), 8, 8,
                                 seed=tf.constant([0, 0]), impl='simclrv3')


def test_color_jitter_ops_clip_and_order_varies():
  """Each op is clipped; the four ops run in different orders."""
  x = tf.constant(colour_image(seed=3))
  jitter = tf.function(lambda s: augment.color_jitter(x, 1.0, seed=s))
  outs = [jitter(s).numpy() for s in seeds(40)]
  for out in outs:
    assert out.min() >= 0.0 and out.max() <= 1.0
  # Brightness then contrast ≠ contrast then brightness once clipping bites:
  # different seeds give different results (no fixed point).
  assert len({o.tobytes() for o in outs}) == len(outs)


def test_zero_strength_jitter_is_identity():
  x = tf.constant(colour_image(seed=4))
  out = augment.color_jitter(x, 0.0, seed=tf.constant([1, 2]))
  np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-7)


# ----------------------------------------------------------------------------
# Blur.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('shape,sigma', [((224, 224, 3), 2.0), ((37, 50, 3), 0.1),
                                         ((10, 10, 1), 1.3)])
def test_blur_keeps_constant_image_constant(shape, sigma):
  image = tf.fill(shape, 0.37)
  out = augment.gaussian_blur(image, tf.constant(sigma),
                              augment_constants.blur_kernel_size(224))
  np.testing.assert_allclose(out.numpy(), 0.37, atol=2e-6)


def test_random_blur_constant_image_and_probability():
  image = tf.fill([64, 64, 3], 0.6)
  checker = tf.constant(np.indices((64, 64)).sum(0)[..., None] % 2 * np.ones(3),
                        tf.float32)
  blur = tf.function(lambda x, s: augment.random_blur(x, 64, seed=s))
  blurred = []
  for s in seeds(200):
    np.testing.assert_allclose(blur(image, s).numpy(), 0.6, atol=2e-6)
    blurred.append(not np.allclose(blur(checker, s).numpy(), checker.numpy()))
  assert abs(np.mean(blurred) - 0.5) < 4 * math.sqrt(0.25 / 200)


def test_blur_impulse_response_is_the_truncated_gaussian():
  """Away from the border: outer product of the 1-D gaussian, radius k // 2."""
  size, sigma, k = 64, 1.5, augment_constants.blur_kernel_size(224)  # k = 23.
  assert k == 23 and augment_constants.blur_kernel_size(32) == 3
  impulse = np.zeros([size, size, 1], np.float32)
  impulse[32, 32] = 1.0
  out = augment.gaussian_blur(tf.constant(impulse), tf.constant(sigma), k)
  t = np.arange(-(k // 2), k // 2 + 1)
  g = np.exp(-t**2 / (2 * sigma**2))
  g /= g.sum()
  expected = np.zeros([size, size])
  expected[32 - k // 2:32 + k // 2 + 1, 32 - k // 2:32 + k // 2 + 1] = np.outer(g, g)
  np.testing.assert_allclose(out.numpy()[..., 0], expected, atol=1e-6)


# ----------------------------------------------------------------------------
# Eval.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('src_h,src_w', [(300, 400), (500, 333), (256, 256)])
def test_eval_crop_is_the_0875_centre(src_h, src_w):
  out = 224
  image = tf.constant(coordinate_image(src_h, src_w))
  top, left, h, w = read_window(
      augment.preprocess_for_eval(image, out, out).numpy(), src_h, src_w)
  side = np.rint(0.875 * min(src_h, src_w))  # Square output: shorter side.
  np.testing.assert_allclose([h, w], [side, side], atol=0.02)
  np.testing.assert_allclose([top, left], [(src_h - side + 1) // 2,
                                           (src_w - side + 1) // 2], atol=0.02)


def test_eval_without_crop_is_identity_at_32px():
  x = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  out = augment.preprocess_for_eval(tf.constant(x), 32, 32, crop=False)
  np.testing.assert_allclose(out.numpy(), x / 255.0, atol=1e-7)


def test_grayscale_input_becomes_three_channels():
  x = tf.constant(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1))
  out = augment.preprocess_for_eval(x, 32, 32, crop=False)
  assert out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


# ----------------------------------------------------------------------------
# Seeds and the JPEG path.
# ----------------------------------------------------------------------------
def test_same_seed_same_view_different_seed_different_view():
  x = tf.constant(colour_image(40, seed=5))
  view = lambda s: augment.preprocess_for_train(x, 24, 24, seed=tf.constant(s),
                                                blur=True).numpy()
  np.testing.assert_array_equal(view([3, 9]), view([3, 9]))
  assert not np.allclose(view([3, 9]), view([3, 10]))
