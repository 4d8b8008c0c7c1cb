"""Metrics of the evaluation job (`eval/run.py`): a registry of name -> metric factory.

A metric is built once per job from an `EvalContext` (where it may compute and cache reference data), then, per
checkpoint, `reset()`, `update(images, prompts)` over batches of generated uint8 images, and `result()` -> scalars.
`describe()` says what the numbers mean (weights, reference data), for the JSON record.

  fid     Fréchet Inception Distance against statistics of the dataset (cached in `<workdir>/eval/`). With no
          Inception weight file the network is random with BatchNorm calibrated on reference images: the key is then
          `fid_random_inception`, comparable only between checkpoints of the same job, never with published FID.
  oracle  caption accuracy read by the shapes dataset's oracle (`diffusion.data.oracle`, as eval/caption_accuracy.py),
          with the shuffled-prompt control.
  clip    CLIP score of each image with its prompt (`eval/clip_score.py`, registered when imported): needs a
          transformers CLIPModel directory in `context.options['clip_model']` (eval/run.py --clip_model DIR).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
from typing import Any, Callable, Iterator, Protocol, Sequence

import ml_collections
import numpy as np

from diffusion.errors import UserError


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


_METRICS: dict[str, Callable[[EvalContext], Metric]] = {}
_PROVIDED_BY = {'clip': 'eval.clip_score'}  # Registered on import of these modules.


def register_metric(name: str) -> Callable:
  """Decorator: `factory(context) -> Metric` becomes available as `--metrics name`."""

  def decorator(factory: Callable[[EvalContext], Metric]) -> Callable[[EvalContext], Metric]:
    _METRICS[name] = factory
    return factory

  return decorator


def available_metrics() -> list[str]:
  return sorted(set(_METRICS) | set(_PROVIDED_BY))


def create_metric(name: str, context: EvalContext) -> Metric:
  if name not in _METRICS and name in _PROVIDED_BY:
    try:
      importlib.import_module(_PROVIDED_BY[name])
    except ImportError as e:
      raise UserError(f'metric {name!r} is not available: {_PROVIDED_BY[name]} cannot be imported ({e})') from None
  if name not in _METRICS:
    raise UserError(f'unknown metric {name!r}; known: {", ".join(available_metrics())}')
  return _METRICS[name](context)


# ----------------------------------------------------------------------------------------------------------------------
# FID.


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()[:12]


class FIDMetric:
  """FID of the generated images against the reference split's Inception statistics (computed once, cached)."""

  name = 'fid'
  num_calibration_images = 64

  def __init__(self, context: EvalContext):
    from eval import fid, inception

    self._fid, self.context = fid, context
    os.makedirs(context.cache_dir, exist_ok=True)
    if context.inception_weights:
      path = inception.resolve_weights_path(context.inception_weights)
      variables = inception.convert_state_dict(inception.load_state_dict(path))
      self.key, tag = 'fid', f'pytorch-fid-{_file_digest(path)}'
      self.weights = f'pytorch-fid weights {os.path.abspath(path)}'
    else:
      variables = self._random_variables(inception)
      self.key, tag = 'fid_random_inception', f'random-seed{context.seed}'
      self.weights = (f'RANDOM Inception weights (seed {context.seed}, BatchNorm calibrated on '
                      f'{self.num_calibration_images} reference images): comparable only between checkpoints '
                      'evaluated with the same reference, not with published FID')
    self.extractor = inception.FeatureExtractor(variables)
    self.stats_path = os.path.join(context.cache_dir, f'fid_reference_{context.reference_name}_{tag}.npz')
    self.reference = self._reference_stats()
    self.reset()

  def _random_variables(self, inception) -> dict:
    import flax.serialization

    path = os.path.join(self.context.cache_dir, f'inception_random_seed{self.context.seed}_'
                        f'{self.context.reference_name}.msgpack')
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        return flax.serialization.msgpack_restore(f.read())
    images = next(self.context.reference_images(self.num_calibration_images))
    variables = inception.random_variables(self.context.seed, images)
    _atomic_write(path, flax.serialization.msgpack_serialize(variables))
    return variables

  def _reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    if os.path.isfile(self.stats_path):
      return self._fid.load_stats(self.stats_path)
    print(f'computing FID reference statistics of {self.context.reference_name} -> {self.stats_path}',
          file=sys.stderr, flush=True)
    bs = self.context.batch_size
    stats = self._fid.allgather_stats(self._fid.accumulate(self.context.reference_images(bs), self.extractor, bs))
    self._fid.save_stats(self.stats_path, stats.mu, stats.sigma)
    return stats.mu, stats.sigma

  def reset(self) -> None:
    self._stats = self._fid.RunningStats(self.extractor.dims)

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    del prompts
    self._stats.update(self.extractor(images))

  def result(self) -> dict[str, float]:
    stats = self._fid.allgather_stats(self._stats)
    return {self.key: self._fid.frechet_distance(stats.mu, stats.sigma, *self.reference)}

  def describe(self) -> dict[str, Any]:
    return {'metric': self.key, 'inception_weights': self.weights, 'random_weights': self.key != 'fid',
            'reference': self.context.reference_name, 'reference_stats': os.path.relpath(self.stats_path,
                                                                                         self.context.workdir)}


register_metric('fid')(FIDMetric)


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# The shapes oracle.


class OracleMetric:
  """Fraction of images whose content the shapes oracle finds to match their prompt (and a shuffled control)."""

  name = 'oracle'

  def __init__(self, context: EvalContext):
    if context.config.data.name != 'shapes':
      raise UserError(f'metric oracle: {context.workdir!r} was not trained on the shapes dataset; the oracle only '
                      'reads shapes scenes')
    self.seed = context.seed
    self.reset()

  def reset(self) -> None:
    self._images: list[np.ndarray] = []
    self._prompts: list[str] = []

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    self._images.extend(np.asarray(images))  # Small (shapes scenes are 32-64 px); scored together at the end.
    self._prompts.extend(prompts)

  def result(self) -> dict[str, float]:
    from diffusion.data import oracle

    try:
      accuracy = oracle.caption_accuracy(self._images, self._prompts)
      shuffled = [self._prompts[i] for i in np.random.default_rng(self.seed).permutation(len(self._prompts))]
      control = oracle.caption_accuracy(self._images, shuffled)
    except ValueError as e:  # A prompt outside the shapes grammar.
      raise UserError(f'metric oracle: {e}') from None
    return {'oracle_caption_accuracy': accuracy, 'oracle_shuffled_prompts': control}

  def describe(self) -> dict[str, Any]:
    return {'metric': 'oracle_caption_accuracy', 'control': 'oracle_shuffled_prompts (chance level)'}


register_metric('oracle')(OracleMetric)
