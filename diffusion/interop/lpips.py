"""LPIPS weights -> params of `diffusion.models.lpips.LPIPS`, read without PyTorch.

Two files, as the `lpips` package uses them: the backbone is torchvision's state dict (`vgg16-397923af.pth`,
`alexnet-owt-7be5be79.pth`: `features.<i>.weight|bias`; the classifier is ignored; an `lpips` package state dict
with `net.slice<k>.<i>.*` keys works too), the linear heads are the package's `weights/v0.1/<net>.pth`
(`lin<k>.model.1.weight`, shape (1, C, 1, 1)). `'random'` for either is the explicit, labelled choice of random
weights (tests, the CPU demo); `''` is the usual place: torch hub's cache for the backbone (where torchvision puts
its download), the installed `lpips` package's file for the heads (found without importing it, or torch). A missing
or mis-shaped file is one `ConfigError` naming the config key.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion.errors import ConfigError, UserError
from diffusion.interop import pth
from diffusion.models import lpips

RANDOM = 'random'
BACKBONE_FILES = {'vgg': 'vgg16-397923af.pth', 'alex': 'alexnet-owt-7be5be79.pth'}  # torchvision's file names.
_BACKBONE_KEY = re.compile(r'(?:features|net\.slice\d+)\.(\d+)\.(weight|bias)')
_HEAD_KEY = re.compile(r'lin(\d+)\.model\.[01]\.weight')


def _error(key: str | None, message: str) -> UserError:
  return ConfigError(key, message) if key else UserError(message)


def convert_backbone(state: Mapping[str, Any], net: str = 'vgg', key: str | None = None) -> dict:
  """torchvision `features.<i>.weight|bias` (OIHW) -> {'features_<i>': {'kernel' (HWIO), 'bias'}}; strict."""
  expected = {index: (out, k) for index, out, k in lpips.conv_layers(net)}
  params: dict = {}
  for name, value in state.items():
    match = _BACKBONE_KEY.fullmatch(name)
    if not match or int(match.group(1)) not in expected:
      continue  # The classifier, the heads, the scaling layer's buffers.
    index, leaf = int(match.group(1)), match.group(2)
    out, k = expected[index]
    array = np.asarray(value, np.float32)
    ok = array.shape[0] == out and (
      array.ndim == 1 if leaf == 'bias' else array.ndim == 4 and array.shape[2:] == (k, k)
    )
    if not ok:
      raise _error(key, f'{name} has shape {array.shape}, which does not fit the LPIPS {net} backbone')
    entry = params.setdefault(f'features_{index}', {})
    entry['bias' if leaf == 'bias' else 'kernel'] = array if leaf == 'bias' else array.transpose(2, 3, 1, 0)
  names = {'weight': 'kernel', 'bias': 'bias'}
  missing = [
    f'features.{i}.{t}' for i in expected for t, f in names.items() if f not in params.get(f'features_{i}', {})
  ]
  if missing:
    raise _error(key, f'not a {net} backbone state dict: {len(missing)} tensors missing ({", ".join(missing[:3])}...)')
  _check_chain(params, net, key)
  return params


def _check_chain(params: dict, net: str, key: str | None) -> None:
  """Each conv's input channels are the previous conv's outputs (3 for the first)."""
  channels = 3
  for index, out, _ in lpips.conv_layers(net):
    have = params[f'features_{index}']['kernel'].shape[2]
    if have != channels:
      raise _error(key, f'features.{index}.weight takes {have} input channels, the {net} backbone gives {channels}')
    channels = out


def convert_heads(state: Mapping[str, Any], net: str = 'vgg', key: str | None = None) -> dict:
  """The package's `lin<k>.model.1.weight` (1, C, 1, 1) -> {'lin<k>': {'kernel': (1, 1, C, 1)}}; strict."""
  channels = lpips.CHANNELS[net]
  params: dict = {}
  for name, value in state.items():
    match = _HEAD_KEY.fullmatch(name)
    if not match:
      continue
    i, array = int(match.group(1)), np.asarray(value, np.float32)
    if i >= len(channels) or array.shape != (1, channels[i], 1, 1):
      want = (1, channels[i], 1, 1) if i < len(channels) else 'no such layer'
      raise _error(key, f'{name} has shape {array.shape}; the LPIPS {net} head wants {want}')
    params[f'lin{i}'] = {'kernel': array.transpose(2, 3, 1, 0)}
  missing = [f'lin{i}.model.1.weight' for i in range(len(channels)) if f'lin{i}' not in params]
  if missing:
    raise _error(key, f'not LPIPS {net} linear heads: missing {", ".join(missing)}')
  return params


def default_backbone_path(net: str) -> str:
  """torchvision's download location of the backbone (torch hub's cache, as `$TORCH_HOME` says)."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'torch'
  )
  return os.path.join(torch_home, 'hub', 'checkpoints', BACKBONE_FILES[net])


def default_heads_path(net: str) -> str | None:
  """The `lpips` package's bundled heads (`lpips/weights/v0.1/<net>.pth`), None when it is not installed."""
  spec = importlib.util.find_spec('lpips')
  if spec is None or not spec.origin:
    return None
  return os.path.join(os.path.dirname(spec.origin), 'weights', 'v0.1', f'{net}.pth')


def _resolve(path: str, default: str | None, key: str | None, what: str) -> str:
  if path:
    return path
  if default is None:
    raise _error(key, f'no {what} given and the lpips package (which ships them) is not installed: name the file')
  return default


def _read(path: str, key: str | None) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise _error(key, f'weight file {path!r} does not exist (or use {RANDOM!r}, labelled random weights)')
  try:
    return pth.read_pth(path)
  except UserError as e:
    raise _error(key, str(e)) from None


def load_params(
  backbone_weights: str,
  head_weights: str,
  net: str = 'vgg',
  *,
  seed: int = 0,
  backbone_key: str | None = None,
  head_key: str | None = None,
) -> dict:
  """LPIPS params from the two weight files (`'random'` for either: `lpips.random_params(net, seed)`'s part; `''`:
  the usual place, see the module docstring)."""
  if net not in lpips.NETS:
    raise UserError(f'unknown LPIPS network {net!r}; known: {", ".join(lpips.NETS)}')
  backbone_weights = _resolve(backbone_weights, default_backbone_path(net), backbone_key, 'backbone weights')
  head_weights = _resolve(head_weights, default_heads_path(net), head_key, 'linear heads')
  random = lpips.random_params(net, seed) if RANDOM in (backbone_weights, head_weights) else None
  if backbone_weights == RANDOM:
    backbone = random['backbone']
  else:
    backbone = convert_backbone(_read(backbone_weights, backbone_key), net, backbone_key)
  if head_weights == RANDOM:
    heads = {k: v for k, v in random.items() if k.startswith('lin')}
  else:
    heads = convert_heads(_read(head_weights, head_key), net, head_key)
  return {'backbone': backbone, **heads}


def describe(backbone_weights: str, head_weights: str, net: str = 'vgg') -> str:
  """A label for records and logs: which weights an LPIPS number was computed with."""
  label = lambda w: 'random' if w == RANDOM else os.path.basename(w) or 'default'
  return f'LPIPS-{net} (backbone: {label(backbone_weights)}, heads: {label(head_weights)})'
