"""SimCLR colour distortion and blur in JAX, run inside the train step.

With `config.color_augment = 'device'` the host pipeline only decodes, crops,
flips and resizes (data/pipeline.py), and the colour jitter, grayscale and
gaussian blur of the reference (data/augment.py) run here, on the accelerator, fused by XLA into
the train step. On a GPU/TPU host the tf.data colour ops cost more CPU per
view than decoding and resizing together (the hue and saturation kernels
convert every pixel to HSV and back); on the accelerator they are a few
elementwise passes over the batch. The reference already runs its blur on the
accelerator for the same reason.

The math is that of data/augment.py (and of TF's `adjust_*` kernels, which
tests/test_device_augment.py checks op by op):
  brightness  x·U[max(1 − 0.8s, 0), 1 + 0.8s] ('simclrv2'), x + U[±0.8s] ('simclrv1')
  contrast    (x − mean)·U[1 − 0.8s, 1 + 0.8s] + mean   (mean per channel)
  saturation  S·U[1 − 0.8s, 1 + 0.8s] in HSV, S clipped to [0, 1]
  hue         H + U[−0.2s, 0.2s] in HSV (mod 1)
in a uniformly random order, each followed by a clip to [0, 1], all with
p = 0.8; then grayscale with p = 0.2; then (blur) a gaussian blur with p = 0.5,
σ ~ U[0.1, 2], kernel 2·((H // 10) // 2) + 1, border-normalised as on the host.

Every random draw of a view comes from that view's key, which the host
pipeline derives from (seed, epoch, global example index, view) and ships in
the batch as raw uint32 key data: the views are the same on any number of
devices or hosts, and a resumed run redraws exactly the same ones.
"""
import jax
import jax.numpy as jnp

from simclr_jax.data import augment_constants as C


def _channels(x):
  return x[..., 0], x[..., 1], x[..., 2]


def adjust_brightness(x, factor, impl='simclrv2'):
  return x * factor if impl == 'simclrv2' else x + factor


def adjust_contrast(x, factor):
  """tf.image.adjust_contrast: (x − mean)·factor + mean, mean per channel."""
  mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
  return (x - mean) * factor + mean


def adjust_saturation(x, factor):
  """tf.image.adjust_saturation for factor ≥ 0, without the HSV round trip.

  With V = max and m = min over channels, HSV's S = (V − m)/V and every
  channel satisfies V − c = V·S·g(H) for a g fixed by the hue. Scaling S to
  S' = min(S·factor, 1) at fixed H and V therefore maps each channel to
  V − (V − c)·S'/S, with S'/S = min(factor, V/(V − m)); grey pixels
  (V = m) stay as they are.
  """
  r, g, b = _channels(x)
  v = jnp.maximum(jnp.maximum(r, g), b)[..., None]
  m = jnp.minimum(jnp.minimum(r, g), b)[..., None]
  chroma = v - m
  ratio = jnp.minimum(factor, v / jnp.where(chroma > 0, chroma, 1.0))
  return jnp.where(chroma > 0, v - (v - x) * ratio, x)


