"""Orbax checkpoints of a training run: train state, data-iterator position and run metadata, saved together.

A workdir holds `checkpoints/<step>/{state,data,meta}` (async saves, keep N, the final step always saved), the config
the run was trained with (`config.json`) and, for stage 2, the tokenizer and the frozen VAE params, so that
`sample.py --workdir W` needs nothing else. Restores go through an abstract target (shapes, dtypes, shardings), so
optimizer NamedTuples come back as themselves.
"""

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion.errors import UserError

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'transformers')


def run_metadata() -> dict[str, Any]:
  """The git commit of the code and the versions of the packages a result depends on."""
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(
      ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ''
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {'git_commit': commit or 'unknown', 'packages': versions}


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


def all_finite(tree: Any) -> bool:
  """Whether every float in `tree` is finite: one jitted reduction, so sharded arrays spanning several processes
  work too (each process calls it and gets the same replicated answer)."""
  leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  if not leaves:
    return True
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


class Checkpointer:
  """Saves and restores `(state, data_state, meta)` under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if read_only and not os.path.isdir(directory):
      raise UserError(f'no checkpoints in {workdir!r} (expected {directory})')
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
    )
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'data', 'meta'))
    self.read_only = read_only
    self.workdir = workdir
    self._skip: set[int] = set()  # Damaged steps seen by a read-only reader.

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return max(steps) if steps else None

  def all_steps(self) -> list[int]:
    return [s for s in self.manager.all_steps() if s not in self._skip]

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster (e.g. a TPU pod's preemption notice, synced across hosts by Orbax) asks to stop."""
    return bool(self.manager.reached_preemption(step))

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None, force: bool = False) -> bool:
    """Saves asynchronously; refuses a state whose params are not all finite, so a NaN is never checkpointed."""
    params = state.params if hasattr(state, 'params') else state
    if not all_finite(params):
      raise FloatingPointError(f'refusing to checkpoint step {step}: the params are not all finite')
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({'iterator': data_state}),
      meta=ocp.args.JsonSave({**run_metadata(), **(meta or {}), 'step': int(step)}),
    )
    return self.manager.save(step, args=args, force=force)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores into the structure, dtypes and shardings of `target` (concrete or abstract arrays).

    Without `step`, a damaged latest checkpoint (truncated or partly written files) is moved aside with a warning
    and the newest valid one is used instead; the good ones are never touched.
    """
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(target)), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
    )
    step, restored = self._restore_valid(lambda s: self.manager.restore(s, args=args), step)
    return restored.state, restored.data['iterator'], {**restored.meta, 'step': step}

  def _restore_valid(self, restore_fn: Callable[[int], Any], step: int | None) -> tuple[int, Any]:
    if step is not None:
      if step not in self.all_steps():
        have = ', '.join(str(s) for s in sorted(self.all_steps())) or 'none'
        raise UserError(f'no checkpoint at step {step} in {self.workdir} (have: {have})')
      return step, restore_fn(step)
    for candidate in sorted(self.all_steps(), reverse=True):
      try:
        return candidate, restore_fn(candidate)
      except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
        self._set_aside(candidate, e)
    raise UserError(f'no valid checkpoint in {self.manager.directory}')

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves a damaged checkpoint to `checkpoints/damaged/` (kept for inspection) so it is never resumed or
    overwritten, and warns."""
    source = os.path.join(str(self.manager.directory), str(step))
    message = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    print(
      f'warning: checkpoint {source} is damaged ({message}); falling back to an older one', file=sys.stderr, flush=True
    )
    if self.read_only or jax.process_index() != 0:
      self._skip.add(step)
      return
    damaged = os.path.join(str(self.manager.directory), 'damaged')
    os.makedirs(damaged, exist_ok=True)
    os.rename(source, os.path.join(damaged, f'{step}-{int(time.time())}'))
    self.manager.reload()

  def latest_valid_step(self) -> int | None:
    """The newest step whose train state restores (damaged newer ones are set aside, as in `restore`)."""
    if not self.all_steps():
      return None
    restore = lambda s: self.manager.restore(s, args=self._untargeted_state_args(s))
    try:
      return self._restore_valid(restore, None)[0]
    except UserError:
      return None

  def restore_meta(self, step: int | None = None) -> dict:
    restore = lambda s: self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return self._restore_valid(restore, step)[1]

  def restore_params(self, step: int | None = None, item: str = 'ema_params') -> Any:
    """Restores one field of the saved train state (e.g. EMA params) as host arrays, without a target; falls back
    past a damaged latest checkpoint like `restore`."""
    if step is None and not self.all_steps():
      raise UserError(f'no checkpoint in {self.manager.directory}')
    restore = lambda s: self.manager.restore(s, args=self._untargeted_state_args(s)).state
    state = self._restore_valid(restore, step)[1]
    return state[item] if isinstance(state, dict) else getattr(state, item)

  def _untargeted_state_args(self, step: int) -> ocp.args.Composite:
    """Restore args for the saved state without a caller's target: the saved shapes and dtypes, replicated over
    this run's devices, so a checkpoint written on any mesh or number of processes restores here."""
    target = _replicated_target(os.path.join(str(self.manager.directory), str(step), 'state'))
    return ocp.args.Composite(state=ocp.args.StandardRestore(target))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _replicated_target(path: str) -> Any:
  """The saved pytree at `path` as ShapeDtypeStructs replicated over this run's devices."""
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata
  sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('devices',)), PartitionSpec())
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def save_pytree(path: str, tree: Any) -> None:
  """Writes a standalone pytree (e.g. the frozen VAE params copied into a stage-2 workdir); with several processes,
  all of them call it (Orbax writes each array once)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def load_pytree(path: str, target: Any = None) -> Any:
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f'missing checkpoint directory {path!r}')
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(path, _abstract(target) if target is not None else _replicated_target(path))


def params_hash(params: Any) -> str:
  """sha256 over the params' paths, dtypes, shapes and values (the identity of a frozen VAE)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()
