"""Supervised baseline: the same ResNet-50 trained from scratch with labels.

SGD with momentum 0.9, lr 0.1·B/256, wd 1e-4, cosine decay after 5 warmup
epochs, 90 epochs, batch 4096, crop + flip augmentation. bfloat16 compute.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.train_mode = 'supervised'
  config.dataset = 'imagenet2012'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 90
  config.warmup_epochs = 5.0
  config.optimizer = 'momentum'
  config.momentum = 0.9
  config.nesterov = False
  config.learning_rate = 0.1
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-4
  config.use_blur = False
  config.lineareval_while_pretraining = False
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  return config_lib.lock(config)
