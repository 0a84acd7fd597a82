"""Offline demo with a Vision Transformer: SimCLR on 4,000 MNIST digits on CPU.

`python -m simclr_jax.main --config=configs/demo_vit.py --workdir=/tmp/vit_demo`

configs/demo.py with the ResNet swapped for a ViT-Ti and MoCo v3's recipe
for contrastive ViT training (Chen, Xie & He, ICCV 2021) around it: AdamW
with warmup, cosine decay and weight decay, a frozen random patch
projection, the fixed 2-D sin-cos position embedding, the class token as h,
BatchNorm in every projection-head layer, the output's without scale. What
is changed for a few minutes on a CPU: 16 px images in 8 px patches (four
patch tokens and the class token), a narrower head, τ and the jitter of
the demo, a higher learning rate and a one-epoch warmup (150 steps in
all). At the end the linear probe is compared with the same probe on a
randomly initialised ViT and on the raw pixels. (A random ViT-Ti is a
strong feature extractor here: the margin is small; `--config.vit_variant
=mu/4 --config.train_steps=1000` shows a clearer one on a weaker network.)
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'mnist_offline'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 16
  config.train_batch_size = 128
  config.eval_batch_size = 200
  config.train_epochs = 0
  config.train_steps = 150
  config.warmup_epochs = 1.0
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3  # ×B/256: 1e-3 at batch 128.
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 0.05
  config.temperature = 0.2
  config.color_jitter_strength = 0.5
  config.use_blur = False
  config.model = 'vit'
  config.vit_variant = 'Ti/8'
  config.vit_pooling = 'token'
  config.vit_position_embedding = 'sincos2d'
  config.vit_frozen_patch_embedding = True
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.proj_hidden_dim = 256
  config.proj_out_dim = 64
  config.proj_head_bn = True
  config.proj_out_bn_scale = False
  config.lineareval_while_pretraining = True
  config.dtype = 'float32'
  config.cache_dataset = True
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 2
  config.eval_every_steps = 0
  config.log_every_steps = 10
  config.num_profile_steps = 0
  config.evals.probe = dict(train_examples=4000,
                            baselines=('random_init', 'raw_pixels'))
  return config_lib.lock(config)
