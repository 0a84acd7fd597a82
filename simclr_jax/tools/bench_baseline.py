"""The SimCLR pretraining step written directly with `jax.jit`: the bench's floor.

Same computation as `train.make_train_step` in pretrain mode (ResNet v1 with
the reference's padding, training-mode BatchNorm over the global batch,
projection head, NT-Xent, linear head on stop_gradient(h), LARS with the
reference's exclusions, weight and gradient norms), but with no Flax, no optax
and no code of ours: plain `lax.conv_general_dilated`, dicts of arrays and one
`jax.jit` over the data mesh. The loss is written on the global batch and XLA
partitions it. If our step is slower than this, our layers cost something.
"""
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

BN_DECAY, BN_EPS, LARGE_NUM = 0.9, 1e-5, 1e9
LAYERS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)),
          50: (True, (3, 4, 6, 3)), 101: (True, (3, 4, 23, 3)),
          152: (True, (3, 8, 36, 3)), 200: (True, (3, 24, 36, 3))}


def architecture(depth, width, cifar_stem, num_proj_layers, proj_out_dim):
  """Static list of ops: ('conv', name, k, cin, cout, stride), ('bn', ...)...

  Blocks are ('block', name, ops_of_branch, ops_of_shortcut).
  """
  bottleneck, groups = LAYERS[depth]
  stem_k, stem_s = (3, 1) if cifar_stem else (7, 2)
  blocks, cin = [], int(64 * width)  # As the model: int(base·w).
  for g, n in enumerate(groups):
    f = int(64 * 2 ** g * width)
    cout = 4 * f if bottleneck else f
    for j in range(n):
      s = 2 if (g > 0 and j == 0) else 1
      if bottleneck:
        branch = [(1, cin, f, 1), (3, f, f, s), (1, f, cout, 1)]
      else:
        branch = [(3, cin, f, s), (3, f, f, 1)]
      # The first block of a group has a projection shortcut (reference).
      short = (1, cin, cout, s) if j == 0 else None
      blocks.append((f'g{g}b{j}', branch, short))
      cin = cout
  head = [cin] * (num_proj_layers - 1) + [proj_out_dim]
  return dict(stem=(stem_k, 3, int(64 * width), stem_s), pool=not cifar_stem,
              blocks=blocks, width=cin, head=head)


def init(rng, arch, num_classes):
  """params (conv/dense kernels, BN scale/bias) and BN statistics."""
  params, stats = {}, {}
  keys = iter(jax.random.split(rng, 1000))

  def conv(name, k, cin, cout, _=None, zero_bn=False):
    std = math.sqrt(1.0 / (k * k * cin)) / .87962566103423978
    params[name] = std * jax.random.truncated_normal(
        next(keys), -2, 2, (k, k, cin, cout), jnp.float32)
    bn(name + '/bn', cout, zero=zero_bn)

  def bn(name, c, zero=False, bias=True):
    params[name + '/scale'] = (jnp.zeros if zero else jnp.ones)((c,))
    if bias:
      params[name + '/bias'] = jnp.zeros((c,))
    stats[name + '/mean'], stats[name + '/var'] = jnp.zeros((c,)), jnp.ones((c,))

  conv('stem', *arch['stem'])
  for name, branch, short in arch['blocks']:
    for i, spec in enumerate(branch):
      conv(f'{name}/c{i}', *spec, zero_bn=i == len(branch) - 1)
    if short:
      conv(f'{name}/short', *short)
  cin = arch['width']
  for i, d in enumerate(arch['head']):
    params[f'head{i}'] = 0.01 * jax.random.normal(next(keys), (cin, d))
    bn(f'head{i}/bn', d, bias=i < len(arch['head']) - 1)
    cin = d
  params['sup/w'] = 0.01 * jax.random.normal(next(keys), (arch['width'],
                                                          num_classes))
  params['sup/b'] = jnp.zeros((num_classes,))
  return params, stats


def residual_blocks(arch, x, conv_bn, relu):
  """The blocks of `arch` on x, with the framework's conv_bn(name, x, k,
  stride, relu) and relu (shared by this baseline and the TF yardstick)."""
  for name, branch, short in arch['blocks']:
    y = x
    for i, (k, _, _, s) in enumerate(branch):
      y = conv_bn(f'{name}/c{i}', y, k, s, i < len(branch) - 1)
    if short:
      x = conv_bn(f'{name}/short', x, 1, short[3], False)
    x = relu(x + y)
  return x


