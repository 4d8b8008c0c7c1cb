"""LoRA files of the PyTorch ecosystem <-> our LoRA trees (`diffusion.lora`).

Read: diffusers / peft files (`pytorch_lora_weights.safetensors` as `StableDiffusionPipeline.save_lora_weights`
writes them: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.text_model.<module>...`, alpha from the
`lora_adapter_metadata` JSON of the safetensors metadata, else from `<module>.alpha` tensors, else alpha = r as
diffusers assumes) and kohya files (`lora_unet_<module>` / `lora_te_<module>` with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`). Written: the diffusers format with its metadata, which `load_lora_weights` reads.

  loras = load_lora('pytorch_lora_weights.safetensors')    # {'unet': {...}, 'text': {...}}
  params = diffusion.lora.merge(params, [loras], [0.7])     # params: {'unet': ..., 'text': ...}
"""

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from diffusion import lora as lora_lib
from diffusion.errors import UserError
from diffusion.interop import naming

Params = Any
WEIGHT_NAME = 'pytorch_lora_weights.safetensors'
METADATA_KEY = 'lora_adapter_metadata'
# diffusers' component prefix -> (our params key, naming layout).
COMPONENTS = {'unet': ('unet', naming.UNET), 'text_encoder': ('text', naming.CLIP_TEXT)}
_PEFT = re.compile(r'^(?P<part>unet|text_encoder)\.(?P<module>.+)\.(?P<what>lora_A\.weight|lora_B\.weight|alpha)$')
_KOHYA = re.compile(
  r'^lora_(?P<part>unet|te)_(?P<module>[A-Za-z0-9_]+)\.(?P<what>lora_down\.weight|lora_up\.weight|alpha)$'
)
_KOHYA_PARTS = {'unet': 'unet', 'te': 'text_encoder'}
_ROLE = {'lora_A.weight': 'a', 'lora_B.weight': 'b', 'lora_down.weight': 'a', 'lora_up.weight': 'b', 'alpha': 'alpha'}
# Module names of our U-Net and CLIP text encoder that contain '_' (kohya joins every path segment with '_').
_COMPOUND = frozenset(
  {
    'add_embedding', 'class_embedding', 'conv_in', 'conv_norm_out', 'conv_out', 'conv_shortcut', 'down_blocks',
    'encoder_hid_proj', 'final_layer_norm', 'k_proj', 'layer_norm1', 'layer_norm2', 'linear_1', 'linear_2',
    'mid_block', 'out_proj', 'position_embedding', 'proj_in', 'proj_out', 'q_proj', 'self_attn', 'text_model',
    'text_projection', 'time_emb_proj', 'time_embedding', 'time_proj', 'to_k', 'to_out', 'to_q', 'to_v',
    'token_embedding', 'transformer_blocks', 'up_blocks', 'v_proj',
  }
)  # fmt: skip


def _listing(keys: Sequence[str], limit: int = 5) -> str:
  more = f', ... ({len(keys)} in all)' if len(keys) > limit else ''
  return ', '.join(sorted(keys)[:limit]) + more


def _our_path(dotted: str, layout: naming.Layout) -> tuple[str, ...]:
  """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0' -> ('down_blocks_0', ..., 'to_out_0')."""
  name = layout.canonical(dotted + '.weight')[: -len('.weight')]
  if layout.prefix and name.startswith(layout.prefix):
    name = name[len(layout.prefix) :]
  path: list[str] = []
  for part in name.split('.'):
    if part.isdigit() and path and path[-1] in naming.LIST_MODULES:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  return tuple(path)


def _kohya_dotted(name: str) -> str:
  """A kohya module name ('down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q') as diffusers' dotted one."""
  tokens, parts, i = name.split('_'), [], 0
  while i < len(tokens):
    for width in (3, 2, 1):
      candidate = '_'.join(tokens[i : i + width])
      if width == 1 or candidate in _COMPOUND:
        parts.append(candidate)
        i += width
        break
  return '.'.join(parts)


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  if not os.path.isfile(path):
    raise UserError(f'LoRA file {path!r} does not exist')
  try:
    with safe_open(path, framework='numpy') as f:
      return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
  except (OSError, ValueError, RuntimeError, TypeError) as e:
    raise UserError(f'cannot read the LoRA file {path}: {e}') from None


def _component_metadata(metadata: Mapping[str, str], part: str, source: str) -> dict[str, Any] | None:
  raw = metadata.get(METADATA_KEY)
  if not raw:
    return None
  try:
    packed = json.loads(raw)
  except json.JSONDecodeError as e:
    raise UserError(f'{source}: {METADATA_KEY} is not JSON: {e}') from None
  own = {k[len(part) + 1 :]: v for k, v in packed.items() if k.startswith(f'{part}.')}
  if own.get('use_dora'):
    raise UserError(f'{source}: a DoRA adapter ({part}.use_dora); only plain LoRA is supported')
  return own or None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def _alpha(module: str, rank: int, stored: Any, meta: dict[str, Any] | None) -> float:
  """alpha of one module: the metadata's (with its patterns; rsLoRA as the equivalent plain alpha), else the file's
  `.alpha` tensor, else the rank (diffusers' and kohya's default)."""
  if meta is not None and 'lora_alpha' in meta:
    alpha = float(_pattern_value(meta.get('alpha_pattern'), module, meta['lora_alpha']))
    return alpha * math.sqrt(rank) if meta.get('use_rslora') else alpha
  return float(np.asarray(stored).reshape(())) if stored is not None else float(rank)


