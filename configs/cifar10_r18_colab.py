"""SimCLR on CIFAR-10 at batch 1024 on one 16 GB GPU (a Colab runtime).

`cifar10_r18.py` (the reference README's CIFAR-10 recipe: ResNet-18, CIFAR
stem, 1000 epochs, LARS lr 1.0·B/256, wd 1e-4, τ 0.5) with two changes:
- train_batch_size 1024: the batch of the paper's best CIFAR-10 result
  (SimCLR v1, App. B.9); linear scaling makes the learning rate 4.0;
- micro_batch_size 128: the batch runs in micro-batches of 128 images (256
  views) with the exact NT-Xent gradient of all 1024 images (2046 negatives
  per anchor; simclr_jax/grad_cache.py), at the cost of one extra forward
  pass. BatchNorm statistics are then over each micro-batch (as per-device
  BatchNorm on a GPU cluster), not over the global batch.
Why 128, from the compiled memory analysis (per device, on CPU:
`python -m simclr_jax.tools.bench --config=configs/cifar10_r18.py
--config.train_batch_size=1024 --what=micro --micro_batch_sizes=128,256,512
--steps=0`): the plain step at batch 1024 needs 10.46 GiB, nearly all of
the 75 % of a 16 GB card (≈ 11 GiB of a T4's 15) that XLA takes on a GPU by
default, before cuDNN's workspaces and the evaluators; in micro-batches of
512, 256 or 128 it needs 5.32, 2.76 or 1.48 GiB. 128 leaves room for
`--config.resnet_depth=50` (the paper's CIFAR network: 6.68 GiB in
micro-batches of 128, 50.41 GiB plain) on the same card, and
divides the per-device batch on 1, 2, 4 or 8 GPUs, so the config also runs
unchanged on one node.
"""
import importlib.util
import os


def _cifar10_r18():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'cifar10_r18.py')
  spec = importlib.util.spec_from_file_location('cifar10_r18', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _cifar10_r18()  # Locked: only existing keys can change.
  config.train_batch_size = 1024
  config.micro_batch_size = 128
  return config