def forward(params, stats, x, arch, dtype):
  """-> (h, z, logits, new BN statistics); training-mode BatchNorm."""
  new_stats = {}

  def bn(name, x, relu):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(jnp.mean(xf * xf, axes) - mean * mean, 0.0)
    new_stats[name + '/mean'] = BN_DECAY * stats[name + '/mean'] + (
        1 - BN_DECAY) * mean
    new_stats[name + '/var'] = BN_DECAY * stats[name + '/var'] + (
        1 - BN_DECAY) * var
    mul = lax.rsqrt(var + BN_EPS) * params[name + '/scale']
    add = params.get(name + '/bias', 0.0) - mean * mul
    y = x * mul.astype(x.dtype) + add.astype(x.dtype)
    return jax.nn.relu(y) if relu else y

  def conv_bn(name, x, k, stride, relu):
    if stride > 1:
      pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
      padding = (pad, pad)
    else:
      padding = 'SAME'
    y = lax.conv_general_dilated(
        x, params[name].astype(dtype), (stride, stride), padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return bn(name + '/bn', y, relu)

  x = x.astype(dtype)
  k, _, _, s = arch['stem']
  x = conv_bn('stem', x, k, s, True)
  if arch['pool']:
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          'SAME')
  x = residual_blocks(arch, x, conv_bn, jax.nn.relu)
  h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  z = h.astype(dtype)
  for i in range(len(arch['head'])):
    z = bn(f'head{i}/bn', z @ params[f'head{i}'].astype(dtype),
           i < len(arch['head']) - 1)
  logits = lax.stop_gradient(h) @ params['sup/w'] + params['sup/b']
  return h, z.astype(jnp.float32), logits, new_stats


def nt_xent(z, temperature):
  """z [2N, d], views of image i at rows 2i, 2i+1 -> reference NT-Xent."""
  z = z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
  a, b = z[0::2], z[1::2]
  n = a.shape[0]
  mask = jnp.eye(n) * LARGE_NUM

  def ce(pos_block, self_block):
    logits = jnp.concatenate([pos_block, self_block - mask], 1)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits),
                                jnp.arange(n)[:, None], 1)[:, 0]
  ab, aa = a @ b.T / temperature, a @ a.T / temperature
  ba, bb = b @ a.T / temperature, b @ b.T / temperature
  return jnp.mean(ce(ab, aa) + ce(ba, bb))


def excluded(name):
  """LARS exclusion, as optim.lars_exclusion_mask: BN params, biases, head."""
  return '/bn/' in name or name.endswith('/bias') or name.startswith('sup/')


def make_step(arch, *, dtype, temperature, weight_decay, learning_rate,
              momentum=0.9, eeta=1e-3, mesh=None):
  """jitted (params, stats, momenta, images [N,2,H,W,3], labels) -> same + loss."""

  def step(params, stats, mom, images, labels):
    n = images.shape[0]
    x = images.reshape((2 * n,) + images.shape[2:])
    y = jnp.repeat(labels, 2)

    def loss_fn(p):
      _, z, logits, new_stats = forward(p, stats, x, arch, dtype)
      con = nt_xent(z, temperature)
      sup = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                          y[:, None], 1))
      l2 = 0.5 * weight_decay * jnp.sum(p['sup/w'] ** 2)
      return con + sup + l2, (con, new_stats)

    grads, (con, new_stats) = jax.grad(loss_fn, has_aux=True)(params)
    new_params, new_mom = {}, {}
    for name, w in params.items():
      g = grads[name]
      if excluded(name):
        lr = learning_rate
      else:
        g = g + weight_decay * w
        wn, gn = jnp.linalg.norm(w), jnp.linalg.norm(g)
        trust = jnp.where((wn > 0) & (gn > 0), eeta * wn / gn, 1.0)
        lr = learning_rate * trust
      new_mom[name] = momentum * mom[name] + lr * g
      new_params[name] = w - new_mom[name]
    norms = [jnp.sqrt(sum(jnp.sum(v ** 2) for v in t.values()))
             for t in (params, grads)]
    return new_params, new_stats, new_mom, (con, *norms)

  if mesh is None:
    return jax.jit(step, donate_argnums=(0, 1, 2))
  rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  return jax.jit(step, in_shardings=(rep, rep, rep, data, data),
                 out_shardings=(rep, rep, rep, rep), donate_argnums=(0, 1, 2))


def from_config(config, num_classes, mesh=None):
  """(step, initial (params, stats, momenta)) for a pretrain config."""
  if config.model != 'resnet':
    raise ValueError(f'{__name__} models ResNets only; config.model is '
                     f'{config.model!r}.')
  arch = architecture(config.resnet_depth, config.width_multiplier,
                      config.image_size <= 32, config.num_proj_layers,
                      config.proj_out_dim)
  params, stats = init(jax.random.PRNGKey(0), arch, num_classes)
  mom = jax.tree.map(jnp.zeros_like, params)
  step = make_step(arch, dtype=jnp.dtype(config.dtype),
                   temperature=config.temperature,
                   weight_decay=config.weight_decay,
                   learning_rate=0.1, mesh=mesh)
  state = (params, stats, mom)
  if mesh is not None:
    state = jax.device_put(state, NamedSharding(mesh, P()))
  return step, state
