"""Shared building blocks of the networks: attention, resnet blocks, resampling, time embedding.

Every module mirrors a diffusers / transformers PyTorch module of the same name, and every parameter is
named like its PyTorch counterpart with `.` turned into `_` for list indices (`to_out.0` -> `to_out_0`,
`resnets.1` -> `resnets_1`), so weight conversion is a mechanical, table-driven rename plus the usual
layout changes (Conv kernel HWIO <-> OIHW, Dense kernel transposed, `scale` <-> `weight`,
`embedding` <-> `weight`). Activations are NHWC (images) or (B, L, D) (sequences). Every module computes in
`dtype` and keeps its parameters in `param_dtype` (float32). Every attention module takes an `attention` field,
the implementation of `diffusion.models.attention.dot_product_attention` ('auto', 'xla', 'cudnn', 'splash'),
re-exported here.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.attention import IMPLEMENTATIONS as IMPLEMENTATIONS
from diffusion.models.attention import dot_product_attention as dot_product_attention

Array = jax.Array
Dtype = Any


def quick_gelu(x: Array) -> Array:
  """The sigmoid approximation of GELU used by the original CLIP."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  'silu': nn.silu,
  'swish': nn.silu,
  'gelu': lambda x: nn.gelu(x, approximate=False),
  'gelu_new': lambda x: nn.gelu(x, approximate=True),
  'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
  'quick_gelu': quick_gelu,
  'relu': nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Returns the activation named like diffusers' `act_fn` / transformers' `hidden_act`."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}.')
  return _ACTIVATIONS[name]


def get_timestep_embedding(
  timesteps: Array,
  embedding_dim: int,
  flip_sin_to_cos: bool = False,
  downscale_freq_shift: float = 1.0,
  scale: float = 1.0,
  max_period: int = 10000,
) -> Array:
  """Sinusoidal timestep embedding, exactly as diffusers' `get_timestep_embedding` (float32).

  Args:
    timesteps: (B,) float or int timesteps (fractional values are allowed).
    embedding_dim: output width; odd widths are zero-padded.
    flip_sin_to_cos: put the cosines first.
    downscale_freq_shift: the frequency shift (`freq_shift` in the U-Net config).
    scale: multiplies the arguments of sin / cos.
    max_period: the lowest frequency is 1 / max_period.

  Returns:
    (B, embedding_dim) float32.
  """
  half_dim = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half_dim - downscale_freq_shift))
  args = scale * timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers `TimestepEmbedding`: linear_1 -> act -> linear_2."""

  time_embed_dim: int
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: Array) -> Array:
    dense = lambda name: nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    sample = dense('linear_1')(sample)
    sample = get_activation(self.act_fn)(sample)
    return dense('linear_2')(sample)


def conv(
  features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1, padding: Any = None
) -> nn.Conv:
  """A Conv2d like PyTorch's `Conv2d(k, padding=k // 2)` unless `padding` is given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def group_norm(num_groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
  """A GroupNorm over the channel axis (statistics in float32)."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (time_embedding_norm='default', output_scale_factor=1, no dropout).

  `temb` is optional (the VAE passes none and then `time_emb_proj` does not exist). A 1x1
  `conv_shortcut` exists exactly when the channel count changes.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None) -> Array:
    act = get_activation(self.act_fn)
    h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, 'norm1')(x)
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, 'conv1')(act(h))
    if temb is not None:
      temb = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype, name='time_emb_proj')(
        act(temb)
      )
      h = h + temb[:, None, None, :]
    h = group_norm(self.groups, self.eps, self.dtype, self.param_dtype, 'norm2')(h)
    h = conv(self.out_channels, 3, self.dtype, self.param_dtype, 'conv2')(act(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, self.param_dtype, 'conv_shortcut')(x)
    return x + h


class Downsample2D(nn.Module):
  """diffusers `Downsample2D` with a 3x3 stride-2 `conv`.

  `padding=1` pads symmetrically (U-Net); `padding=0` pads one row/column at the bottom/right only
  (the VAE encoder, `downsample_padding=0`).
  """

  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, 'conv', stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
  """diffusers `Upsample2D`: 2x nearest-neighbour upsampling, then a 3x3 `conv`."""

  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, 3, self.dtype, self.param_dtype, 'conv')(x)


class Attention(nn.Module):
  """diffusers `Attention` (processor AttnProcessor2_0): to_q/to_k/to_v, to_out_0.

  Takes (B, L, C) or (B, H, W, C) hidden states. With `norm_num_groups` set, a `group_norm` is applied
  first (the VAE mid-block attention); with `residual_connection` the input is added back.
  """

  heads: int
  dim_head: int
  bias: bool = False
  out_bias: bool = True
  norm_num_groups: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    hidden_states: Array,
    encoder_hidden_states: Array | None = None,
    mask: Array | None = None,
    kv_mask: Array | None = None,
  ) -> Array:
    """`mask` is boolean, broadcastable to (B, heads, Lq, Lk); True means "attend". `kv_mask` (B, Lk) marks the
    real keys (a padding mask, which every attention implementation takes)."""
    residual = hidden_states
    shape = hidden_states.shape
    channels = shape[-1]
    if self.norm_num_groups is not None:
      hidden_states = group_norm(self.norm_num_groups, self.eps, self.dtype, self.param_dtype, 'group_norm')(
        hidden_states
      )
    hidden_states = hidden_states.reshape(shape[0], -1, channels)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    inner = self.heads * self.dim_head
    dense = lambda name, feats, bias: nn.Dense(
      feats, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    q = split(dense('to_q', inner, self.bias)(hidden_states))
    k = split(dense('to_k', inner, self.bias)(context))
    v = split(dense('to_v', inner, self.bias)(context))
    out = dot_product_attention(q, k, v, mask, self.dtype, self.attention, kv_mask=kv_mask)
    out = out.reshape(out.shape[0], out.shape[1], inner)
    out = dense('to_out_0', channels, self.out_bias)(out).reshape(shape)
    if self.residual_connection:
      out = out + residual
    return out


class GEGLU(nn.Module):
  """diffusers `GEGLU`: one `proj` to 2 * dim_out, value * gelu(gate) (exact gelu)."""

  dim_out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    value, gate = jnp.split(x, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward(activation_fn='geglu', mult=4)`: net_0 (GEGLU), net_2 (Dense)."""

  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    x = GEGLU(dim * self.mult, self.dtype, self.param_dtype, name='net_0')(x)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name='net_2')(x)


