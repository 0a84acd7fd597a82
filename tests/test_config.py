"""config.py and configs/: every config loads, validates and builds; bad
configs fail clearly; each default has one definition."""
import dataclasses
import glob
import importlib.util
import os

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
          'imagenet_finetune_10pct', 'r50_supervised', 'demo'} <= names


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
  config_lib.validate(config)
  config_lib.validate_for_devices(config, device_count=8, process_count=1)
  num_examples, num_classes = DATASETS[config.dataset]
  model = models.create_model(config, num_classes)
  tx = optim.create_optimizer(
      config, optim.create_learning_rate_schedule(config, num_examples))
  # Shapes only: no parameter is allocated, even for ResNet-50 2x SK.
  state = jax.eval_shape(lambda: train.create_train_state(
      config, model, tx, jax.random.PRNGKey(0)))
  assert 'resnet' in state.params
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
        train_batch_size=4096, train_epochs=800, temperature=0.1),
    'cifar10_r50': dict(  # SimCLR v1 B.9 ("the rest as ImageNet").
        resnet_depth=50, image_size=32, num_proj_layers=2,
        train_batch_size=1024, temperature=0.5, color_jitter_strength=0.5,
        use_blur=False, weight_decay=1e-6, optimizer='lars'),
    'cifar10_r18': dict(  # The reference README's CIFAR-10 command.
        resnet_depth=18, image_size=32, train_batch_size=512,
        train_epochs=1000, learning_rate=1.0, weight_decay=1e-4,
        temperature=0.5, color_jitter_strength=0.5, use_blur=False,
        num_proj_layers=3),
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
}


@pytest.mark.parametrize('name', sorted(PAPER_VALUES))
def test_config_has_the_values_of_the_paper_it_cites(name):
  config = load(os.path.join(CONFIG_DIR, f'{name}.py'))
  got = {key: config[key] for key in PAPER_VALUES[name]}
  assert got == PAPER_VALUES[name]


def _base():
  config = load(os.path.join(CONFIG_DIR, 'demo.py'))
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
    ('width_multiplier', 0.0, 'must be > 0'),
    ('crop_area_min', 0.0, 'must be in (0, 1]'),
    ('crop_area_min', 1.5, 'must be in (0, 1]'),
]


@pytest.mark.parametrize('key,value,expected', BAD,
                         ids=[f'{k}={v}' for k, v, _ in BAD])
def test_bad_config_is_one_line_naming_key_and_value(key, value, expected):
  config = _base()
  with config.unlocked():
    config[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'config.{key}={value!r} is invalid')
  assert expected in message


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
          'dtype', 'remat'} <= set(fields)
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
