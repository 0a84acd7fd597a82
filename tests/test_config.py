"""config.py and configs/: every config loads, validates and builds; bad
configs fail clearly; each default has one definition."""
import dataclasses
import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from simclr_jax import config as config_lib
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import preflight
from simclr_jax import train
from simclr_jax.data import pipeline

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))
# (train examples, classes) per dataset, so no dataset has to be present.
DATASETS = {
    'imagenet2012': (1_281_167, 1000),
    'imagenet2012_subset/1pct': (12_811, 1000),
    'imagenet2012_subset/10pct': (128_116, 1000),
    'cifar10': (50_000, 10),
    'mnist_offline': (4_000, 10),
}


def load(path):
  spec = importlib.util.spec_from_file_location(
      'config_' + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_issue_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert {'r50_4096', 'r50_2x_sk1', 'cifar10_r50', 'cifar10_r18',
          'imagenet_linear_eval', 'imagenet_finetune_1pct',
          'imagenet_finetune_10pct', 'r50_supervised', 'demo',
          'vit_s16_simclr', 'vit_b16_simclr', 'demo_vit',
          'imagenet_distill_1pct', 'imagenet_distill_10pct',
          'imagenet_distill_big_to_small'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_loads_validates_and_builds(path):
  config = load(path)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.trian_steps = 5  # A typo'd key: the locked config refuses it.
  with config.unlocked():
    if config.train_mode in ('linear_eval', 'finetune'):
      assert config.init_checkpoint == ''  # Given on the command line.
      config.init_checkpoint = '/pretrain/workdir'
    if config.train_mode == 'distill':
      assert config.teacher_checkpoint == ''  # Given on the command line.
      config.teacher_checkpoint = '/finetune/workdir'
  config_lib.validate(config)
  config_lib.validate_for_devices(config, device_count=8, process_count=1)
  num_examples, num_classes = DATASETS[config.dataset]
  model = models.create_model(config, num_classes)
  tx = optim.create_optimizer(
      config, optim.create_learning_rate_schedule(config, num_examples))
  # Shapes only: no parameter is allocated, even for ResNet-50 2x SK.
  state = jax.eval_shape(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))
  assert config.model in state.params  # 'resnet' or 'vit'.
  assert ('supervised_head' in state.params) == model.has_supervised_head()
  assert jax.tree.leaves(state.opt_state)


def test_r50_4096_is_the_paper_recipe():
  config = load(os.path.join(CONFIG_DIR, 'r50_4096.py'))
  assert (config.resnet_depth, config.width_multiplier) == (50, 1)
  assert (config.train_batch_size, config.train_epochs) == (4096, 100)
  assert (config.optimizer, config.learning_rate,
          config.learning_rate_scaling) == ('lars', 0.3, 'linear')
  assert (config.temperature, config.weight_decay) == (0.1, 1e-6)
  assert config.image_size == 224 and config.use_blur
  assert config.color_augment == 'device'  # The host CPU limits at 224 px.
  steps = config_lib.config_schedule_steps(config, 1_281_167)
  assert steps['warmup_steps'] == 3127
  assert optim.scale_learning_rate(
      config.learning_rate, config.train_batch_size,
      config.learning_rate_scaling) == pytest.approx(4.8)


# What each config must say, from the paper (or reference) its docstring
# cites; every key here is checked.
PAPER_VALUES = {
    'r50_4096': dict(  # SimCLR v1 §2.3 default setting, Table 5.
        resnet_depth=50, width_multiplier=1, num_proj_layers=2,
        proj_out_dim=128, optimizer='lars', learning_rate=0.3,
        learning_rate_scaling='linear', weight_decay=1e-6,
        train_batch_size=4096, train_epochs=100, warmup_epochs=10.0,
        temperature=0.1, color_jitter_strength=1.0, use_blur=True,
        image_size=224),
    'r50_2x_sk1': dict(  # SimCLRv2 §3.
        resnet_depth=50, width_multiplier=2, sk_ratio=0.0625,
        num_proj_layers=3, ft_proj_selector=1, optimizer='lars',
        learning_rate=0.1, learning_rate_scaling='sqrt', weight_decay=1e-4,
        train_batch_size=4096, train_epochs=800, temperature=0.1,
        memory_buffer_size=65536, memory_momentum=0.999),
    'imagenet_distill_1pct': dict(  # SimCLRv2 §2, §3.
        train_mode='distill', dataset='imagenet2012', train_split='train',
        distill_temperature=0.1, distill_alpha=1.0, train_epochs=400,
        optimizer='lars', momentum=0.9, proj_head_mode='none',
        ft_proj_selector=0, resnet_depth=50, width_multiplier=1,
        distill_labeled_dataset='imagenet2012_subset/1pct'),
    'imagenet_distill_10pct': dict(
        train_mode='distill', distill_temperature=0.1, train_epochs=400,
        distill_labeled_dataset='imagenet2012_subset/10pct'),
    'imagenet_distill_big_to_small': dict(  # SimCLRv2 §3, Table 3.
        train_mode='distill', distill_temperature=1.0, train_epochs=400,
        resnet_depth=50, width_multiplier=1, sk_ratio=0.0),
    'cifar10_r50': dict(  # SimCLR v1 B.9 ("the rest as ImageNet").
        resnet_depth=50, image_size=32, num_proj_layers=2,
        train_batch_size=1024, temperature=0.5, color_jitter_strength=0.5,
        use_blur=False, weight_decay=1e-6, optimizer='lars'),
    'cifar10_r18': dict(  # The reference README's CIFAR-10 command.
        resnet_depth=18, image_size=32, train_batch_size=512,
        train_epochs=1000, learning_rate=1.0, weight_decay=1e-4,
        temperature=0.5, color_jitter_strength=0.5, use_blur=False,
        num_proj_layers=3),
    'cifar10_r18_colab': dict(  # The above at v1 B.9's batch, one GPU.
        resnet_depth=18, image_size=32, train_batch_size=1024,
        micro_batch_size=128, train_epochs=1000, learning_rate=1.0,
        weight_decay=1e-4, temperature=0.5, color_jitter_strength=0.5,
        use_blur=False, num_proj_layers=3),
    'imagenet_linear_eval': dict(  # v1 B.6 and the reference README.
        train_mode='linear_eval', optimizer='momentum', nesterov=True,
        learning_rate=0.1, learning_rate_scaling='linear',
        train_epochs=90, warmup_epochs=0.0, ft_proj_selector=0),
    'imagenet_finetune_1pct': dict(  # SimCLRv2 §3, reference README.
        train_mode='finetune', dataset='imagenet2012_subset/1pct',
        optimizer='lars', learning_rate=0.005, learning_rate_scaling='sqrt',
        weight_decay=0.0, train_batch_size=1024, train_epochs=60,
        ft_proj_selector=1, zero_init_logits_layer=True),
    'imagenet_finetune_10pct': dict(
        train_mode='finetune', dataset='imagenet2012_subset/10pct',
        train_epochs=30, ft_proj_selector=1, learning_rate=0.005),
    'r50_supervised': dict(
        train_mode='supervised', optimizer='momentum', nesterov=True,
        train_epochs=90, weight_decay=1e-4),
    # MoCo v3 (Chen, Xie & He 2021): Table 2 (ViT-S 12 heads), §4.2
    # (frozen patch projection), §5 (AdamW, batch 4096, 40 warmup epochs,
    # sin-cos, class token, 3-layer head 4096/256 with BN, τ 0.2), Table 4
    # (300 epochs), Fig. 6 (SimCLR: lr 2e-4, wd 0.1).
    'vit_s16_simclr': dict(
        model='vit', vit_variant='S/16', vit_num_heads=12,
        vit_pooling='token', vit_position_embedding='sincos2d',
        vit_frozen_patch_embedding=True, optimizer='adamw',
        learning_rate=2e-4, learning_rate_scaling='linear', weight_decay=0.1,
        train_batch_size=4096, train_epochs=300, warmup_epochs=40.0,
        temperature=0.2, num_proj_layers=3, proj_hidden_dim=4096,
        proj_out_dim=256, proj_head_bn=True, proj_out_bn_scale=False,
        image_size=224),
    'vit_b16_simclr': dict(
        model='vit', vit_variant='B/16', vit_num_heads=0, optimizer='adamw',
        learning_rate=2e-4, weight_decay=0.1, train_batch_size=4096,
        train_epochs=300, warmup_epochs=40.0, temperature=0.2,
        proj_hidden_dim=4096, proj_out_dim=256, proj_out_bn_scale=False),
}


@pytest.mark.parametrize('name', sorted(PAPER_VALUES))
def test_config_has_the_values_of_the_paper_it_cites(name):
  config = load(os.path.join(CONFIG_DIR, f'{name}.py'))
  got = {key: config[key] for key in PAPER_VALUES[name]}
  assert got == PAPER_VALUES[name]


def test_distill_teachers_are_the_papers():
  """Self-distillation: the student's ResNet under a fine-tuned 3-layer
  head; big-to-small: the ResNet-152 3x SK teacher of Table 3."""
  for name in ('imagenet_distill_1pct', 'imagenet_distill_10pct'):
    teacher = load(os.path.join(CONFIG_DIR, f'{name}.py')).teacher
    assert (teacher.resnet_depth, teacher.width_multiplier, teacher.sk_ratio,
            teacher.num_proj_layers, teacher.ft_proj_selector) == (
                50, 1, 0.0, 3, 1)
  teacher = load(os.path.join(CONFIG_DIR,
                              'imagenet_distill_big_to_small.py')).teacher
  assert (teacher.resnet_depth, teacher.width_multiplier,
          teacher.sk_ratio) == (152, 3, 0.0625)


def _base(name='demo'):
  config = load(os.path.join(CONFIG_DIR, f'{name}.py'))
  return config


BAD = [
    ('train_mode', 'pretraining', 'expected one of'),
    ('optimizer', 'sgd', 'expected one of'),
    ('augmentation_impl', 'simclrv3', 'expected one of'),
    ('color_augment', 'gpu', 'expected one of'),
    ('temperature', 0.0, 'must be > 0'),
    ('temperature', -0.5, 'must be > 0'),
    ('eval_batch_size', 0, 'must be > 0'),
    ('image_size', 4, 'ResNet stem'),
    ('resnet_depth', 20, 'expected one of'),
    ('fine_tune_after_block', 2, "train_mode='pretrain'"),
    ('ft_proj_selector', 5, 'num_proj_layers'),
    ('learning_rate', 0.0, 'must be > 0'),
    ('momentum', 1.0, 'must be in [0, 1)'),
    ('checkpoint_every_steps', 0, 'must be > 0'),
    ('memory_buffer_size', -1, 'must be >= 0'),
    ('memory_momentum', 1.5, 'must be in [0, 1]'),
    ('width_multiplier', 0.0, 'must be > 0'),
    ('crop_area_min', 0.0, 'must be in (0, 1]'),
    ('crop_area_min', 1.5, 'must be in (0, 1]'),
]


# Distillation: each key on a distill config that is otherwise valid.
BAD_DISTILL = [
    ('teacher_checkpoint', '', 'needs a fine-tuned run'),
    ('distill_temperature', 0.0, 'must be > 0'),
    ('distill_alpha', 1.5, 'must be in [0, 1]'),
    ('distill_labeled_split', '', "distill_alpha=0.5 < 1"),
    ('memory_buffer_size', 64, "train_mode='pretrain'"),
    ('fine_tune_after_block', 2, "train_mode='distill'"),
]


@pytest.mark.parametrize('key,value,expected', BAD_DISTILL,
                         ids=[f'{k}={v}' for k, v, _ in BAD_DISTILL])
def test_bad_distill_config_is_one_line_naming_key_and_value(key, value,
                                                             expected):
  config = _base()
  with config.unlocked():
    config.update(train_mode='distill', teacher_checkpoint='/teacher',
                  distill_alpha=0.5 if key == 'distill_labeled_split' else 1.0)
    config[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'config.{key}={value!r} is invalid')
  assert expected in message


def test_bad_teacher_architecture_is_named():
  config = _base()
  with config.unlocked():
    config.update(train_mode='distill', teacher_checkpoint='/teacher')
  config_lib.validate(config)
  for key, value in (('resnet_depth', 20), ('proj_head_mode', 'mlp'),
                     ('ft_proj_selector', 4), ('width_multiplier', 0.0)):
    bad = config.copy_and_resolve_references()
    bad.teacher[key] = value
    with pytest.raises(config_lib.ConfigError,
                       match=rf'^config.teacher.{key}={value!r} is invalid'):
      config_lib.validate(bad)


@pytest.mark.parametrize('key,value,expected', BAD,
                         ids=[f'{k}={v}' for k, v, _ in BAD])
def test_bad_config_is_one_line_naming_key_and_value(key, value, expected):
  config = _base()
  with config.unlocked():
    config[key] = value
  assert_refused_in_one_line(config, key, value, expected)


def assert_refused_in_one_line(config, key, value, expected):
  """validate(config) raises one line naming key and value, with `expected`."""
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'config.{key}={value!r} is invalid')
  assert expected in message


