"""The SimCLR augmentation's constants, shared by the tf.data ops
(augment.py) and the on-device ones (device_augment.py).

Values of the reference release (`tf2/data_util.py`) and the paper's
Appendix A. Pure Python: importing this loads neither TensorFlow nor JAX.
"""
# Brightness: 'simclrv2' multiplies by U[max(1 − 0.8s, 0), 1 + 0.8s],
# 'simclrv1' adds U[−0.8s, 0.8s].
IMPLS = ('simclrv1', 'simclrv2')

# Random crop (sample_distorted_bounding_box), then bicubic resize.
CROP_MIN_OBJECT_COVERED = 0.1
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # × the output's width/height.
CROP_MAX_ATTEMPTS = 100
CROP_PROPORTION = 0.875  # Eval centre crop, standard for ImageNet.

FLIP_PROB = 0.5
# Colour jitter of strength s: brightness, contrast and saturation factors
# within ±0.8s, hue shift within ±0.2s.
JITTER_PROB = 0.8
BRIGHTNESS_CONTRAST_SATURATION_STRENGTH = 0.8
HUE_STRENGTH = 0.2
GRAYSCALE_PROB = 0.2
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as TF's.
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)


def blur_kernel_size(height: int) -> int:
  """2·((height // 10) // 2) + 1, the reference's kernel (23 at 224 px)."""
  return 2 * ((height // 10) // 2) + 1


def jitter_ranges(strength: float, impl: str) -> dict:
  """(low, high) of each colour-jitter draw at strength s.

  brightness: a factor ('simclrv2') or an offset ('simclrv1'); contrast and
  saturation: factors; hue: a shift of the hue circle (in turns).
  """
  if impl not in IMPLS:
    raise ValueError(f'Unknown impl {impl!r} for random brightness; allowed '
                     f'values: {", ".join(map(repr, IMPLS))}.')
  d = BRIGHTNESS_CONTRAST_SATURATION_STRENGTH * strength
  h = HUE_STRENGTH * strength
  brightness = (max(1.0 - d, 0.0), 1.0 + d) if impl == 'simclrv2' else (-d, d)
  return dict(brightness=brightness, contrast=(1.0 - d, 1.0 + d),
              saturation=(1.0 - d, 1.0 + d), hue=(-h, h))
