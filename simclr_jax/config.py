"""What a config is: the one set of defaults, the allowed values, validation
and the schedule's step counts.

Every experiment in `configs/` is `base_config()` plus the fields it changes,
locked so that an override naming a key that does not exist (a typo) fails.
The keys are the reference release's flag names. Other modules read the
config's keys and keep no defaults of their own: a default lives here only.

`validate(config)` runs before anything is compiled or written: each problem
is one `ConfigError` whose message names the key, the bad value and what is
allowed. `validate_for_devices` adds the checks that need the device and
process counts (known once the multi-host job has started).
"""
import math

import ml_collections

from simclr_jax.data import augment_constants

TRAIN_MODES = ('pretrain', 'linear_eval', 'finetune', 'supervised', 'distill')
OPTIMIZERS = ('lars', 'momentum', 'adam', 'adamw')
MODELS = ('resnet', 'vit')
LEARNING_RATE_SCALINGS = ('linear', 'sqrt')
PROJ_HEAD_MODES = ('none', 'linear', 'nonlinear')
RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
DTYPES = ('float32', 'bfloat16')
AUGMENTATION_IMPLS = augment_constants.IMPLS
# Where the colour jitter, grayscale and blur of pretraining run: in tf.data
# on the host CPU, or in the train step on the accelerator.
COLOR_AUGMENT_PLACES = ('host', 'device')
# The CIFAR stem (image_size <= 32) keeps full resolution and the three strided
# block groups halve it: below 8 px the last groups would convolve padding.
# Above 32 px the ImageNet stem (÷4) and the groups (÷8) leave >= 1 px.
MIN_IMAGE_SIZE = 8


