"""Config loading helpers and validation, run once before anything is compiled.

`validate_config` dispatches each section to the component that owns its rules: the models check `config.model`
and the sizes the networks must agree on (`models.validate_config`), the mesh its axes (`parallel`), the data
section its own (`data.validation`), the process and the loss theirs (`process`, `losses`), and the sampling
settings theirs (`samplers.SamplingSettings`). Only the train / optim / wandb sections, which no lower component
owns, are checked here. Unknown keys and wrong types are already refused by ml_collections when a
`--config.a.b=value` override is parsed. Every error names the key and what would fix it.
"""

import json

import ml_collections

from diffusion import lora, losses, models, parallel, process, samplers
from diffusion.data import dreambooth
from diffusion.data import validation as data_validation
from diffusion.errors import ConfigError

WANDB_MODES = ('online', 'offline', 'disabled')
COMPUTE_DTYPES = ('float32', 'bfloat16')


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(key, message)


def _validate_train(config: ml_collections.ConfigDict) -> None:
  """The train, optim and wandb sections, and the batch against the data parallelism."""
  train = config.train
  for name in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'max_bad_steps'):
    _check(train[name] > 0, f'train.{name}', f'must be > 0, got {train[name]!r}')
  for name in ('eval_every', 'eval_batches', 'sample_every'):
    _check(train[name] >= 0, f'train.{name}', f'must be >= 0 (0 disables), got {train[name]!r}')
  optim = config.optim
  _check(0 < optim.lr < float('inf'), 'optim.lr', f'the learning rate must be > 0 and finite, got {optim.lr!r}')
  _check(optim.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {optim.warmup_steps!r}')
  _check(
    optim.lr_schedule in ('cosine', 'constant'),
    'optim.lr_schedule',
    f'unknown schedule {optim.lr_schedule!r}; known: cosine, constant',
  )
  _check(0.0 <= optim.end_lr_factor <= 1.0, 'optim.end_lr_factor', f'must be in [0, 1], got {optim.end_lr_factor!r}')
  _check(0.0 <= optim.ema_decay < 1.0, 'optim.ema_decay', f'must be in [0, 1), got {optim.ema_decay!r}')
  _check(optim.weight_decay >= 0, 'optim.weight_decay', f'must be >= 0, got {optim.weight_decay!r}')
  _check(optim.grad_clip >= 0, 'optim.grad_clip', f'must be >= 0 (0 disables), got {optim.grad_clip!r}')
  for name in ('b1', 'b2'):
    _check(0.0 <= optim[name] < 1.0, f'optim.{name}', f'must be in [0, 1), got {optim[name]!r}')
  _check(config.wandb.mode in WANDB_MODES, 'wandb.mode', f'unknown mode {config.wandb.mode!r}; known: {WANDB_MODES}')
  accum = train.get('grad_accum_steps', 1)
  _check(isinstance(accum, int) and accum >= 1, 'train.grad_accum_steps', f'must be an integer >= 1, got {accum!r}')
  degrees = [config.mesh[axis] for axis in parallel.BATCH_AXES]
  data_parallel = degrees[0] * degrees[1] if -1 not in degrees else 1  # -1: checked once the devices are known.
  _check(
    train.batch_size % (accum * data_parallel) == 0,
    'train.batch_size',
    f'{train.batch_size} is not divisible by the data parallelism {data_parallel} (mesh data x fsdp) times '
    f'train.grad_accum_steps={accum}',
  )
  dtype = train.get('compute_dtype', '')
  _check(
    dtype in ('',) + COMPUTE_DTYPES,
    'train.compute_dtype',
    f'unknown {dtype!r}; known: {", ".join(COMPUTE_DTYPES)} ("" = each model.*.dtype)',
  )
  frozen = train.get('frozen_param_dtype', 'float32')
  _check(
    frozen in COMPUTE_DTYPES, 'train.frozen_param_dtype', f'unknown {frozen!r}; known: {", ".join(COMPUTE_DTYPES)}'
  )


def _validate_sample(config: ml_collections.ConfigDict, schedule: process.NoiseSchedule) -> None:
  """The sample section: valid sampling settings for the model's schedule, and the training sample grid."""
  samplers.SamplingSettings.from_config(config.sample).check_schedule(schedule, config_keys=True)
  _check(config.sample.num_images_per_prompt >= 1, 'sample.num_images_per_prompt', 'must be >= 1')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first bad key; cheap, so entry points call it before compiling anything."""
  model_type = config.get('model_type')
  _check(
    isinstance(model_type, str) and bool(model_type),
    'model_type',
    f'must name a task (the training task registry checks the name), got {model_type!r}',
  )
  parallel.validate_config(config)  # The mesh first: the batch-size check below divides by its degrees.
  _validate_train(config)
  data_validation.validate_config(config)
  models.validate_config(config)
  losses.validate_config(config)
  lora.validate_config(config)
  dreambooth.validate_config(config)
  if 'diffusion' in config:  # A diffusion model: its process, and sampling settings for that process.
    _validate_sample(config, process.validate_config(config.diffusion))


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The inverse of `config_to_json`; lists come back as tuples, as the config files write them."""

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  return ml_collections.ConfigDict(tuples(json.loads(text)))