FLOAT_KEYS = sorted(k for k, v in config_lib.base_config().items()
                    if isinstance(v, float))


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')],
                         ids=['nan', 'inf', '-inf'])
def test_every_float_key_must_be_finite(value):
  """NaN passes every range check (all its comparisons are False) and inf
  passes the lower bounds: each float key is refused by name instead."""
  assert len(FLOAT_KEYS) >= 8, FLOAT_KEYS
  for key in FLOAT_KEYS:
    config = _base()
    with config.unlocked():
      config[key] = value
    with pytest.raises(config_lib.ConfigError) as error:
      config_lib.validate(config)
    assert str(error.value) == (f'config.{key}={value!r} is invalid: must be '
                                'a finite number.'), key
  # Nested values too: an evaluator's field, an element of a list.
  for field, bad, name in (('temperature', value, 'temperature'),
                           ('shots', (1, value), 'shots[1]')):
    config = _base()
    with config.unlocked():
      config.evals.knn = {field: bad}
    with pytest.raises(config_lib.ConfigError,
                       match=rf'^config\.evals\.knn\.{re.escape(name)}='):
      config_lib.validate(config)


# On configs/demo_vit.py (ViT-Ti/8 at 16 px).
BAD_VIT = [
    ('vit_variant', 'X/16', "SIZE one of mu, Ti, S, B, L and PATCH one of "
     "4, 8, 14, 16, 32 (e.g. 'S/16')"),
    ('vit_variant', 'S/15', 'PATCH one of'),
    ('vit_variant', 'S16', 'SIZE/PATCH'),
    ('vit_pooling', 'cls', "expected one of 'token', 'gap'"),
    ('vit_position_embedding', 'none', 'expected one of'),
    ('vit_num_heads', 5, "divide the width 192 of ViT-Ti/8"),
    ('image_size', 18, 'multiple of its patch size 8'),
    ('fine_tune_after_block', 13, 'must be in [-1, 12] for ViT-Ti/8'),
    # The ResNet's keys, which a ViT would ignore, are refused.
    ('resnet_depth', 18, "the other backbone (config.model='vit')"),
    ('width_multiplier', 2.0, 'leave it at 1.0'),
    ('sk_ratio', 0.0625, 'the other backbone'),
    ('proj_hidden_dim', -1, 'must be >= 0'),
    ('grad_clip_norm', -1.0, 'must be >= 0'),
]


