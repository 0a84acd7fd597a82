"""Analytic ResNet FLOPs against published per-image counts."""
import pytest

from simclr_jax.tools import flops

# Multiply-accumulates per 224-px image incl. the 1000-way classifier, as
# published with torchvision's model zoo ("GFLOPS" there counts MACs).
PUBLISHED_GMACS = {18: 1.81, 34: 3.66, 50: 4.09, 101: 7.80, 152: 11.51}


@pytest.mark.parametrize("depth", sorted(PUBLISHED_GMACS))
def test_imagenet_resnet_matches_published(depth):
  got = flops.resnet_forward_flops(depth, image_size=224, num_classes=1000) / 2e9
  assert got == pytest.approx(PUBLISHED_GMACS[depth], abs=0.006)


def test_cifar_resnet18():
  # 0.56 GMACs: the usual figure for ResNet-18 with a 3x3 stride-1 stem at 32 px.
  got = flops.resnet_forward_flops(18, image_size=32, cifar_stem=True) / 2e9
  assert got == pytest.approx(0.556, abs=0.001)


def test_width_multiplier_scales_quadratically_except_stem():
  one = flops.resnet_forward_flops(50, image_size=224)
  two = flops.resnet_forward_flops(50, image_size=224, width_multiplier=2)
  stem_1x = 2 * 112 * 112 * 7 * 7 * 3 * 64
  assert two - 2 * stem_1x == 4 * (one - stem_1x)
  # A fraction: at w = 0.5 every layer has int(c/2) channels.
  half = flops.resnet_forward_flops(50, image_size=224, width_multiplier=0.5)
  assert one - stem_1x == 4 * (half - stem_1x // 2)


def test_head_dense_layers_counted():
  base = flops.resnet_forward_flops(18, image_size=32, cifar_stem=True)
  head = flops.resnet_forward_flops(18, image_size=32, cifar_stem=True, head_dims=(512, 128))
  assert head - base == 2 * (512 * 512 + 512 * 128)


def test_peaks():
  assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.peak_flops_per_device("TPU v4", "bfloat16") == 275e12
  assert flops.peak_flops_per_device("cpu", "float32") is None
  with pytest.raises(ValueError, match="depth 42"):
    flops.resnet_forward_flops(42, image_size=32)
