"""The device mesh, logical-axis sharding rules, and multi-host start-up: one code path for 1 device and many.

The mesh has the axes ('data', 'fsdp', 'tensor'); `config.mesh` gives their degrees (one may be -1: the devices the
others leave). On multi-slice pods, `mesh.dcn_data` / `mesh.dcn_fsdp` (> 1) split those axes across slices
(`mesh_utils.create_hybrid_device_mesh`); the in-slice degree is then the config value divided by the DCN degree.
Batches are sharded over data x fsdp. Single-device is the 1x1x1 mesh.

Parameters get their shardings from two tables:
  * `PARAM_LOGICAL_AXES` names the logical axes of every parameter from its path (the last module names and the leaf
    name) and rank, so the networks stay plain Flax modules with plain param trees (the interop converters and
    checkpoints see the same names and structure);
  * `config.mesh.rules` maps each logical axis to a mesh axis (or None: replicated), e.g. embed/conv_out -> 'fsdp',
    heads/mlp -> 'tensor'.
A dimension is sharded over its mesh axis only if its size is divisible by that axis's size and the axis is not
already used by another dimension of the same parameter; dimensions are assigned from the last to the first, so when
the output channels of a conv cannot take 'fsdp', its input channels may. Parameters with fewer than
`mesh.min_shard_size` elements stay replicated (their all-gathers cost more than they save). The same table shards
the optimizer state (its moments have the parameter's path as suffix) and the EMA params.
"""