def adjust_hue(x, delta):
  """tf.image.adjust_hue: H ← (H + delta) mod 1 in HSV, S and V kept."""
  r, g, b = _channels(x)
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of the circle, [0, 6), as TF's rgb_to_hsv computes it.
  h6 = jnp.where(v == r, (g - b) / safe,
                 jnp.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
  h6 = jnp.where(chroma > 0, h6, 0.0)
  h6 = jnp.mod(h6 + 6.0 * delta, 6.0)

  # hsv_to_rgb: channel n ∈ (5, 3, 1) for (r, g, b) is
  # V − C·clip(min(k, 4 − k), 0, 1) with k = (n + H6) mod 6.
  def channel(n):
    k = jnp.mod(n + h6, 6.0)
    return v - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def to_grayscale(x):
  """ITU-R 601 luma, kept as three equal channels."""
  luma = sum(w * c for w, c in zip(C.GRAY_WEIGHTS, _channels(x)))
  return jnp.repeat(luma[..., None], 3, axis=-1)


def blur_matrix(length, sigma, radius):
  """[length, length] banded gaussian, rows normalised inside the image."""
  idx = jnp.arange(length)
  d = (idx[None, :] - idx[:, None]).astype(jnp.float32)
  w = jnp.where(jnp.abs(d) <= radius, jnp.exp(-d * d / (2.0 * sigma * sigma)),
                0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def gaussian_blur(x, sigma, kernel_size):
  """Separable, border-normalised gaussian blur of one [H, W, C] image."""
  radius = kernel_size // 2
  blur_h = blur_matrix(x.shape[0], sigma, radius)
  blur_w = blur_matrix(x.shape[1], sigma, radius)
  # Default matmul precision, as the reference's on-accelerator blur: on
  # TPU/GPU the products may round to bf16/tf32, ≲ 1e-3 of a pixel value.
  return jnp.einsum('ij,jkc,lk->ilc', blur_h, x, blur_w)


def jitter_params(key, strength, impl='simclrv2'):
  """The random draws of one colour jitter: (order [4], factors [4]).

  order is a uniformly random permutation of the ops (0 brightness,
  1 contrast, 2 saturation, 3 hue); factors holds each op's factor (for hue,
  its delta), drawn from the ranges in the module docstring.
  """
  ranges = C.jitter_ranges(strength, impl)
  order_key, *op_keys = jax.random.split(key, 5)
  factors = jnp.stack([
      jax.random.uniform(k, (), minval=ranges[op][0], maxval=ranges[op][1])
      for k, op in zip(op_keys, ('brightness', 'contrast', 'saturation',
                                 'hue'))])
  order = jnp.argsort(jax.random.uniform(order_key, (4,)))
  return order, factors


def apply_jitter(x, order, factors, impl='simclrv2'):
  """The four ops in `order`, each followed by a clip to [0, 1]."""
  ops = [lambda y: adjust_brightness(y, factors[0], impl),
         lambda y: adjust_contrast(y, factors[1]),
         lambda y: adjust_saturation(y, factors[2]),
         lambda y: adjust_hue(y, factors[3])]
  for i in range(4):
    x = jnp.clip(jax.lax.switch(order[i], ops, x), 0.0, 1.0)
  return x


def color_jitter(x, key, strength, impl='simclrv2'):
  """Brightness, contrast, saturation and hue of strength s, random order.

  With strength 0 every factor is the identity (as in the reference).
  """
  order, factors = jitter_params(key, strength, impl)
  return apply_jitter(x, order, factors, impl)


def distort_view(x, key, *, strength=1.0, impl='simclrv2', blur=False):
  """Colour jitter (p 0.8), grayscale (p 0.2), [blur (p 0.5)] of one view.

  Args:
    x: float [H, W, 3] in [0, 1].
    key: a PRNG key (typed, or raw uint32 [2] threefry key data).
    strength: s of the colour jitter.
    impl: 'simclrv2' (multiplicative brightness) or 'simclrv1' (additive).
    blur: the gaussian blur (ImageNet yes, CIFAR no).
  """
  C.jitter_ranges(strength, impl)  # Checks impl before tracing.
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key, impl='threefry2x32')
  keys = jax.random.split(key, 5)
  jitter_u, gray_u, blur_u = (jax.random.uniform(k) for k in keys[:3])
  x = jnp.where(jitter_u < C.JITTER_PROB,
                color_jitter(x, keys[3], strength, impl), x)
  x = jnp.where(gray_u < C.GRAYSCALE_PROB, to_grayscale(x), x)
  kernel_size = C.blur_kernel_size(x.shape[0])
  if blur and kernel_size > 1:
    sigma = jax.random.uniform(keys[4], (), minval=C.BLUR_SIGMA_RANGE[0],
                               maxval=C.BLUR_SIGMA_RANGE[1])
    x = jnp.where(blur_u < C.BLUR_PROB,
                  jnp.clip(gaussian_blur(x, sigma, kernel_size), 0.0, 1.0), x)
  return x


def distort_views(images, keys, **kwargs):
  """`distort_view` over a batch: images [..., H, W, 3], keys [..., 2] uint32."""
  lead = images.shape[:-3]
  flat = jax.vmap(lambda x, k: distort_view(x, k, **kwargs))(
      images.reshape((-1,) + images.shape[-3:]),
      keys.reshape((-1,) + keys.shape[len(lead):]))
  return flat.reshape(images.shape).astype(images.dtype)
