r"""Converts the reference release's TF2 checkpoints to our Flax parameter tree.

`python -m simclr_jax.tools.convert_tf2 --tf_checkpoint=PATH --out=DIR`

PATH is a checkpoint of the reference's `tf2/` code (google-research/simclr):
a released SavedModel directory (`r50_1x_sk0/saved_model`; its variables are
read from `variables/variables`), a checkpoint prefix (`.../ckpt-1`) or a
directory with a `checkpoint` file (newest). DIR receives an Orbax tree
`{'params', 'batch_stats'}` that `config.init_checkpoint` accepts (see
checkpoint.load_pretrained) for linear eval or fine-tuning here.

TF2 checkpoints are keyed by the object graph of the Keras model, i.e. by the
attribute names of the reference's layers (`tf2/model.py`, `tf2/resnet.py`):
  .../resnet_model/initial_conv_relu_max_pool/{i}/conv2d/kernel     stem
  .../resnet_model/block_groups/{g}/layers/{b}/projection_layers/{i}/...
  .../resnet_model/block_groups/{g}/layers/{b}/conv_relu_dropblock_layers/{i}/
      conv2d/kernel | bn/{gamma,beta,moving_mean,moving_variance}
      | conv2d_fixed_padding/conv2d/kernel, batch_norm_relu/bn/..., conv2d_0/
        kernel, batch_norm_relu_1/bn/..., conv2d_1/kernel     (SK conv, v2)
  .../_projection_head/linear_layers/{j}/dense/kernel, bn_relu/bn/...
  .../supervised_head/linear_layer/dense/{kernel,bias}
Whatever precedes `resnet_model/` (`model/` in a training checkpoint) is the
model's root; optimizer slots, the step counter and anything outside the
model root are ignored. Layers without variables (padding, pooling, dropblock,
identity) occupy list indices too, so layers are matched by their order and
kind, never by index.

Depth, width multiplier, selective-kernel ratio, stem kind, projection head
and classifier size are read from the checkpoint's shapes, and the result is
checked leaf by leaf against `jax.eval_shape` of our `SimCLRModel` built with
them. Kernels need no transposition: Keras Conv2D kernels are HWIO and Dense
kernels [in, out], as Flax's.

Only bottleneck ResNets (depth >= 50: the released models) are converted. The
reference's basic-block ResNets (18/34) put a projection shortcut on the first
block where the shape does not change; our ResNet does not (see
models/resnet.py), so those weights have no place here.
"""
import collections
import os
import re
from typing import Any, Dict, List, Mapping, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.models import resnet as resnet_lib
from simclr_jax.models.simclr import SimCLRModel

VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
MODEL_ANCHOR = 'resnet_model/'
# The SimCLRv2 default; any ratio giving the same gate widths is equivalent.
DEFAULT_SK_RATIO = 0.0625


class ConversionError(ValueError):
  """The checkpoint is not one this converter understands (message says why)."""


