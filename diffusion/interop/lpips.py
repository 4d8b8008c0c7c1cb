"""LPIPS weights -> params of `diffusion.models.lpips.LPIPS`, read without PyTorch.

Two files, as the `lpips` package uses them: the backbone is torchvision's state dict (`vgg16-397923af.pth`,
`alexnet-owt-7be5be79.pth`: `features.<i>.weight|bias`; the classifier is ignored; an `lpips` package state dict
with `net.slice<k>.<i>.*` keys works too), the linear heads are the package's `weights/v0.1/<net>.pth`
(`lin<k>.model.1.weight`, shape (1, C, 1, 1)). `'random'` for either is the explicit, labelled choice of random
weights (tests, the CPU demo). A missing or mis-shaped file is one `ConfigError` naming the config key.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from diffusion.errors import ConfigError, UserError
from diffusion.interop import pth
from diffusion.models import lpips

RANDOM = 'random'
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
  """LPIPS params from the two weight files (or `'random'` for either: `lpips.random_params(net, seed)`'s part)."""
  if net not in lpips.NETS:
    raise UserError(f'unknown LPIPS network {net!r}; known: {", ".join(lpips.NETS)}')
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
  label = lambda w: 'random' if w == RANDOM else os.path.basename(w)
  return f'LPIPS-{net} (backbone: {label(backbone_weights)}, heads: {label(head_weights)})'
