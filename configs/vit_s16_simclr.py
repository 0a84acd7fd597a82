"""SimCLR with a ViT-S/16 on ImageNet: MoCo v3's recipe for contrastive ViTs.

`--config=configs/vit_s16_simclr.py` pretrains; `...vit_s16_simclr.py:
linear_eval --config.init_checkpoint=WORKDIR` is MoCo v3's linear probe of
the result (same architecture keys, so the checkpoint fits).

Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers" (MoCo v3, ICCV 2021), which trained SimCLR with ViTs (Table 4:
69.0 % linear accuracy for ViT-S/16 and 73.9 % for ViT-B/16 after 300
epochs). Where each value comes from:
- ViT-S/16 with 12 heads (their Table 2; DeiT's ViT-S has 6), class token
  after the final LayerNorm as h (§5 "ViT architecture").
- Frozen random patch projection (§4.2: the stability trick, used for every
  framework in Table 4; +0.8 points for SimCLR in Fig. 6) and the fixed 2-D
  sin-cos position embedding (§5, ablation in §6.2).
- AdamW, batch 4096, lr·B/256 (the linear scaling rule, §4.1), 40 warmup
  epochs then cosine (§5), 300 epochs (Table 4).
- lr 2e-4 and weight decay 0.1: the SimCLR ViT-B/16 setting of Fig. 6
  (100 epochs). Table 4's 300-epoch runs swept lr and wd per framework and
  do not publish the values; MoCo v3's own ViT-S/B use lr 1.5e-4, wd 0.1
  (their CONFIG.md).
- Projection head: 3 layers, hidden 4096, output 256, BatchNorm after every
  layer (§5 "MLP heads", "following SimCLR"); the output BN has no scale
  either (their `moco/builder.py`: BatchNorm1d(affine=False)).
- τ 0.2: MoCo v3's (§5 "Loss"); the paper does not give SimCLR's τ for ViT
  (SimCLR's ResNet recipe uses 0.1). MoCo v3 also multiplies its loss by
  2τ; under Adam a constant factor on the loss cancels (up to ε), so it is
  left out.
Not theirs: the augmentation is SimCLR's (crop, flip, colour jitter,
grayscale, blur; MoCo v3 adds BYOL's solarization), bfloat16 compute with
float32 parameters, the colour ops in the train step, and a linear head on
stop_gradient(h) trained alongside (SimCLR's monitor).

linear_eval (§5 "Linear probing" and their CONFIG.md): SGD momentum 0.9,
lr 3·B/256 at batch 1024, no weight decay, 90 epochs, cosine, no warmup,
crop and flip only, on the frozen class token.
"""
from simclr_jax import config as config_lib

MODES = ('pretrain', 'linear_eval')


def architecture(config):
  """The ViT and head keys (pretraining and linear eval must agree)."""
  config.image_size = 224
  config.model = 'vit'
  config.vit_variant = 'S/16'
  config.vit_num_heads = 12
  config.vit_pooling = 'token'
  config.vit_position_embedding = 'sincos2d'
  config.vit_frozen_patch_embedding = True
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.proj_hidden_dim = 4096
  config.proj_out_dim = 256
  config.proj_head_bn = True
  config.proj_out_bn_scale = False
  config.dtype = 'bfloat16'
  return config


def get_config(mode='pretrain'):
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; expected one of {MODES}')
  config = architecture(config_lib.base_config())
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  if mode == 'linear_eval':
    config.train_mode = 'linear_eval'
    config.init_checkpoint = ''  # Required: set on the command line.
    config.train_batch_size = 1024
    config.train_epochs = 90
    config.warmup_epochs = 0.0
    config.optimizer = 'momentum'
    config.nesterov = False
    config.momentum = 0.9
    config.learning_rate = 3.0
    config.learning_rate_scaling = 'linear'
    config.weight_decay = 0.0
    config.use_blur = False
    config.ft_proj_selector = 0
    config.lineareval_while_pretraining = False
    config.checkpoint_every_steps = 2500
    config.eval_every_steps = 5000
    return config_lib.lock(config)
  config.train_batch_size = 4096
  config.train_epochs = 300
  config.warmup_epochs = 40.0
  config.optimizer = 'adamw'
  config.learning_rate = 2e-4
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 0.1
  config.temperature = 0.2
  config.color_jitter_strength = 1.0
  config.use_blur = True
  config.color_augment = 'device'
  config.lineareval_while_pretraining = True
  # 312 steps an epoch at batch 4096.
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  config.log_every_steps = 100
  return config_lib.lock(config)
