"""device_augment.py: each op against TF's kernels, the random draws'
statistics, determinism, and the 8-device sharded batch against 1 device."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import device_augment
from simclr_jax import sharding
from simclr_jax.data import augment


def random_image(seed, size=(24, 20)):
  """Random colours plus the HSV edge cases: grey, black, white, one-hot,
  and pixels with two equal maxima (hue-branch ties)."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(size=size + (3,)).astype(np.float32)
  image[0, :6] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0],
                  [0.3, 0.7, 0.7], [0.9, 0.2, 0.9]]
  return image


@pytest.mark.parametrize('factor', [0.2, 0.6, 1.0, 1.3, 1.8])
def test_adjust_saturation_equals_tf_kernel(factor):
  image = random_image(0)
  expected = tf.image.adjust_saturation(image, factor).numpy()
  got = device_augment.adjust_saturation(jnp.asarray(image), factor)
  np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize('delta', [-0.2, -0.07, 0.0, 0.05, 0.13, 0.2])
def test_adjust_hue_equals_tf_kernel(delta):
  image = random_image(1)
  expected = tf.image.adjust_hue(image, delta).numpy()
  got = device_augment.adjust_hue(jnp.asarray(image), delta)
  np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize('factor', [0.2, 1.0, 1.8])
def test_adjust_contrast_and_brightness_equal_tf(factor):
  image = random_image(2)
  np.testing.assert_allclose(
      device_augment.adjust_contrast(jnp.asarray(image), factor),
      tf.image.adjust_contrast(image, factor).numpy(), atol=2e-6)
  np.testing.assert_allclose(
      device_augment.adjust_brightness(jnp.asarray(image), factor),
      image * factor, atol=1e-7)
  np.testing.assert_allclose(
      device_augment.adjust_brightness(jnp.asarray(image), factor - 1.0,
                                       impl='simclrv1'),
      image + (factor - 1.0), atol=1e-7)


def test_grayscale_and_blur_equal_host_versions():
  image = random_image(3, size=(40, 36))
  np.testing.assert_allclose(
      device_augment.to_grayscale(jnp.asarray(image)),
      np.tile(tf.image.rgb_to_grayscale(image).numpy(), [1, 1, 3]), atol=1e-6)
  for sigma in (0.3, 1.7):
    np.testing.assert_allclose(
        device_augment.gaussian_blur(jnp.asarray(image), sigma, 23),
        augment.gaussian_blur(image, sigma, 23).numpy(), atol=1e-5)
  # A hand-computed 3-tap case: weights exp(-d²/2σ²) over the pixels inside.
  line = np.zeros((1, 5, 1), np.float32)
  line[0, 2] = 1.0
  w = np.exp(-1.0 / (2 * 0.8 ** 2))
  got = device_augment.gaussian_blur(jnp.asarray(line), 0.8, 3)[0, :, 0]
  np.testing.assert_allclose(got, [0, w / (1 + 2 * w), 1 / (1 + 2 * w),
                                   w / (1 + 2 * w), 0], atol=1e-6)


def keys(n, seed=0):
  return np.asarray(jax.random.key_data(
      jax.random.split(jax.random.key(seed), n)), np.uint32)


