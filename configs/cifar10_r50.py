"""SimCLR on CIFAR-10, ResNet-50 with the CIFAR stem (paper appendix B.9).

Batch 1024, τ 0.5, color jitter 0.5, no blur, 32 px (CIFAR stem: 3×3 stride-1
conv, no max-pool), LARS lr 1.0·B/256, wd 1e-4 (reference README), 1000 epochs,
2-layer projection head as in v1. Paper: 94.0% linear eval.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 32
  config.train_batch_size = 1024
  config.eval_batch_size = 1000
  config.train_epochs = 1000
  config.warmup_epochs = 10.0
  config.optimizer = 'lars'
  config.learning_rate = 1.0
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-4
  config.temperature = 0.5
  config.color_jitter_strength = 0.5
  config.use_blur = False
  config.resnet_depth = 50
  config.width_multiplier = 1
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 2
  config.lineareval_while_pretraining = True
  config.dtype = 'float32'
  # 48 steps an epoch at batch 1024.
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 5000
  config.log_every_steps = 50
  return config_lib.lock(config)
