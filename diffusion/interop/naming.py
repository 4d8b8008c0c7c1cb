"""Table-driven renaming between PyTorch state dicts (diffusers / transformers) and our Flax parameter trees.

Our parameter names are the PyTorch module paths with list indices glued to their container
(`down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`). Three tables drive
every conversion, in both directions:

- `LIST_MODULES`: the Flax module names `<name>_<i>` that stand for a PyTorch `ModuleList` / `Sequential`
  entry `<name>.<i>` (other names, like `linear_1`, are kept as they are);
- `LEAF_RULES`: per (Flax leaf name, rank): the PyTorch leaf name and the layout change (Conv kernels
  HWIO <-> OIHW, Dense kernels transposed, `scale` / `embedding` <-> `weight`);
- a `Layout` per model family: a prefix (`text_model.`), old names still found in published files (read on
  import, never written) and state-dict entries that are not parameters.

A load is all or nothing: every parameter is filled and every tensor in the file is used (or declared
ignorable by the layout), else a `UserError` lists what is missing, left over, or of the wrong shape.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from diffusion.errors import UserError

LIST_MODULES = frozenset(
  {
    'down_blocks',
    'up_blocks',
    'resnets',
    'attentions',
    'downsamplers',
    'upsamplers',
    'transformer_blocks',
    'to_out',
    'net',
    'layers',
    'block',  # T5: encoder.block.<i>.layer.<j>
    'layer',
  }
)
_INDEXED = re.compile(r'^(?P<name>[A-Za-z_]+?)_(?P<index>\d+)$')


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _squeeze_1x1(x: np.ndarray) -> np.ndarray:
  """A 1x1 Conv2d weight (O, I, 1, 1) read as a Linear weight (O, I) (old VAE attention files)."""
  return x.reshape(x.shape[:2]) if x.ndim == 4 and x.shape[2:] == (1, 1) else x


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """How one kind of Flax parameter is stored in PyTorch."""

  torch_leaf: str
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]


LEAF_RULES: dict[tuple[str, int], LeafRule] = {
  ('kernel', 4): LeafRule('weight', lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0)),
  ('kernel', 2): LeafRule('weight', lambda k: k.T, lambda w: _squeeze_1x1(w).T),
  ('scale', 1): LeafRule('weight', _identity, _identity),
  ('bias', 1): LeafRule('bias', _identity, _identity),
  ('embedding', 2): LeafRule('weight', _identity, _identity),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one model family's state dict adds to the mechanical names.

  Attributes:
    name: for messages ('diffusers UNet2DConditionModel', ...).
    prefix: put before every key, except under the top-level modules in `unprefixed`.
    unprefixed: top-level Flax modules stored without `prefix` (CLIP's `text_projection`).
    aliases: (regex, replacement) pairs rewriting old PyTorch names to current ones on import.
    ignore: regexes of state-dict entries that are not parameters of this model (buffers, the vision
      tower of a full CLIPModel); they are dropped on import and never written.
  """

  name: str
  prefix: str = ''
  unprefixed: tuple[str, ...] = ()
  aliases: tuple[tuple[str, str], ...] = ()
  ignore: tuple[str, ...] = ()

  def torch_key(self, path: Sequence[str], ndim: int) -> tuple[str, LeafRule]:
    """('down_blocks_0', 'resnets_1', 'conv1', 'kernel'), 4 -> ('down_blocks.0.resnets.1.conv1.weight', rule)."""
    *modules, leaf = path
    rule = LEAF_RULES.get((leaf, ndim))
    if rule is None:
      raise ValueError(
        f'no conversion rule for parameter {"/".join(path)!r} of rank {ndim}; known: {sorted(LEAF_RULES)}'
      )
    parts = []
    for module in modules:
      match = _INDEXED.match(module)
      if match and match['name'] in LIST_MODULES:
        parts += [match['name'], match['index']]
      else:
        parts.append(module)
    prefix = '' if modules and modules[0] in self.unprefixed else self.prefix
    return prefix + '.'.join(parts + [rule.torch_leaf]), rule

  def canonical(self, key: str) -> str:
    for pattern, replacement in self.aliases:
      key = re.sub(pattern, replacement, key)
    return key

  def ignored(self, key: str) -> bool:
    return any(re.search(pattern, key) for pattern in self.ignore)


