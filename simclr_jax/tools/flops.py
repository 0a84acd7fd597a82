"""Analytic FLOP counts for ResNet v1 and accelerator peaks, for MFU.

The count walks the architecture (models/resnet.py) layer by layer, independently of
the Flax code, so the bench can cross-check it against XLA's cost analysis of
the compiled step. A FLOP is a multiply or an add: one multiply-accumulate is
2 FLOPs. Only convolutions and dense layers are counted (BN, ReLU, pooling
and the loss are < 1% for ResNets).
"""

BLOCKS_PER_GROUP = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
    101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3),
}
GROUP_FILTERS = (64, 128, 256, 512)


def _conv_macs(h, w, k, cin, cout, stride):
  out_h, out_w = -(-h // stride), -(-w // stride)  # SAME padding.
  return out_h * out_w * k * k * cin * cout, out_h, out_w


def resnet_forward_flops(depth, *, image_size, width_multiplier=1,
                         cifar_stem=False, head_dims=(), num_classes=0):
  """Forward FLOPs of one image through ResNet v1 (+ optional dense layers).

  Args:
    depth: 18, 34, 50, 101, 152 or 200.
    image_size: square input side in pixels.
    width_multiplier: channel multiplier of every layer.
    cifar_stem: 3×3 stride-1 stem without max-pool instead of 7×7/2 + pool/2.
    head_dims: widths of dense layers after pooling (the projection head).
    num_classes: width of a final classifier (0 for none).
  Returns:
    FLOPs (2 × multiply-accumulates) for one image, forward only.
  """
  if depth not in BLOCKS_PER_GROUP:
    raise ValueError(f"resnet depth {depth} not in {sorted(BLOCKS_PER_GROUP)}")
  bottleneck = depth >= 50
  expansion = 4 if bottleneck else 1
  h = w = image_size
  stem_width = int(64 * width_multiplier)  # As the model: int(64·w).
  if cifar_stem:
    macs, h, w = _conv_macs(h, w, 3, 3, stem_width, 1)
  else:
    macs, h, w = _conv_macs(h, w, 7, 3, stem_width, 2)
    h, w = -(-h // 2), -(-w // 2)  # 3×3/2 max-pool.
  cin = stem_width
  for group, num_blocks in enumerate(BLOCKS_PER_GROUP[depth]):
    filters = int(GROUP_FILTERS[group] * width_multiplier)
    for block in range(num_blocks):
      stride = 2 if (block == 0 and group > 0) else 1
      cout = filters * expansion
      if cin != cout or stride != 1:  # Projection shortcut (1×1, strided).
        m, _, _ = _conv_macs(h, w, 1, cin, cout, stride)
        macs += m
      if bottleneck:  # 1×1 reduce, 3×3 (carries the stride), 1×1 expand.
        m1, _, _ = _conv_macs(h, w, 1, cin, filters, 1)
        m2, oh, ow = _conv_macs(h, w, 3, filters, filters, stride)
        m3, _, _ = _conv_macs(oh, ow, 1, filters, cout, 1)
        macs += m1 + m2 + m3
      else:
        m1, oh, ow = _conv_macs(h, w, 3, cin, filters, stride)
        m2, _, _ = _conv_macs(oh, ow, 3, filters, filters, 1)
        macs += m1 + m2
      h, w, cin = oh, ow, cout
  for dim in tuple(head_dims) + ((num_classes,) if num_classes else ()):
    macs += cin * dim
    cin = dim
  return 2 * macs


def train_step_flops(forward_flops_per_image, images_per_step):
  """Forward + backward ≈ 3× forward (input and weight gradients, 1× each)."""
  return 3 * forward_flops_per_image * images_per_step


# Dense peak FLOP/s per JAX device, by device_kind substring and compute dtype.
# On TPU v2/v3 a JAX device is one TensorCore (half a chip); from v4 on, one chip.
# Sources: Cloud TPU system architecture pages; NVIDIA A100/H100/H200 datasheets
# (SXM, dense, no sparsity; float32 = TF32 tensor-core rate).
PEAK_FLOPS = (
    ("TPU v3", {"bfloat16": 61.5e12, "float32": 61.5e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
)


def peak_flops_per_device(device_kind, dtype):
  """Peak FLOP/s of one device, or None where unknown (CPUs)."""
  for kind, peaks in PEAK_FLOPS:
    if kind.lower() in device_kind.lower():
      return peaks.get(str(dtype))
  return None


def vit_forward_flops(*, image_size, patch_size, hidden_size, depth,
                      mlp_ratio=4, class_token=True, head_dims=(),
                      num_classes=0, in_channels=3):
  """Forward FLOPs of one image through a ViT encoder (+ optional dense layers).

  Counts the matmuls (2 FLOPs per multiply-accumulate), with T tokens
  (the (image_size/patch_size)² patches, plus the class token if any) and
  width D:
  - patch projection: patches · p²·C · D;
  - per block: query, key, value and output projections 4·T·D², the MLP
    2·mlp_ratio·T·D², the attention logits Q·Kᵀ and the weighted sum of
    the values T²·D each (over all heads together);
  - dense layers after pooling (projection head, classifier).
  Ignored: biases, LayerNorms, softmax, GELU, residual and position-embedding
  adds, pooling: O(T·D) or O(heads·T²) element-wise work. XLA's cost analysis
  counts them and comes out 2.9 % higher at ViT-S/16, 224 px, 2.5 points of
  which are the exact GELU (XLA counts its erf as 64 FLOPs an element).

  Args:
    image_size: square input side in pixels, a multiple of patch_size.
    patch_size: patch side p.
    hidden_size: width D.
    depth: number of encoder blocks.
    mlp_ratio: MLP width over D.
    class_token: whether a class token is prepended (token pooling).
    head_dims: widths of dense layers after pooling.
    num_classes: width of a final classifier (0 for none).
    in_channels: image channels C.
  Returns:
    FLOPs for one image, forward only.
  """
  if image_size % patch_size:
    raise ValueError(f"image_size {image_size} is not divisible by "
                     f"patch_size {patch_size}")
  patches = (image_size // patch_size) ** 2
  tokens = patches + (1 if class_token else 0)
  d = hidden_size
  macs = patches * patch_size * patch_size * in_channels * d
  per_block = ((4 + 2 * mlp_ratio) * tokens * d * d   # Projections and MLP.
               + 2 * tokens * tokens * d)             # Q·Kᵀ and weights·V.
  macs += depth * per_block
  cin = d
  for dim in tuple(head_dims) + ((num_classes,) if num_classes else ()):
    macs += cin * dim
    cin = dim
  return 2 * macs