def test_draw_fractions_and_brightness_range():
  n = 600
  # A constant grey image: contrast, saturation and hue leave it alone and
  # grayscale keeps it (to its weights' sum), so out/in is the brightness factor.
  grey = np.full((n, 8, 8, 3), 0.25, np.float32)
  out = np.asarray(device_augment.distort_views(grey, keys(n), strength=1.0))
  ratio = out[:, 0, 0, 0] / 0.25
  jittered = np.abs(ratio - 1.0) > 1e-3
  # p = 0.8 within 4 binomial standard deviations.
  assert abs(jittered.mean() - 0.8) < 4 * np.sqrt(0.8 * 0.2 / n)
  assert ratio.min() >= 0.2 - 1e-5 and ratio.max() <= 1.8 + 1e-5
  assert ratio.min() < 0.3 and ratio.max() > 1.7
  out1 = np.asarray(device_augment.distort_views(grey, keys(n), strength=1.0,
                                                 impl='simclrv1'))
  delta = out1[:, 0, 0, 0] - 0.25
  assert delta.min() >= -0.25 - 1e-6 and delta.max() <= 0.8 + 1e-6
  assert delta.min() < -0.2 and delta.max() > 0.6

  # Grayscale p = 0.2: equal channels on a colour image.
  color = np.broadcast_to(np.float32([0.8, 0.3, 0.1]), (n, 8, 8, 3))
  out = np.asarray(device_augment.distort_views(color, keys(n, 1)))
  gray = np.all(np.abs(out[..., 0] - out[..., 1]) < 1e-6, axis=(1, 2))
  assert abs(gray.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n)

  # Blur p = 0.5 (jitter strength 0: only grayscale and blur act). A step
  # edge is smoothed by a blur; a constant image stays constant.
  edge = np.zeros((n, 40, 40, 3), np.float32)
  edge[:, :, 20:] = 1.0
  out = np.asarray(device_augment.distort_views(edge, keys(n, 2), strength=0.0,
                                                blur=True))
  blurred = out[:, 0, 20, 0] < 0.99
  assert abs(blurred.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
  const = np.full((16, 40, 40, 3), 0.6, np.float32)
  out = np.asarray(device_augment.distort_views(const, keys(16, 3),
                                                strength=0.0, blur=True))
  assert np.all(np.abs(out - 0.6) < 1e-4)


def tf_jitter(image, order, factors):
  """The jitter composed from TF's kernels in the given order (the host's)."""
  ops = [lambda x: x * factors[0],
         lambda x: tf.image.adjust_contrast(x, factors[1]),
         lambda x: tf.image.adjust_saturation(x, factors[2]),
         lambda x: tf.image.adjust_hue(x, factors[3])]
  for i in order:
    image = tf.clip_by_value(ops[i](image), 0.0, 1.0)
  return image.numpy()


def test_jitter_is_a_uniform_random_order_of_the_tf_ops():
  image = random_image(4, (12, 12))
  for key in jax.random.split(jax.random.key(4), 6):
    order, factors = map(np.asarray,
                         device_augment.jitter_params(key, 1.0))
    got = device_augment.color_jitter(jnp.asarray(image), key, 1.0)
    np.testing.assert_allclose(got, tf_jitter(image, order, factors),
                               atol=1e-5)
    assert sorted(order) == [0, 1, 2, 3]
    assert 0.2 <= factors[0] <= 1.8 and 0.2 <= factors[1] <= 1.8
    assert 0.2 <= factors[2] <= 1.8 and -0.2 <= factors[3] <= 0.2

  n = 2400
  orders = np.asarray(jax.vmap(lambda k: device_augment.jitter_params(
      k, 1.0)[0])(jax.random.split(jax.random.key(5), n)))
  assert len({tuple(o) for o in orders}) == 24
  for position in range(4):
    counts = np.bincount(orders[:, position], minlength=4)
    # Each op at each position with p = 1/4, within 4 standard deviations.
    assert np.all(np.abs(counts / n - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n))
  # Strength 0: every op is the identity.
  np.testing.assert_allclose(
      device_augment.color_jitter(jnp.asarray(image), jax.random.key(0), 0.0),
      image, atol=1e-6)


def test_values_stay_in_range():
  n = 64
  image = np.broadcast_to(random_image(6, (16, 16)), (n, 16, 16, 3))
  out = np.asarray(device_augment.distort_views(image, keys(n, 4), blur=True))
  assert out.min() >= 0.0 and out.max() <= 1.0


def test_same_keys_same_views_different_keys_different_views():
  image = np.broadcast_to(random_image(5, (16, 16)), (8, 2, 16, 16, 3))
  k = keys(16, 7).reshape(8, 2, 2)
  a = device_augment.distort_views(image, k, blur=True)
  b = device_augment.distort_views(image, k, blur=True)
  np.testing.assert_array_equal(a, b)
  c = device_augment.distort_views(image, keys(16, 8).reshape(8, 2, 2),
                                   blur=True)
  assert not np.allclose(a, c)
  assert a.shape == image.shape and a.dtype == np.float32


def test_sharded_batch_on_8_devices_equals_1_device():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(16, 2, 32, 32, 3)).astype(np.float32)
  k = keys(32, 9).reshape(16, 2, 2)
  fn = lambda x, kk: device_augment.distort_views(x, kk, blur=True)
  single = np.asarray(jax.jit(fn)(images, k))
  mesh = sharding.create_mesh(jax.devices())
  assert mesh.size == 8
  data = sharding.data_sharding(mesh)
  out = jax.jit(fn, in_shardings=(data, data), out_shardings=data)(
      jax.device_put(images, data), jax.device_put(k, data))
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P('data')), 5)
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-6)


def test_bad_impl_is_named():
  with pytest.raises(ValueError, match="'simclrv3'"):
    device_augment.distort_view(jnp.zeros((8, 8, 3)), keys(1)[0],
                                impl='simclrv3')
