"""What every evaluator shares: the context it is built from, the metric protocol, and the one registry.

A metric is built once per job from an `EvalContext` (where it may compute and cache reference data), then, per
checkpoint, `reset()`, `update(images, prompts)` over the batches of generated uint8 images this process made,
and `result()` -> scalars combined over all processes (every process calls it: it is a collective). `describe()`
says what the numbers mean (weights, reference data), for the JSON record. Metrics keep sums of their own
process's samples and combine them once with `sum_across_processes`; caches are written by process 0 only.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Protocol, Sequence

import ml_collections
import numpy as np

from diffusion.registry import Registry


@dataclasses.dataclass
class EvalContext:
  """What metrics may use: the workdir, its config, the reference split's images, and job options."""

  workdir: str
  config: ml_collections.ConfigDict
  # batch_size -> uint8 batches of THIS process's share of the reference split (disjoint across processes).
  reference_images: Callable[[int], Iterator[np.ndarray]] | None
  reference_name: str  # Identifies the reference data in cache file names, e.g. 'shapes-train-1000'.
  batch_size: int = 50  # Images per batch on this process.
  inception_weights: str | None = None
  seed: int = 0
  options: dict[str, Any] = dataclasses.field(default_factory=dict)  # Metric-specific settings (e.g. a model dir).
  calibration_images: Callable[[int], np.ndarray] | None = None  # n -> the first n reference images (all processes).
  prompts: Sequence[str] = ()  # The prompts of all the evaluator's samples (sample i has prompts[i]).

  @property
  def cache_dir(self) -> str:
    return os.path.join(self.workdir, 'eval')


class Metric(Protocol):
  """A metric factory (usually the class) may set `needs_reference = True` to get the reference split's images in
  its context (`reference_images`, `calibration_images`, `reference_name`); otherwise they are None / ''."""

  name: str

  def reset(self) -> None: ...

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None: ...

  def result(self) -> dict[str, float]: ...

  def describe(self) -> dict[str, Any]: ...


MetricFactory = Callable[[EvalContext], Metric]
METRICS: Registry[MetricFactory] = Registry('metric')


def is_lead() -> bool:
  """Whether this is process 0, the one that writes files and logs."""
  import jax

  return jax.process_index() == 0


def on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective): e.g. a cache file every process can read, so that all
  processes take the same branch around the collectives that follow."""
  return bool(sum_across_processes(np.asarray(0.0 if flag else 1.0)) == 0)


def atomic_write(path: str, data: bytes) -> None:
  """Writes `path` through a temporary file, so a killed job never leaves a half-written file behind."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def sum_across_processes(tree: Any) -> Any:
  """Each leaf (a NumPy array or scalar of this process's partial sums) summed over all processes, in float64.

  Evaluators keep sums (counts, feature sums, outer-product sums) of the samples this process generated and combine
  them once, here, so P processes evaluating N/P samples each give the 1-process statistics (to float rounding).
  """
  import jax
  from jax.experimental import multihost_utils

  tree = jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  if jax.process_count() == 1:
    return tree
  # JAX arrays are float32 here (no x64): send each float64 value as a float32 pair hi + lo, exact to ~1e-14.
  hi = jax.tree.map(lambda x: x.astype(np.float32), tree)
  lo = jax.tree.map(lambda x, h: (x - h.astype(np.float64)).astype(np.float32), tree, hi)
  gathered = multihost_utils.process_allgather((hi, lo))  # Leading axis: the process.
  return jax.tree.map(lambda h, l: (np.asarray(h, np.float64) + np.asarray(l, np.float64)).sum(axis=0), *gathered)
