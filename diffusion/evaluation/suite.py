"""The one evaluation path: the evaluators of a job (from `config.evals` or a tool's flags), built once.

  suite = build_suite(config, workdir, pipeline)     # None when config.evals is empty
  if suite and suite.due(step, last):
    scalars = suite.evaluate(params, step, last=last)  # {'fid_random_inception': ..., 'guided/oracle_...': ...}

Each process generates its own share of every evaluator's samples (`reference.process_batches`: disjoint image
indices, image i from fold_in(seed, i) with prompt i, so the union is the 1-process run's samples), feeds them to
the evaluator's metric, and the metric combines its sums over processes once. Evaluators whose samples are the same
(prompts, noise, sampling settings, batch) share one generation. A metric's keys are prefixed with `<evaluator>/`
unless the evaluator is named after its metric. `evaluate` is a collective: every process calls it. Pair metrics
(`spec.pairs`: PSNR, SSIM, LPIPS, rFID) instead get this process's share of their split's images and the pipeline's
`reconstruct`ions of them; evaluators of the same split and count share one reconstruction pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from diffusion.errors import ConfigError, UserError
from diffusion.evaluation import base, reference
from diffusion.evaluation.spec import EvaluatorSpec
from diffusion.prompts import read_prompts_file


@dataclasses.dataclass
class Evaluator:
  """One evaluator: its spec, sampling settings, prompts and noise of every sample, and its metric."""

  spec: EvaluatorSpec
  settings: Any  # diffusion.samplers.SamplingSettings
  prompts: list[str]
  noise: list[tuple[int, int]]  # (root seed, fold-in index) of each sample.
  prompt_source: str
  local_batch: int
  metric: Any = None

  def samples_key(self) -> tuple:
    if self.spec.pairs:
      return ('pairs', self.spec.split, self.spec.num_samples, self.local_batch)
    return (self.settings, tuple(self.prompts), tuple(self.noise), self.local_batch)

  def prefix(self, results: dict[str, float]) -> dict[str, float]:
    if self.spec.name == self.spec.type:
      return dict(results)
    return {f'{self.spec.name}/{k}': v for k, v in results.items()}


def sample_noise(
  num_samples: int, num_prompts: int, seed: int, prompt_seeds: Sequence[int | None]
) -> list[tuple[int, int]]:
  """(root seed, index) of each sample; sample i has prompt i % num_prompts. Without a per-prompt seed, sample i
  starts from fold_in(PRNGKey(seed), i); with one (a `prompt<TAB>seed` line), the j-th sample of that prompt from
  fold_in(PRNGKey(prompt_seed), j), as in sample.py."""
  return [
    (seed, i) if prompt_seeds[i % num_prompts] is None else (int(prompt_seeds[i % num_prompts]), i // num_prompts)
    for i in range(num_samples)
  ]


class EvalSuite:
  """The evaluators of one job, with their metrics (and reference data) built once."""

  def __init__(self, specs: Sequence[EvaluatorSpec], config: ml_collections.ConfigDict, workdir: str, pipeline: Any):
    self.config, self.workdir, self.pipeline = config, workdir, pipeline
    self._references: dict[tuple[str, int], reference.ReferenceData] = {}
    self.evaluators = [self._build(s) for s in specs]

  def _reference(self, split: str, limit: int) -> reference.ReferenceData:
    if (split, limit) not in self._references:
      self._references[(split, limit)] = reference.ReferenceData(self.config, split, limit)
    return self._references[(split, limit)]

  def _prompts(self, s: EvaluatorSpec) -> tuple[list[str], list[int | None], str]:
    if s.prompts:
      return list(s.prompts), [None] * len(s.prompts), f'{len(s.prompts)} prompts of the evals spec'
    if s.prompts_file:
      prompts, seeds = read_prompts_file(s.prompts_file)
      return prompts, seeds, s.prompts_file
    data = self._reference(s.split, s.num_reference)
    captions = data.captions()
    return captions, [None] * len(captions), f'captions of {data.name}'

  def _build(self, s: EvaluatorSpec) -> Evaluator:
    processes = jax.process_count()
    if s.batch_size % processes:
      raise ConfigError(
        f'evals.{s.name}.batch_size', f'{s.batch_size} (global) is not divisible by the {processes} processes'
      )
    if s.pairs:
      if not hasattr(self.pipeline, 'reconstruct'):
        raise ConfigError(f'evals.{s.name}.type', f'metric {s.type} needs an autoencoder; this run has none')
      data = self._reference(s.split, s.num_samples)
      evaluator = Evaluator(s, None, [], [], f'held-out images of {data.name}', s.batch_size // processes)
    else:
      evaluator = self._sampling_evaluator(s, processes)
    factory = base.METRICS.get(s.type)
    limit = s.num_samples if s.pairs else s.num_reference
    data = self._reference(s.split, limit) if getattr(factory, 'needs_reference', False) else None
    context = base.EvalContext(
      self.workdir,
      self.config,
      data.batches if data else None,
      data.name if data else '',
      evaluator.local_batch,
      s.options.get('inception_weights'),
      s.seed,
      options=dict(s.options),
      calibration_images=data.first_images if data else None,
      prompts=evaluator.prompts,
    )
    evaluator.metric = factory(context)
    return evaluator

  def _sampling_evaluator(self, s: EvaluatorSpec, processes: int) -> Evaluator:
    prompts, seeds, source = self._prompts(s)
    if not prompts:
      raise UserError(f'evaluator {s.name}: no prompts ({source} is empty)')
    return Evaluator(
      s,
      self.pipeline.sampling_settings(**s.sampling),
      [prompts[i % len(prompts)] for i in range(s.num_samples)],
      sample_noise(s.num_samples, len(prompts), s.seed, seeds),
      source,
      s.batch_size // processes,
    )

  def due(self, step: int, last: bool = False) -> bool:
    """Whether any evaluator runs at training step `step` (`last`: the final step, where all run)."""
    return any(e.spec.due(step, last) for e in self.evaluators)

  def evaluate(self, params: dict | None, step: int | None = None, *, last: bool = True) -> dict[str, float]:
    """The scalars of every evaluator due at (`step`, `last`) (all of them by default), with `params`
    ({'unet', 'text', 'vae'}, addressable by this process; None: the pipeline's)."""
    due = [e for e in self.evaluators if step is None or e.spec.due(step, last)]
    groups: dict[tuple, list[Evaluator]] = {}
    for e in due:
      groups.setdefault(e.samples_key(), []).append(e)
    results: dict[str, float] = {}
    for group in groups.values():
      results.update(self._run_group(group, params))
    return results

  def _run_group(self, group: list[Evaluator], params: dict | None) -> dict[str, float]:
    first = group[0]
    for e in group:
      e.metric.reset()
    if first.spec.pairs:
      return self._run_pairs(group, params)
    for indices in reference.process_batches(first.spec.num_samples, first.local_batch):
      prompts = [first.prompts[i] for i in indices]
      images = self._generate(first, prompts, [first.noise[i] for i in indices], params)
      for e in group:
        e.metric.update(images, prompts)
    results: dict[str, float] = {}
    for e in group:
      results.update(e.prefix(e.metric.result()))
    return results

  def _run_pairs(self, group: list[Evaluator], params: Any) -> dict[str, float]:
    first = group[0]
    for images in self._reference(first.spec.split, first.spec.num_samples).batches(first.local_batch):
      reconstructions = self.pipeline.reconstruct(images, params, batch_size=first.local_batch)
      for e in group:
        e.metric.update(reconstructions, images)
    results: dict[str, float] = {}
    for e in group:
      results.update(e.prefix(e.metric.result()))
    return results

  def _generate(self, e: Evaluator, prompts: list[str], noise: list[tuple[int, int]], params: dict | None):
    """This batch's uint8 images; padded to the evaluator's batch (one shape: sampling compiles once)."""
    n = len(prompts)
    pad = e.local_batch - n
    prompts, noise = prompts + [prompts[-1]] * pad, noise + [noise[-1]] * pad
    out: list[Any] = [None] * len(prompts)
    for root in dict.fromkeys(r for r, _ in noise):  # One call per root seed (one, unless prompts have seeds).
      rows = [i for i, (r, _) in enumerate(noise) if r == root]
      images = self.pipeline.generate(
        [prompts[i] for i in rows],
        e.settings,
        seed=root,
        indices=[noise[i][1] for i in rows],
        batch_size=e.local_batch,
        params=params,
      )
      for i, image in zip(rows, images):
        out[i] = image
    return np.stack(out[:n])

  def describe(self) -> dict[str, Any]:
    """What each evaluator measures, for records: sampling settings, seed, prompts, metric information."""
    return {
      e.spec.name: {
        'type': e.spec.type,
        'num_samples': e.spec.num_samples,
        'seed': e.spec.seed,
        'batch_size': e.spec.batch_size,
        'every': e.spec.every,
        'prompts': e.prompt_source,
        'sampling': e.settings.to_dict() if e.settings is not None else None,
        'use_ema': True,
        **e.metric.describe(),
      }
      for e in self.evaluators
    }
