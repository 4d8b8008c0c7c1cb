"""Tests of UNet2DConditionModel (diffusion/models/unet.py) and its factory."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from support import random_params


def unet_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    mid_block_type='UNetMidBlock2DCrossAttn',
    attention_head_dim=2,
    num_attention_heads=None,
    cross_attention_dim=12,
    transformer_layers_per_block=1,
    use_linear_projection=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=8,
    norm_eps=1e-5,
    act_fn='silu',
    dtype='float32',
  )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _inputs(batch=2, size=8, length=5, width=12):
  rng = np.random.default_rng(1)
  return (
    jnp.asarray(rng.normal(size=(batch, size, size, 4)), jnp.float32),
    jnp.array([3, 900][:batch]),
    jnp.asarray(rng.normal(size=(batch, length, width)), jnp.float32),
  )


def _paths(params) -> set[str]:
  return {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}


def _jit_apply(unet):
  """One compiled forward per module (timesteps float, mask given) to keep compile time low."""
  return jax.jit(lambda p, x, t, ctx, mask: unet.apply({'params': p}, x, t.astype(jnp.float32), ctx, mask))


@pytest.fixture(scope='module')
def unet_and_params():
  unet = models.create_unet(unet_config())
  params = random_params(unet, *_inputs())
  return unet, params, _jit_apply(unet)


def test_param_names_follow_diffusers(unet_and_params):
  _, params, _ = unet_and_params
  paths = _paths(params)
  block = 'down_blocks_0/attentions_0/transformer_blocks_0'
  expected = [
    'conv_in/kernel',
    'time_embedding/linear_1/kernel',
    'time_embedding/linear_2/bias',
    'down_blocks_0/resnets_0/time_emb_proj/kernel',
    'down_blocks_0/downsamplers_0/conv/kernel',
    'down_blocks_0/attentions_0/norm/scale',
    'down_blocks_0/attentions_0/proj_in/kernel',
    f'{block}/attn1/to_q/kernel',
    f'{block}/attn2/to_k/kernel',
    f'{block}/attn2/to_out_0/bias',
    f'{block}/norm3/scale',
    f'{block}/ff/net_0/proj/kernel',
    f'{block}/ff/net_2/kernel',
    'down_blocks_1/resnets_0/conv_shortcut/kernel',
    'mid_block/resnets_1/conv2/kernel',
    'mid_block/attentions_0/proj_out/kernel',
    'up_blocks_0/resnets_1/norm1/scale',
    'up_blocks_0/upsamplers_0/conv/kernel',
    'up_blocks_1/attentions_1/proj_out/bias',
    'conv_norm_out/scale',
    'conv_out/kernel',
  ]
  missing = [p for p in expected if p not in paths]
  assert not missing, missing
  assert f'{block}/attn1/to_q/bias' not in paths
  assert not any(
    p.startswith(
      ('down_blocks_1/attentions', 'down_blocks_1/downsamplers', 'up_blocks_0/attentions', 'up_blocks_1/upsamplers')
    )
    for p in paths
  )
  assert params['time_embedding']['linear_1']['kernel'].shape == (16, 64)
  # Up-block resnets see the skip concatenation: 32 (from below) + 32 (skip), then 32 + 16.
  assert params['up_blocks_0']['resnets_0']['conv1']['kernel'].shape == (3, 3, 64, 32)
  assert params['up_blocks_0']['resnets_1']['conv1']['kernel'].shape == (3, 3, 48, 32)
  assert params['up_blocks_1']['resnets_1']['conv1']['kernel'].shape == (3, 3, 32, 16)


def test_output_shape_jit_and_conditioning(unet_and_params):
  unet, params, apply = unet_and_params
  x, t, ctx = _inputs()
  keep = jnp.ones(ctx.shape[:2], bool)
  out = apply(params, x, t, ctx, keep)
  assert out.shape == (2, 8, 8, 4) and out.dtype == jnp.float32
  assert not np.allclose(out, apply(params, x, t + 50, ctx, keep))
  assert not np.allclose(out, apply(params, x, t, ctx + 1.0, keep))
  for steps in (3, jnp.int32(3), t):  # Python / int / array timesteps all trace.
    shape = jax.eval_shape(lambda s: unet.apply({'params': params}, x, s, ctx), steps).shape
    assert shape == out.shape


def test_encoder_attention_mask_hides_tokens(unet_and_params):
  _, params, apply = unet_and_params
  x, t, ctx = _inputs()
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  out = apply(params, x, t, ctx, mask)
  np.testing.assert_allclose(apply(params, x, t, ctx.at[0, 3:].set(7.0).at[1, 4].set(-3.0), mask), out, atol=1e-5)
  assert not np.allclose(apply(params, x, t, ctx.at[:, 0].set(7.0), mask), out)


@pytest.mark.parametrize(
  'overrides',
  [
    dict(attention_head_dim=(2, 4), use_linear_projection=True),
    dict(transformer_layers_per_block=(2, 1), layers_per_block=(2, 1), mid_block_type=None),
    dict(
      block_out_channels=(16, 16, 32),
      num_attention_heads=(1, 2, 4),
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    ),
  ],
)
def test_config_variants(overrides):
  config = unet_config(**overrides)
  unet = models.create_unet(config)
  inputs = _inputs(batch=1)
  params = random_params(unet, *inputs)
  paths = _paths(params)
  out = jax.jit(lambda p: unet.apply({'params': p}, *inputs))(params)
  assert out.shape == (1, 8, 8, 4)
  if config.use_linear_projection:
    assert params['down_blocks_0']['attentions_0']['proj_in']['kernel'].shape == (16, 16)
  if config.mid_block_type is None:
    assert 'mid_block' not in params
  if config.transformer_layers_per_block == (2, 1):
    assert 'down_blocks_0/attentions_1/transformer_blocks_1/attn1/to_q/kernel' in paths
    assert 'up_blocks_1/attentions_2/transformer_blocks_1/attn1/to_q/kernel' in paths
    assert 'mid_block/attentions_0/transformer_blocks_1/attn1/to_q/kernel' not in paths
    assert 'up_blocks_1/resnets_2/conv1/kernel' in paths  # layers_per_block + 1 = 3 up resnets
  if len(config.block_out_channels) == 3:
    assert models.unet_downsample_factor(config) == 4
    assert not any(p.startswith(('down_blocks_0/attentions', 'up_blocks_2/attentions')) for p in paths)
    assert 'down_blocks_1/attentions_0/proj_in/kernel' in paths


def test_heads_follow_diffusers_semantics(unet_and_params):
  """num_attention_heads or attention_head_dim is the head count; it changes the output, not params."""
  _, params, apply = unet_and_params
  x, t, ctx = _inputs()
  keep = jnp.ones(ctx.shape[:2], bool)
  out = apply(params, x, t, ctx, keep)
  same = _jit_apply(models.create_unet(unet_config(attention_head_dim=8, num_attention_heads=2)))
  np.testing.assert_allclose(same(params, x, t, ctx, keep), out, atol=1e-5)
  other = _jit_apply(models.create_unet(unet_config(attention_head_dim=4)))
  assert not np.allclose(other(params, x, t, ctx, keep), out, atol=1e-4)


def test_errors_and_bfloat16(unet_and_params):
  unet, params, apply = unet_and_params
  x, t, ctx = _inputs()
  keep = jnp.ones(ctx.shape[:2], bool)
  trace = lambda module, *args: jax.eval_shape(lambda: module.apply({'params': params}, *args))
  with pytest.raises(ValueError, match='divisible'):
    trace(unet, x[:, :7, :7], t, ctx)
  with pytest.raises(ValueError, match='cross_attention_dim'):
    trace(unet, x, t, ctx[..., :8])
  with pytest.raises(ValueError, match='down block type'):
    trace(models.create_unet(unet_config(down_block_types=('Nope', 'DownBlock2D'))), x, t, ctx)
  with pytest.raises(ValueError, match='one per level'):
    trace(models.create_unet(unet_config(attention_head_dim=(2, 2, 2))), x, t, ctx)
  half = _jit_apply(models.create_unet(unet_config(dtype='bfloat16')))(params, x, t, ctx, keep)
  assert half.dtype == jnp.bfloat16
  ref = apply(params, x, t, ctx, keep)
  assert np.abs(half.astype(jnp.float32) - ref).max() < 0.1 * np.abs(ref).max()
