"""SimCLR on CIFAR-10, ResNet-50 with the CIFAR stem (SimCLR paper, App. B.9).

Where each value comes from (Chen et al., ICML 2020, Appendix B.9, whose
best model reaches 94.0 % linear evaluation):
- ResNet-50 with a 3×3 stride-1 stem and no max-pool, 32 px: B.9.
- Crop + flip, colour distortion 0.5, no blur: B.9.
- Batch 1024 (the best of 256..4096), τ 0.5 (Fig. B.8: optimal once trained
  past 300 epochs), lr 1.0·B/256 (the middle of B.9's {0.5, 1.0, 1.5}),
  1000 epochs (Fig. B.7's longest).
- Optimizer, weight decay 1e-6, 10 warmup epochs and the 2-layer head: "the
  rest of the settings are the same as our ImageNet training" (B.9, §2.3).
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
  config.weight_decay = 1e-6
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
