"""The CLIP vision transformer (transformers' `CLIPVisionTransformer` + `visual_projection`) and its weight import.

Parameter names mirror transformers' `vision_model.*` state dict: embeddings/{class_embedding, patch_embedding,
position_embedding}, pre_layrnorm (transformers' spelling), encoder/layers_i/... (the text tower's encoder layers,
`diffusion.models.text.CLIPEncoder`, without a mask), post_layernorm, plus the bias-free top-level
`visual_projection`. Inputs are NHWC pixel values already preprocessed like CLIPImageProcessor (see clip_score.py).
"""

from __future__ import annotations

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.errors import UserError
from diffusion.interop import files, naming
from diffusion.models.layers import Array, get_activation
from diffusion.models.text import CLIPEncoder

Params = Any

# transformers' vision state dict; the text tower, logit scale and buffers of a full CLIPModel are not ours.
CLIP_VISION = naming.Layout(
    'transformers CLIPVisionModel', prefix='vision_model.', unprefixed=('visual_projection',),
    ignore=(r'position_ids$', r'^text_model\.', r'^text_projection\.', r'^logit_scale$'))
_CLASS_EMBEDDING = 'vision_model.embeddings.class_embedding'  # A bare parameter: no leaf rule in `naming`.


class CLIPVisionEmbeddings(nn.Module):
  """Patch convolution (no bias) + a learned class token, then learned absolute position embeddings."""
  hidden_size: int
  image_size: int
  patch_size: int

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    b = pixel_values.shape[0]
    patches = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
                      padding='VALID', use_bias=False, name='patch_embedding')(pixel_values)
    patches = patches.reshape(b, -1, self.hidden_size)
    cls = self.param('class_embedding', nn.initializers.normal(self.hidden_size ** -0.5), (self.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)), patches], axis=1)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    positions = nn.Embed(num_positions, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                         name='position_embedding')(jnp.arange(num_positions)[None])
    return x + positions


class CLIPVisionTransformer(nn.Module):
  """pixel_values (B, H, W, 3), H = W = image_size -> image embeddings (B, projection_dim) (or pooled (B, hidden)
  without a projection): pre-LN, encoder, post-LN on the class token, visual_projection."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = 512

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    if pixel_values.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'expected {self.image_size}x{self.image_size} pixel values, got {pixel_values.shape}')
    x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name='embeddings')(pixel_values)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, name='pre_layrnorm')(x)
    x = CLIPEncoder(self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.num_attention_heads,
                    self.hidden_act, self.layer_norm_eps, name='encoder')(x, None)[-1]
    pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, name='post_layernorm')(x[:, 0])
    if self.projection_dim is not None:
      pooled = nn.Dense(self.projection_dim, use_bias=False, name='visual_projection')(pooled)
    return pooled


def vision_fields(config: dict[str, Any], source: str) -> dict[str, Any]:
  """The module fields for a transformers CLIPConfig (model_type 'clip') or CLIPVisionConfig (config.json dict)."""
  import transformers  # pylint: disable=import-outside-toplevel

  model_type = config.get('model_type')
  try:
    if model_type == 'clip':
      full = transformers.CLIPConfig.from_dict(config)
      vision, projection_dim = full.vision_config, full.projection_dim
    elif model_type in ('clip_vision_model', None):
      vision = transformers.CLIPVisionConfig.from_dict(config)
      projection_dim = vision.projection_dim
    else:
      raise UserError(f'{source}: model_type={model_type!r}; expected a CLIP model (clip or clip_vision_model)')
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f'{source}: not a CLIP vision config: {e}') from None
  try:
    get_activation(vision.hidden_act)
  except ValueError as e:
    raise UserError(f'{source}: hidden_act: {e}') from None
  if vision.num_channels != 3:
    raise UserError(f'{source}: num_channels={vision.num_channels}; only RGB (3) is supported')
  return {'hidden_size': vision.hidden_size, 'intermediate_size': vision.intermediate_size,
          'num_hidden_layers': vision.num_hidden_layers, 'num_attention_heads': vision.num_attention_heads,
          'image_size': vision.image_size, 'patch_size': vision.patch_size, 'hidden_act': vision.hidden_act,
          'layer_norm_eps': float(vision.layer_norm_eps), 'projection_dim': int(projection_dim)}


def load_vision_encoder(directory: str, state: dict[str, np.ndarray] | None = None
                        ) -> tuple[CLIPVisionTransformer, Params]:
  """(module, params) of the vision tower of a transformers CLIPModel directory (safetensors or .bin).

  `state`: the directory's tensors if already read (a full CLIPModel is read once for both towers).
  """
  source = os.path.join(directory, 'config.json')
  state = files.read_state_dict(directory, files.TRANSFORMERS_WEIGHTS) if state is None else state
  fields = vision_fields(files.read_json(source), source)
  if 'visual_projection.weight' not in state:
    fields['projection_dim'] = None  # A CLIPVisionModel without projection: the pooled output.
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
