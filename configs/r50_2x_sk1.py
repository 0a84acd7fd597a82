"""SimCLRv2 ImageNet pretraining: ResNet-50 2× with selective kernels.

SimCLRv2 (Chen et al., NeurIPS 2020) and the reference's v2 README: SK ratio
1/16 (with the ResNet-D stem and shortcut), 3-layer projection head, LARS
lr 0.1·√B = 6.4 at B=4096, wd 1e-4, τ 0.1, 800 epochs; fine-tuning then starts
from the first projection layer (ft_proj_selector=1). bfloat16 compute.
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
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 10000
  return config_lib.lock(config)
