"""SimCLR v1 ImageNet pretraining: the paper's default setting.

Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations" (ICML 2020). Where each value comes from:
- ResNet-50 1×; 2-layer projection head (one hidden layer + ReLU) to 128-d:
  §2.3 "Default setting", §4.2.
- LARS, lr 4.8 = 0.3·B/256, weight decay 1e-6, batch 4096, 100 epochs,
  10 warmup epochs then cosine: §2.3. (The paper's best models train 1000
  epochs, §6: --config.train_epochs=1000.)
- τ 0.1 with l2-normalised projections: Table 5's best (64.4 % at 100
  epochs).
- Crop + flip, colour distortion strength 1.0 and blur, 224 px: Table 1's
  default policy, Appendix A.
- A linear head on stop_gradient(h) trained during pretraining: Appendix B.6
  (as good as a separate linear evaluation); the reference's default.
Not the paper's: bfloat16 compute with float32 parameters, and the colour
ops in the train step (the host CPU limits at 224 px). The reference README's
command uses weight decay 1e-4 (its v2 code's default); this follows the
paper.
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 100
  config.warmup_epochs = 10.0
  config.optimizer = 'lars'
  config.learning_rate = 0.3
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-6
  config.temperature = 0.1
  config.color_jitter_strength = 1.0
  config.use_blur = True
  config.color_augment = 'device'
  config.resnet_depth = 50
  config.width_multiplier = 1
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 2
  config.proj_out_dim = 128
  config.lineareval_while_pretraining = True
  config.dtype = 'bfloat16'
  # 312 steps an epoch at batch 4096.
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 5000
  config.log_every_steps = 100
  return config_lib.lock(config)
