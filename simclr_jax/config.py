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
import ml_collections

from simclr_jax.data import augment_constants

TRAIN_MODES = ('pretrain', 'linear_eval', 'finetune', 'supervised')
OPTIMIZERS = ('lars', 'momentum', 'adam')
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
  # Model. num_proj_layers 3 is the reference's default (SimCLRv2); the v1
  # paper's head has one hidden layer (2).
  c.resnet_depth = 50
  c.width_multiplier = 1.0  # Channels int(64·w)...: fractions allowed.
  c.sk_ratio = 0.0
  c.proj_head_mode = 'nonlinear'
  c.num_proj_layers = 3
  c.proj_out_dim = 128
  c.ft_proj_selector = 0
  c.fine_tune_after_block = -1
  c.dtype = 'float32'
  c.remat = False
  # Mode.
  c.train_mode = 'pretrain'
  c.lineareval_while_pretraining = True
  c.init_checkpoint = ''  # Pretraining workdir, checkpoint or exported backbone.
  c.zero_init_logits_layer = False
  # Loop, checkpoints, logs.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0  # 0: evaluate at the end only.
  c.log_every_steps = 100
  c.num_profile_steps = 5  # 0 disables the CLU profiler.
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


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for the first problem found, else None.

  Checks the values alone: no file, dataset or device is looked at.
  """
  _one_of(config, 'train_mode', TRAIN_MODES)
  _one_of(config, 'optimizer', OPTIMIZERS)
  _one_of(config, 'learning_rate_scaling', LEARNING_RATE_SCALINGS)
  _one_of(config, 'proj_head_mode', PROJ_HEAD_MODES)
  _one_of(config, 'resnet_depth', RESNET_DEPTHS)
  _one_of(config, 'dtype', DTYPES)
  _one_of(config, 'augmentation_impl', AUGMENTATION_IMPLS)
  _one_of(config, 'color_augment', COLOR_AUGMENT_PLACES)

  _positive(config, 'train_batch_size')
  _positive(config, 'eval_batch_size')
  if not config.temperature > 0:
    _fail('temperature', config.temperature, 'must be > 0')
  _positive(config, 'width_multiplier')
  _positive(config, 'sk_ratio', allow_zero=True)
  _positive(config, 'proj_out_dim')
  _positive(config, 'num_proj_layers', allow_zero=True)
  if config.proj_head_mode == 'nonlinear' and config.num_proj_layers < 1:
    _fail('num_proj_layers', config.num_proj_layers,
          "proj_head_mode='nonlinear' needs >= 1 layer")
  if not 0 <= config.ft_proj_selector <= max(config.num_proj_layers, 0):
    _fail('ft_proj_selector', config.ft_proj_selector,
          f'must be in [0, num_proj_layers={config.num_proj_layers}]')
  if not -1 <= config.fine_tune_after_block <= 4:
    _fail('fine_tune_after_block', config.fine_tune_after_block,
          'must be in [-1, 4] (-1: train all, 0: stem, 1..4: block groups)')
  if (config.train_mode in ('pretrain', 'supervised')
      and config.fine_tune_after_block != -1):
    _fail('fine_tune_after_block', config.fine_tune_after_block,
          f"must be -1 with train_mode={config.train_mode!r} (freezing blocks "
          "is for 'finetune')")

  if not isinstance(config.image_size, int) or (
      config.image_size < MIN_IMAGE_SIZE):
    _fail('image_size', config.image_size,
          f'the ResNet stem needs an integer >= {MIN_IMAGE_SIZE} px '
          '(<= 32: CIFAR stem, > 32: ImageNet stem)')

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
