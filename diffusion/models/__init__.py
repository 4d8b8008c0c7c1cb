"""The networks: AutoencoderKL, UNet2DConditionModel, CLIPTextTransformer, and factories from configs.

Factories read `config.model.vae` / `.unet` / `.text` (fields named like diffusers / transformers) and
return unbound Flax modules; parameters are created by `module.init`. `MODELS` maps a name to a factory
(`'vae'`, `'unet'`, `'text/<type>'`); add a model with `register_model`. Each section's `attention` key
('auto' when absent, as in imported configs) picks the attention implementation (`diffusion.models.attention`).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.t5 import T5EncoderModel
from diffusion.models.text import CLIPTextTransformer, TextEncoderOutput
from diffusion.models.unet import UNet2DConditionModel
from diffusion.models.vae import AutoencoderKL
from diffusion.models.validation import unet_downsample_factor, vae_downsample_factor, validate_config
from diffusion.registry import Registry

Factory = Callable[[Any], nn.Module]
MODELS: Registry[Factory] = Registry('model')


def register_model(name: str) -> Callable[[Factory], Factory]:
  """Decorator adding `factory(config) -> nn.Module` to MODELS under `name` (duplicates are errors)."""
  return MODELS.register(name)


def get_model_factory(name: str) -> Factory:
  """The factory registered under `name`; unknown names are a `UserError` listing the known ones."""
  return MODELS.get(name)


def _tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


@register_model('vae')
def create_vae(vae_config: Any) -> AutoencoderKL:
  """AutoencoderKL from `config.model.vae` (scaling_factor is not a module field)."""
  c = vae_config
  return AutoencoderKL(
    in_channels=c.in_channels,
    out_channels=c.out_channels,
    block_out_channels=_tuple(c.block_out_channels),
    layers_per_block=c.layers_per_block,
    latent_channels=c.latent_channels,
    norm_num_groups=c.norm_num_groups,
    act_fn=c.act_fn,
    mid_block_add_attention=c.mid_block_add_attention,
    attention=c.get('attention', 'auto'),
    dtype=jnp.dtype(c.dtype),
  )


@register_model('unet')
def create_unet(unet_config: Any) -> UNet2DConditionModel:
  """UNet2DConditionModel from `config.model.unet`."""
  c = unet_config
  return UNet2DConditionModel(
    sample_size=c.sample_size,
    in_channels=c.in_channels,
    out_channels=c.out_channels,
    block_out_channels=_tuple(c.block_out_channels),
    layers_per_block=_tuple(c.layers_per_block),
    down_block_types=_tuple(c.down_block_types),
    up_block_types=_tuple(c.up_block_types),
    mid_block_type=c.mid_block_type,
    attention_head_dim=_tuple(c.attention_head_dim),
    num_attention_heads=_tuple(c.num_attention_heads),
    cross_attention_dim=c.cross_attention_dim,
    transformer_layers_per_block=_tuple(c.transformer_layers_per_block),
    use_linear_projection=c.use_linear_projection,
    flip_sin_to_cos=c.flip_sin_to_cos,
    freq_shift=c.freq_shift,
    norm_num_groups=c.norm_num_groups,
    norm_eps=c.norm_eps,
    act_fn=c.act_fn,
    remat=bool(c.get('remat', False)),
    remat_policy=c.get('remat_policy', 'nothing_saveable'),
    remat_blocks=c.get('remat_blocks', 'all'),
    attention=c.get('attention', 'auto'),
    dtype=jnp.dtype(c.dtype),
  )


@register_model('text/transformer')
@register_model('text/clip')
def _create_clip_text_transformer(text_config: Any) -> CLIPTextTransformer:
  """The CLIP text transformer: 'transformer' is trained from scratch, 'clip' holds pretrained CLIP weights
  (imported with `diffusion.interop`); the module is the same, only the parameters differ."""
  c = text_config
  if c.vocab_size is None or c.vocab_size < 1:
    raise ValueError(
      f'model.text.vocab_size is {c.vocab_size}; set it from the tokenizer '
      '(len(tokenizer)) before creating the text encoder.'
    )
  if c.hidden_size % c.num_attention_heads:
    raise ValueError(
      f'model.text.hidden_size {c.hidden_size} is not divisible by num_attention_heads {c.num_attention_heads}.'
    )
  return CLIPTextTransformer(
    vocab_size=c.vocab_size,
    hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size,
    num_hidden_layers=c.num_hidden_layers,
    num_attention_heads=c.num_attention_heads,
    max_position_embeddings=c.max_position_embeddings,
    hidden_act=c.hidden_act,
    layer_norm_eps=c.layer_norm_eps,
    eos_token_id=c.eos_token_id,
    projection_dim=c.projection_dim,
    attention=c.get('attention', 'auto'),
    dtype=jnp.dtype(c.dtype),
  )


def create_text_encoder(text_config: Any) -> CLIPTextTransformer:
  """The text encoder registered as `text/<text_config.type>`."""
  return get_model_factory(f'text/{text_config.type}')(text_config)


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


__all__ = [
  'AutoencoderKL',
  'CLIPTextTransformer',
  'MODELS',
  'T5EncoderModel',
  'TextEncoderOutput',
  'UNet2DConditionModel',
  'count_params',
  'create_text_encoder',
  'create_unet',
  'create_vae',
  'get_model_factory',
  'register_model',
  'unet_downsample_factor',
  'vae_downsample_factor',
  'validate_config',
]
