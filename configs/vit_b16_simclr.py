"""SimCLR with a ViT-B/16 on ImageNet: configs/vit_s16_simclr.py's recipe.

`--config=configs/vit_b16_simclr.py` pretrains, `...:linear_eval` probes.

The same MoCo v3 recipe (Chen, Xie & He, ICCV 2021; every value's source is
in vit_s16_simclr.py) with the ViT-B/16 of their Table 2 (12 blocks, width
768, 12 heads, 86 M parameters). lr 2e-4 and weight decay 0.1 are exactly
their SimCLR ViT-B/16 setting (Fig. 6, 100 epochs); Table 4 reports 73.9 %
linear accuracy for SimCLR with ViT-B/16 after 300 epochs.
"""
import importlib.util
import os

_SMALL = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'vit_s16_simclr.py')


def _small_config_module():
  spec = importlib.util.spec_from_file_location('vit_s16_simclr', _SMALL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(mode='pretrain'):
  config = _small_config_module().get_config(mode)
  with config.unlocked():
    config.vit_variant = 'B/16'
    config.vit_num_heads = 0  # The variant's 12.
  return config
