"""SimCLR on CIFAR-10, ResNet-18 with the CIFAR stem (reference README).

Every value is the reference release's README command for CIFAR-10 and its
flags' defaults (google-research/simclr): batch 512, 1000 epochs, LARS lr 1.0
with linear scaling, weight decay 1e-4, τ 0.5, colour jitter 0.5, no blur,
32 px, the default 3-layer projection head and 10 warmup epochs. The README
reports about 91 % for a linear head then trained on the frozen features.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'cifar10'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 32
  config.train_batch_size = 512
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
  config.resnet_depth = 18
  config.width_multiplier = 1
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.lineareval_while_pretraining = True
  config.dtype = 'float32'
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 5000
  config.log_every_steps = 50
  return config_lib.lock(config)