class BasicTransformerBlock(nn.Module):
  """diffusers `BasicTransformerBlock` (layer_norm): self-attn, cross-attn, GEGLU feed-forward."""

  num_attention_heads: int
  attention_head_dim: int
  norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None = None) -> Array:
    """`context_mask`: optional (B, L) boolean, True for the real context tokens."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, name=name, **kw)
    attn = lambda name: Attention(
      self.num_attention_heads, self.attention_head_dim, attention=self.attention, name=name, **kw
    )
    x = attn('attn1')(norm('norm1')(x)) + x
    x = attn('attn2')(norm('norm2')(x), context, kv_mask=context_mask) + x
    return FeedForward(name='ff', **kw)(norm('norm3')(x)) + x


class Transformer2DModel(nn.Module):
  """diffusers `Transformer2DModel` (continuous input): norm, proj_in, transformer_blocks_k, proj_out.

  `proj_in` / `proj_out` are 1x1 convs, or Dense layers with `use_linear_projection` (SD 2.x), as in
  diffusers, so the parameter shapes convert one-to-one. The output includes the residual.
  """

  num_attention_heads: int
  attention_head_dim: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None = None) -> Array:
    """x: (B, H, W, C); context: (B, L, D); context_mask: optional (B, L) boolean."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = x.shape
    inner = self.num_attention_heads * self.attention_head_dim
    residual = x
    x = group_norm(self.norm_num_groups, 1e-6, name='norm', **kw)(x)
    if self.use_linear_projection:
      x = nn.Dense(inner, name='proj_in', **kw)(x.reshape(b, height * width, channels))
    else:
      x = conv(inner, 1, name='proj_in', **kw)(x).reshape(b, height * width, inner)
    mask = None if context_mask is None else context_mask.astype(bool)
    for k in range(self.num_layers):
      x = BasicTransformerBlock(
        self.num_attention_heads,
        self.attention_head_dim,
        self.norm_eps,
        self.attention,
        name=f'transformer_blocks_{k}',
        **kw,
      )(x, context, mask)
    if self.use_linear_projection:
      x = nn.Dense(channels, name='proj_out', **kw)(x).reshape(b, height, width, channels)
    else:
      x = conv(channels, 1, name='proj_out', **kw)(x.reshape(b, height, width, inner))
    return x + residual
