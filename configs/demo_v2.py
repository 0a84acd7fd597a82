"""Offline SimCLRv2 demo, stage 1 of 3: pretraining with the memory buffer.

`demo.py` (ResNet-18, CIFAR stem, 8 px, on the offline `mnist_offline`
digits) with SimCLRv2's changes (Chen et al., NeurIPS 2020, §2): a 3-layer
projection head and the memory buffer, sized as the paper's in steps of
history: 64K keys at batch 4096 are the 2·4096 keys of 8 steps, so here
K = 8 · 2 · 128 = 2048. The paper's EMA decay 0.999 averages over ~1000
steps, longer than this whole run; 0.99 (~100 steps) lets the momentum
network follow a run of a few hundred steps. Then:
  configs/demo_v2_finetune_1pct.py  (stage 2: 40 labels)
  configs/demo_v2_distill_1pct.py   (stage 3: self-distillation)
"""
import os
import runpy


def get_config():
  config = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                       'demo.py'))['get_config']()
  config.num_proj_layers = 3
  config.memory_buffer_size = 2048
  config.memory_momentum = 0.99
  return config
