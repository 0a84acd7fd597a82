"""SimCLRv2 big-to-small distillation: ResNet-152 3× SK into a ResNet-50 1×.

SimCLRv2 (Chen et al., NeurIPS 2020) Table 3: a ResNet-50 student distilled
from the (self-distilled) ResNet-152 (3×+SK) reaches 73.9 % / 77.5 % top-1
with 1 % / 10 % of the labels. §3: τ = 1.0 for big-to-small distillation;
everything else as self-distillation (`imagenet_distill_1pct.py`: the
unlabeled train images, crop and flip only, LARS, 400 epochs). The teacher
is a fine-tuned (or self-distilled) ResNet-152 3× with selective kernels and
the 3-layer head fine-tuned from layer 1, as the reference's released
r152_3x_sk1 (converted with `simclr_jax.tools.convert_tf2`, or trained here):
  --config.teacher_checkpoint=/path/to/r152_3x_sk1/finetune/workdir
For a self-distilled teacher (no projection head, classifier on h) add
--config.teacher.proj_head_mode=none --config.teacher.ft_proj_selector=0.
"""
import os
import runpy


def get_config():
  base = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                     'imagenet_distill_1pct.py'))
  config = base['get_config']()
  config.distill_temperature = 1.0
  config.teacher.update(dict(resnet_depth=152, width_multiplier=3,
                             sk_ratio=0.0625))
  return config
