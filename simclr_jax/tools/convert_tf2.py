r"""Converts the reference release's TF2 checkpoints to our Flax parameter tree.

`python -m simclr_jax.tools.convert_tf2 --tf_checkpoint=PATH --out=DIR [--overwrite]`

PATH is a model of the reference's `tf2/` code (google-research/simclr):
  - a released model directory (`r50_1x_sk0/`: its `saved_model/` is read),
  - a SavedModel directory (`.../saved_model`, or the `saved_model/` of a
    training run's model_dir, whose numbered exports `<step>/` the
    reference's run.py writes: the newest is read),
  - a checkpoint prefix (`.../ckpt-1`, or its `.index` file) or a directory
    with a `checkpoint` file (the newest checkpoint).
DIR receives an Orbax tree `{'params', 'batch_stats'}` that
`config.init_checkpoint` accepts (see checkpoint.load_pretrained) for linear
eval or fine-tuning here.

How the checkpoint is read (training checkpoints and SavedModels alike):
tf2_checkpoint.py.

Depth, block kind, width multiplier, selective-kernel ratio, stem kind,
projection head and classifier size are read from the checkpoint's shapes,
and the result is checked leaf by leaf against `jax.eval_shape` of our
`SimCLRModel` built with them. Kernels need no transposition: Keras Conv2D
kernels are HWIO and Dense kernels [in, out], as Flax's. ResNet-18/34 have a
projection shortcut on the first block of every group, as our ResNet does.

Output. DIR must not exist or be empty; with `--overwrite` it may also hold
a previous conversion, recognised by the marker file that every conversion
writes into DIR, listing what it wrote (runtime/owned_output.py): a
directory with anything else in it is refused even with `--overwrite`, so
the converter never deletes a file it did not write. The tree is written into a hidden
temporary directory beside DIR (`.DIR.convert_tf2-tmp-*`) and renamed to DIR
when complete: an interrupted conversion never leaves a DIR that looks
finished, and a failed one removes its temporary directory. (Killed between
the two renames of a replacement, DIR is absent and the previous conversion
is in that hidden directory.)

Bad input (a missing or unreadable path, a checkpoint that is not the
reference's model, an --out that may not be written) ends with one line on
stderr, `convert_tf2: error: ...`, and exit code 2.

ResNets only: the reference release has no Vision Transformer, so there is
no ViT checkpoint to convert (a ViT starts from its own pretraining run
here; preflight refuses a converted ResNet as a ViT's init_checkpoint).
"""
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.models import resnet as resnet_lib
from simclr_jax.models.simclr import SimCLRModel
from simclr_jax.runtime import owned_output
from simclr_jax.tools.tf2_checkpoint import ConversionError
from simclr_jax.tools.tf2_checkpoint import convs_and_bns
from simclr_jax.tools.tf2_checkpoint import FlaxTree
from simclr_jax.tools.tf2_checkpoint import indexed_layer_list
from simclr_jax.tools.tf2_checkpoint import layer_kind
from simclr_jax.tools.tf2_checkpoint import layer_list
from simclr_jax.tools.tf2_checkpoint import one_line
from simclr_jax.tools.tf2_checkpoint import read_tf_checkpoint
from simclr_jax.tools.tf2_checkpoint import resolve_tf_checkpoint

# The SimCLRv2 default; any ratio giving the same gate widths is equivalent.
DEFAULT_SK_RATIO = 0.0625
# Names this converter in the marker file of its output directories.
WRITER = 'simclr_jax convert_tf2'
EXIT_BAD_INPUT = 2


# ----------------------------------------------------------------------------
# The conversion.
# ----------------------------------------------------------------------------
# The reference's two block classes (tf2/resnet.py): the list holding the
# projection shortcut of a group's first block, the list of the residual
# branch, and the kinds of the branch's layers with variables.
BLOCK_LAYOUTS = {
    'basic': ('shortcut_layers', 'conv2d_bn_layers'),  # ResidualBlock
    'bottleneck': ('projection_layers', 'conv_relu_dropblock_layers'),
}


def _convert_stem(tree: 'FlaxTree', take) -> str:
  """Stem variables -> tree; returns 'cifar', 'imagenet' or 'resnet_d'."""
  prefix = 'resnet_model/initial_conv_relu_max_pool'
  stem = layer_list(take(prefix), prefix)
  if len(stem) == 2:
    pairs = convs_and_bns(stem, ('',), 'stem')
    kernel_size = pairs[0][1].shape[0]
    if kernel_size not in (3, 7):
      raise ConversionError(f'stem conv is {kernel_size}x{kernel_size}; '
                            'expected 3x3 (CIFAR) or 7x7 (ImageNet).')
    stem_kind = 'cifar' if kernel_size == 3 else 'imagenet'
  elif len(stem) == 6:
    pairs = convs_and_bns(stem, ('0', '1', '2'), 'ResNet-D stem')
    stem_kind = 'resnet_d'
  else:
    raise ConversionError(f'stem has {len(stem)} layers with variables; '
                          'expected 2 (one conv) or 6 (ResNet-D).')
  for suffix, kernel, bn in pairs:
    tree.conv(('resnet', 'stem', 'conv' + suffix), kernel)
    tree.bn(('resnet', 'stem', 'bn' + suffix), bn)
  return stem_kind


