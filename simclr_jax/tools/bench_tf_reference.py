"""The SimCLR pretraining step in TensorFlow, as the reference release runs it.

The yardstick for "CPU speed vs the reference" (`python -m simclr_jax.tools.bench
--what=train,tf`): the network of bench_baseline.py (same architecture list,
same initial values), written with TF ops the way the reference's
`tf2/resnet.py` and `tf2/model.py` run on CPU: `tf.nn.conv2d` (oneDNN on x86),
fused BatchNorm for the convolutional layers, the projection head, NT-Xent,
the linear head on stop_gradient(h) and LARS with the reference's exclusions,
in one `tf.function` without XLA (the reference does not compile with XLA).
"""
import numpy as np
import tensorflow as tf

from simclr_jax.tools import bench_baseline as baseline


def make_step(arch, params, stats, *, temperature, weight_decay,
              learning_rate=0.1, momentum=0.9, eeta=1e-3):
  """(step(images [N, 2, H, W, 3], labels [N]) -> (loss, NT-Xent), variables).

  params, stats: bench_baseline.init's dicts (numpy or jax arrays).
  """
  variables = {k: tf.Variable(np.asarray(v), name=k.replace('/', '_'))
               for k, v in params.items()}
  running = {k: tf.Variable(np.asarray(v), trainable=False)
             for k, v in stats.items()}
  moms = {k: tf.Variable(tf.zeros_like(v)) for k, v in variables.items()}
  names = sorted(variables)

  def bn(name, x, relu):
    if x.shape.rank == 4:
      y, mean, var = tf.compat.v1.nn.fused_batch_norm(
          x, variables[name + '/scale'], variables[name + '/bias'],
          epsilon=baseline.BN_EPS, is_training=True)
    else:
      mean, var = tf.nn.moments(x, [0])
      y = tf.nn.batch_normalization(
          x, mean, var, variables.get(name + '/bias'),
          variables[name + '/scale'], baseline.BN_EPS)
    decay = baseline.BN_DECAY
    running[name + '/mean'].assign(decay * running[name + '/mean'] +
                                   (1 - decay) * mean)
    running[name + '/var'].assign(decay * running[name + '/var'] +
                                  (1 - decay) * var)
    return tf.nn.relu(y) if relu else y

  def conv_bn(name, x, k, stride, relu):
    if stride > 1:
      pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
      x = tf.pad(x, [(0, 0), pad, pad, (0, 0)])
      padding = 'VALID'
    else:
      padding = 'SAME'
    y = tf.nn.conv2d(x, variables[name], stride, padding)
    return bn(name + '/bn', y, relu)

  def forward(x):
    k, _, _, s = arch['stem']
    x = conv_bn('stem', x, k, s, True)
    if arch['pool']:
      x = tf.nn.max_pool2d(x, 3, 2, 'SAME')
    x = baseline.residual_blocks(arch, x, conv_bn, tf.nn.relu)
    h = tf.reduce_mean(x, [1, 2])
    z = h
    for i in range(len(arch['head'])):
      z = bn(f'head{i}/bn', z @ variables[f'head{i}'],
             i < len(arch['head']) - 1)
    logits = tf.stop_gradient(h) @ variables['sup/w'] + variables['sup/b']
    return z, logits

  def nt_xent(z):
    z = tf.math.l2_normalize(z, -1)
    a, b = z[0::2], z[1::2]
    n = tf.shape(a)[0]
    mask = tf.one_hot(tf.range(n), n) * baseline.LARGE_NUM
    labels = tf.one_hot(tf.range(n), 2 * n)
    ab = tf.matmul(a, b, transpose_b=True) / temperature
    aa = tf.matmul(a, a, transpose_b=True) / temperature - mask
    ba = tf.matmul(b, a, transpose_b=True) / temperature
    bb = tf.matmul(b, b, transpose_b=True) / temperature - mask
    ce = tf.nn.softmax_cross_entropy_with_logits
    return tf.reduce_mean(ce(labels, tf.concat([ab, aa], 1)) +
                          ce(labels, tf.concat([ba, bb], 1)))

  @tf.function(jit_compile=False)
  def step(images, labels):
    shape = tf.shape(images)
    x = tf.reshape(images, tf.concat([[2 * shape[0]], shape[2:]], 0))
    y = tf.repeat(labels, 2)
    with tf.GradientTape() as tape:
      z, logits = forward(x)
      contrastive = nt_xent(z)
      loss = (contrastive + tf.reduce_mean(
          tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)) +
              0.5 * weight_decay * tf.reduce_sum(variables['sup/w'] ** 2))
    grads = tape.gradient(loss, [variables[k] for k in names])
    for name, g in zip(names, grads):
      w = variables[name]
      if baseline.excluded(name):
        lr = learning_rate
      else:
        g = g + weight_decay * w
        wn, gn = tf.norm(w), tf.norm(g)
        lr = learning_rate * tf.where((wn > 0) & (gn > 0), eeta * wn / gn, 1.0)
      moms[name].assign(momentum * moms[name] + lr * g)
      w.assign_sub(moms[name])
    return loss, contrastive

  return step, variables


def from_config(config, num_classes):
  """(step, variables) for a pretrain config, initial values as the baseline's."""
  if config.model != 'resnet':
    raise ValueError(f'{__name__} models ResNets only; config.model is '
                     f'{config.model!r}.')
  import jax  # pylint: disable=g-import-not-at-top
  arch = baseline.architecture(config.resnet_depth, config.width_multiplier,
                               config.image_size <= 32, config.num_proj_layers,
                               config.proj_out_dim)
  params, stats = baseline.init(jax.random.PRNGKey(0), arch, num_classes)
  return make_step(arch, params, stats, temperature=config.temperature,
                   weight_decay=config.weight_decay)
