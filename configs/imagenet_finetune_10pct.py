"""Semi-supervised fine-tuning on 10% of ImageNet labels (128,116 images).

imagenet_finetune_1pct.py's recipe (SimCLRv2 §3 and the reference README:
from the first projection layer, LARS lr 0.005·√B, no weight decay, batch
1024, crop + flip only) on tfds `imagenet2012_subset/10pct` for 30 epochs
(10 % of labels: v2 §3). Start it from a pretraining run:
  --config.init_checkpoint=/path/to/pretrain/workdir
"""
import os
import runpy

_ONE_PERCENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            'imagenet_finetune_1pct.py')


def get_config():
  config = runpy.run_path(_ONE_PERCENT)['get_config']()
  config.dataset = 'imagenet2012_subset/10pct'
  config.train_epochs = 30
  return config
