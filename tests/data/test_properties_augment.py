"""Property tests (hypothesis): any image size and content gives a valid view.

Augmentations are always in [0, 1] with the requested shape.
Eager TF (no tf.function), so every new shape costs no retrace.
"""
from hypothesis import example, given, settings, strategies as st
import numpy as np
import tensorflow as tf

from simclr_jax.data import augment
from simclr_jax.data import augment_constants

sizes = st.integers(min_value=1, max_value=72)
out_sizes = st.integers(min_value=8, max_value=48)


@st.composite
def images(draw):
  h, w = draw(sizes), draw(sizes)
  channels = draw(st.sampled_from([1, 3]))
  kind = draw(st.sampled_from(['random', 'constant', 'extremes']))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  if kind == 'random':
    x = rng.integers(0, 256, (h, w, channels))
  elif kind == 'constant':
    x = np.full((h, w, channels), draw(st.integers(0, 255)))
  else:  # Only 0 and 255: worst case for the bicubic overshoot.
    x = rng.integers(0, 2, (h, w, channels)) * 255
  x = x.astype(np.uint8)
  if draw(st.booleans()):
    return x.astype(np.float32) / 255.0  # Float input in [0, 1].
  return x


def check(out, height, width):
  out = out.numpy()
  assert out.shape == (height, width, 3) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  assert out.min() >= 0.0 and out.max() <= 1.0


@settings(max_examples=25, deadline=None)
@given(image=images(), height=out_sizes, width=out_sizes,
       strength=st.floats(0.0, 1.5), impl=st.sampled_from(augment_constants.IMPLS),
       blur=st.booleans(), crop=st.booleans(), color=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_train_view_in_unit_range_with_requested_shape(
    image, height, width, strength, impl, blur, crop, color, seed):
  out = augment.preprocess_for_train(
      tf.constant(image), height, width, seed=tf.constant([seed, 1], tf.int64),
      color_jitter_strength=strength, impl=impl, blur=blur, crop=crop,
      color_distort=color)
  check(out, height, width)


@settings(max_examples=15, deadline=None)
@given(image=images(), height=out_sizes, width=out_sizes, crop=st.booleans())
# A 1-px image whose centre crop at aspect 14/8 rounds to 0 rows.
@example(image=np.array([[[217]]], np.uint8), height=8, width=14, crop=True)
def test_eval_view_in_unit_range_with_requested_shape(image, height, width,
                                                      crop):
  check(augment.preprocess_for_eval(tf.constant(image), height, width,
                                    crop=crop), height, width)
