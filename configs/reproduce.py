"""Base of the paper-findings grid (`python -m simclr_jax.reproduce`).

The demo recipe (configs/demo.py, where every value is explained) with the
ResNet-18 at a quarter of the width (channels 16..128, h is 128-d), trained
for 200 steps (6.4 epochs). The grid trains 13 distinct configs × 3 seeds; at
the demo's 3/4 width a step costs about 4.3 CPU-s, hours for the grid on 2
CPU cores, while the quarter width costs about 0.6 CPU-s a step and brings
the grid within the hour. Its probe is a few points below the demo's, which
compares variants of the same recipe, not the demo's absolute numbers.
"""
import os
import runpy


def get_config():
  config = runpy.run_path(os.path.join(os.path.dirname(__file__),
                                       'demo.py'))['get_config']()
  config.width_multiplier = 0.25
  config.train_steps = 200
  config.demo_plot = False  # The grid draws results.png instead.
  return config
