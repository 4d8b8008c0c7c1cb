"""Reading a training workdir: the one owner of what a workdir holds and how it is read back.

A workdir is self-describing: `config.json` (the resolved config it was trained with), `tokenizer/`, `frozen/<name>`
(parts it was built on but does not train, e.g. the VAE of stage 2), `built_on.json` (what the run is built on),
`checkpoints/`, `metrics.jsonl`, `eval/`.

Readers of a workdir that a config key names take that `key`: their errors then name it
(`config.vae_workdir: 'DIR' is not a training workdir (no config.json)`).
"""

import json
import os
from typing import Any, Mapping

import jax
import ml_collections

from diffusion import checkpoint
from diffusion.config import config_from_json, config_to_json
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import ConfigError, UserError

BUILT_ON = 'built_on.json'
# Config keys naming a workdir a run is built on. Params read from a `LIVE` key are used at every start (not copied
# into the run), so a resumed run must name a workdir with the same params again.
BUILT_ON_KEYS = ('vae_workdir', 'base_workdir', 'init_from')
LIVE = ('base_workdir',)


def _error(key: str | None, message: str) -> UserError:
  return ConfigError(key, message) if key else UserError(message)


def has_config(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, 'config.json'))


def load_workdir_config(workdir: str, expect: str | None = None, key: str | None = None) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`); `key`: the config key that named `workdir`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise _error(key, f'{workdir!r} is not a training workdir (no config.json)')
  try:
    config = config_from_json(open(path).read())
  except json.JSONDecodeError as e:
    raise _error(key, f'{path} is not valid JSON: {e}') from None
  if expect and config.get('model_type') != expect:
    raise _error(key, f'{workdir!r} holds a {config.get("model_type")!r} model, expected a {expect!r} workdir')
  return config


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config a run trains with (`<workdir>/config.json`)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config_to_json(config))


def tokenizer_path(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer')


def has_tokenizer(workdir: str) -> bool:
  return os.path.isdir(tokenizer_path(workdir))


def load_tokenizer(workdir: str, key: str | None = None) -> Any:
  """The tokenizer a workdir was trained with (`<workdir>/tokenizer`)."""
  if not has_tokenizer(workdir):
    raise _error(key, f'{workdir!r} has no tokenizer ({tokenizer_path(workdir)} is missing)')
  return tokenizer_lib.load_tokenizer(tokenizer_path(workdir))


def frozen_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'frozen', name)


def has_frozen(workdir: str, name: str) -> bool:
  return os.path.isdir(frozen_path(workdir, name))


def load_frozen(workdir: str, name: str, key: str | None = None) -> Any:
  """Frozen params a workdir holds under `frozen/<name>` (e.g. 'vae': the VAE stage 2 trains on)."""
  if not has_frozen(workdir, name):
    raise _error(key, f'{workdir!r} has no frozen {name!r} params ({frozen_path(workdir, name)} is missing)')
  return checkpoint.load_pytree(frozen_path(workdir, name))


def save_frozen(workdir: str, name: str, params: Any) -> None:
  """Writes frozen params into `frozen/<name>`; with several processes, all of them call it."""
  checkpoint.save_pytree(frozen_path(workdir, name), params)


def load_trained_params(
  workdir: str, item: str = 'ema_params', step: int | None = None, key: str | None = None
) -> tuple[Any, int]:
  """(params, step): one field of a workdir's checkpointed train state (default: the latest step's EMA params)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise _error(key, f'{workdir!r} has no checkpoints (train it first)')
  ckpt = checkpoint.Checkpointer(os.path.abspath(workdir), read_only=True)
  if ckpt.latest_step() is None:
    raise _error(key, f'{workdir!r} has no checkpoint (train it first)')
  try:
    params = ckpt.restore_params(step, item)
  except UserError as e:
    raise _error(key, str(e)) from None
  return params, step if step is not None else ckpt.latest_step()


def load_built_on(workdir: str) -> dict[str, dict] | None:
  """The record of what the run in `workdir` is built on (`built_on.json`), None when it has none."""
  path = os.path.join(workdir, BUILT_ON)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def record_built_on(workdir: str, config: ml_collections.ConfigDict, used: Mapping[str, Any], resume: bool) -> dict:
  """Records, or at resume verifies, what the run in `workdir` is built on; returns the record.

  `used` maps config keys of `BUILT_ON_KEYS` to the params this start of the run takes from the workdir the key names
  (at resume: a copy the run holds, e.g. its frozen VAE, or the params of a `LIVE` key read again). A fresh run writes
  `built_on.json`: per key the workdir's path and the sha256 of those params (`checkpoint.params_hash`). A resumed run
  checks every used key against the record; a changed hash, a key set now that the run was not started with, or an
  empty `LIVE` key the run is built on is a `ConfigError` naming the key. Runs without a record (imported, older ones)
  are not checked.
  """
  unknown = set(used) - set(BUILT_ON_KEYS)
  if unknown:
    raise ValueError(f'not keys naming what a run is built on: {sorted(unknown)}; known: {BUILT_ON_KEYS}')
  hashes = {key: checkpoint.params_hash(params) for key, params in used.items()}
  if not resume:
    record = {key: {'path': os.path.abspath(config[key]), 'params_sha256': hashes[key]} for key in used}
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, BUILT_ON), 'w') as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return record
  record = load_built_on(workdir)
  if record is None:
    return {}
  for key in BUILT_ON_KEYS:
    if (config.get(key) or key in used) and key not in record:
      raise ConfigError(
        key,
        f'{config.get(key)!r} is given, but the run in {workdir!r} was started without one '
        f'({BUILT_ON} has no {key}); start a new workdir to build on it',
      )
  for key, digest in hashes.items():
    if digest != record[key]['params_sha256']:
      raise ConfigError(
        key,
        f'the params of {config[key] or record[key]["path"]!r} changed since the run in '
        f'{workdir!r} was built on them (sha256 {record[key]["params_sha256"][:12]} in '
        f'{BUILT_ON}, {digest[:12]} now)',
      )
  for key in LIVE:
    if key in record and key not in used:
      raise ConfigError(key, f'is empty, but the run in {workdir!r} is built on {record[key]["path"]!r} ({BUILT_ON})')
  return record
