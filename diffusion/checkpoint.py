"""Orbax checkpoints of a training run: train state, data-iterator position and run metadata, saved together.

A workdir holds `checkpoints/<step>/{state,data,meta}` (async saves, keep N, the final step always saved), the config
the run was trained with (`config.json`) and, for stage 2, the tokenizer and the frozen VAE params, so that
`sample.py --workdir W` needs nothing else. Restores go through an abstract target (shapes, dtypes, shardings), so
optimizer NamedTuples come back as themselves.
"""

import importlib.metadata
import os
import subprocess
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffusion.errors import UserError

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets', 'transformers')


def run_metadata() -> dict[str, Any]:
  """The git commit of the code and the versions of the packages a result depends on."""
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True,
                            timeout=10).stdout.strip()
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


class Checkpointer:
  """Saves and restores `(state, data_state, meta)` under `<workdir>/checkpoints`."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    if read_only and not os.path.isdir(directory):
      raise UserError(f'no checkpoints in {workdir!r} (expected {directory})')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({'iterator': data_state}),
                              meta=ocp.args.JsonSave({**run_metadata(), **(meta or {}), 'step': int(step)}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores into the structure, dtypes and shardings of `target` (concrete or abstract arrays)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError('no checkpoint to restore')
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return restored.state, restored.data['iterator'], restored.meta

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_params(self, step: int | None = None, item: str = 'ema_params') -> Any:
    """Restores one field of the saved train state (e.g. EMA params) as host arrays, without a target."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError('no checkpoint to restore')
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored.state
    return state[item] if isinstance(state, dict) else getattr(state, item)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_pytree(path: str, tree: Any) -> None:
  """Writes a standalone pytree (e.g. the frozen VAE params copied into a stage-2 workdir)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def load_pytree(path: str, target: Any = None) -> Any:
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f'missing checkpoint directory {path!r}')
  checkpointer = ocp.StandardCheckpointer()
  return checkpointer.restore(path, _abstract(target) if target is not None else None)
