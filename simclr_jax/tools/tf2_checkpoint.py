"""Reading the reference release's TF2 checkpoints and SavedModels.

`read_tf_checkpoint(path)` gives the model's variables keyed by their
attribute paths relative to the model's root, whatever the file: a training
checkpoint or a SavedModel (`resolve_tf_checkpoint` lists the paths
accepted).

Variables by attribute path. A TF2 checkpoint is the object graph of the
saved Python objects; a training checkpoint keys each variable by its path of
attribute names in the reference's Keras model (`tf2/model.py`,
`tf2/resnet.py`):
  .../resnet_model/initial_conv_relu_max_pool/{i}/conv2d/kernel     stem
  .../resnet_model/block_groups/{g}/layers/{b}/...                  blocks:
    bottleneck (ResNet-50+, `BottleneckBlock`):
      projection_layers/{i}/conv2d/kernel | bn/{gamma,beta,moving_mean,
        moving_variance}                                 (first block)
      conv_relu_dropblock_layers/{i}/conv2d/kernel | bn/...
        | conv2d_fixed_padding/conv2d/kernel, batch_norm_relu/bn/...,
          conv2d_0/kernel, batch_norm_relu_1/bn/..., conv2d_1/kernel (SK, v2)
    basic (ResNet-18/34, `ResidualBlock`):
      shortcut_layers/{i}/...                            (first block)
      conv2d_bn_layers/{i}/conv2d/kernel | bn/...        (conv, bn, conv, bn)
  .../_projection_head/linear_layers/{j}/dense/kernel, bn_relu/bn/...
  .../supervised_head/linear_layer/dense/{kernel,bias}
Whatever precedes `resnet_model/` (`model/` in a training checkpoint) is the
model's root; optimizer slots, the step counter and anything outside the
model root are ignored. Layers without variables (padding, pooling, dropblock,
identity) occupy list indices too, so layers are matched by their order and
kind, not by index; an index tells only where a shortcut's conv sits (after
an average pool: the ResNet-D shortcut of v2).

SavedModels. Their `variables/variables` is a checkpoint of the exported
root object, but it does not key variables by those names: a checkpoint
names each variable by the first path that reaches it from the root
(breadth first), and a SavedModel has shorter ones. The reference's export
root (run.py `build_saved_model`) holds `model` and `trainable_variables_list`
(= `model.trainable_variables`), and Keras 2 gives every layer it saves a
`variables` list (also `trainable_variables`, `keras_api`, ...). So in a
SavedModel written by the reference's code the trainable variables are
keyed `trainable_variables_list/<i>` and the BatchNorm moving averages
`model/resnet_model/variables/<j>` (or `model/variables/<j>`) — positions,
not names; Keras 3 keys the moving averages by attribute path. The object
graph stored in the same file (`_CHECKPOINTABLE_OBJECT_GRAPH`) keeps every
edge, including each layer's attribute edges (`conv2d`, `kernel`, ...), so
each variable's attribute path is read from the graph, skipping the edges
that only a SavedModel adds: the same paths as in a training checkpoint,
with no guessing from shapes or order. Keras 3 layers keep their kernel in
an attribute `_kernel`; it is read as `kernel`.
"""
import collections
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

VALUE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
MODEL_ANCHOR = 'resnet_model/'
# Object-graph edges that a SavedModel adds beside the attributes: Keras's
# per-layer lists of the same variables, its `keras_api` object, and the
# reference's export root's list of the trainable ones (run.py).
SAVED_MODEL_ONLY_EDGES = frozenset({
    'variables', 'trainable_variables', 'non_trainable_variables',
    'keras_api', 'trainable_variables_list'})
class ConversionError(ValueError):
  """Input this converter cannot use (the message says why, naming the file)."""