@pytest.mark.parametrize('key,value,expected', BAD_VIT,
                         ids=[f'{k}={v}' for k, v, _ in BAD_VIT])
def test_bad_vit_config_is_one_line_naming_key_and_value(key, value,
                                                         expected):
  config = _base('demo_vit')
  config_lib.validate(config)
  with config.unlocked():
    config[key] = value
    if key == 'fine_tune_after_block':
      config.train_mode = 'finetune'
      config.init_checkpoint = '/pretrain/workdir'
  assert_refused_in_one_line(config, key, value, expected)


@pytest.mark.parametrize('key,value', [
    ('vit_variant', 'B/16'), ('vit_frozen_patch_embedding', False),
    ('vit_pooling', 'gap')])
def test_vit_keys_with_a_resnet_are_refused(key, value):
  config = _base('demo')
  with config.unlocked():
    config[key] = value
  with pytest.raises(config_lib.ConfigError,
                     match=rf"config.{key}={value!r} is invalid: it "
                     r"configures the other backbone \(config.model="
                     r"'resnet'\)"):
    config_lib.validate(config)


def test_vit_fine_tune_after_block_covers_every_block():
  config = _base('demo_vit')
  with config.unlocked():
    config.update(train_mode='finetune', init_checkpoint='/pretrain/workdir')
    for after in (-1, 0, 5, 12):
      config.fine_tune_after_block = after
      config_lib.validate(config)