class ConfigError(ValueError):
  """A config that cannot run; the message is one line for the user."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments: the paper's ImageNet pretraining.

  Not locked: experiment files change fields and then call `lock()`.
  """
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = 'imagenet2012'
  c.data_dir = ''  # '' = tfds default (TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.image_size = 224
  c.color_jitter_strength = 1.0
  # The random crop's smallest area, a fraction of the image (the paper's
  # 0.08; its largest is the whole image).
  c.crop_area_min = 0.08
  c.use_blur = True
  # False: pretraining views are the whole image, not random crops (the
  # paper's Figure 5 ablation: without cropping the representation suffers).
  c.random_crop = True
  c.augmentation_impl = 'simclrv2'  # brightness: simclrv2 ×, simclrv1 +.
  # 'device': colour jitter, grayscale and blur run in the train step (the
  # host only decodes, crops, flips, resizes): for hosts whose CPU limits.
  c.color_augment = 'host'
  c.cache_dataset = False  # Keep the encoded records in memory (small sets).
  # Examples in the shuffle buffer of each host; 0: the reference's host
  # batch × 50 at <= 32 px, × 10 above.
  c.shuffle_buffer_size = 0
  # Batches are global (all devices of all hosts).
  c.train_batch_size = 4096
  c.eval_batch_size = 256
  # > 0: pretrain in micro-batches of this many images (2 views each) per
  # device, with the exact NT-Xent gradient of the whole global batch (the
  # gradient cache, grad_cache.py); BatchNorm statistics are then over each
  # micro-batch on its device. 0: one pass, BatchNorm over the global batch.
  c.micro_batch_size = 0
  # Schedule: train_steps > 0 overrides train_epochs.
  c.train_epochs = 100
  c.train_steps = 0
  c.warmup_epochs = 10.0
  c.learning_rate = 0.3
  c.learning_rate_scaling = 'linear'
  # Optimizer.
  c.optimizer = 'lars'
  c.momentum = 0.9
  # momentum optimizer only: the reference's is always Nesterov.
  c.nesterov = True
  c.weight_decay = 1e-6
  c.lars_eeta = 1e-3
  # Loss.
  c.temperature = 0.1
  c.hidden_norm = True
  # Gradient clipping to this global norm before the optimizer; 0: none.
  # Not part of the SimCLR or MoCo v3 recipes (MoCo v3 found clipping only
  # the patch projection helps when the threshold is so small that it
  # freezes it); a guard for unstable runs.
  c.grad_clip_norm = 0.0
  # Backbone: 'resnet' (the resnet_depth, width_multiplier and sk_ratio
  # keys) or 'vit' (the vit_* keys). The other backbone's keys must keep
  # their defaults, so a key that would be ignored is refused instead.
  c.model = 'resnet'
  c.resnet_depth = 50
  c.width_multiplier = 1.0  # Channels int(64·w)...: fractions allowed.
  c.sk_ratio = 0.0
  # ViT (models/vit.py): 'SIZE/PATCH', SIZE one of mu, Ti, S, B, L, PATCH one
  # of 4, 8, 14, 16, 32 (image_size must be a multiple).
  c.vit_variant = 'S/16'
  c.vit_num_heads = 0  # 0: the variant's (DeiT's 6 for S; MoCo v3 uses 12).
  # 'token': h is the class token (ViT, MoCo v3); 'gap': the mean of the
  # patch tokens.
  c.vit_pooling = 'token'
  # MoCo v3's stability recipe (Chen, Xie & He, ICCV 2021, §4.2, §5): a
  # patch projection that stays at its random init (gradient spikes start
  # there; freezing it smooths training and adds 0.8 points for SimCLR,
  # Fig. 6) and the fixed 2-D sin-cos position embedding (their default;
  # 'learned': ViT's, 0.4 points lower there).
  c.vit_frozen_patch_embedding = True
  c.vit_position_embedding = 'sincos2d'
  # Projection head. num_proj_layers 3 is the reference's default
  # (SimCLRv2); the v1 paper's head has one hidden layer (2).
  c.proj_head_mode = 'nonlinear'
  c.num_proj_layers = 3
  c.proj_out_dim = 128
  # Width of the hidden layers; 0: the width of h (the reference). MoCo v3's
  # ViT heads: 4096.
  c.proj_hidden_dim = 0
  # BatchNorm after every head layer (SimCLR; MoCo v3: 2.1 points better
  # with ViT-B than without, and without it they had to halve the batch).
  c.proj_head_bn = True
  # The output layer's BatchNorm has a scale (the reference: centre off,
  # scale on); False: neither (MoCo v3's BatchNorm1d(affine=False)).
  c.proj_out_bn_scale = True
  c.ft_proj_selector = 0
  c.fine_tune_after_block = -1
  c.dtype = 'float32'
  c.remat = False
  # Mode.
  c.train_mode = 'pretrain'
  c.lineareval_while_pretraining = True
  c.init_checkpoint = ''  # Pretraining workdir, checkpoint or exported backbone.
  c.zero_init_logits_layer = False
  # SimCLRv2 memory buffer (pretrain): the K most recent projections of a
  # momentum (EMA) copy of the network are extra negatives; 0 = off (v1).
  c.memory_buffer_size = 0
  c.memory_momentum = 0.999
  # SimCLRv2 distillation (train_mode='distill'): a frozen fine-tuned teacher
  # (its workdir or step directory) labels the unlabeled training images.
  c.teacher_checkpoint = ''
  c.distill_temperature = 0.1
  # α of the paper's Eq. (3): the distillation term's weight; 1 = unlabeled
  # images only, < 1 adds (1 − α)·cross-entropy on distill_labeled_split
  # (of distill_labeled_dataset, '' = dataset).
  c.distill_alpha = 1.0
  c.distill_labeled_dataset = ''
  c.distill_labeled_split = ''
  # The teacher's architecture, checked against teacher_checkpoint's shapes;
  # default: a SimCLRv2 ResNet-50 fine-tuned from projection layer 1.
  c.teacher = ml_collections.ConfigDict(dict(
      resnet_depth=50, width_multiplier=1.0, sk_ratio=0.0,
      proj_head_mode='nonlinear', num_proj_layers=3, proj_out_dim=128,
      ft_proj_selector=1))
  # Loop, checkpoints, logs.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0  # 0: evaluate at the end only.
  c.log_every_steps = 100
  c.num_profile_steps = 5  # 0 disables the CLU profiler.
  # True: main.py ends by drawing the run's loss and accuracy curves and its
  # final probe accuracies to WORKDIR/demo.png (runtime/plots.py).
  c.demo_plot = False
  c.seed = 0
  # True: a step with a non-finite loss or gradient leaves the state unchanged
  # (and is counted); False: the run stops before checkpointing it.
  c.skip_nonfinite_steps = False
  # Evaluators by name (simclr_jax/evaluators/), e.g.
  # evals.knn = dict(every_steps=1000); empty: only the supervised head's
  # top-1/5 every eval_every_steps and at the end.
  c.evals = ml_collections.ConfigDict()
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config (no new keys: a typo'd override fails) and returns it."""
  config.lock()
  return config


def _fail(key: str, value, allowed: str) -> None:
  raise ConfigError(f'config.{key}={value!r} is invalid: {allowed}.')


def _one_of(config, key, allowed) -> None:
  value = config[key]
  if value not in allowed:
    _fail(key, value, 'expected one of ' + ', '.join(map(repr, allowed)))


def _positive(config, key, *, allow_zero=False) -> None:
  value = config[key]
  if value < 0 or (value == 0 and not allow_zero):
    _fail(key, value, 'must be ' + ('>= 0' if allow_zero else '> 0'))


def _nonfinite_float(value, key: str):
  """(key, value) of the first NaN or infinite float in `value` (a number,
  or a config, dict, list or tuple of them), or None."""
  if isinstance(value, float):
    return None if math.isfinite(value) else (key, value)
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    items = [(f'{key}.{name}' if key else name, item)
             for name, item in value.items()]
  elif isinstance(value, (list, tuple)):
    items = [(f'{key}[{i}]', item) for i, item in enumerate(value)]
  else:
    return None
  for item_key, item in items:
    found = _nonfinite_float(item, item_key)
    if found:
      return found
  return None


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for the first problem found, else None.

  Checks the values alone: no file, dataset or device is looked at.
  """
  nonfinite = _nonfinite_float(config, '')
  if nonfinite:
    _fail(nonfinite[0], nonfinite[1], 'must be a finite number')
  _one_of(config, 'train_mode', TRAIN_MODES)
  _one_of(config, 'optimizer', OPTIMIZERS)
  _one_of(config, 'learning_rate_scaling', LEARNING_RATE_SCALINGS)
  _one_of(config, 'proj_head_mode', PROJ_HEAD_MODES)
  _one_of(config, 'model', MODELS)
  _check_backbone_keys(config)
  _one_of(config, 'dtype', DTYPES)
  _one_of(config, 'augmentation_impl', AUGMENTATION_IMPLS)
  _one_of(config, 'color_augment', COLOR_AUGMENT_PLACES)

  _positive(config, 'train_batch_size')
  _positive(config, 'eval_batch_size')
  _positive(config, 'micro_batch_size', allow_zero=True)
  if config.micro_batch_size:
    if config.train_mode != 'pretrain':
      _fail('micro_batch_size', config.micro_batch_size,
            f"micro-batches are for train_mode='pretrain' (got "
            f"{config.train_mode!r}); use 0")
    if config.train_batch_size % config.micro_batch_size:
      _fail('micro_batch_size', config.micro_batch_size,
            f'must divide train_batch_size={config.train_batch_size} '
            '(0: no micro-batches)')
  if not config.temperature > 0:
    _fail('temperature', config.temperature, 'must be > 0')
  _positive(config, 'proj_out_dim')
  _positive(config, 'proj_hidden_dim', allow_zero=True)
  _positive(config, 'grad_clip_norm', allow_zero=True)
  _positive(config, 'num_proj_layers', allow_zero=True)
  if config.proj_head_mode == 'nonlinear' and config.num_proj_layers < 1:
    _fail('num_proj_layers', config.num_proj_layers,
          "proj_head_mode='nonlinear' needs >= 1 layer")
  if not 0 <= config.ft_proj_selector <= max(config.num_proj_layers, 0):
    _fail('ft_proj_selector', config.ft_proj_selector,
          f'must be in [0, num_proj_layers={config.num_proj_layers}]')
  if (config.train_mode in ('pretrain', 'supervised', 'distill')
      and config.fine_tune_after_block != -1):
    _fail('fine_tune_after_block', config.fine_tune_after_block,
          f"must be -1 with train_mode={config.train_mode!r} (freezing blocks "
          "is for 'finetune')")

  if config.train_steps < 0:
    _fail('train_steps', config.train_steps, 'must be >= 0 (0: from epochs)')
  if config.train_steps == 0 and not config.train_epochs > 0:
    _fail('train_epochs', config.train_epochs,
          'must be > 0 when train_steps is 0')
  _positive(config, 'warmup_epochs', allow_zero=True)
  if not config.learning_rate > 0:
    _fail('learning_rate', config.learning_rate, 'must be > 0')
  _positive(config, 'weight_decay', allow_zero=True)
  if not 0 <= config.momentum < 1:
    _fail('momentum', config.momentum, 'must be in [0, 1)')
  _positive(config, 'color_jitter_strength', allow_zero=True)
  if not 0 < config.crop_area_min <= 1:
    _fail('crop_area_min', config.crop_area_min, 'must be in (0, 1]')
  _positive(config, 'shuffle_buffer_size', allow_zero=True)
  _positive(config, 'checkpoint_every_steps')
  _positive(config, 'keep_checkpoints')
  _positive(config, 'log_every_steps')
  _positive(config, 'eval_every_steps', allow_zero=True)
  _positive(config, 'num_profile_steps', allow_zero=True)

  if config.train_mode in ('linear_eval', 'finetune'):
    if not config.init_checkpoint:
      _fail('init_checkpoint', config.init_checkpoint,
            f'train_mode={config.train_mode!r} needs a pretraining workdir, '
            'checkpoint or exported backbone to start from')
  _validate_memory_buffer(config)
  if config.train_mode == 'distill':
    _validate_distill(config)


def _validate_memory_buffer(config) -> None:
  _positive(config, 'memory_buffer_size', allow_zero=True)
  if config.memory_buffer_size and config.train_mode != 'pretrain':
    _fail('memory_buffer_size', config.memory_buffer_size,
          f"the memory buffer is for train_mode='pretrain' (0 with "
          f'{config.train_mode!r})')
  if not 0 <= config.memory_momentum <= 1:
    _fail('memory_momentum', config.memory_momentum, 'must be in [0, 1]')


def _validate_distill(config) -> None:
  if not config.teacher_checkpoint:
    _fail('teacher_checkpoint', config.teacher_checkpoint,
          "train_mode='distill' needs a fine-tuned run's workdir or "
          'checkpoint step directory as the teacher')
  if not config.distill_temperature > 0:
    _fail('distill_temperature', config.distill_temperature, 'must be > 0')
  if not 0 <= config.distill_alpha <= 1:
    _fail('distill_alpha', config.distill_alpha,
          'must be in [0, 1] (1: distillation on unlabeled images only)')
  if config.distill_alpha < 1 and not config.distill_labeled_split:
    _fail('distill_labeled_split', config.distill_labeled_split,
          f'distill_alpha={config.distill_alpha} < 1 weighs a labeled '
          "cross-entropy and needs its split (e.g. 'train[:1%]')")
  teacher = config.teacher
  for key, allowed in (('resnet_depth', RESNET_DEPTHS),
                       ('proj_head_mode', PROJ_HEAD_MODES)):
    if teacher[key] not in allowed:
      _fail(f'teacher.{key}', teacher[key],
            'expected one of ' + ', '.join(map(repr, allowed)))
  if teacher.width_multiplier <= 0:
    _fail('teacher.width_multiplier', teacher.width_multiplier, 'must be > 0')
  if teacher.sk_ratio < 0:
    _fail('teacher.sk_ratio', teacher.sk_ratio, 'must be >= 0')
  if not 0 <= teacher.ft_proj_selector <= max(teacher.num_proj_layers, 0):
    _fail('teacher.ft_proj_selector', teacher.ft_proj_selector,
          f'must be in [0, teacher.num_proj_layers='
          f'{teacher.num_proj_layers}]')


def _check_backbone_keys(config) -> None:
  """The chosen backbone's keys, image size and fine_tune_after_block; the
  other backbone's keys must be at their defaults (they would be ignored)."""
  defaults = base_config()
  resnet_keys = ('resnet_depth', 'width_multiplier', 'sk_ratio')
  vit_keys = tuple(k for k in defaults if k.startswith('vit_'))
  other = vit_keys if config.model == 'resnet' else resnet_keys
  for key in other:
    if config[key] != defaults[key]:
      _fail(key, config[key], f'it configures the other backbone '
            f'(config.model={config.model!r}); leave it at '
            f'{defaults[key]!r} or set config.model')
  if config.model == 'resnet':
    _one_of(config, 'resnet_depth', RESNET_DEPTHS)
    _positive(config, 'width_multiplier')
    _positive(config, 'sk_ratio', allow_zero=True)
    if not isinstance(config.image_size, int) or (
        config.image_size < MIN_IMAGE_SIZE):
      _fail('image_size', config.image_size,
            f'the ResNet stem needs an integer >= {MIN_IMAGE_SIZE} px '
            '(<= 32: CIFAR stem, > 32: ImageNet stem)')
    if not -1 <= config.fine_tune_after_block <= 4:
      _fail('fine_tune_after_block', config.fine_tune_after_block,
            'must be in [-1, 4] (-1: train all, 0: stem, 1..4: block groups)')
    return
  # Imported here: models/ imports this module.
  from simclr_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    shape = vit.parse_vit_variant(config.vit_variant)
  except ValueError:
    _fail('vit_variant', config.vit_variant,
          'expected SIZE/PATCH with SIZE one of '
          f'{", ".join(vit.VIT_VARIANTS)} and PATCH one of '
          f'{", ".join(map(str, vit.PATCH_SIZES))} (e.g. \'S/16\')')
  _one_of(config, 'vit_pooling', vit.POOLINGS)
  _one_of(config, 'vit_position_embedding', vit.POSITION_EMBEDDINGS)
  heads = config.vit_num_heads or shape['num_heads']
  if config.vit_num_heads < 0 or shape['hidden_size'] % heads:
    _fail('vit_num_heads', config.vit_num_heads,
          f'must be 0 (the variant\'s {shape["num_heads"]}) or divide the '
          f'width {shape["hidden_size"]} of ViT-{config.vit_variant}')
  patch = shape['patch_size']
  if not isinstance(config.image_size, int) or config.image_size < patch or (
      config.image_size % patch):
    _fail('image_size', config.image_size,
          f'ViT-{config.vit_variant} needs a multiple of its patch size '
          f'{patch}')
  depth = shape['depth']
  if not -1 <= config.fine_tune_after_block <= depth:
    _fail('fine_tune_after_block', config.fine_tune_after_block,
          f'must be in [-1, {depth}] for ViT-{config.vit_variant} (-1: train '
          f'all, 0: patch and position embedding, 1..{depth}: encoder '
          'blocks; the final LayerNorm goes with the last)')


def validate_for_devices(config: ml_collections.ConfigDict, *,
                         device_count: int, process_count: int) -> None:
  """The global batches split evenly over the devices and the processes."""
  for key in ('train_batch_size', 'eval_batch_size'):
    batch = config[key]
    if batch % device_count:
      _fail(key, batch, f'the global batch must be divisible by the device '
            f'count {device_count}')
    if batch % process_count:
      _fail(key, batch, f'the global batch must be divisible by the process '
            f'count {process_count}')
  micro, per_device = (config.micro_batch_size,
                       config.train_batch_size // device_count)
  if micro and per_device % micro:
    _fail('micro_batch_size', micro, f'must divide the per-device batch '
          f'{per_device} (train_batch_size={config.train_batch_size} / '
          f'{device_count} devices)')


def schedule_steps(*, batch_size: int, num_examples: int, train_epochs: float,
                   warmup_epochs: float, train_steps: int = 0) -> dict:
  """Warmup, total and per-epoch steps, exactly as the reference computes them.

  warmup = round(warmup_epochs·N_ex // B); total = train_steps or
  N_ex·epochs // B + 1.
  """
  warmup = int(round(warmup_epochs * num_examples // batch_size))
  total = int(train_steps or num_examples * train_epochs // batch_size + 1)
  return dict(warmup_steps=warmup, total_steps=total,
              steps_per_epoch=max(num_examples // batch_size, 1))


def config_schedule_steps(config, num_examples: int) -> dict:
  """`schedule_steps` of the config's batch, epochs and steps."""
  return schedule_steps(
      batch_size=config.train_batch_size, num_examples=num_examples,
      train_epochs=config.train_epochs, warmup_epochs=config.warmup_epochs,
      train_steps=config.train_steps)
