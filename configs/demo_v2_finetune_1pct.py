"""Offline SimCLRv2 demo, stage 2 of 3: fine-tuning on 1% of the labels.

The network of `demo_v2.py` fine-tuned on the first 40 of the 4,000 train
digits (1%, ~4 a class) as SimCLRv2 §3 fine-tunes on ImageNet's 1% subset
(`imagenet_finetune_1pct.py`): from projection-head layer 1 with a new
zero-initialised classifier, LARS lr 0.005·√B, no weight decay, no warmup,
crop + flip only, 60 epochs. Test top-1 on the 1,000 test digits at the end.
  --config.init_checkpoint=/path/to/demo_v2/workdir
"""
import os
import runpy

import ml_collections


def get_config():
  config = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                       'demo_v2.py'))['get_config']()
  config.train_mode = 'finetune'
  config.init_checkpoint = ''  # Required: set on the command line.
  config.memory_buffer_size = 0
  config.train_split = 'train[:40]'
  config.train_batch_size = 40
  config.train_epochs = 60
  config.train_steps = 0
  config.warmup_epochs = 0.0
  config.optimizer = 'lars'
  config.learning_rate = 0.005
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 0.0
  config.ft_proj_selector = 1
  config.zero_init_logits_layer = True
  config.lineareval_while_pretraining = False
  config.checkpoint_every_steps = 1000
  with config.unlocked():
    config.evals = ml_collections.ConfigDict()  # The classifier's top-1 only.
  return config
