"""SimCLRv2 ImageNet pretraining: ResNet-50 2× with selective kernels.

Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised
Learners" (NeurIPS 2020), and the reference release's v2 README. Where each
value comes from:
- ResNet-50 2× with selective kernels (SK ratio 1/16, ResNet-D stem and
  shortcuts): the v2 paper's §2 and its released r50_2x_sk1 model.
- 3-layer projection head, fine-tuning later from its first layer
  (ft_proj_selector=1): v2 §2 and §3.
- LARS (momentum 0.9), lr 6.4 = 0.1·√B at batch 4096, weight decay 1e-4,
  800 epochs, τ 0.1: v2 §3 ("Settings") and the reference's flags.
- 10 warmup epochs: the reference's default (the paper does not restate it).
- Augmentation as v1: crop, flip, colour 1.0, blur, 224 px.
- Memory buffer (v2 §3 "Settings"): 64K (65,536, MoCo's K) projections of a
  momentum network with EMA decay 0.999 (MoCo's m), as extra negatives; the
  paper credits it with ≈ +1 % linear and 1 %-label top-1 (its Appendix D).
  It costs a forward pass of the momentum network over both views per step
  and a second copy of the parameters; --config.memory_buffer_size=0 turns
  it off.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'imagenet2012'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 800
  config.warmup_epochs = 10.0
  config.optimizer = 'lars'
  config.learning_rate = 0.1
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 1e-4
  config.temperature = 0.1
  config.color_jitter_strength = 1.0
  config.use_blur = True
  # Colour jitter, grayscale and blur in the train step: at 224 px they cost
  # the host more CPU than decoding and resizing (README, performance).
  config.color_augment = 'device'
  config.resnet_depth = 50
  config.width_multiplier = 2
  config.sk_ratio = 0.0625
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.proj_out_dim = 128
  config.ft_proj_selector = 1
  config.lineareval_while_pretraining = True
  config.memory_buffer_size = 65536
  config.memory_momentum = 0.999
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 10000
  return config_lib.lock(config)