@pytest.mark.parametrize('name', ['vit_s16_simclr', 'vit_b16_simclr'])
def test_vit_linear_eval_mode_keeps_the_architecture(name):
  path = os.path.join(CONFIG_DIR, f'{name}.py')
  spec = importlib.util.spec_from_file_location('config_' + name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  pretrain, probe = module.get_config(), module.get_config('linear_eval')
  arch = [k for k in pretrain if k.startswith(('vit_', 'proj_'))] + [
      'model', 'num_proj_layers', 'image_size']
  assert {k: probe[k] for k in arch} == {k: pretrain[k] for k in arch}
  # MoCo v3's linear probe (§5, CONFIG.md): SGD momentum, lr 3·B/256 at
  # batch 1024, no weight decay, 90 epochs.
  assert (probe.train_mode, probe.optimizer, probe.nesterov) == (
      'linear_eval', 'momentum', False)
  assert (probe.learning_rate, probe.train_batch_size, probe.weight_decay,
          probe.train_epochs) == (3.0, 1024, 0.0, 90)
  with pytest.raises(ValueError, match='unknown mode'):
    module.get_config('finetune')


def test_batch_not_divisible_by_the_devices_is_named():
  config = _base()
  with config.unlocked():
    config.train_batch_size = 100
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.train_batch_size=100 is invalid: .*'
                     'divisible by the device count 8'):
    config_lib.validate_for_devices(config, device_count=8, process_count=1)
  config_lib.validate_for_devices(config, device_count=4, process_count=2)
  with pytest.raises(config_lib.ConfigError, match='process count 3'):
    config_lib.validate_for_devices(config, device_count=1, process_count=3)


