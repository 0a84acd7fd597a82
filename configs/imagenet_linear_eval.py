"""Linear evaluation on ImageNet of a pretrained backbone.

Where each value comes from: the SimCLR paper, Appendix B.6 (Nesterov
momentum 0.9, lr 0.1·B/256 = 1.6 at batch 4096, 90 epochs, no warmup, crop +
flip only) and the reference README's ImageNet linear-eval command (the same,
with weight decay 1e-6 where B.6 uses none; about 64.5 % from a 100-epoch
v1 model). The backbone is frozen (BatchNorm in inference mode); the
classifier reads h (ft_proj_selector 0) and starts at zero. Start it from a
pretraining run:
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
