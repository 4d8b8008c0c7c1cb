"""The CLIP vision transformer (transformers' `CLIPVisionTransformer` + `visual_projection`), next to its text tower.

Parameter names mirror transformers' `vision_model.*` state dict: embeddings/{class_embedding, patch_embedding,
position_embedding}, pre_layrnorm (transformers' spelling), encoder/layers_i/... (the text tower's encoder layers,
`diffusion.models.text.CLIPEncoder`, without a mask), post_layernorm, plus the bias-free top-level
`visual_projection`. Inputs are NHWC pixel values already preprocessed like CLIPImageProcessor
(`diffusion.evaluation.clip_preprocessing`); weights are imported by `diffusion.interop.clip`.
"""

import flax.linen as nn
import jax.numpy as jnp

from diffusion.models.layers import Array
from diffusion.models.text import CLIPEncoder


class CLIPVisionEmbeddings(nn.Module):
  """Patch convolution (no bias) + a learned class token, then learned absolute position embeddings."""

  hidden_size: int
  image_size: int
  patch_size: int

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    b = pixel_values.shape[0]
    patches = nn.Conv(
      self.hidden_size,
      (self.patch_size, self.patch_size),
      strides=self.patch_size,
      padding='VALID',
      use_bias=False,
      name='patch_embedding',
    )(pixel_values)
    patches = patches.reshape(b, -1, self.hidden_size)
    cls = self.param('class_embedding', nn.initializers.normal(self.hidden_size**-0.5), (self.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden_size)), patches], axis=1)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    positions = nn.Embed(
      num_positions, self.hidden_size, embedding_init=nn.initializers.normal(0.02), name='position_embedding'
    )(jnp.arange(num_positions)[None])
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
  attention: str = 'auto'  # the attention implementation (diffusion.models.attention)

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    if pixel_values.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'expected {self.image_size}x{self.image_size} pixel values, got {pixel_values.shape}')
    x = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, name='embeddings')(pixel_values)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, name='pre_layrnorm')(x)
    x = CLIPEncoder(
      self.num_hidden_layers,
      self.hidden_size,
      self.intermediate_size,
      self.num_attention_heads,
      self.hidden_act,
      self.layer_norm_eps,
      self.attention,
      name='encoder',
    )(x)[-1]
    pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, name='post_layernorm')(x[:, 0])
    if self.projection_dim is not None:
      pooled = nn.Dense(self.projection_dim, use_bias=False, name='visual_projection')(pooled)
    return pooled