import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
DEFAULT_RULES = (
  ('embed', 'fsdp'),
  ('conv_out', 'fsdp'),
  ('conv_in', 'fsdp'),
  ('heads', 'tensor'),
  ('mlp', 'tensor'),
  ('vocab', 'tensor'),
  ('norm', 'fsdp'),
  ('bias', 'fsdp'),
)
# (regex over the '/'-joined param path, logical axes): the first entry whose regex matches and whose rank equals the
# parameter's rank wins. Paths end like 'attn1/to_q/kernel' (params) or '.../mu/.../to_q/kernel' (Adam moments).
PARAM_LOGICAL_AXES = (
  (r'(to_q|to_k|to_v|q_proj|k_proj|v_proj)/kernel$', ('embed', 'heads')),
  (r'(to_out_0|out_proj)/kernel$', ('heads', 'embed')),
  (r'(net_0/proj|fc1)/kernel$', ('embed', 'mlp')),
  (r'(net_2|fc2)/kernel$', ('mlp', 'embed')),
  (r'embedding$', ('vocab', 'embed')),
  (r'norm[^/]*/(scale|bias)$', ('norm',)),
  (r'kernel$', (None, None, 'conv_in', 'conv_out')),
  (r'kernel$', ('embed', 'embed')),  # Other Dense layers (time embedding, projections): output dim first.
  (r'bias$', ('bias',)),
)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.mesh` (degrees, DCN degrees, rules, min_shard_size) and `config.distributed`, before any device
  is touched; the product against the device count is checked by `mesh_shape`. Raises `ConfigError` naming the key."""
  mesh = config.mesh
  for axis in MESH_AXES:
    value = mesh[axis]
    if not (value == -1 or value >= 1):
      raise ConfigError(f'mesh.{axis}', f'must be >= 1 or -1 (the rest), got {value!r}')
  for axis in BATCH_AXES:
    dcn = mesh.get(f'dcn_{axis}', 1)
    if not (isinstance(dcn, int) and dcn >= 1):
      raise ConfigError(f'mesh.dcn_{axis}', f'must be an integer >= 1, got {dcn!r}')
    if not (mesh[axis] == -1 or mesh[axis] % dcn == 0):
      raise ConfigError(f'mesh.dcn_{axis}', f'{dcn} slices do not divide mesh.{axis}={mesh[axis]}')
  for rule in mesh.get('rules', ()):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError('mesh.rules', f'each rule is (logical axis, mesh axis in {MESH_AXES} or None), got {rule!r}')
  _rules(mesh.get('rules', ()))  # Unknown mesh axes.
  if not mesh.get('min_shard_size', 0) >= 0:
    raise ConfigError('mesh.min_shard_size', 'must be >= 0')
  if 'distributed' in config and config.distributed.initialize not in ('auto', 'yes', 'no'):
    raise ConfigError('distributed.initialize', f'unknown {config.distributed.initialize!r}; known: auto, yes, no')


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
    raise ConfigError(
      'mesh.data',
      f'mesh {dict(zip(MESH_AXES, degrees))} needs {math.prod(degrees)} devices, '
      f'but {num_devices} are available; set one axis to -1',
    )
  return tuple(degrees)


def dcn_shape(mesh_config: ml_collections.ConfigDict, shape: Sequence[int]) -> tuple[int, ...]:
  """The across-slice (DCN) degree of each mesh axis; each must divide the axis's total degree."""
  dcn = (int(mesh_config.get('dcn_data', 1)), int(mesh_config.get('dcn_fsdp', 1)), 1)
  for axis, d, total in zip(MESH_AXES, dcn, shape):
    if d < 1 or total % d:
      raise ConfigError(f'mesh.dcn_{axis}', f'{d} must be >= 1 and divide the mesh.{axis} degree {total}')
  return dcn


def create_mesh(mesh_config: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh; a hybrid ICI x DCN mesh when `mesh.dcn_*` > 1."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  dcn = dcn_shape(mesh_config, shape)
  if math.prod(dcn) > 1:
    ici = tuple(total // d for total, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=not hasattr(devices[0], 'slice_index')
    )
  elif devices[0].platform in ('tpu', 'gpu'):
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:  # CPU: the plain device order (process-major), which is what create_device_mesh would give.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_batch_size(batch_size: int, mesh: Mesh, key: str = 'train.batch_size', grad_accum_steps: int = 1) -> int:
  """Returns the per-process batch size; the global batch must split evenly over micro-batches, devices and
  processes."""
  parallel = batch_parallelism(mesh)
  if batch_size % (parallel * grad_accum_steps):
    raise ConfigError(
      key,
      f'{batch_size} is not divisible by the data parallelism {parallel} (mesh data x fsdp) '
      f'times train.grad_accum_steps={grad_accum_steps}',
    )
  if batch_size % jax.process_count():
    raise ConfigError(key, f'{batch_size} is not divisible by the {jax.process_count()} processes')
  return batch_size // jax.process_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_string(path: Sequence[Any]) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...] | None:
  """The logical axis names of the parameter at `path` (None: no table entry matches)."""
  for pattern, axes in PARAM_LOGICAL_AXES:
    if len(axes) == ndim and re.search(pattern, path):
      return axes
  return None


def _rules(rules: Any) -> dict[str, tuple[str, ...]]:
  table = {}
  for logical, mesh_axes in rules:
    mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    for axis in mesh_axes:
      if axis not in MESH_AXES:
        raise ConfigError('mesh.rules', f'{logical!r} maps to unknown mesh axis {axis!r}; known: {MESH_AXES}')
    table[logical] = mesh_axes
  return table


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Any, min_size: int = 0) -> P:
  """The PartitionSpec of one array from its logical axes: see the module docstring for the rule."""
  table = rules if isinstance(rules, dict) else _rules(rules)
  spec: list[Any] = [None] * len(shape)
  if math.prod(shape) < min_size:
    return P(*spec)
  used: set[str] = set()
  for dim in reversed(range(len(shape))):
    mesh_axes = table.get(axes[dim], ()) if axes[dim] is not None else ()
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    if mesh_axes and shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      spec[dim] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
      used.update(mesh_axes)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Any = DEFAULT_RULES, min_size: int = 0) -> Any:
  """NamedShardings for every array leaf of `tree` (params, a TrainState, frozen params, abstract or concrete)."""
  table = _rules(rules)

  def sharding(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    axes = logical_axes(_path_string(path), len(shape))
    if axes is None:
      return replicated(mesh)
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, table, min_size))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def mesh_rules(mesh_config: ml_collections.ConfigDict) -> tuple[Any, int]:
  """(rules, min_shard_size) from `config.mesh`, defaulting for configs saved before they existed."""
  return tuple(mesh_config.get('rules', DEFAULT_RULES)), int(mesh_config.get('min_shard_size', 0))


def param_sharding(mesh: Mesh, params: Any, rules: Any = DEFAULT_RULES, min_size: int = 0) -> Any:
  """Shardings for a parameter pytree from the logical-axis rules."""
  return tree_shardings(params, mesh, rules, min_size)


def sharded_bytes(tree: Any, shardings: Any) -> tuple[int, int]:
  """(bytes of the sharded leaves, total bytes) of an (abstract) array tree under `shardings`."""
  sharded = total = 0
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for leaf, sharding in zip(jax.tree.leaves(tree), leaves):
    size = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += size
    if any(s is not None for s in sharding.spec):
      sharded += size
  return sharded, total


def device_bytes(tree: Any) -> dict[Any, int]:
  """Bytes each local device holds of the arrays in `tree`, measured from their addressable shards."""
  held: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's shard of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def host_local(tree: Any) -> Any:
  """`tree` itself on one process; with several, full host copies of every array (a collective: all processes call
  it), so process 0 can run local work such as sample grids on them."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def _cluster_detected() -> str | None:
  """The multi-process environment this process runs in, if any (read from the launcher's variables)."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if 'SLURM_JOB_ID' in env and 'SLURM_STEP_NODELIST' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'SLURM'
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1 or env.get(
    'MEGASCALE_COORDINATOR_ADDRESS'
  ):
    return 'TPU pod'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  return None


def initialize_distributed(settings: ml_collections.ConfigDict | None = None) -> bool:
  """Starts JAX's multi-process runtime when this process is one of several; returns whether it did.

  `settings` is `config.distributed` (or None: environment only). `initialize`: 'auto' starts it when a coordinator
  is given (settings or $JAX_COORDINATOR_ADDRESS) or a SLURM / TPU-pod / Open MPI launch with > 1 process is
  detected; 'yes' always calls `jax.distributed.initialize()` (e.g. Cloud TPU VM pods, where JAX asks the metadata
  server); 'no' never. $DIFFUSION_DISTRIBUTED overrides `initialize` for entry points without a config. Call it
  before anything touches a device.
  """
  get = (lambda k, d: settings.get(k, d)) if settings is not None else (lambda k, d: d)
  mode = os.environ.get('DIFFUSION_DISTRIBUTED', get('initialize', 'auto'))
  if mode not in ('auto', 'yes', 'no'):
    raise ConfigError('distributed.initialize', f'unknown {mode!r}; known: auto, yes, no')
  address, processes, process_id = get('coordinator_address', ''), get('num_processes', -1), get('process_id', -1)
  explicit = bool(address)
  reason = 'distributed.coordinator_address' if explicit else _cluster_detected()
  if mode == 'no' or (mode == 'auto' and reason is None):
    return False
  kwargs = {}
  if explicit:
    if processes < 1 or not 0 <= process_id < processes:
      raise ConfigError(
        'distributed.process_id',
        f'with a coordinator address, num_processes ({processes}) must be '
        f'>= 1 and process_id ({process_id}) in [0, num_processes)',
      )
    kwargs = dict(coordinator_address=address, num_processes=processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  print(
    f'process {jax.process_index()}/{jax.process_count()} started ({reason or "jax auto-detection"}); '
    f'{jax.local_device_count()} local of {jax.device_count()} devices',
    file=sys.stderr,
    flush=True,
  )
  return True
