"""pytorch-fid's InceptionV3 weights (`pt_inception-2015-12-05-6726825d.pth`) -> Flax variables of
`diffusion.models.inception.InceptionV3`.

The file is read from a local path, from the cache where pytorch-fid keeps it, or (with `download=True`) downloaded
there; `.pth` files are read without PyTorch (`diffusion.interop.pth`). The conversion is table-driven and strict.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from typing import Any, Mapping

import jax
import numpy as np

from diffusion.errors import UserError
from diffusion.interop import pth
from diffusion.models import inception

FID_WEIGHTS_URL = (
  'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
)
FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_SHA256_PREFIX = '6726825d'


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...], bool]:
  """'Mixed_5b.branch1x1.conv.weight' -> ('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel'), transpose)."""
  *modules, leaf = torch_key.split('.')
  layer = modules[-1] if modules else ''
  table = {
    ('conv', 'weight'): ('params', 'kernel'),
    ('bn', 'weight'): ('params', 'scale'),
    ('bn', 'bias'): ('params', 'bias'),
    ('bn', 'running_mean'): ('batch_stats', 'mean'),
    ('bn', 'running_var'): ('batch_stats', 'var'),
    ('fc', 'weight'): ('params', 'kernel'),
    ('fc', 'bias'): ('params', 'bias'),
  }
  if (layer, leaf) not in table:
    raise KeyError(torch_key)
  collection, name = table[(layer, leaf)]
  return collection, (*modules, name), name == 'kernel'


def convert_state_dict(state_dict: Mapping[str, Any], dtype: Any = np.float32) -> dict:
  """pytorch-fid's InceptionV3 state dict (name -> array) -> Flax variables {'params', 'batch_stats'}.

  Strict: every expected parameter must be present with the expected shape, and no unknown key is accepted
  (`num_batches_tracked` counters are ignored).
  """
  expected = {
    tuple(str(getattr(k, 'key', k)) for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(inception.abstract_variables())
  }
  variables: dict = {}
  unknown, seen = [], set()
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    try:
      collection, path, transpose = _flax_path(key)
    except KeyError:
      unknown.append(key)
      continue
    array = np.asarray(value, dtype=dtype)
    if transpose:
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T  # OIHW -> HWIO; (out, in) -> (in, out).
    full = (collection, *path)
    if full not in expected:
      unknown.append(key)
      continue
    if array.shape != expected[full]:
      raise UserError(
        f'Inception weights: {key} has shape {tuple(np.shape(value))}, which does not fit the FID '
        f'InceptionV3 (expected {expected[full]} after conversion)'
      )
    node = variables
    for part in full[:-1]:
      node = node.setdefault(part, {})
    node[full[-1]] = array
    seen.add(full)
  missing = ['.'.join(p) for p in expected if p not in seen]
  if unknown or missing:
    raise UserError(
      f'Inception weights do not match the FID InceptionV3: {len(missing)} missing '
      f'({", ".join(missing[:3])}{"..." if len(missing) > 3 else ""}), {len(unknown)} unexpected '
      f'({", ".join(unknown[:3])}{"..." if len(unknown) > 3 else ""})'
    )
  return variables


def default_weights_path() -> str:
  """Where pytorch-fid's download lands (torch hub's cache), so a file users already have is found."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'torch'
  )
  return os.path.join(torch_home, 'hub', 'checkpoints', FID_WEIGHTS_FILE)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _download(path: str) -> None:
  import urllib.request

  os.makedirs(os.path.dirname(path), exist_ok=True)
  print(f'downloading {FID_WEIGHTS_URL} to {path}', file=sys.stderr, flush=True)
  tmp = path + '.partial'
  try:
    urllib.request.urlretrieve(FID_WEIGHTS_URL, tmp)
  except OSError as e:
    raise UserError(f'could not download the Inception weights ({e}); {_where_to_put(path)}') from None
  os.replace(tmp, path)


def _where_to_put(path: str) -> str:
  return (
    f'download {FID_WEIGHTS_URL} (sha256 starts with {FID_WEIGHTS_SHA256_PREFIX}) and put it at {path}, '
    'or pass the file with --inception_weights'
  )


def resolve_weights_path(path: str | None = None, download: bool = False) -> str:
  """The weight file to use: `path`, else the cached pytorch-fid file (downloaded first if `download`).

  A file named like the official one (`pt_inception-2015-12-05-<hash>.pth`) is checked against its hash.
  """
  if path is None:
    path = default_weights_path()
    if not os.path.isfile(path):
      if not download:
        raise UserError(
          f'FID Inception weights not found at {path}: {_where_to_put(path)} (or allow the download with --download)'
        )
      _download(path)
  elif not os.path.isfile(path):
    raise UserError(f'Inception weight file {path!r} does not exist: {_where_to_put(default_weights_path())}')
  match = re.fullmatch(r'pt_inception-2015-12-05-([0-9a-f]{8,})\.pth', os.path.basename(path))
  if match:
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
      raise UserError(
        f'{path} is corrupt or not the expected file: its sha256 is {digest[:16]}..., expected '
        f'{match.group(1)}...; {_where_to_put(path)}'
      )
  return path


_read_pth_without_torch = pth.read_zip_pth  # The shared torch-free reader (diffusion.interop.pth).


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as NumPy arrays, read without PyTorch (zip and legacy `torch.save` formats)."""
  return pth.read_pth(path)


def load_variables(path: str | None = None, download: bool = False) -> dict:
  """Flax variables of the FID InceptionV3 from pytorch-fid's weight file (see `resolve_weights_path`)."""
  return convert_state_dict(load_state_dict(resolve_weights_path(path, download)))
