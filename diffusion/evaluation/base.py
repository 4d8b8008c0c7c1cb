"""What every evaluator shares: the context it is built from, the metric protocol, and the one registry.

A metric is built once per job from an `EvalContext` (where it may compute and cache reference data), then, per
checkpoint, `reset()`, `update(images, prompts)` over the batches of generated uint8 images this process made,
and `result()` -> scalars combined over all processes. `describe()` says what the numbers mean (weights, reference
data), for the JSON record.
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
  reference_images: Callable[[int], Iterator[np.ndarray]]  # batch_size -> uint8 batches of the reference split.
  reference_name: str  # Identifies the reference data in cache file names, e.g. 'shapes-train-1000'.
  batch_size: int = 50
  inception_weights: str | None = None
  seed: int = 0
  options: dict[str, Any] = dataclasses.field(default_factory=dict)  # Metric-specific settings (e.g. a model dir).

  @property
  def cache_dir(self) -> str:
    return os.path.join(self.workdir, 'eval')


class Metric(Protocol):
  name: str

  def reset(self) -> None: ...

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None: ...

  def result(self) -> dict[str, float]: ...

  def describe(self) -> dict[str, Any]: ...


MetricFactory = Callable[[EvalContext], Metric]
METRICS: Registry[MetricFactory] = Registry('metric')


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
