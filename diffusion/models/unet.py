"""The text-conditioned U-Net (diffusers `UNet2DConditionModel`), a pure function of (z_t, t, context).

conv_in -> down_blocks_i (resnets_j [+ attentions_j] [+ downsamplers_0]) -> mid_block -> up_blocks_i
(skip concatenation, resnets_j [+ attentions_j] [+ upsamplers_0]) -> conv_norm_out, act, conv_out,
with a sinusoidal `time_proj` and a `time_embedding` MLP fed to every resnet. Fields are named like the
diffusers config and parameters like the diffusers state dict, so real SD U-Nets are expressible exactly.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.layers import (
  Array,
  Downsample2D,
  Dtype,
  ResnetBlock2D,
  TimestepEmbedding,
  Transformer2DModel,
  Upsample2D,
  conv,
  get_activation,
  get_timestep_embedding,
  group_norm,
)
from diffusion.models.sizes import downsample_factor

DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', None)
# Rematerialisation policies (`remat_policy`): what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
  'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Which block types `remat_blocks` rematerialises (when `remat` is on).
REMAT_BLOCKS = {'all': ('resnet', 'attention'), 'resnet': ('resnet',), 'attention': ('attention',)}


def remat_block_types(remat: bool | str, remat_blocks: str = 'all') -> tuple[str, ...]:
  """The block types ('resnet', 'attention') that recompute their activations: none without `remat`, else those
  `remat_blocks` names. `remat` may also be a block selection itself ('all', 'resnet', 'attention')."""
  if isinstance(remat, str):
    remat, remat_blocks = True, remat
  if remat_blocks not in REMAT_BLOCKS:
    raise ValueError(f'Unknown remat_blocks {remat_blocks!r}; known: {sorted(REMAT_BLOCKS)}.')
  return REMAT_BLOCKS[remat_blocks] if remat else ()


def _remat(cls: type, remat: bool, policy: str) -> type:
  """`cls`, or `nn.remat(cls)` (same parameter names) recomputing its activations in the backward pass."""
  if not remat:
    return cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat_policy {policy!r}; known: {sorted(REMAT_POLICIES)}.')
  return nn.remat(cls, policy=REMAT_POLICIES[policy])


class _BlockCommon(nn.Module):
  """Fields shared by the down / mid / up blocks (resnet + optional spatial transformer settings)."""

  out_channels: int
  num_layers: int = 1
  has_attention: bool = False
  num_attention_heads: int = 8
  transformer_layers_per_block: int = 1
  use_linear_projection: bool = False
  resnet_groups: int = 32
  resnet_eps: float = 1e-5
  act_fn: str = 'silu'
  remat_types: tuple[str, ...] = ()
  remat_policy: str = 'nothing_saveable'
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _resnet(self, j: int) -> ResnetBlock2D:
    cls = _remat(ResnetBlock2D, 'resnet' in self.remat_types, self.remat_policy)
    return cls(
      self.out_channels,
      self.resnet_groups,
      self.resnet_eps,
      self.act_fn,
      self.dtype,
      self.param_dtype,
      name=f'resnets_{j}',
    )

  def _attention(self, j: int) -> Transformer2DModel:
    cls = _remat(Transformer2DModel, 'attention' in self.remat_types, self.remat_policy)
    return cls(
      self.num_attention_heads,
      self.out_channels // self.num_attention_heads,
      num_layers=self.transformer_layers_per_block,
      norm_num_groups=self.resnet_groups,
      use_linear_projection=self.use_linear_projection,
      attention=self.attention,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=f'attentions_{j}',
    )


class DownBlock(_BlockCommon):
  """CrossAttnDownBlock2D (has_attention) or DownBlock2D; returns (x, skip outputs)."""

  add_downsample: bool = True

  @nn.compact
  def __call__(
    self, x: Array, temb: Array, context: Array, context_mask: Array | None = None
  ) -> tuple[Array, list[Array]]:
    skips = []
    for j in range(self.num_layers):
      x = self._resnet(j)(x, temb)
      if self.has_attention:
        x = self._attention(j)(x, context, context_mask)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, 1, self.dtype, self.param_dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class UpBlock(_BlockCommon):
  """CrossAttnUpBlock2D (has_attention) or UpBlock2D; consumes skips last-first (channel concat)."""

  add_upsample: bool = True

  @nn.compact
  def __call__(
    self, x: Array, skips: Sequence[Array], temb: Array, context: Array, context_mask: Array | None = None
  ) -> Array:
    skips = list(skips)
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = self._resnet(j)(x, temb)
      if self.has_attention:
        x = self._attention(j)(x, context, context_mask)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name='upsamplers_0')(x)
    return x


class UNetMidBlock2DCrossAttn(_BlockCommon):
  """diffusers `UNetMidBlock2DCrossAttn`: resnets_0, then (attentions_j, resnets_{j+1}) pairs."""

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array, context_mask: Array | None = None) -> Array:
    x = self._resnet(0)(x, temb)
    for j in range(self.num_layers):
      x = self._attention(j)(x, context, context_mask)
      x = self._resnet(j + 1)(x, temb)
    return x


def _per_level(value: Any, n: int, name: str) -> tuple:
  """Broadcasts an int (or None) to a per-level tuple, like diffusers does for its list-valued fields."""
  if value is None or isinstance(value, int):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{name} has {len(value)} entries, expected one per level ({n}).')
  return value


class UNet2DConditionModel(nn.Module):
  """diffusers `UNet2DConditionModel` (positional time embedding, cross-attention conditioning).

  Heads follow diffusers' semantics: `num_attention_heads or attention_head_dim` heads per level, each of
  width channels // heads. Spatial sizes must be divisible by 2 ** (len(block_out_channels) - 1).
  With `remat`, the resnets and / or spatial transformers `remat_blocks` selects ('all', 'resnet', 'attention')
  recompute their activations in the backward pass (`remat_policy` names what they may keep); parameters and
  outputs are unchanged. `attention` is the attention implementation of every spatial transformer
  (`diffusion.models.attention`: 'auto', 'xla', 'cudnn', 'splash').
  """

  sample_size: int | None = None
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int | Sequence[int] = 2
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  up_block_types: Sequence[str] = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'
  attention_head_dim: int | Sequence[int] = 8
  num_attention_heads: int | Sequence[int] | None = None
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | Sequence[int] = 1
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  act_fn: str = 'silu'
  remat: bool | str = False
  remat_policy: str = 'nothing_saveable'
  remat_blocks: str = 'all'
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _level_settings(self) -> list[dict[str, Any]]:
    """Per-level resnet / attention settings of the down path (the up path reverses them)."""
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f'down_block_types / up_block_types need {n} entries (one per level).')
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f'Unknown down block type {t!r}; known: {DOWN_BLOCK_TYPES}.')
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f'Unknown up block type {t!r}; known: {UP_BLOCK_TYPES}.')
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f'Unknown mid block type {self.mid_block_type!r}; known: {MID_BLOCK_TYPES}.')
    heads = _per_level(self.num_attention_heads or self.attention_head_dim, n, 'attention heads')
    layers = _per_level(self.layers_per_block, n, 'layers_per_block')
    tlayers = _per_level(self.transformer_layers_per_block, n, 'transformer_layers_per_block')
    return [
      dict(out_channels=c, num_attention_heads=h, num_layers=n_res, transformer_layers_per_block=t)
      for c, h, n_res, t in zip(self.block_out_channels, heads, layers, tlayers, strict=True)
    ]

  @nn.compact
  def __call__(
    self, sample: Array, timesteps: Array, encoder_hidden_states: Array, encoder_attention_mask: Array | None = None
  ) -> Array:
    """sample (B, H, W, in_channels), timesteps (B,) or scalar, encoder_hidden_states (B, L, D),
    encoder_attention_mask optional (B, L) (True / 1 = keep) -> (B, H, W, out_channels)."""
    levels = self._level_settings()
    factor = downsample_factor(levels)
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise ValueError(f'U-Net input {sample.shape[1:3]} is not divisible by its factor {factor}.')
    if encoder_hidden_states.shape[-1] != self.cross_attention_dim:
      raise ValueError(
        f'encoder_hidden_states width {encoder_hidden_states.shape[-1]} != '
        f'cross_attention_dim {self.cross_attention_dim}.'
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    common = dict(
      use_linear_projection=self.use_linear_projection,
      resnet_groups=self.norm_num_groups,
      resnet_eps=self.norm_eps,
      act_fn=self.act_fn,
      remat_types=remat_block_types(self.remat, self.remat_blocks),
      remat_policy=self.remat_policy,
      attention=self.attention,
      **kw,
    )
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift).astype(
      self.dtype
    )
    temb = TimestepEmbedding(4 * self.block_out_channels[0], self.act_fn, name='time_embedding', **kw)(t_emb)
    context = encoder_hidden_states.astype(self.dtype)
    mask = encoder_attention_mask
    x = conv(self.block_out_channels[0], 3, name='conv_in', **kw)(sample)

    skips = [x]
    for i, (level, block_type) in enumerate(zip(levels, self.down_block_types, strict=True)):
      x, out = DownBlock(
        has_attention=block_type.startswith('CrossAttn'),
        add_downsample=i < len(levels) - 1,
        name=f'down_blocks_{i}',
        **level,
        **common,
      )(x, temb, context, mask)
      skips += out

    if self.mid_block_type is not None:
      mid = dict(levels[-1], num_layers=1, has_attention=True)
      x = UNetMidBlock2DCrossAttn(name='mid_block', **mid, **common)(x, temb, context, mask)

    for i, (level, block_type) in enumerate(zip(levels[::-1], self.up_block_types, strict=True)):
      n = level['num_layers'] + 1
      skips, out = skips[:-n], skips[-n:]
      x = UpBlock(
        has_attention=block_type.startswith('CrossAttn'),
        add_upsample=i < len(levels) - 1,
        name=f'up_blocks_{i}',
        **dict(level, num_layers=n),
        **common,
      )(x, out, temb, context, mask)

    x = group_norm(self.norm_num_groups, self.norm_eps, name='conv_norm_out', **kw)(x)
    x = get_activation(self.act_fn)(x)
    return conv(self.out_channels, 3, name='conv_out', **kw)(x)
