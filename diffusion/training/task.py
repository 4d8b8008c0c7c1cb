"""The task protocol: what the one training loop needs from a stage, the registry of tasks, and what every run can be
built on whatever its task (`config.init_from`, `config.base_workdir`).

A task is built as `TASKS.get(config.model_type)(config, workdir)`. It never changes the config it is given: it
holds its resolved copy in `task.config` (facts read from the workdirs it is built on, the vocabulary size, a scale
computed from data), and the loop writes that copy to `<workdir>/config.json`. The loop calls every protocol member
on every task, in this order: `built_on`, `calibrate` (fresh runs only), `init_params`, `aux_networks`, `loss_fn` /
`eval_step` (under jit), `prepare_sampling` (once per run), `sample_grid` (process 0), `sampling_params` (at each
in-training evaluation), `meta` (with each checkpoint).
"""

from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import workdir as workdir_lib
from diffusion.errors import ConfigError
from diffusion.registry import Registry

Batches = Callable[[], Iterator[dict]]  # Builds an iterator over global training batches when called.


class Task(Protocol):
  """One stage of training (VAE, LDM, ...) as the loop sees it."""

  config: ml_collections.ConfigDict  # The resolved config (a copy; the loop saves it as config.json).
  tokenizer: Any  # The text tokenizer the input pipeline uses, or None (no captions needed).
  frozen: dict[str, Any]  # Params the task uses but does not train (e.g. {'vae': ...}); passed to loss and eval.
  frozen_param_groups: tuple[str, ...]  # Top-level groups of the trained params the optimizer leaves alone.

  def built_on(self) -> dict[str, Any]:
    """Config key -> the params this start of the run takes from the workdir the key names (e.g. the frozen VAE
    under 'vae_workdir'); recorded and checked by `workdir.record_built_on`."""

  def calibrate(self, batches: Batches) -> str | None:
    """At the start of a fresh run, computes config values that come from data (into `self.config`); returns a line
    for the log, or None when the task needs nothing (it then builds no batches)."""

  def init_params(self, rng: jax.Array) -> Any:
    """Fresh trainable params."""

  def aux_networks(self) -> Any:
    """`state.AuxNetworks` (init, optimizer) of networks trained beside the params (the VAE's discriminator; the loss
    sees them as `frozen['aux']`; not EMA'd, not what readers of the workdir load), or None."""

  def loss_fn(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
    """(mean loss, metrics) of a batch; `keys`: one PRNG key per example."""

  def eval_step(self, params: Any, frozen: Any, batch: dict, keys: jax.Array) -> dict:
    """Held-out metrics of a batch with fixed per-example `keys` (tasks without randomness ignore them)."""

  def prepare_sampling(self, held_out: Callable[[], dict]) -> None:
    """Once per run, before the first sample grid: builds what sampling needs (a pipeline, held-out images taken
    from `held_out()`, which gathers one host-local eval batch and is a collective: call it on all processes or
    none). Every process calls this."""

  def sample_grid(self, params: Any, frozen: Any) -> tuple[np.ndarray, str]:
    """(uint8 image grid, caption) from host-local (EMA) params and frozen params; process 0 only."""

  def sampling_params(self, params: Any, frozen: Any) -> Any:
    """What `sampling_pipeline()` takes as `params=` for these host-local (EMA) trained params and frozen parts (what
    in-training evaluators sample or reconstruct with)."""

  def sampling_pipeline(self) -> Any:
    """The text -> image pipeline of this task (built once per run; call it with `params=`), or None. What
    in-training evaluators of generated samples use."""

  def meta(self) -> dict:
    """Extra metadata saved with every checkpoint (at least {'model_type': ...})."""


TaskFactory = Callable[[ml_collections.ConfigDict, str], Task]
TASKS: Registry[TaskFactory] = Registry('model_type')


def resolved_copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A new, unlocked ConfigDict with the values of `config`: the one a task resolves and the loop saves."""
  return ml_collections.ConfigDict(config.to_dict())


def _paths(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_shapes(expected: Any, params: Any, key: str, source: str) -> None:
  """`ConfigError(key, ...)` naming the first param path (in `expected`'s order) whose presence or shape differs."""
  want, have = _paths(expected), _paths(params)
  for path, leaf in want.items():
    if path not in have:
      raise ConfigError(key, f'{source!r} has no param {path} (shape {tuple(leaf.shape)}) that this task trains')
    if tuple(have[path].shape) != tuple(leaf.shape):
      raise ConfigError(
        key, f'param {path} has shape {tuple(have[path].shape)} in {source!r}, this task wants {tuple(leaf.shape)}'
      )
  extra = [path for path in have if path not in want]
  if extra:
    raise ConfigError(key, f'{source!r} has param {extra[0]} that this task does not have')


def load_init_params(config: ml_collections.ConfigDict, init_params: Callable[[jax.Array], Any]) -> Any:
  """The (EMA) params of the workdir `config.init_from` names, checked against the task's param shapes and cast to
  its dtypes: what a fine-tuning run (or a distillation student) starts from."""
  source = config.init_from
  params, _ = workdir_lib.load_trained_params(source, item='ema_params', key='init_from')
  expected = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  check_same_shapes(expected, params, 'init_from', source)
  return jax.tree.map(lambda p, e: jnp.asarray(p, e.dtype), params, expected)


def load_base_params(config: ml_collections.ConfigDict) -> Any:
  """The (EMA) params of the frozen base `config.base_workdir` names (read at every start: not copied)."""
  workdir_lib.load_workdir_config(config.base_workdir, key='base_workdir')
  return workdir_lib.load_trained_params(config.base_workdir, item='ema_params', key='base_workdir')[0]
