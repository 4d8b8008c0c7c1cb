"""The `config.evals` section: one entry per evaluator, validated here (its owner) with errors naming the key.

  config.evals.oracle = ml_collections.ConfigDict(dict(type='oracle', every=1500, num_samples=144))
  config.evals.fid = ml_collections.ConfigDict(dict(type='fid', num_samples=1000, guidance_scale=2.0,
                                                    inception_weights='pt_inception-2015-12-05-6726825d.pth'))

Every key is optional (defaults in `DEFAULTS`). `type` is a metric of `diffusion.evaluation.METRICS` (default: the
evaluator's name). `every` > 0 runs it during training at multiples of `every` and at the last step; 0 only at the
last step. `batch_size` is global (all processes together). Sampling overrides (None: `config.sample`'s):
guidance_scale, num_steps, sampler, negative_prompt, and `seed` (None: `config.seed`); image i starts from
fold_in(seed, i). Prompts: `prompts` (a tuple, cycled), else `prompts_file` (`prompt<TAB>seed` lines honoured as in
sample.py), else the captions of the reference split. Metric options: split ('' = data.train_split),
num_reference, inception_weights ('' = random, calibrated Inception), clip_model, resize_backend, vgg_weights,
lpips_weights, lpips_net. Pair metrics (psnr, ssim, lpips, rfid: `pairs = True`) reconstruct `num_samples` images of
`split` ('' = data.eval_split) and take no sampling settings or prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from diffusion import process, samplers
from diffusion.errors import ConfigError, UserError
from diffusion.evaluation.base import METRICS

DEFAULTS: dict[str, Any] = {
  'type': '',
  'every': 0,
  'num_samples': 1000,
  'batch_size': 50,
  'seed': None,
  'guidance_scale': None,
  'num_steps': None,
  'sampler': None,
  'negative_prompt': None,
  'prompts': (),
  'prompts_file': '',
  'split': '',
  'num_reference': 10000,
  'inception_weights': '',
  'clip_model': '',
  'resize_backend': '',
  'vgg_weights': '',
  'lpips_weights': '',
  'lpips_net': '',
}
SAMPLING_KEYS = ('guidance_scale', 'num_steps', 'sampler', 'negative_prompt')
OPTION_KEYS = ('inception_weights', 'clip_model', 'resize_backend', 'vgg_weights', 'lpips_weights', 'lpips_net')


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
  """One validated entry of `config.evals`."""

  name: str
  type: str
  every: int
  num_samples: int
  batch_size: int
  seed: int
  sampling: dict[str, Any]  # The overrides of config.sample that are set.
  prompts: tuple[str, ...]
  prompts_file: str
  split: str
  num_reference: int
  options: dict[str, str]  # The metric options that are set.
  pairs: bool = False  # A metric of (reconstruction, held-out image) pairs.

  def due(self, step: int, last: bool) -> bool:
    return last or (self.every > 0 and step % self.every == 0)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_value(key: str, value: Any) -> str | None:
  """Why `value` is not valid for evaluator key `key` (None if it is)."""
  if key in ('every',) and not (_is_int(value) and value >= 0):
    return f'must be an integer >= 0 (0: only at the last training step), got {value!r}'
  if key in ('num_samples', 'batch_size', 'num_reference') and not (_is_int(value) and value >= 1):
    return f'must be an integer >= 1, got {value!r}'
  if key == 'seed' and not (value is None or _is_int(value)):
    return f'must be an integer or None (config.seed), got {value!r}'
  if key in ('type', 'prompts_file', 'split') + OPTION_KEYS and not isinstance(value, str):
    return f'must be a string, got {value!r}'
  if key == 'prompts' and not (isinstance(value, (tuple, list)) and all(isinstance(p, str) for p in value)):
    return f'must be a tuple of strings, got {value!r}'
  return None


def _sampling(config: ml_collections.ConfigDict, name: str, overrides: dict[str, Any]) -> None:
  """Builds the sampling settings once per override, so a bad one is an error naming its key."""
  schedule = process.get_noise_schedule(config.diffusion)
  for key in list(overrides) + [None]:
    given = overrides if key is None else {key: overrides[key]}
    try:
      samplers.SamplingSettings.from_config(config.sample, **given).check_schedule(schedule)
    except UserError as e:
      raise ConfigError(f'evals.{name}.{key or next(iter(overrides))}', str(e)) from None


def parse_evaluator(name: str, entry: Mapping[str, Any], config: ml_collections.ConfigDict) -> EvaluatorSpec:
  """The validated spec of `config.evals.<name>` (`entry`); a bad value is a `ConfigError('evals.<name>.<key>')`."""
  if isinstance(entry, ml_collections.ConfigDict):
    entry = entry.to_dict()
  if not isinstance(entry, Mapping):
    raise ConfigError(f'evals.{name}', f'must be a ConfigDict of evaluator settings, got {entry!r}')
  values = dict(DEFAULTS)
  for key, value in dict(entry).items():
    if key not in DEFAULTS:
      raise ConfigError(f'evals.{name}.{key}', f'unknown key; known: {", ".join(DEFAULTS)}')
    if value is not None or DEFAULTS[key] is None:
      values[key] = value
  for key, value in values.items():
    why = _check_value(key, value)
    if why:
      raise ConfigError(f'evals.{name}.{key}', why)
  metric = values['type'] or name
  if metric not in METRICS:
    raise ConfigError(f'evals.{name}.type', METRICS.unknown(metric))
  sampling = {k: values[k] for k in SAMPLING_KEYS if values[k] is not None}
  pairs = getattr(METRICS.get(metric), 'pairs', False)
  if pairs:
    given = [k for k in (*SAMPLING_KEYS, 'prompts', 'prompts_file') if k in sampling or (k in entry and entry[k])]
    if given:
      raise ConfigError(f'evals.{name}.{given[0]}', f'metric {metric} reconstructs held-out images: it samples nothing')
  elif 'diffusion' not in config:
    pair_metrics = [m for m in METRICS.names() if getattr(METRICS.get(m), 'pairs', False)]
    raise ConfigError(
      f'evals.{name}.type',
      f'metric {metric} scores images sampled from text, which an {"ldm"!r} (text-to-image) model makes; this is a '
      f'{config.get("model_type")!r} model (its metrics: {", ".join(pair_metrics)})',
    )
  else:
    _sampling(config, name, sampling)
  return EvaluatorSpec(
    name=name,
    type=metric,
    every=values['every'],
    num_samples=values['num_samples'],
    batch_size=values['batch_size'],
    seed=config.seed if values['seed'] is None else values['seed'],
    sampling=sampling,
    prompts=tuple(values['prompts']),
    prompts_file=values['prompts_file'],
    split=values['split'] or (config.data.eval_split if pairs else config.data.train_split),
    num_reference=values['num_reference'],
    options={k: values[k] for k in OPTION_KEYS if values[k]},
    pairs=pairs,
  )


def parse_evals(config: ml_collections.ConfigDict) -> list[EvaluatorSpec]:
  """Every evaluator of `config.evals` (none when the section is missing or empty), validated."""
  evals = config.get('evals') or {}
  return [parse_evaluator(name, evals[name], config) for name in sorted(evals)]


def validate_evals(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first bad `config.evals` key; cheap (nothing is built)."""
  parse_evals(config)