# ----------------------------------------------------------------------------
# Reading the checkpoint.
# ----------------------------------------------------------------------------
def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix that PATH designates (see the module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if tf.io.gfile.isdir(path):
    for candidate in (os.path.join(path, 'variables', 'variables'),
                      os.path.join(path, 'saved_model', 'variables',
                                   'variables')):
      if tf.io.gfile.exists(candidate + '.index'):
        return candidate
    latest = tf.train.latest_checkpoint(path)
    if latest:
      return latest
    raise ConversionError(f'{path!r} holds neither a SavedModel nor a '
                          'checkpoint.')
  if not tf.io.gfile.exists(path + '.index'):
    raise ConversionError(f'{path!r} is not a TF checkpoint ({path}.index '
                          'does not exist).')
  return path


def read_tf_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """{object path: value} of the model's variables, relative to its root."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  reader = tf.train.load_checkpoint(resolve_tf_checkpoint(path))
  keys = [k[:-len(VALUE_SUFFIX)] for k in reader.get_variable_to_shape_map()
          if k.endswith(VALUE_SUFFIX) and '.OPTIMIZER_SLOT' not in k]
  roots = {k[:k.index(MODEL_ANCHOR)] for k in keys if MODEL_ANCHOR in k}
  if len(roots) != 1:
    raise ConversionError(
        f'expected one model with a {MODEL_ANCHOR!r} in {path!r}, found '
        f'{len(roots)} roots {sorted(roots)} (is it a checkpoint of the '
        'reference tf2/ code?)')
  root = roots.pop()
  return {k[len(root):]: reader.get_tensor(k + VALUE_SUFFIX)
          for k in keys if k.startswith(root)}


# ----------------------------------------------------------------------------
# Layers in order: a Keras layer list -> [(kind, {name: value})].
# ----------------------------------------------------------------------------
def _layer_list(variables: Mapping[str, np.ndarray], prefix: str
                ) -> List[Dict[str, np.ndarray]]:
  """The variables of `prefix/{i}/...`, one dict per index i, in index order."""
  by_index = collections.defaultdict(dict)
  pattern = re.compile(re.escape(prefix) + r'/(\d+)/(.+)')
  for key, value in variables.items():
    match = pattern.fullmatch(key)
    if match:
      by_index[int(match.group(1))][match.group(2)] = value
  return [by_index[i] for i in sorted(by_index)]


def _kind(layer: Mapping[str, np.ndarray]) -> str:
  if 'conv2d/kernel' in layer and len(layer) == 1:
    return 'conv'  # Conv2dFixedPadding.
  if all(k.startswith('bn/') for k in layer):
    return 'bn'  # BatchNormRelu.
  if 'conv2d_fixed_padding/conv2d/kernel' in layer:
    return 'sk'  # SK_Conv2D.
  raise ConversionError(f'unknown layer with variables {sorted(layer)} (SE '
                        'layers and other options are not supported).')


def _bn(layer: Mapping[str, np.ndarray], prefix: str = 'bn/'):
  """Keras BN variables -> ({'scale', 'bias'}, {'mean', 'var'})."""
  params = {'scale': layer[prefix + 'gamma']}
  if prefix + 'beta' in layer:  # The projection's last BN has no centre.
    params['bias'] = layer[prefix + 'beta']
  stats = {'mean': layer[prefix + 'moving_mean'],
           'var': layer[prefix + 'moving_variance']}
  return params, stats


class _Tree:
  """Accumulates `params` and `batch_stats` under one module path."""

  def __init__(self):
    self.params = {}
    self.batch_stats = {}

  def _at(self, tree, path):
    for part in path:
      tree = tree.setdefault(part, {})
    return tree

  def conv(self, path: Tuple[str, ...], kernel):
    self._at(self.params, path)['kernel'] = kernel

  def bn(self, path: Tuple[str, ...], layer, prefix='bn/'):
    params, stats = _bn(layer, prefix)
    self._at(self.params, path).update(params)
    self._at(self.batch_stats, path).update(stats)


def _convs_and_bns(layers, names: Tuple[str, ...], where: str):
  """Pairs the conv layers of a list with the BN layer that follows each."""
  kinds = [_kind(layer) for layer in layers]
  expected = ['conv', 'bn'] * len(names)
  if kinds != expected:
    raise ConversionError(f'{where}: layers {kinds}, expected {expected}.')
  return [(name, layers[2 * i]['conv2d/kernel'], layers[2 * i + 1])
          for i, name in enumerate(names)]


# ----------------------------------------------------------------------------
# The conversion.
# ----------------------------------------------------------------------------
def convert(variables: Mapping[str, np.ndarray]) -> Tuple[Dict[str, Any],
                                                          Dict[str, Any]]:
  """TF2 variables (from read_tf_checkpoint) -> (flax variables, model kwargs).

  The flax variables are `{'params': ..., 'batch_stats': ...}` with top-level
  `resnet`, `projection_head` (if the checkpoint has one) and
  `supervised_head` (if it has one); the kwargs build the matching
  `SimCLRModel`.
  """
  used = set()

  def take(prefix):
    keys = [k for k in variables if k.startswith(prefix + '/')]
    used.update(keys)
    return {k: variables[k] for k in keys}

  tree = _Tree()
  # --- Stem ---------------------------------------------------------------
  stem = _layer_list(take('resnet_model/initial_conv_relu_max_pool'),
                     'resnet_model/initial_conv_relu_max_pool')
  if len(stem) == 2:
    pairs = _convs_and_bns(stem, ('',), 'stem')
    kernel_size = pairs[0][1].shape[0]
    cifar_stem = kernel_size == 3
    if kernel_size not in (3, 7):
      raise ConversionError(f'stem conv is {kernel_size}x{kernel_size}; '
                            'expected 3x3 (CIFAR) or 7x7 (ImageNet).')
  elif len(stem) == 6:
    pairs = _convs_and_bns(stem, ('0', '1', '2'), 'ResNet-D stem')
    cifar_stem = False
  else:
    raise ConversionError(f'stem has {len(stem)} layers with variables; '
                          'expected 2 (one conv) or 6 (ResNet-D).')
  for suffix, kernel, bn in pairs:
    tree.conv(('resnet', 'stem', 'conv' + suffix), kernel)
    tree.bn(('resnet', 'stem', 'bn' + suffix), bn)

  # --- Block groups -------------------------------------------------------
  group_keys = take('resnet_model/block_groups')
  groups = {int(m.group(1)) for m in (
      re.match(r'resnet_model/block_groups/(\d+)/', k) for k in group_keys)
            if m}
  if groups != set(range(4)):
    raise ConversionError(f'block groups {sorted(groups)}; expected 0..3.')
  blocks_per_group = []
  gate_widths = []  # (filters, SK gate width) per SK conv.
  for g in range(4):
    group = f'resnet_model/block_groups/{g}/layers'
    num_blocks = len({int(m.group(1)) for m in (
        re.match(re.escape(group) + r'/(\d+)/', k) for k in group_keys) if m})
    if not num_blocks:
      raise ConversionError(f'block group {g + 1} is missing.')
    blocks_per_group.append(num_blocks)
    for b in range(num_blocks):
      block = f'{group}/{b}'
      where = f'block_group{g + 1} block {b}'
      path = ('resnet', f'block_group{g + 1}_block{b}')
      if any(k.startswith(block + '/conv2d_bn_layers/') for k in group_keys):
        raise ConversionError(
            'basic-block ResNet (18/34): the reference gives the first block '
            'a projection shortcut our ResNet does not have; only depth >= 50 '
            'converts.')
      shortcut = _layer_list(group_keys, block + '/projection_layers')
      if shortcut:
        (_, kernel, bn), = _convs_and_bns(shortcut, ('',), where + ' shortcut')
        tree.conv(path + ('shortcut', 'conv'), kernel)
        tree.bn(path + ('shortcut', 'bn'), bn)
      layers = _layer_list(group_keys, block + '/conv_relu_dropblock_layers')
      kinds = [_kind(layer) for layer in layers]
      if kinds == ['conv', 'bn'] * 3:
        for name, kernel, bn in _convs_and_bns(layers, ('1', '2', '3'), where):
          tree.conv(path + ('conv' + name,), kernel)
          tree.bn(path + ('bn' + name,), bn)
      elif kinds == ['conv', 'bn', 'sk', 'conv', 'bn']:
        tree.conv(path + ('conv1',), layers[0]['conv2d/kernel'])
        tree.bn(path + ('bn1',), layers[1])
        sk = layers[2]
        sk_path = path + ('sk_conv',)
        tree.conv(sk_path + ('conv',), sk['conv2d_fixed_padding/conv2d/kernel'])
        tree.bn(sk_path + ('bn',), sk, 'batch_norm_relu/bn/')
        tree.conv(sk_path + ('gate_conv1',), sk['conv2d_0/kernel'])
        tree.bn(sk_path + ('gate_bn',), sk, 'batch_norm_relu_1/bn/')
        tree.conv(sk_path + ('gate_conv2',), sk['conv2d_1/kernel'])
        filters = layers[0]['conv2d/kernel'].shape[-1]
        gate_widths.append((filters, sk['conv2d_0/kernel'].shape[-1]))
        tree.conv(path + ('conv3',), layers[3]['conv2d/kernel'])
        tree.bn(path + ('bn3',), layers[4])
      else:
        raise ConversionError(f'{where}: layers {kinds}; expected a '
                              'bottleneck block (conv, bn) x 3 or with an SK '
                              'conv.')
  depths = {tuple(layers): depth for depth, (kind, layers)
            in resnet_lib.RESNET_LAYERS.items() if kind == 'bottleneck'}
  if tuple(blocks_per_group) not in depths:
    raise ConversionError(f'blocks per group {blocks_per_group} match no '
                          f'bottleneck ResNet depth ({sorted(depths)}).')
  depth = depths[tuple(blocks_per_group)]
  first_filters = tree.params['resnet']['block_group1_block0']['conv1'][
      'kernel'].shape[-1]
  if first_filters % 64:
    raise ConversionError(f'first block has {first_filters} filters, not a '
                          'multiple of 64.')
  width = first_filters // 64
  sk_ratio = _sk_ratio(gate_widths)

  # --- Heads --------------------------------------------------------------
  head_prefix = next((p for p in ('_projection_head', 'projection_head')
                      if any(k.startswith(p + '/') for k in variables)), None)
  num_proj_layers, proj_out_dim = 0, 128
  if head_prefix:
    head = _layer_list(take(head_prefix + '/linear_layers'),
                       head_prefix + '/linear_layers')
    for j, layer in enumerate(head):
      if sorted(layer) != sorted(
          ['dense/kernel', 'bn_relu/bn/gamma', 'bn_relu/bn/moving_mean',
           'bn_relu/bn/moving_variance'] +
          (['bn_relu/bn/beta'] if j < len(head) - 1 else [])):
        raise ConversionError(f'projection head layer {j}: variables '
                              f'{sorted(layer)} are not Dense + BN.')
      tree.conv(('projection_head', f'layer_{j}', 'dense'),
                layer['dense/kernel'])
      tree.bn(('projection_head', f'layer_{j}', 'bn'), layer, 'bn_relu/bn/')
    num_proj_layers = len(head)
    proj_out_dim = head[-1]['dense/kernel'].shape[-1]
  supervised = take('supervised_head')
  num_classes = None
  if supervised:
    kernel = supervised.get('supervised_head/linear_layer/dense/kernel')
    bias = supervised.get('supervised_head/linear_layer/dense/bias')
    if kernel is None or bias is None or len(supervised) != 2:
      raise ConversionError('supervised head: expected linear_layer/dense/'
                            f'{{kernel,bias}}, found {sorted(supervised)}.')
    tree.params['supervised_head'] = {'kernel': kernel, 'bias': bias}
    num_classes = kernel.shape[-1]

  unused = sorted(set(variables) - used)
  if unused:
    raise ConversionError(f'{len(unused)} variables have no place in the '
                          f'model, e.g. {unused[:3]}.')
  model_kwargs = dict(
      resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
      cifar_stem=cifar_stem,
      proj_head_mode='nonlinear' if num_proj_layers else 'none',
      num_proj_layers=max(num_proj_layers, 1), proj_out_dim=proj_out_dim,
      num_classes=num_classes, train_mode='pretrain',
      lineareval_while_pretraining=num_classes is not None)
  flax_vars = jax.tree.map(lambda x: np.asarray(x, np.float32),
                           {'params': tree.params,
                            'batch_stats': tree.batch_stats})
  check_against_model(flax_vars, model_kwargs)
  return flax_vars, model_kwargs


def _sk_ratio(gate_widths) -> float:
  """An sk_ratio that gives every SK gate its width (0 without SK convs).

  Widths are max(int(filters·ratio), 32): when all are 32 the ratio is not
  determined and any small one gives the same network.
  """
  if not gate_widths:
    return 0.0
  above_min = [width / filters for filters, width in gate_widths if width > 32]
  ratio = above_min[0] if above_min else DEFAULT_SK_RATIO
  for filters, width in gate_widths:
    if max(int(filters * ratio), 32) != width:
      raise ConversionError(f'SK gate widths {gate_widths} fit no single '
                            'sk_ratio.')
  return ratio


def build_model(model_kwargs: Mapping[str, Any]) -> SimCLRModel:
  return SimCLRModel(**model_kwargs)


def check_against_model(flax_vars, model_kwargs) -> None:
  """Raises ConversionError unless flax_vars has exactly the model's leaves."""
  model = build_model(model_kwargs)
  size = 32 if model_kwargs['cifar_stem'] else 64
  expected = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros((1, size, size, 3)), train=False))
  flat = lambda t: {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  want = flat({k: expected[k] for k in ('params', 'batch_stats')})
  got = flat(flax_vars)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    raise ConversionError(
        f'converted tree does not fit SimCLRModel({model_kwargs}): missing '
        f'{missing[:3]}, unexpected {extra[:3]}, wrong shape '
        f'{[(k, got[k], want[k]) for k in wrong[:3]]}.')


def save(flax_vars, out: str) -> str:
  """Writes {'params', 'batch_stats'} as an Orbax tree (init_checkpoint)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out, flax_vars, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  return out


def config_overrides(model_kwargs: Mapping[str, Any], out: str) -> str:
  """The --config flags that build the same model from a simclr_jax config."""
  flags_ = [f'--config.resnet_depth={model_kwargs["resnet_depth"]}',
            f'--config.width_multiplier={model_kwargs["width_multiplier"]}',
            f'--config.sk_ratio={model_kwargs["sk_ratio"]}',
            f'--config.proj_head_mode={model_kwargs["proj_head_mode"]}']
  if model_kwargs['proj_head_mode'] != 'none':
    flags_ += [f'--config.num_proj_layers={model_kwargs["num_proj_layers"]}',
               f'--config.proj_out_dim={model_kwargs["proj_out_dim"]}']
  return ' '.join(flags_ + [f'--config.init_checkpoint={out}'])


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
def run(tf_checkpoint: str, out: str) -> str:
  """Converts and saves; returns the summary that the command line prints."""
  flax_vars, model_kwargs = convert(read_tf_checkpoint(tf_checkpoint))
  out = save(flax_vars, out)
  count = sum(np.size(x) for x in jax.tree.leaves(flax_vars['params']))
  k = model_kwargs
  head = k['num_proj_layers'] if k['proj_head_mode'] != 'none' else 0
  return (f'Converted ResNet-{k["resnet_depth"]} {k["width_multiplier"]}x '
          f'sk_ratio={k["sk_ratio"]} '
          f'({"CIFAR" if k["cifar_stem"] else "ImageNet"} stem), projection '
          f'head {head} layers, supervised head {k["num_classes"] or "none"}; '
          f'{count:,} parameters -> {out}\n'
          f'Use with: {config_overrides(model_kwargs, out)}')


def main(argv):
  del argv
  args = flags.FLAGS
  if not args.tf_checkpoint or not args.out:
    raise app.UsageError('--tf_checkpoint and --out are required.')
  try:
    print(run(args.tf_checkpoint, args.out))
  except ConversionError as e:
    raise SystemExit(f'convert_tf2: error: {e}') from None


if __name__ == '__main__':
  # Defined here, not at import: importing the converter (tests, notebooks)
  # must not add flags to a program that has its own.
  flags.DEFINE_string('tf_checkpoint', None, 'Reference TF2 checkpoint: a '
                      'SavedModel directory, checkpoint prefix or directory.')
  flags.DEFINE_string('out', None, 'Output directory (Orbax; overwritten).')
  app.run(main)
