"""Offline SimCLRv2 demo, stage 1 of 3: pretraining with the memory buffer.

The recipe of `demo.py` (ResNet-18 with the CIFAR stem at 8 px on the
offline `mnist_offline` digits; LARS lr 1.0·B/256, τ 0.5, colour jitter 0.5,
no blur), its values written out so this demo keeps its measured figures
(README, SimCLRv2) whatever becomes of `demo.py`, at half its batch and
two thirds of its steps (the three stages run in minutes on 2 CPU cores),
with SimCLRv2's changes (Chen et al., NeurIPS 2020, §2): a 3-layer
projection head and the memory buffer, sized as the paper's in steps of
history: 64K keys at batch 4096 are the 2·4096 keys of 8 steps, so here
K = 8 · 2 · 64 = 1024. The paper's EMA decay 0.999 averages over ~1000
steps, ten times this run; 0.99 (~100 steps) lets the momentum network
follow. Then:
  configs/demo_v2_finetune_1pct.py  (stage 2: 40 labels)
  configs/demo_v2_distill_1pct.py   (stage 3: self-distillation)
"""
import ml_collections

from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'mnist_offline'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 8
  config.train_batch_size = 64
  config.eval_batch_size = 200
  config.train_epochs = 0
  config.train_steps = 100
  config.warmup_epochs = 0.5
  config.optimizer = 'lars'
  config.learning_rate = 1.0
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-6
  config.temperature = 0.5
  config.color_jitter_strength = 0.5
  config.use_blur = False
  config.resnet_depth = 18
  config.width_multiplier = 1
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 3
  config.proj_out_dim = 64
  config.lineareval_while_pretraining = True
  config.memory_buffer_size = 1024
  config.memory_momentum = 0.99
  config.dtype = 'float32'
  config.cache_dataset = True
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 2
  config.log_every_steps = 10
  config.num_profile_steps = 0
  # The linear probe of demo.py, beside the same probe on a random network.
  config.evals = ml_collections.ConfigDict(dict(probe=dict(
      train_examples=4000, baselines=('random_init',))))
  return config_lib.lock(config)
