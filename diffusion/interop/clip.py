"""A transformers CLIPModel directory (both towers) into our modules, reading its weight file once.

  towers = load_clip('path/to/clip')                   # CLIPModel.save_pretrained output (safetensors or .bin)
  image_embeddings = towers.vision.apply({'params': towers.vision_params}, pixel_values)      # NHWC
  _, text_embeddings = towers.text.apply({'params': towers.text_params}, input_ids, attention_mask)

The text tower and `text_projection` are `load_text_encoder`'s; this module adds the vision tower
(`diffusion.models.clip_vision`) and its `vision_model.*` / `visual_projection` layout.
"""

import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from diffusion.errors import UserError
from diffusion.interop import files, naming
from diffusion.interop.loaders import load_text_encoder
from diffusion.models.clip_vision import CLIPVisionTransformer
from diffusion.models.layers import get_activation
from diffusion.models.text import CLIPTextTransformer

Params = Any

# transformers' vision state dict; the text tower, logit scale and buffers of a full CLIPModel are not ours.
CLIP_VISION = naming.Layout(
  'transformers CLIPVisionModel',
  prefix='vision_model.',
  unprefixed=('visual_projection',),
  ignore=(r'position_ids$', r'^text_model\.', r'^text_projection\.', r'^logit_scale$'),
)
_CLASS_EMBEDDING = 'vision_model.embeddings.class_embedding'  # A bare parameter: no leaf rule in `naming`.


class CLIPTowers(NamedTuple):
  """Both towers of a CLIPModel: modules and their parameters."""

  vision: CLIPVisionTransformer
  vision_params: Params
  text: CLIPTextTransformer
  text_params: Params


def vision_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
  """The module fields for a transformers CLIPConfig (model_type 'clip') or CLIPVisionConfig (config.json dict)."""
  model_type = config.get('model_type')
  if model_type not in ('clip', 'clip_vision_model', None):
    raise UserError(f'{source}: model_type={model_type!r}; expected a CLIP model (clip or clip_vision_model)')
  try:
    if model_type == 'clip':
      full = transformers.CLIPConfig.from_dict(config)
      vision, projection_dim = full.vision_config, full.projection_dim
    else:
      vision = transformers.CLIPVisionConfig.from_dict(config)
      projection_dim = vision.projection_dim
  except (TypeError, ValueError) as e:
    raise UserError(f'{source}: not a CLIP vision config: {e}') from None
  try:
    get_activation(vision.hidden_act)
  except (ValueError, TypeError):
    raise UserError(f'{source}: hidden_act={vision.hidden_act!r} is not a supported activation') from None
  if vision.num_channels != 3:
    raise UserError(f'{source}: num_channels={vision.num_channels}; only RGB (3) is supported')
  return {
    'hidden_size': vision.hidden_size,
    'intermediate_size': vision.intermediate_size,
    'num_hidden_layers': vision.num_hidden_layers,
    'num_attention_heads': vision.num_attention_heads,
    'image_size': vision.image_size,
    'patch_size': vision.patch_size,
    'hidden_act': vision.hidden_act,
    'layer_norm_eps': float(vision.layer_norm_eps),
    'projection_dim': int(projection_dim),
  }


def load_vision_encoder(
  directory: str, *, state: dict[str, np.ndarray] | None = None
) -> tuple[CLIPVisionTransformer, Params]:
  """(module, params) of the vision tower of a transformers CLIPModel (or CLIPVisionModel) directory.

  `state`: the directory's tensors if already read (`load_clip` reads a CLIPModel once for both towers). Without
  `visual_projection` (a CLIPVisionModel) the module returns the pooled output.
  """
  source = os.path.join(directory, 'config.json')
  fields = vision_fields(files.read_json(source), source)
  state = files.read_state_dict(directory, files.TRANSFORMERS_WEIGHTS) if state is None else state
  if 'visual_projection.weight' not in state:
    fields['projection_dim'] = None
  module = CLIPVisionTransformer(**fields)
  size = module.image_size
  target = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  if _CLASS_EMBEDDING not in state:
    raise UserError(f'{directory}: no {_CLASS_EMBEDDING} in the weights: not a CLIP vision model')
  state = dict(state)
  class_embedding = np.asarray(state.pop(_CLASS_EMBEDDING), np.float32)
  flat = flax.traverse_util.flatten_dict(target)
  expected = flat.pop(('embeddings', 'class_embedding')).shape
  if class_embedding.shape != expected:
    raise UserError(f'{directory}: {_CLASS_EMBEDDING} has shape {class_embedding.shape}, expected {expected}')
  params = naming.torch_to_flax(state, flax.traverse_util.unflatten_dict(flat), CLIP_VISION, source=directory)
  params['embeddings']['class_embedding'] = jnp.asarray(class_embedding)
  return module, params


def load_clip(directory: str) -> CLIPTowers:
  """Both towers of a transformers CLIPModel directory, from one read of its weights.

  A CLIP score needs both projections (`text_projection`, `visual_projection`): a directory without them is refused.
  """
  state = files.read_state_dict(directory, files.TRANSFORMERS_WEIGHTS)
  vision, vision_params = load_vision_encoder(directory, state=state)
  text, text_params = load_text_encoder(directory, state=state)
  if vision.projection_dim is None or text.projection_dim is None:
    raise UserError(
      f'{directory}: not a full CLIPModel: it lacks text_projection or visual_projection (save the '
      'whole CLIPModel, not one tower)'
    )
  return CLIPTowers(vision, vision_params, text, text_params)
