"""sharding.py on 8 fake CPU devices: the mesh and host batch -> global array."""
import jax
import numpy as np

from simclr_jax import sharding


def test_mesh_covers_every_device_on_one_data_axis():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == (sharding.DATA_AXIS,)
  assert mesh.devices.size == jax.device_count() == 8
  assert list(mesh.devices.flat) == jax.devices()


def test_host_batch_to_global_splits_rows_in_device_order():
  mesh = sharding.create_mesh()
  batch = {'image': np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3),
           'label': np.arange(16, dtype=np.int32)}
  out = sharding.host_batch_to_global(batch, mesh)
  assert out['image'].shape == (16, 2, 3)
  assert out['image'].sharding.is_equivalent_to(
      sharding.data_sharding(mesh), 3)
  np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
  # Device k holds rows 2k, 2k + 1: the data axis splits the leading axis.
  for shard in out['label'].addressable_shards:
    k = mesh.devices.flat[:].tolist().index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), [2 * k, 2 * k + 1])
  back = sharding.global_to_host_local(out, mesh)
  np.testing.assert_array_equal(back['label'], batch['label'])


def test_replicate_puts_a_full_copy_on_every_device():
  mesh = sharding.create_mesh()
  tree = sharding.replicate({'w': np.ones((3, 2), np.float32)}, mesh)
  assert tree['w'].sharding.is_fully_replicated
  assert len(tree['w'].addressable_shards) == 8
  for shard in tree['w'].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.ones((3, 2)))


def test_mesh_on_a_subset_of_devices():
  mesh = sharding.create_mesh(jax.devices()[:1])
  x = sharding.host_batch_to_global(np.zeros((4, 2), np.float32), mesh)
  assert x.sharding.mesh.devices.size == 1 and x.shape == (4, 2)