# The VAE's mid-block attention was saved as query/key/value/proj_attn before diffusers 0.14; SD 1.x/2.x
# VAE files in that format are still common (diffusers renames them on load, and so do we).
_LEGACY_ATTENTION = (
  (r'(attentions\.\d+)\.query\.', r'\1.to_q.'),
  (r'(attentions\.\d+)\.key\.', r'\1.to_k.'),
  (r'(attentions\.\d+)\.value\.', r'\1.to_v.'),
  (r'(attentions\.\d+)\.proj_attn\.', r'\1.to_out.0.'),
)

UNET = Layout('diffusers UNet2DConditionModel')
VAE = Layout('diffusers AutoencoderKL', aliases=_LEGACY_ATTENTION)
# transformers 5 saves CLIPTextModel without the `text_model.` prefix that every earlier file (and CLIPModel,
# CLIPTextModelWithProjection) has; both read, the prefixed form is written (transformers 4 and 5 load it).
CLIP_TEXT = Layout(
  'transformers CLIPTextModel',
  prefix='text_model.',
  unprefixed=('text_projection',),
  aliases=((r'^(?!text_model\.|text_projection\.|vision_model\.|visual_projection\.|logit_scale$)', 'text_model.'),),
  ignore=(r'position_ids$', r'^vision_model\.', r'^visual_projection\.', r'^logit_scale$'),
)

# T5EncoderModel stores the token embedding as `shared.weight` (transformers 4 files also hold its tied copy
# `encoder.embed_tokens.weight`, which the loader folds into `shared`); the decoder and lm_head of a full T5 model
# (T5ForConditionalGeneration) are not the encoder's.
T5_ENCODER = Layout('transformers T5EncoderModel', ignore=(r'^decoder\.', r'^lm_head\.'))


def _listing(keys: Sequence[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def torch_to_flax(
  state: Mapping[str, Any], target: Any, layout: Layout, *, source: str = '', dtype: Any = np.float32
) -> Any:
  """A PyTorch state dict (name -> array) as a Flax parameter tree shaped like `target`.

  Args:
    state: the tensors of a diffusers / transformers weight file, as numpy arrays.
    target: the expected tree (arrays or ShapeDtypeStructs), e.g. from `jax.eval_shape(module.init, ...)`.
    layout: the model family's `Layout`.
    source: where `state` came from, for messages.
    dtype: the dtype of the returned parameters.

  Returns:
    The parameter tree (jax arrays of `dtype`).

  Raises:
    UserError: listing missing parameters, left-over tensors and shape mismatches, if there are any.
  """
  canonical: dict[str, str] = {}
  for key in state:
    if layout.ignored(key):
      continue
    name = layout.canonical(key)
    if name in canonical:
      raise UserError(f'{source}: tensors {canonical[name]!r} and {key!r} are the same parameter {name!r}')
    canonical[name] = key
  flat, missing, wrong = {}, [], []
  for path, leaf in flax.traverse_util.flatten_dict(target).items():
    name, rule = layout.torch_key(path, len(leaf.shape))
    if name not in canonical:
      missing.append(name)
      continue
    raw = np.asarray(state[canonical.pop(name)])
    try:
      value = rule.from_torch(raw)
    except ValueError:  # A rank the rule cannot even transpose.
      value = raw
    if tuple(value.shape) != tuple(leaf.shape):
      expected = rule.to_torch(np.empty(leaf.shape, np.int8)).shape
      wrong.append(f'{name} (file {tuple(raw.shape)}, expected {tuple(expected)})')
      continue
    flat[path] = np.asarray(value, dtype)
  if missing or canonical or wrong:
    problems = []
    if missing:
      problems.append(f'{len(missing)} missing: {_listing(missing)}')
    if canonical:
      problems.append(f'{len(canonical)} left over: {_listing(list(canonical.values()))}')
    if wrong:
      problems.append(f'{len(wrong)} with the wrong shape: {_listing(wrong, 4)}')
    raise UserError(
      f'{source}: the weights do not match the {layout.name} its config describes; ' + '; '.join(problems)
    )
  return jax.tree.map(jax.numpy.asarray, flax.traverse_util.unflatten_dict(flat))


def flax_to_torch(params: Any, layout: Layout, dtype: Any = None) -> dict[str, np.ndarray]:
  """Our parameter tree as a PyTorch state dict (name -> contiguous numpy array), the inverse of
  `torch_to_flax`; `dtype` casts every tensor (default: keep)."""
  state = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    name, rule = layout.torch_key(path, value.ndim)
    value = rule.to_torch(value)
    state[name] = np.ascontiguousarray(value if dtype is None else value.astype(dtype))
  return state
