"""Supervised baseline: the same ResNet-50 trained from scratch with labels.

The standard ImageNet recipe the SimCLR paper compares with (its supervised
ResNet-50 baselines, §6 and Appendix B.8): 90 epochs, crop + flip, momentum
0.9 with Nesterov (the reference's momentum optimizer), lr 0.1·B/256, weight
decay 1e-4; at batch 4096 a 5-epoch warmup then cosine (Goyal et al., 2017:
large-batch SGD). bfloat16 compute.
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
  config.learning_rate = 0.1
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-4
  config.use_blur = False
  config.lineareval_while_pretraining = False
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  return config_lib.lock(config)
