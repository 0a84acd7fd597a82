"""One Mesh, one way to shard, one way to turn host batches into global arrays.

Data parallelism only: a 1-D mesh with axis 'data' over every device of every
host. Parameters, batch statistics and optimizer state are replicated; the
batch is split along its leading axis. Under `jax.jit` over this mesh,
reductions over the batch axis (BatchNorm statistics, the mean loss) are global
by construction, which is what SimCLR's "global BN" asks for.
"""
from typing import Any, Optional, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def create_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D Mesh with axis 'data' over `devices` (default: all, all hosts).

  `jax.devices()` is ordered by process, so each host's devices form one
  contiguous block of the data axis and host-local batches map onto it with no
  cross-host copies.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device (params, batch stats, optimizer state)."""
  return NamedSharding(mesh, P())


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (a pytree) -> global jax.Arrays sharded on axis 0.

  Every host passes its own rows (`global_batch // process_count` of them); the
  global array is their concatenation in process order.
  """
  sharding = data_sharding(mesh)

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, batch)


def global_to_host_local(x: Any, mesh: Mesh) -> Any:
  """Inverse of `host_batch_to_global`: this host's rows as numpy arrays."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, x)
  local = multihost_utils.global_array_to_host_local_array(
      x, mesh, P(DATA_AXIS))
  return jax.tree.map(np.asarray, local)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of arrays fully replicated on the mesh."""
  return jax.device_put(tree, replicated_sharding(mesh))
