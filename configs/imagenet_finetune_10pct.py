"""Semi-supervised fine-tuning on 10% of ImageNet labels (128,116 images).

Where each value comes from: SimCLRv2 (Chen et al., NeurIPS 2020) §3 and the
reference README's fine-tuning command: tfds `imagenet2012_subset/10pct`;
the whole network fine-tuned from the first projection layer
(ft_proj_selector=1) with a new zero-initialised linear head; LARS (momentum
0.9) lr 0.005·√B, no weight decay, batch 1024, no warmup, crop + flip only,
global BatchNorm; 30 epochs (10% of labels: v2 §3). Start it from a
pretraining run:
  --config.init_checkpoint=/path/to/pretrain/workdir
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.train_mode = 'finetune'
  config.init_checkpoint = ''  # Required: set on the command line.
  config.dataset = 'imagenet2012_subset/10pct'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.train_batch_size = 1024
  config.train_epochs = 30
  config.warmup_epochs = 0.0
  config.optimizer = 'lars'
  config.learning_rate = 0.005
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 0.0
  config.momentum = 0.9
  config.use_blur = False
  config.ft_proj_selector = 1
  config.fine_tune_after_block = -1
  config.lineareval_while_pretraining = False
  config.zero_init_logits_layer = True
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 500
  config.eval_every_steps = 1000
  config.log_every_steps = 50
  return config_lib.lock(config)