def _block_kind(keys, block: str, where: str) -> str:
  kinds = [kind for kind, (_, branch) in BLOCK_LAYOUTS.items()
           if any(k.startswith(f'{block}/{branch}/') for k in keys)]
  if len(kinds) != 1:
    found = sorted({k[len(block) + 1:].split('/')[0] for k in keys
                    if k.startswith(block + '/')})
    raise ConversionError(
        f'{where}: expected the layer lists of a basic block '
        f'{BLOCK_LAYOUTS["basic"]} or a bottleneck block '
        f'{BLOCK_LAYOUTS["bottleneck"]}, found {found}.')
  return kinds[0]


def _convert_branch(tree: 'FlaxTree', kind: str, layers, path, where: str):
  """A residual branch -> tree; the SK gate's (filters, width), or None."""
  kinds = [layer_kind(layer) for layer in layers]
  if kind == 'basic' and kinds == ['conv', 'bn'] * 2:
    names = ('1', '2')
  elif kind == 'bottleneck' and kinds == ['conv', 'bn'] * 3:
    names = ('1', '2', '3')
  elif kind == 'bottleneck' and kinds == ['conv', 'bn', 'sk', 'conv', 'bn']:
    tree.conv(path + ('conv1',), layers[0]['conv2d/kernel'])
    tree.bn(path + ('bn1',), layers[1])
    sk = layers[2]
    sk_path = path + ('sk_conv',)
    tree.conv(sk_path + ('conv',), sk['conv2d_fixed_padding/conv2d/kernel'])
    tree.bn(sk_path + ('bn',), sk, 'batch_norm_relu/bn/')
    tree.conv(sk_path + ('gate_conv1',), sk['conv2d_0/kernel'])
    tree.bn(sk_path + ('gate_bn',), sk, 'batch_norm_relu_1/bn/')
    tree.conv(sk_path + ('gate_conv2',), sk['conv2d_1/kernel'])
    tree.conv(path + ('conv3',), layers[3]['conv2d/kernel'])
    tree.bn(path + ('bn3',), layers[4])
    return layers[0]['conv2d/kernel'].shape[-1], sk['conv2d_0/kernel'].shape[-1]
  else:
    expected = ('(conv, bn) x 2' if kind == 'basic' else
                '(conv, bn) x 3 or conv, bn, SK conv, conv, bn')
    raise ConversionError(f'{where}: layers {kinds}; expected a {kind} block '
                          f'{expected}.')
  for name, kernel, bn in convs_and_bns(layers, names, where):
    tree.conv(path + ('conv' + name,), kernel)
    tree.bn(path + ('bn' + name,), bn)
  return None


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

  tree = FlaxTree()
  stem_kind = _convert_stem(tree, take)

  # --- Block groups -------------------------------------------------------
  group_keys = take('resnet_model/block_groups')
  groups = {int(m.group(1)) for m in (
      re.match(r'resnet_model/block_groups/(\d+)/', k) for k in group_keys)
            if m}
  if groups != set(range(4)):
    raise ConversionError(f'block groups {sorted(groups)}; expected 0..3.')
  blocks_per_group = []
  block_kinds = set()
  resnet_d_shortcuts = set()  # Per shortcut: is its conv after a pool?
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
      kind = _block_kind(group_keys, block, where)
      block_kinds.add(kind)
      shortcut_list, branch_list = BLOCK_LAYOUTS[kind]
      shortcut = indexed_layer_list(group_keys, f'{block}/{shortcut_list}')
      if shortcut:
        (_, kernel, bn), = convs_and_bns([layer for _, layer in shortcut],
                                          ('',), where + ' shortcut')
        tree.conv(path + ('shortcut', 'conv'), kernel)
        tree.bn(path + ('shortcut', 'bn'), bn)
        # ResNet-D puts (padding and) an average pool, which have no
        # variables, before the shortcut's conv.
        resnet_d_shortcuts.add(shortcut[0][0] > 0)
      gate = _convert_branch(
          tree, kind, layer_list(group_keys, f'{block}/{branch_list}'), path,
          where)
      if gate:
        gate_widths.append(gate)
  if len(block_kinds) != 1:
    raise ConversionError('both basic and bottleneck blocks: no ResNet '
                          'mixes them.')
  kind = block_kinds.pop()
  depths = {tuple(layers): depth for depth, (kind_, layers)
            in resnet_lib.RESNET_LAYERS.items() if kind_ == kind}
  if tuple(blocks_per_group) not in depths:
    raise ConversionError(f'blocks per group {blocks_per_group} match no '
                          f'{kind}-block ResNet depth '
                          f'({sorted(depths.values())}).')
  depth = depths[tuple(blocks_per_group)]
  first_filters = tree.params['resnet']['block_group1_block0']['conv1'][
      'kernel'].shape[-1]
  if first_filters % 64:
    raise ConversionError(f'first block has {first_filters} filters, not a '
                          'multiple of 64.')
  width = first_filters // 64
  # Our ResNet turns selective kernels (bottleneck), the ResNet-D stem
  # (ImageNet stem) and the ResNet-D shortcut on together, as the
  # reference's sk_ratio flag does.
  if len(resnet_d_shortcuts) > 1:
    raise ConversionError('some projection shortcuts are ResNet-D (average '
                          'pool, then conv) and some are not.')
  resnet_d = resnet_d_shortcuts == {True}
  if stem_kind != 'cifar' and (stem_kind == 'resnet_d') != resnet_d:
    raise ConversionError(
        f'{stem_kind} stem but {"ResNet-D" if resnet_d else "plain"} '
        'shortcuts; the reference (sk_ratio) turns both on together.')
  num_blocks = sum(blocks_per_group)
  if kind == 'bottleneck' and len(gate_widths) not in (0, num_blocks):
    raise ConversionError(f'{len(gate_widths)} of {num_blocks} blocks have '
                          'selective kernels; expected none or all.')
  if kind == 'bottleneck' and bool(gate_widths) != resnet_d:
    raise ConversionError(
        f'{"selective kernels" if gate_widths else "no selective kernels"} '
        f'but {"ResNet-D" if resnet_d else "plain"} shortcuts; the reference '
        '(sk_ratio) turns both on together.')
  if gate_widths:
    sk_ratio = _sk_ratio(gate_widths)
  else:
    # Basic blocks have no SK conv: any positive ratio gives the ResNet-D
    # stem and shortcuts, and nothing else.
    sk_ratio = DEFAULT_SK_RATIO if resnet_d else 0.0
  cifar_stem = stem_kind == 'cifar'

  # --- Heads --------------------------------------------------------------
  head_prefix = next((p for p in ('_projection_head', 'projection_head')
                      if any(k.startswith(p + '/') for k in variables)), None)
  num_proj_layers, proj_out_dim = 0, 128
  if head_prefix:
    head = layer_list(take(head_prefix + '/linear_layers'),
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


# ----------------------------------------------------------------------------
# Writing DIR: never over anything a conversion did not write.
# ----------------------------------------------------------------------------
def save(flax_vars, out: str, *, overwrite: bool = False,
         record: Optional[Mapping[str, Any]] = None) -> str:
  """Writes {'params', 'batch_stats'} as an Orbax tree (init_checkpoint).

  `out` must not exist or be empty, or with `overwrite` be a previous
  conversion (runtime/owned_output.py: written whole beside `out`, then
  renamed; on failure `out` is left as it was).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def write(directory):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory, flax_vars)
      checkpointer.wait_until_finished()

  try:
    return owned_output.write_local_output(out, write, writer=WRITER,
                                           overwrite=overwrite, record=record)
  except owned_output.OutputRefused as e:
    raise ConversionError(f'--out {e}') from None


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
def run(tf_checkpoint: str, out: str, *, overwrite: bool = False) -> str:
  """Converts and saves; returns the summary that the command line prints."""
  try:  # Before minutes of reading.
    owned_output.check_local_output(out, WRITER, overwrite=overwrite)
  except owned_output.OutputRefused as e:
    raise ConversionError(f'--out {e}') from None
  prefix = resolve_tf_checkpoint(tf_checkpoint)
  flax_vars, model_kwargs = convert(read_tf_checkpoint(prefix))
  out = save(flax_vars, out, overwrite=overwrite,
             record={'tf_checkpoint': prefix, 'model': model_kwargs})
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
  args = flags.FLAGS
  try:
    if len(argv) > 1:
      raise ConversionError(f'unexpected arguments {argv[1:]}.')
    if not args.tf_checkpoint or not args.out:
      raise ConversionError('--tf_checkpoint and --out are required.')
    print(run(args.tf_checkpoint, args.out, overwrite=args.overwrite))
  except ConversionError as e:
    print(f'convert_tf2: error: {one_line(e, limit=1000)}', file=sys.stderr,
          flush=True)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == '__main__':
  # TensorFlow (imported later, where a checkpoint is read) would add lines
  # of its own to the one error line: warnings about unreadable files, and
  # at load time, whatever TF_CPP_MIN_LOG_LEVEL says, a notice that oneDNN
  # kernels are on. The converter runs no TF kernel they would speed up.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  # Defined here, not at import: importing the converter (tests, notebooks)
  # must not add flags to a program that has its own.
  flags.DEFINE_string('tf_checkpoint', None, 'Reference TF2 model: a '
                      'SavedModel or model directory, a checkpoint prefix or '
                      'a directory of checkpoints.')
  flags.DEFINE_string('out', None, 'Output directory (Orbax). Must not exist '
                      'or be empty, unless --overwrite.')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it holds a '
                    'previous conversion (and nothing else).')
  app.run(main)
