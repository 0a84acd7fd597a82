"""Linear evaluation on ImageNet of a pretrained backbone.

Frozen backbone (BatchNorm in inference mode, no global BN), a linear
classifier on the pooled representation trained with Nesterov momentum,
lr 0.1·B/256, wd 1e-6, 90 epochs, no warmup, crop + flip augmentation only.
Start it from a pretraining run:
  --config.init_checkpoint=/path/to/pretrain/workdir
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.train_mode = 'linear_eval'
  config.init_checkpoint = ''  # Required: set on the command line.
  config.dataset = 'imagenet2012'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 90
  config.warmup_epochs = 0.0
  config.optimizer = 'momentum'
  config.nesterov = True
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-6
  config.use_blur = False
  config.ft_proj_selector = 0  # Classify the backbone's representation.
  config.lineareval_while_pretraining = False
  config.zero_init_logits_layer = True
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  return config_lib.lock(config)
