"""Offline SimCLRv2 demo, stage 3 of 3: self-distillation.

A student of the demo's ResNet-18 (with a linear classifier on h, no
projection head) learns from the frozen teacher of
`demo_v2_finetune_1pct.py` on all 4,000 train digits without their labels,
as SimCLRv2 §2/§3 (`imagenet_distill_1pct.py`): the distillation loss of
Eq. (2) at τ = 0.1, crop + flip only, LARS with pretraining's learning rate
and weight decay, from a random initialisation. Test top-1 at the end.
  --config.teacher_checkpoint=/path/to/demo_v2_finetune_1pct/workdir
"""
import os
import runpy

import ml_collections


def get_config():
  config = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                       'demo_v2.py'))['get_config']()
  teacher = dict(resnet_depth=config.resnet_depth,
                 width_multiplier=config.width_multiplier,
                 sk_ratio=config.sk_ratio,
                 proj_head_mode=config.proj_head_mode,
                 num_proj_layers=config.num_proj_layers,
                 proj_out_dim=config.proj_out_dim, ft_proj_selector=1)
  config.train_mode = 'distill'
  config.teacher_checkpoint = ''  # Required: set on the command line.
  config.teacher.update(teacher)
  config.memory_buffer_size = 0
  config.distill_temperature = 0.1
  config.distill_alpha = 1.0
  config.proj_head_mode = 'none'
  config.train_steps = 200
  config.ft_proj_selector = 0
  config.lineareval_while_pretraining = False
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()  # The classifier's top-1 only.
  return config
