"""The device mesh and shardings: one code path for one device and many, one host and many.

The mesh has the axes ('data', 'fsdp', 'tensor'); `config.mesh` gives their degrees, one of them may be -1 to take the
devices the others leave. Batches are sharded over data x fsdp; parameters are replicated for now (a sharding rule
table for FSDP/tensor parallelism plugs in at `param_sharding`). Single-device is the 1x1x1 mesh.
"""

import math
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry of `config.mesh` and checks the product against the device count."""
  degrees = [int(mesh_config[axis]) for axis in MESH_AXES]
  unknown = [axis for axis, d in zip(MESH_AXES, degrees) if d == -1]
  if len(unknown) > 1:
    raise ConfigError(f'mesh.{unknown[1]}', f'only one mesh axis may be -1, got {", ".join(unknown)}')
  known = math.prod(d for d in degrees if d != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f'mesh.{unknown[0]}', f'{num_devices} devices cannot be split with the other axes = {known}')
    degrees[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(degrees) != num_devices:
    raise ConfigError('mesh.data', f'mesh {dict(zip(MESH_AXES, degrees))} needs {math.prod(degrees)} devices, '
                      f'but {num_devices} are available; set one axis to -1')
  return tuple(degrees)


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_batch_size(batch_size: int, mesh: Mesh, key: str = 'train.batch_size') -> int:
  """Returns the per-process batch size; the global batch must split evenly over devices and processes."""
  parallel = batch_parallelism(mesh)
  if batch_size % parallel:
    raise ConfigError(key, f'{batch_size} is not divisible by the data parallelism {parallel} (mesh data x fsdp)')
  if batch_size % jax.process_count():
    raise ConfigError(key, f'{batch_size} is not divisible by the {jax.process_count()} processes')
  return batch_size // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, params: Any) -> Any:
  """Shardings for a parameter pytree (replicated until logical-axis rules are configured)."""
  return jax.tree.map(lambda _: replicated(mesh), params)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's shard of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