def one_line(error: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + '...'


# ----------------------------------------------------------------------------
# Finding and reading the checkpoint.
# ----------------------------------------------------------------------------
def _saved_model_prefix(directory: str) -> Optional[str]:
  """The variables prefix of the SavedModel that `directory` designates.

  None when it designates none; ConversionError for a SavedModel without
  variables.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  for candidate in (directory, os.path.join(directory, 'saved_model')):
    if not gfile.isdir(candidate):
      continue
    # run.py exports to saved_model/<global step>/: take the newest.
    steps = sorted(int(name.rstrip('/')) for name in gfile.listdir(candidate)
                   if re.fullmatch(r'\d+/?', name) and gfile.exists(
                       os.path.join(candidate, name.rstrip('/'),
                                    'saved_model.pb')))
    if not gfile.exists(os.path.join(candidate, 'saved_model.pb')) and steps:
      candidate = os.path.join(candidate, str(steps[-1]))
    prefix = os.path.join(candidate, 'variables', 'variables')
    if gfile.exists(prefix + '.index'):
      return prefix
    if gfile.exists(os.path.join(candidate, 'saved_model.pb')):
      raise ConversionError(f'SavedModel {candidate} has no variables '
                            f'({prefix}.index does not exist).')
  return None


def resolve_tf_checkpoint(path: str) -> str:
  """The checkpoint prefix that PATH designates (see the module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gfile = tf.io.gfile
  if path.endswith('.index') and gfile.exists(path) and not gfile.isdir(path):
    return path[:-len('.index')]
  if gfile.isdir(path):
    prefix = _saved_model_prefix(path)
    if prefix:
      return prefix
    try:
      latest = tf.train.latest_checkpoint(path)
    except Exception as e:  # pylint: disable=broad-except
      # A `checkpoint` file that is not a CheckpointState text proto.
      raise ConversionError(f'{os.path.join(path, "checkpoint")} cannot be '
                            f'read ({one_line(e)}).') from None
    if latest:
      return latest
    raise ConversionError(f'{path} holds neither a SavedModel nor a '
                          'checkpoint.')
  if gfile.exists(path + '.index'):
    return path
  if gfile.exists(path):
    raise ConversionError(f'{path} is neither a directory nor a checkpoint '
                          f'prefix ({path}.index does not exist).')
  raise ConversionError(f'{path} does not exist.')


def _attribute_paths(graph_bytes: bytes) -> Dict[str, str]:
  """{checkpoint key: the variable's path of attribute names}.

  Breadth first from the root over the object graph, skipping the edges
  that only a SavedModel has (see the module docstring); the first path
  found is a shortest one. Variables reachable only through skipped edges
  (the optimizer's slots have no edges at all) are left out.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow.core.protobuf import trackable_object_graph_pb2
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(graph_bytes)
  paths = {0: ()}
  queue = collections.deque([0])
  while queue:
    node = queue.popleft()
    for child in graph.nodes[node].children:
      if (child.local_name in SAVED_MODEL_ONLY_EDGES or
          child.node_id in paths):
        continue
      paths[child.node_id] = paths[node] + (child.local_name,)
      queue.append(child.node_id)
  keys = {}
  for node, path in paths.items():
    for attribute in graph.nodes[node].attributes:
      if attribute.name == 'VARIABLE_VALUE' and path:
        if path[-1] == '_kernel':  # Keras 3's Conv2D and Dense.
          path = path[:-1] + ('kernel',)
        keys[attribute.checkpoint_key] = '/'.join(path)
  return keys


def _read_tensor(reader, prefix: str, key: str) -> Any:
  """reader.get_tensor(key), or ConversionError naming the data file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return reader.get_tensor(key)
  except Exception as e:  # pylint: disable=broad-except
    # DataLossError, OutOfRangeError, ...: the index names bytes the data
    # file does not hold (intact).
    files = sorted(tf.io.gfile.glob(prefix + '.data-*')) or [
        prefix + '.data-*']
    raise ConversionError(
        f'{", ".join(files)}: {key} cannot be read ({type(e).__name__}: '
        f'{one_line(e)}); is the file truncated or damaged?') from None


def read_tf_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """{attribute path: value} of the model's variables, relative to its root."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  prefix = resolve_tf_checkpoint(path)
  try:
    reader = tf.train.load_checkpoint(prefix)
    stored = reader.get_variable_to_shape_map()
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{prefix}.index cannot be read as a TF checkpoint '
                          f'({type(e).__name__}: {one_line(e)}).') from None
  if OBJECT_GRAPH_KEY in stored:
    graph = _read_tensor(reader, prefix, OBJECT_GRAPH_KEY)
    try:
      paths = _attribute_paths(graph)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f'{prefix}: its object graph does not parse '
                            f'({type(e).__name__}: {one_line(e)}).') from None
  else:  # A name-based (TF1) checkpoint: its keys are all there is.
    paths = {k: k[:-len(VALUE_SUFFIX)] if k.endswith(VALUE_SUFFIX) else k
             for k in stored}
  if not paths:
    raise ConversionError(f'{prefix}.index holds no variables.')
  roots = {p[:p.index(MODEL_ANCHOR)] for p in paths.values()
           if MODEL_ANCHOR in p}
  if len(roots) != 1:
    raise ConversionError(
        f'expected one model with a {MODEL_ANCHOR!r} in {prefix}.index, found '
        f'{len(roots)} roots {sorted(roots)} (is it a checkpoint of the '
        'reference tf2/ code?)')
  root = roots.pop()
  return {p[len(root):]: _read_tensor(reader, prefix, key)
          for key, p in paths.items() if p.startswith(root)}


# ----------------------------------------------------------------------------
# Layers in order: a Keras layer list -> [(index, {name: value})].
# ----------------------------------------------------------------------------
def indexed_layer_list(variables: Mapping[str, np.ndarray], prefix: str
                        ) -> List[Tuple[int, Dict[str, np.ndarray]]]:
  """(i, variables of `prefix/{i}/...`) for each index i, in index order."""
  by_index = collections.defaultdict(dict)
  pattern = re.compile(re.escape(prefix) + r'/(\d+)/(.+)')
  for key, value in variables.items():
    match = pattern.fullmatch(key)
    if match:
      by_index[int(match.group(1))][match.group(2)] = value
  return [(i, by_index[i]) for i in sorted(by_index)]


def layer_list(variables: Mapping[str, np.ndarray], prefix: str
                ) -> List[Dict[str, np.ndarray]]:
  """The variables of `prefix/{i}/...`, one dict per index i, in index order."""
  return [layer for _, layer in indexed_layer_list(variables, prefix)]


def layer_kind(layer: Mapping[str, np.ndarray]) -> str:
  if 'conv2d/kernel' in layer and len(layer) == 1:
    return 'conv'  # Conv2dFixedPadding.
  if all(k.startswith('bn/') for k in layer):
    return 'bn'  # BatchNormRelu.
  if 'conv2d_fixed_padding/conv2d/kernel' in layer:
    return 'sk'  # SK_Conv2D.
  raise ConversionError(f'unknown layer with variables {sorted(layer)} (SE '
                        'layers and other options are not supported).')


def bn_variables(layer: Mapping[str, np.ndarray], prefix: str = 'bn/'):
  """Keras BN variables -> ({'scale', 'bias'}, {'mean', 'var'})."""
  params = {'scale': layer[prefix + 'gamma']}
  if prefix + 'beta' in layer:  # The projection's last BN has no centre.
    params['bias'] = layer[prefix + 'beta']
  stats = {'mean': layer[prefix + 'moving_mean'],
           'var': layer[prefix + 'moving_variance']}
  return params, stats


class FlaxTree:
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
    params, stats = bn_variables(layer, prefix)
    self._at(self.params, path).update(params)
    self._at(self.batch_stats, path).update(stats)


def convs_and_bns(layers, names: Tuple[str, ...], where: str):
  """Pairs the conv layers of a list with the BN layer that follows each."""
  kinds = [layer_kind(layer) for layer in layers]
  expected = ['conv', 'bn'] * len(names)
  if kinds != expected:
    raise ConversionError(f'{where}: layers {kinds}, expected {expected}.')
  return [(name, layers[2 * i]['conv2d/kernel'], layers[2 * i + 1])
          for i, name in enumerate(names)]
