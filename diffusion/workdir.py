"""Reading a training workdir: the one owner of what a workdir holds and how it is read back.

A workdir is self-describing: `config.json` (the resolved config it was trained with), `tokenizer/`, `frozen/`
(parts it was built on but does not train, e.g. the VAE of stage 2), `checkpoints/`, `metrics.jsonl`, `eval/`.
"""

import json
import os

import ml_collections

from diffusion.config import config_from_json
from diffusion.errors import UserError


def load_workdir_config(workdir: str, expect: str | None = None) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir!r} is not a training workdir (no config.json)')
  try:
    config = config_from_json(open(path).read())
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  if expect and config.get('model_type') != expect:
    raise UserError(f'{workdir!r} holds a {config.get("model_type")!r} model, expected a {expect!r} workdir')
  return config
