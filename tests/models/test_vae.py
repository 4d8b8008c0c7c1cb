"""Tests of AutoencoderKL (diffusion/models/vae.py) and its factory."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from support import random_params


def vae_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    act_fn='silu',
    mid_block_add_attention=True,
    scaling_factor=-1.0,
    dtype='float32',
  )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


@pytest.fixture(scope='module')
def vae_and_params():
  vae = models.create_vae(vae_config())
  return vae, random_params(vae, jnp.zeros((1, 16, 16, 3)), sample_posterior=False)


def _image(shape):
  return jnp.asarray(np.random.default_rng(1).uniform(-1, 1, shape), jnp.float32)


def _paths(params) -> set[str]:
  return {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}


def test_param_names_follow_diffusers(vae_and_params):
  _, params = vae_and_params
  paths = _paths(params)
  expected = [
    'encoder/conv_in/kernel',
    'encoder/down_blocks_0/resnets_0/conv1/kernel',
    'encoder/down_blocks_0/resnets_0/norm1/scale',
    'encoder/down_blocks_0/downsamplers_0/conv/kernel',
    'encoder/down_blocks_1/resnets_0/conv_shortcut/kernel',
    'encoder/mid_block/resnets_1/norm2/bias',
    'encoder/mid_block/attentions_0/group_norm/scale',
    'encoder/mid_block/attentions_0/to_q/bias',
    'encoder/mid_block/attentions_0/to_out_0/kernel',
    'encoder/conv_norm_out/scale',
    'encoder/conv_out/kernel',
    'quant_conv/kernel',
    'post_quant_conv/kernel',
    'decoder/conv_in/kernel',
    'decoder/up_blocks_0/resnets_1/conv2/kernel',
    'decoder/up_blocks_0/upsamplers_0/conv/kernel',
    'decoder/up_blocks_2/resnets_0/conv_shortcut/kernel',
    'decoder/conv_out/bias',
  ]
  missing = [p for p in expected if p not in paths]
  assert not missing, missing
  assert not any(p.startswith('encoder/down_blocks_2/downsamplers') for p in paths)
  assert not any(p.startswith('decoder/up_blocks_2/upsamplers') for p in paths)
  assert 'decoder/up_blocks_0/resnets_2/conv1/kernel' not in paths  # layers_per_block + 1 = 2 resnets
  assert params['encoder']['conv_out']['kernel'].shape == (3, 3, 16, 8)  # 2 * latent_channels
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))


def test_encode_decode_shapes_and_factor(vae_and_params):
  vae, params = vae_and_params
  factor = models.vae_downsample_factor(vae_config())
  assert factor == 4
  x = _image((2, 32, 24, 3))
  mean, logvar = jax.jit(lambda x: vae.apply({'params': params}, x, method='encode'))(x)
  assert mean.shape == logvar.shape == (2, 32 // factor, 24 // factor, 4)
  image = vae.apply({'params': params}, mean, method='decode')
  assert image.shape == x.shape


def test_call_samples_posterior_with_rng(vae_and_params):
  vae, params = vae_and_params
  x = _image((1, 16, 16, 3))
  apply = lambda x, rng: vae.apply({'params': params}, x, rng)
  rec_a, mean, logvar = apply(x, jax.random.key(2))
  rec_b, _, _ = apply(x, jax.random.key(3))
  rec_a2, _, _ = apply(x, jax.random.key(2))
  assert rec_a.shape == x.shape and mean.shape == (1, 4, 4, 4)
  np.testing.assert_array_equal(rec_a, rec_a2)
  assert not np.allclose(rec_a, rec_b)
  rec_mean, _, _ = vae.apply({'params': params}, x, sample_posterior=False)
  np.testing.assert_allclose(rec_mean, vae.apply({'params': params}, mean, method='decode'), atol=1e-5)
  with pytest.raises(ValueError, match='rng'):
    vae.apply({'params': params}, x)


def test_logvar_is_clipped(vae_and_params):
  vae, params = vae_and_params
  x = jnp.zeros((1, 8, 8, 3))
  for bias, bound in ((1e3, 20.0), (-1e3, -30.0)):
    moved = jax.tree_util.tree_map(lambda a: a, params)
    moved['quant_conv']['bias'] = moved['quant_conv']['bias'].at[4:].set(bias)
    _, logvar = vae.apply({'params': moved}, x, method='encode')
    np.testing.assert_array_equal(logvar, bound)


def test_no_mid_attention_and_bfloat16():
  vae = models.create_vae(vae_config(block_out_channels=(8, 16), mid_block_add_attention=False, dtype='bfloat16'))
  x = jnp.zeros((1, 8, 8, 3))
  params = random_params(vae, x, sample_posterior=False)
  assert 'attentions_0' not in params['encoder']['mid_block']
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
  rec, mean, _ = vae.apply({'params': params}, x, sample_posterior=False)
  assert rec.dtype == jnp.bfloat16 and mean.shape == (1, 4, 4, 4)
  assert models.vae_downsample_factor(vae_config(block_out_channels=(8, 16))) == 2