def _torch_factors(a: np.ndarray, b: np.ndarray, source: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch lora_A / lora_down (r, in[, kh, kw]) and lora_B / lora_up (out, r[, 1, 1]) in our layout."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.ndim == 4:
    a = a.transpose(0, 2, 3, 1)
  if b.ndim == 4 and b.shape[2:] == (1, 1):
    b = b.reshape(b.shape[:2])
  if a.ndim not in (2, 4) or b.ndim != 2 or b.shape[1] != a.shape[0]:
    raise UserError(f'{source}: {name}: LoRA factors of shapes {a.shape} and {b.shape} do not make a low-rank pair')
  return a, b


def load_lora(path: str) -> Params:
  """A diffusers / peft or kohya LoRA file (or a directory holding pytorch_lora_weights.safetensors) as our LoRA
  tree {'unet': ..., 'text': ...} (module paths -> {'a', 'b', 'alpha'}); see `diffusion.lora`.

  A file with tensors of neither format is a `UserError` listing the first few."""
  state, metadata = _read(path)
  groups: dict[tuple[str, str], dict[str, Any]] = collections.defaultdict(dict)
  unknown = []
  for key, value in state.items():
    match = _PEFT.match(key) or _KOHYA.match(key)
    if match is None:
      unknown.append(key)
      continue
    part = _KOHYA_PARTS.get(match['part'], match['part'])
    module = match['module'] if match.re is _PEFT else _kohya_dotted(match['module'])
    groups[(part, module)][_ROLE[match['what']]] = value
  if unknown:
    raise UserError(
      f'{path}: {len(unknown)} tensor(s) are not LoRA factors of a U-Net or text encoder module '
      f'(diffusers unet.* / text_encoder.* or kohya lora_unet_* / lora_te_*): {_listing(unknown)}'
    )
  if not groups:
    raise UserError(f'{path}: no LoRA tensors')
  flat = {}
  for (part, module), factors in sorted(groups.items()):
    if 'a' not in factors or 'b' not in factors:
      raise UserError(f'{path}: {part}.{module} has {"lora_B" if "a" not in factors else "lora_A"} only')
    a, b = _torch_factors(factors['a'], factors['b'], path, f'{part}.{module}')
    ours, layout = COMPONENTS[part]
    meta = _component_metadata(metadata, part, path)
    alpha = _alpha(module, a.shape[0], factors.get('alpha'), meta)
    node = (ours,) + _our_path(module, layout)
    flat.update({node + ('a',): a, node + ('b',): b, node + ('alpha',): np.float32(alpha)})
  return flax.traverse_util.unflatten_dict(flat)


def merge_files(params: Params, files: Sequence[tuple[str, float]]) -> Params:
  """`params` ({'unet': ..., 'text': ...}) with each (LoRA file, scale) merged in; errors name the file."""
  for path, scale in files:
    loras = load_lora(path)
    try:
      params = lora_lib.merge(params, [loras], [scale])
    except UserError as e:
      raise UserError(f'{path}: {e}') from None
  return params


def _most_common(values: Mapping[str, Any]) -> Any:
  return collections.Counter(values.values()).most_common(1)[0][0]


def _adapter_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
  """The peft LoraConfig fields diffusers rebuilds the adapter from (one rank / alpha plus per-module patterns)."""
  r, alpha = _most_common(ranks), _most_common(alphas)
  return {
    'r': r,
    'lora_alpha': alpha,
    'rank_pattern': {m: v for m, v in ranks.items() if v != r},
    'alpha_pattern': {m: v for m, v in alphas.items() if v != alpha},
    'target_modules': sorted(ranks),
    'lora_dropout': 0.0,
    'bias': 'none',
    'use_dora': False,
    'use_rslora': False,
    'init_lora_weights': True,
  }


def save_lora(path: str, loras: Params) -> str:
  """Writes our LoRA tree ({'unet': ..., 'text': ...}) as a diffusers LoRA file (`path` a directory: its
  pytorch_lora_weights.safetensors) with alpha in the metadata; returns the file's path."""
  if os.path.isdir(path) or not path.endswith('.safetensors'):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  state: dict[str, np.ndarray] = {}
  packed: dict[str, Any] = {}
  for part, (ours, layout) in COMPONENTS.items():
    ranks, alphas = {}, {}
    for node, module in sorted(lora_lib.modules((loras or {}).get(ours, {})).items()):
      a, b = np.asarray(module['a'], np.float32), np.asarray(module['b'], np.float32)
      dotted = layout.torch_key(node + ('kernel',), a.ndim)[0][: -len('.weight')]
      dotted = dotted.removeprefix(layout.prefix)  # transformers 5 names CLIP's modules without `text_model.`.
      state[f'{part}.{dotted}.lora_A.weight'] = np.ascontiguousarray(a if a.ndim == 2 else a.transpose(0, 3, 1, 2))
      state[f'{part}.{dotted}.lora_B.weight'] = np.ascontiguousarray(b if a.ndim == 2 else b[:, :, None, None])
      ranks[dotted] = int(a.shape[0])
      alphas[dotted] = float(np.asarray(module.get('alpha', a.shape[0])))
    if ranks:
      packed.update({f'{part}.{k}': v for k, v in _adapter_metadata(ranks, alphas).items()})
  if not state:
    raise UserError('no LoRA modules to write')
  metadata = {'format': 'pt', METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
  save_file(state, path, metadata=metadata)
  return path
