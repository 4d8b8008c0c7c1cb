"""Reading and writing diffusers / transformers model directories: configs, safetensors (single or sharded)
and PyTorch `.bin` files, local paths or Hugging Face hub ids (through huggingface_hub's cache)."""

import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from diffusion.errors import UserError

# Weight file stems: diffusers models and transformers models.
DIFFUSERS_WEIGHTS = 'diffusion_pytorch_model'
TRANSFORMERS_WEIGHTS = 'model'
_BIN_NAMES = {DIFFUSERS_WEIGHTS: 'diffusion_pytorch_model.bin', TRANSFORMERS_WEIGHTS: 'pytorch_model.bin'}


def looks_like_hub_id(path: str) -> bool:
  parts = path.split('/')
  return len(parts) == 2 and all(parts) and not path.startswith(('.', '/', '~'))


def hub_download(repo_id: str, patterns: list[str]) -> str:
  """A local snapshot of the files of `repo_id` matching `patterns` (cached by huggingface_hub)."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel

    return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
  except Exception as e:  # Offline, unknown repo, gated repo: all are the user's to fix.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(
      f'{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub '
      f'({type(e).__name__}: {message})'
    ) from None


def model_directory(path: str, subfolder: str, stem: str) -> str:
  """The local directory holding one model's `config.json` and weights.

  `path` is a model directory, a pipeline directory with the model in `subfolder` (e.g. `unet`), or a hub
  id of either (downloaded through huggingface_hub's cache: config, safetensors, then `.bin` if needed).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    for candidate in (path, os.path.join(path, subfolder)):
      if os.path.isfile(os.path.join(candidate, 'config.json')):
        return candidate
    raise UserError(f'{path!r} has no config.json (nor {subfolder}/config.json): not a model or pipeline directory')
  if not looks_like_hub_id(path):
    raise UserError(f'{path!r} does not exist')
  for prefix in ('', f'{subfolder}/'):
    patterns = [
      f'{prefix}config.json',
      f'{prefix}{stem}.safetensors',
      f'{prefix}{stem}*.safetensors.index.json',
      f'{prefix}{stem}-*.safetensors',
    ]
    root = hub_download(path, patterns)
    directory = os.path.join(root, prefix)
    if os.path.isfile(os.path.join(directory, 'config.json')):
      if not _safetensors_files(directory, stem):
        hub_download(path, [f'{prefix}{_BIN_NAMES[stem]}'])
      return directory.rstrip('/')
  raise UserError(f'hub repository {path!r} has no config.json (nor {subfolder}/config.json)')


def read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise UserError(f'missing {path}')
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {path}: {e}') from None
  if not isinstance(value, dict):
    raise UserError(f'{path} does not hold a JSON object')
  return value


def write_json(path: str, value: dict[str, Any]) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def _safetensors_files(directory: str, stem: str) -> list[str]:
  """The weight files of `directory`: `<stem>.safetensors`, or the shards its index names."""
  single = os.path.join(directory, f'{stem}.safetensors')
  if os.path.isfile(single):
    return [single]
  index = os.path.join(directory, f'{stem}.safetensors.index.json')
  if os.path.isfile(index):
    shards = sorted(set(read_json(index).get('weight_map', {}).values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing or not shards:
      raise UserError(f'{index}: shard files missing: {missing or "none listed"}')
    return [os.path.join(directory, s) for s in shards]
  return []


def read_state_dict(directory: str, stem: str) -> dict[str, np.ndarray]:
  """Every tensor of a model directory's weights (`<stem>.safetensors`, sharded, or the PyTorch `.bin`)."""
  files = _safetensors_files(directory, stem)
  state: dict[str, np.ndarray] = {}
  for path in files:
    try:
      with safe_open(path, framework='numpy') as f:
        for key in f.keys():
          if key in state:
            raise UserError(f'{path}: tensor {key!r} appears in two shards')
          state[key] = f.get_tensor(key)
    except (OSError, ValueError, RuntimeError) as e:  # safetensors raises SafetensorError (a RuntimeError-like).
      raise UserError(f'cannot read {path}: {e}') from None
  if files:
    return state
  binary = os.path.join(directory, _BIN_NAMES[stem])
  if not os.path.isfile(binary):
    raise UserError(
      f'{directory} has no weights: expected {stem}.safetensors, a sharded '
      f'{stem}.safetensors.index.json, or {_BIN_NAMES[stem]}'
    )
  return _read_torch_bin(binary)


def read_state_keys(directory: str, stem: str) -> set[str]:
  """The tensor names of a model directory's weights, without reading the tensors (safetensors)."""
  files = _safetensors_files(directory, stem)
  if not files:
    return set(read_state_dict(directory, stem))
  keys = set()
  for path in files:
    try:
      with safe_open(path, framework='numpy') as f:
        keys.update(f.keys())
    except (OSError, ValueError, RuntimeError) as e:
      raise UserError(f'cannot read {path}: {e}') from None
  return keys


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f'{path} is a PyTorch pickle: reading it needs torch (or convert it to safetensors)') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # Corrupt or not a state dict.
    raise UserError(f'cannot read {path}: {e}') from None
  state = state.get('state_dict', state)
  return {
    k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    for k, v in state.items()
    if isinstance(v, torch.Tensor)
  }


def write_state_dict(directory: str, stem: str, state: dict[str, np.ndarray]) -> str:
  """Writes `<directory>/<stem>.safetensors` (with the metadata transformers expects); returns its path."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f'{stem}.safetensors')
  save_file(state, path, metadata={'format': 'pt'})
  return path
