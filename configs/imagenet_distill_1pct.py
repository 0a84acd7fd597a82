"""SimCLRv2 self-distillation on ImageNet, the teacher fine-tuned on 1% of labels.

Where each value comes from: SimCLRv2 (Chen et al., NeurIPS 2020) §2
("Self-training / knowledge distillation via unlabeled examples") and §3
("Settings"): the student minimises Eq. (2) on the unlabeled training images
(all of imagenet2012's train split), τ = 0.1 for self-distillation; the
student has the teacher's architecture without the projection head (here:
ResNet-50 1× and a linear classifier on h, proj_head_mode 'none'); crop and
flip only; LARS (momentum 0.9) for 400 epochs with the learning-rate
schedule, weight decay and batch of pretraining (the reference's v2 flags:
lr 0.1·√B = 6.4 at batch 4096, weight decay 1e-4, 10 warmup epochs). The
teacher: the ResNet-50 1× that `imagenet_finetune_1pct.py` fine-tunes from
projection-head layer 1 of a 3-layer head (the reference README's 57.9 %
top-1 for that model). Give its workdir or one of its step directories:
  --config.teacher_checkpoint=/path/to/finetune_1pct/workdir
Distillation alone (distill_alpha 1) is the paper's main setting; with
--config.distill_alpha=0.5 the 1% labels are added (Eq. 3).
"""
from simclr_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.train_mode = 'distill'
  config.teacher_checkpoint = ''  # Required: set on the command line.
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.train_batch_size = 4096
  config.train_epochs = 400
  config.warmup_epochs = 10.0
  config.optimizer = 'lars'
  config.momentum = 0.9
  config.learning_rate = 0.1
  config.learning_rate_scaling = 'sqrt'
  config.weight_decay = 1e-4
  config.use_blur = False  # Crop and flip only.
  config.distill_temperature = 0.1
  config.distill_alpha = 1.0
  config.distill_labeled_dataset = 'imagenet2012_subset/1pct'
  config.distill_labeled_split = 'train'
  # The student: ResNet-50 1x with a linear classifier on h.
  config.resnet_depth = 50
  config.width_multiplier = 1
  config.sk_ratio = 0.0
  config.proj_head_mode = 'none'
  config.ft_proj_selector = 0
  config.lineareval_while_pretraining = False
  # The teacher: the same ResNet, fine-tuned from head layer 1 of 3.
  config.teacher.update(dict(
      resnet_depth=50, width_multiplier=1, sk_ratio=0.0,
      proj_head_mode='nonlinear', num_proj_layers=3, proj_out_dim=128,
      ft_proj_selector=1))
  config.dtype = 'bfloat16'
  config.checkpoint_every_steps = 2500
  config.eval_every_steps = 10000
  return config_lib.lock(config)