@pytest.mark.parametrize('mode', ['linear_eval', 'finetune'])
def test_linear_eval_and_finetune_need_init_checkpoint(mode, tmp_path):
  config = _base()
  with config.unlocked():
    config.train_mode = mode
  with pytest.raises(preflight.BadInput, match='init_checkpoint'):
    preflight.check_config(config)
  with config.unlocked():
    config.init_checkpoint = str(tmp_path / 'missing')
  with pytest.raises(preflight.BadInput, match='no such path'):
    preflight.check_config(config)
  with config.unlocked():
    config.init_checkpoint = str(tmp_path)
  preflight.check_config(config)


def test_unknown_dataset_is_rejected():
  config = _base()
  with config.unlocked():
    config.dataset = 'imagenet2013'
  with pytest.raises(preflight.BadInput, match="'imagenet2013'"):
    preflight.check_dataset(config)


# ----------------------------------------------------------------------------
# One definition of each default.
# ----------------------------------------------------------------------------
def test_model_defaults_are_the_configs():
  base = config_lib.base_config()
  fields = {f.name: f.default for f in dataclasses.fields(models.SimCLRModel)
            if f.name in base}
  assert {'num_proj_layers', 'proj_head_mode', 'proj_out_dim', 'resnet_depth',
          'width_multiplier', 'sk_ratio', 'ft_proj_selector', 'train_mode',
          'lineareval_while_pretraining', 'fine_tune_after_block',
          'dtype', 'remat', 'model', 'vit_variant', 'vit_num_heads',
          'vit_pooling', 'vit_position_embedding',
          'vit_frozen_patch_embedding', 'proj_hidden_dim', 'proj_head_bn',
          'proj_out_bn_scale'} <= set(fields)
  for name, default in fields.items():
    expected = base[name]
    if name == 'dtype':
      expected = jnp.dtype(expected)
    assert default == expected, name
  # create_model reads every one of them from the config.
  model = models.create_model(base, 10)
  for name in fields:
    assert getattr(model, name) == fields[name], name


@pytest.mark.parametrize('key', ['use_blur', 'color_jitter_strength',
                                 'crop_area_min',
                                 'augmentation_impl', 'color_augment',
                                 'shuffle_buffer_size', 'cache_dataset'])
def test_pipeline_takes_its_defaults_from_the_config(key):
  # The pipeline has no default of its own: without the key it cannot run.
  config = config_lib.base_config()
  config.update(dataset='cifar10', image_size=32, train_batch_size=4)
  with tfds.testing.mock_data(num_examples=4):
    next(pipeline.create_train_iterator(config, seed=0, process_index=0,
                                        process_count=1))
    del config[key]
    with pytest.raises((AttributeError, KeyError), match=key):
      next(pipeline.create_train_iterator(config, seed=0, process_index=0,
                                          process_count=1))


def test_the_base_blur_default_reaches_the_pipeline():
  # use_blur is on in the base config (ImageNet) and the pipeline follows it.
  config = config_lib.base_config()
  assert config.use_blur and config.num_proj_layers == 3
  config.update(dataset='cifar10', image_size=224, train_batch_size=4,
                color_jitter_strength=0.0)
  blurred = []
  for use_blur in (True, False):
    config.use_blur = use_blur
    with tfds.testing.mock_data(num_examples=4):
      blurred.append(next(pipeline.create_train_iterator(
          config, seed=0, process_index=0, process_count=1))['image'])
  assert not (blurred[0] == blurred[1]).all()
