"""SimCLR v1 ImageNet pretraining, the paper's recipe.

ResNet-50 1×, global batch 4096, 100 epochs (`--config.train_epochs=800` or
1000 for the longer runs), LARS lr 0.3·B/256 = 4.8, wd 1e-6, τ 0.1, 10 warmup
epochs, color jitter 1.0 + blur, 224 px, 3-layer projection head to 128-d,
linear eval while pretraining (stop-gradient head). bfloat16 compute, float32
parameters (TPU/GPU). Expected linear eval top-1 at 100 epochs: 64.6%.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 100
  config.warmup_epochs = 10.0
  config.optimizer = 'lars'
  config.learning_rate = 0.3
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-6
  config.temperature = 0.1
  config.color_jitter_strength = 1.0
  config.use_blur = True
  # Colour jitter, grayscale and blur in the train step: at 224 px they cost
  # the host more CPU than decoding and resizing (README, performance).
  config.color_augment = 'device'
  config.resnet_depth = 50
  config.width_multiplier = 1
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.proj_out_dim = 128
  config.lineareval_while_pretraining = True
  config.dtype = 'bfloat16'
  # 312 steps an epoch at batch 4096.
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  config.log_every_steps = 100
  return config_lib.lock(config)
