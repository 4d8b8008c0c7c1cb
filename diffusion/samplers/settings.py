"""The one validated description of how to sample: sampler, steps, guidance and the sampler's options.

`SamplingSettings` is the single owner of every sampling-setting rule: config validation builds one from
`config.sample` (a bad value is a `ConfigError('sample.<key>', ...)`), the pipeline samples with one, sample.py and
the eval tools turn their flags into overrides (a bad override is a `UserError` naming the option), and its
`to_dict` is what settings.json and eval records store. It is frozen and hashable, so the pipeline's jit takes it as
a static argument (one compile per settings and batch shape).

Sampler options: the config supplies `CONFIG_OPTIONS` (eta, karras, timestep_spacing, s_churn), each passed only to
a sampler that takes it ('' spacing = the sampler's default); an override may set any option of the chosen sampler
(its registry info lists them) and no other.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from diffusion import process
from diffusion.errors import ConfigError, UserError
from diffusion.samplers.core import SAMPLERS, SPACINGS, family_error, sampler_info

# The config's sample section keys that are sampler options, with the values that mean "not set".
CONFIG_OPTIONS: dict[str, Any] = {'eta': 0.0, 'karras': False, 'timestep_spacing': '', 's_churn': 0.0}
_FIELDS = ('sampler', 'num_steps', 'guidance_scale', 'guidance_rescale', 'guidance_interval', 'negative_prompt')


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Everything static about one sampling call; built validated, so holding one means it can be used.

  `guidance_interval` is (lo, hi) in fractions of the training time range: guidance applies where lo <= t / T <= hi,
  (0, 1) = everywhere. `options` are (name, value) pairs sorted by name, only those the sampler takes.
  """

  sampler: str
  num_steps: int
  guidance_scale: float
  guidance_rescale: float = 0.0
  guidance_interval: tuple[float, float] = (0.0, 1.0)
  negative_prompt: str = ''
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if not isinstance(self.sampler, str):
      raise UserError(f'the sampler must be a name, got {self.sampler!r}')
    try:
      object.__setattr__(self, 'options', tuple(sorted((str(k), _plain(v)) for k, v in dict(self.options).items())))
      object.__setattr__(self, 'guidance_interval', tuple(float(v) for v in self.guidance_interval))
    except (TypeError, ValueError) as e:
      raise UserError(f'bad sampling settings: {e}') from None
    for key, phrase, message in _problems(self):
      raise UserError(message or f'{key} {phrase}')
    for name, kind in (('num_steps', int), ('guidance_scale', float), ('guidance_rescale', float)):
      object.__setattr__(self, name, kind(getattr(self, name)))

  @classmethod
  def from_config(cls, sample_config: Mapping[str, Any], **overrides: Any) -> 'SamplingSettings':
    """The settings of a config's sample section, with the overrides that are not None applied on top.

    A bad value from the config is a `ConfigError` naming `sample.<key>`; a bad override a `UserError` naming it.
    When an override picks another sampler, the config's options that sampler does not take are dropped.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    s = sample_config
    values = {
      'sampler': s['sampler'],
      'num_steps': s['num_steps'],
      'guidance_scale': s['guidance_scale'],
      'guidance_rescale': s.get('guidance_rescale', 0.0),
      'guidance_interval': s.get('guidance_interval', (0.0, 1.0)),
      'negative_prompt': s.get('negative_prompt', ''),
    }
    given = set(overrides)  # Keys whose value came from an override.
    values.update({k: overrides.pop(k) for k in _FIELDS if k in overrides})
    options = {}
    if values['sampler'] in SAMPLERS:
      accepted = sampler_info(values['sampler']).options
      for key, unset in CONFIG_OPTIONS.items():
        value = s.get(key, unset)
        if key in accepted and value != '':
          options[key] = value
        elif value != unset and 'sampler' not in given:
          raise ConfigError(
            f'sample.{key}',
            f'is {value!r} but sampler {values["sampler"]!r} has no option '
            f'{key!r} (its options: {", ".join(accepted)})',
          )
    options.update(overrides)
    candidate = _Candidate(options=tuple(options.items()), **values)
    for key, phrase, message in _problems(candidate):
      if key in given:
        raise UserError(message or f'{key} {phrase}')
      raise ConfigError(f'sample.{key}', phrase)
    return cls(options=tuple(options.items()), **values)

  @classmethod
  def check_overrides(cls, flag_prefix: str = '', **overrides: Any) -> None:
    """Checks overrides on their own, before any config is at hand (flags, before a workdir is loaded): each value's
    range, and the options against the sampler where one is given. A bad one is a `UserError` naming it (as
    `--name` with `flag_prefix='--'`, for command-line tools)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values = {
      'sampler': None,
      'num_steps': 1,
      'guidance_scale': 0.0,
      'guidance_rescale': 0.0,
      'guidance_interval': (0.0, 1.0),
      'negative_prompt': '',
    }
    values.update({k: overrides.pop(k) for k in _FIELDS if k in overrides})
    for key, phrase, message in _problems(_Candidate(options=tuple(overrides.items()), **values)):
      raise UserError(
        f'{flag_prefix}{key}: {message}' if message and flag_prefix else message or f'{flag_prefix}{key} {phrase}'
      )

  def replace(self, **overrides: Any) -> 'SamplingSettings':
    """A copy with the overrides that are not None applied (validated again, a bad one is a `UserError`).

    Sampler options may be given directly (`eta=0.5`); a new sampler keeps only the options it takes.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    values = {k: getattr(self, k) for k in _FIELDS}
    values.update({k: overrides.pop(k) for k in _FIELDS if k in overrides})
    options = dict(self.options)
    if values['sampler'] != self.sampler and values['sampler'] in SAMPLERS:
      accepted = sampler_info(values['sampler']).options
      options = {k: v for k, v in options.items() if k in accepted}
    options.update(overrides)
    return SamplingSettings(options=tuple(options.items()), **values)

  def check_schedule(self, schedule: process.NoiseSchedule, config_keys: bool = False) -> None:
    """Refuses a sampler of the other family than the model's schedule (diffusion vs flow) and more steps than
    the schedule has: a `UserError`, or with `config_keys` (the settings came from the config) a
    `ConfigError('sample.<key>')`."""
    why = family_error(self.sampler, schedule)
    key = 'sampler'
    if why is None and self.num_steps > schedule.num_timesteps:
      key, why = 'num_steps', f'must be in [1, {schedule.num_timesteps}] (the training steps), got {self.num_steps}'
    original = _original_inference_steps(self.sampler, self.options)
    if why is None and original is not None and original > schedule.num_timesteps:
      # Not a config key: always the option's own error.
      raise UserError(
        f'original_inference_steps must be in [1, {schedule.num_timesteps}] (the training steps), got {original}'
      )
    if why is None:
      return
    if config_keys:
      raise ConfigError(f'sample.{key}', why)
    raise UserError(why if key == 'sampler' else f'{key} {why}')

  def model_time_interval(self, num_timesteps: int) -> tuple[float, float] | None:
    """The guidance interval in model-time units (0..T), or None where guidance applies everywhere."""
    lo, hi = self.guidance_interval
    return None if (lo, hi) == (0.0, 1.0) else (lo * num_timesteps, hi * num_timesteps)

  def to_dict(self) -> dict:
    """A JSON-able record (settings.json, eval records); `from_dict` reads it back."""
    return {
      'sampler': self.sampler,
      'num_steps': self.num_steps,
      'guidance_scale': self.guidance_scale,
      'guidance_rescale': self.guidance_rescale,
      'guidance_interval': list(self.guidance_interval),
      'negative_prompt': self.negative_prompt,
      'options': dict(self.options),
    }

  @classmethod
  def from_dict(cls, record: Mapping[str, Any]) -> 'SamplingSettings':
    """The inverse of `to_dict` (validated)."""
    values = {k: record[k] for k in _FIELDS if k in record}
    return cls(options=tuple(dict(record.get('options', {})).items()), **values)


@dataclasses.dataclass(frozen=True)
class _Candidate:
  """Unvalidated values with the fields of `SamplingSettings`, so `_problems` can check them before building."""

  sampler: Any
  num_steps: Any
  guidance_scale: Any
  guidance_rescale: Any
  guidance_interval: Any
  negative_prompt: Any
  options: tuple[tuple[str, Any], ...]


def _plain(value: Any) -> Any:
  """A JSON-able, hashable Python scalar (numpy scalars from flags or configs become Python ones)."""
  if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
    value = value.item()
  if not isinstance(value, (bool, int, float, str)):
    raise TypeError(f'option values must be numbers, booleans or strings, got {value!r}')
  return value


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problems(s: Any) -> Iterator[tuple[str, str, str]]:
  """(key, phrase for `config.sample.<key>: phrase`, message for an override) of each bad value, in key order."""
  if s.sampler is not None and s.sampler not in SAMPLERS:  # None: not known yet (`check_overrides`).
    yield 'sampler', SAMPLERS.unknown(s.sampler), SAMPLERS.unknown(s.sampler)
    return
  if not (isinstance(s.num_steps, int) and not isinstance(s.num_steps, bool) and s.num_steps >= 1):
    yield 'num_steps', f'must be an integer >= 1, got {s.num_steps!r}', None
  if not (_number(s.guidance_scale) and s.guidance_scale >= 0):
    yield 'guidance_scale', f'must be a number >= 0, got {s.guidance_scale!r}', None
  if not (_number(s.guidance_rescale) and 0.0 <= s.guidance_rescale <= 1.0):
    yield 'guidance_rescale', f'must be in [0, 1], got {s.guidance_rescale!r}', None
  interval = tuple(s.guidance_interval) if isinstance(s.guidance_interval, (tuple, list)) else ()
  if not (len(interval) == 2 and all(_number(v) for v in interval) and 0.0 <= interval[0] <= interval[1] <= 1.0):
    yield (
      'guidance_interval',
      f'must be (lo, hi) with 0 <= lo <= hi <= 1 (fractions of the training time), got {s.guidance_interval!r}',
      None,
    )
  if not isinstance(s.negative_prompt, str):
    yield 'negative_prompt', f'must be a string, got {s.negative_prompt!r}', None
  accepted = None if s.sampler is None else sampler_info(s.sampler).options
  for key, value in s.options:
    if accepted is not None and key not in accepted:
      yield (
        key,
        f'is {value!r} but sampler {s.sampler!r} has no option {key!r} (its options: {", ".join(accepted)})',
        f'sampler {s.sampler!r} has no option {key!r}; its options: {", ".join(accepted)}',
      )
    elif (why := _option_problem(key, value)) is not None:
      yield key, why, None
  original = _original_inference_steps(s.sampler, s.options)
  if original is not None and _count(original) and _count(s.num_steps) and s.num_steps > original:
    yield (
      'num_steps',
      f'must be <= original_inference_steps ({original}) with sampler {s.sampler!r} (its timesteps are a subset of '
      f'that many), got {s.num_steps}',
      None,
    )


def _count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _original_inference_steps(sampler: str | None, options: tuple[tuple[str, Any], ...]) -> Any:
  """The `original_inference_steps` a sampler that takes it runs with (its default unless set), else None."""
  if sampler is None or 'original_inference_steps' not in sampler_info(sampler).options:
    return None
  return dict(options).get('original_inference_steps', dict(sampler_info(sampler).defaults)['original_inference_steps'])


def _option_problem(key: str, value: Any) -> str | None:
  """Why `value` is not a valid sampler option `key`, for the options with a range; None if it is."""
  if key in ('eta', 's_churn') and not (_number(value) and value >= 0):
    return f'must be a number >= 0, got {value!r}'
  if key == 'karras' and not isinstance(value, bool):
    return f'must be True or False, got {value!r}'
  if key == 'timestep_spacing' and value not in SPACINGS:
    return f'must be one of {", ".join(SPACINGS)} ("" in the config: the sampler\'s default), got {value!r}'
  if key == 'steps_offset' and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
    return f'must be an integer >= 0, got {value!r}'
  if key == 'original_inference_steps' and not _count(value):
    return f'must be an integer >= 1, got {value!r}'
  if key == 'timestep_scaling' and not (_number(value) and math.isfinite(value) and value > 0):
    return f'must be a finite number > 0, got {value!r}'
  return None
