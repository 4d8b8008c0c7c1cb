"""AutoencoderKL: the KL-regularised image autoencoder of latent diffusion (diffusers `AutoencoderKL`).

encoder: conv_in, down_blocks_i (DownEncoderBlock2D), mid_block (resnet, attention, resnet),
conv_norm_out, act, conv_out -> 2 * latent_channels; quant_conv (1x1) -> posterior (mean, logvar).
decoder: post_quant_conv (1x1), conv_in, mid_block, up_blocks_i (UpDecoderBlock2D, reversed channels),
conv_norm_out, act, conv_out. Parameter names match diffusers' state dict (see layers.py). The latent
`scaling_factor` is not applied here: callers scale latents.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import (
  Array,
  Attention,
  Downsample2D,
  Dtype,
  ResnetBlock2D,
  Upsample2D,
  conv,
  get_activation,
  group_norm,
)

_VAE_EPS = 1e-6  # diffusers' Encoder / Decoder use GroupNorm eps 1e-6 everywhere.


class UNetMidBlock2D(nn.Module):
  """diffusers `UNetMidBlock2D` without time embedding: resnets_0, [attentions_0], resnets_1.

  The attention is single-head over all channels with its own `group_norm` and a residual connection.
  """

  norm_num_groups: int = 32
  act_fn: str = 'silu'
  add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    resnet = lambda i: ResnetBlock2D(channels, self.norm_num_groups, _VAE_EPS, self.act_fn, name=f'resnets_{i}', **kw)
    x = resnet(0)(x)
    if self.add_attention:
      x = Attention(
        heads=1,
        dim_head=channels,
        bias=True,
        norm_num_groups=self.norm_num_groups,
        eps=_VAE_EPS,
        residual_connection=True,
        attention=self.attention,
        name='attentions_0',
        **kw,
      )(x)
    return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
  """diffusers `DownEncoderBlock2D`: resnets_j, then downsamplers_0 (asymmetric padding) if not last."""

  out_channels: int
  num_layers: int
  add_downsample: bool
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_num_groups, _VAE_EPS, self.act_fn, name=f'resnets_{j}', **kw)(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, name='downsamplers_0', **kw)(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """diffusers `UpDecoderBlock2D`: resnets_j, then upsamplers_0 if not last."""

  out_channels: int
  num_layers: int
  add_upsample: bool
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_num_groups, _VAE_EPS, self.act_fn, name=f'resnets_{j}', **kw)(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, name='upsamplers_0', **kw)(x)
    return x


class Encoder(nn.Module):
  """diffusers `Encoder` with DownEncoderBlock2D levels; outputs 2 * latent_channels (double_z)."""

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int = 2
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.block_out_channels[0], 3, name='conv_in', **kw)(x)
    last = len(self.block_out_channels) - 1
    for i, channels in enumerate(self.block_out_channels):
      x = DownEncoderBlock2D(
        channels, self.layers_per_block, i != last, self.norm_num_groups, self.act_fn, name=f'down_blocks_{i}', **kw
      )(x)
    x = UNetMidBlock2D(
      self.norm_num_groups, self.act_fn, self.mid_block_add_attention, self.attention, name='mid_block', **kw
    )(x)
    x = group_norm(self.norm_num_groups, _VAE_EPS, name='conv_norm_out', **kw)(x)
    x = get_activation(self.act_fn)(x)
    return conv(2 * self.out_channels, 3, name='conv_out', **kw)(x)


class Decoder(nn.Module):
  """diffusers `Decoder` with UpDecoderBlock2D levels (layers_per_block + 1 resnets each)."""

  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int = 2
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.block_out_channels[-1], 3, name='conv_in', **kw)(z)
    x = UNetMidBlock2D(
      self.norm_num_groups, self.act_fn, self.mid_block_add_attention, self.attention, name='mid_block', **kw
    )(x)
    reversed_channels = list(reversed(self.block_out_channels))
    last = len(reversed_channels) - 1
    for i, channels in enumerate(reversed_channels):
      x = UpDecoderBlock2D(
        channels, self.layers_per_block + 1, i != last, self.norm_num_groups, self.act_fn, name=f'up_blocks_{i}', **kw
      )(x)
    x = group_norm(self.norm_num_groups, _VAE_EPS, name='conv_norm_out', **kw)(x)
    x = get_activation(self.act_fn)(x)
    return conv(self.out_channels, 3, name='conv_out', **kw)(x)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`: encoder + quant_conv -> diagonal Gaussian; post_quant_conv + decoder.

  Spatial downsampling factor: 2 ** (len(block_out_channels) - 1). Images are NHWC in [-1, 1].
  Initialise with `init(rng, x, sample_posterior=False)` (or pass `rng=`).
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  mid_block_add_attention: bool = True
  attention: str = 'auto'  # the mid-block attention's implementation (diffusion.models.attention)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(
      block_out_channels=tuple(self.block_out_channels),
      layers_per_block=self.layers_per_block,
      norm_num_groups=self.norm_num_groups,
      act_fn=self.act_fn,
      mid_block_add_attention=self.mid_block_add_attention,
      attention=self.attention,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.encoder = Encoder(out_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    self.quant_conv = conv(2 * self.latent_channels, 1, self.dtype, self.param_dtype, 'quant_conv')
    self.post_quant_conv = conv(self.latent_channels, 1, self.dtype, self.param_dtype, 'post_quant_conv')

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Image (B, H, W, in_channels) -> posterior (mean, logvar), each (B, H/f, W/f, latent_channels).

    The latents are unscaled (no `scaling_factor`); logvar is clipped to [-30, 20] like diffusers.
    """
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Unscaled latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(
    self, x: Array, rng: jax.Array | None = None, sample_posterior: bool = True
  ) -> tuple[Array, Array, Array]:
    """Encodes, samples z = mean + std * eps (with `rng`) or takes z = mean, decodes.

    Returns:
      (reconstruction, mean, logvar).
    """
    mean, logvar = self.encode(x)
    z = mean
    if sample_posterior:
      if rng is None:
        raise ValueError('AutoencoderKL: sample_posterior=True needs `rng`; pass rng=... or sample_posterior=False.')
      noise = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * noise
    return self.decode(z), mean, logvar
