"""Tests of the shared network blocks in diffusion/models/layers.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import layers
from support import random_params


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_attention_matches_jax_reference_with_mask():
  rng = np.random.default_rng(0)
  q, k, v = _normal((2, 5, 3, 4), 0), _normal((2, 7, 3, 4), 1), _normal((2, 7, 3, 4), 2)
  mask = jnp.asarray(rng.uniform(size=(2, 1, 1, 7)) < 0.7).at[:, :, :, 0].set(True)
  ours = layers.dot_product_attention(q, k, v, mask)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_attention_fully_masked_row_is_finite_and_uniform():
  q = jnp.ones((1, 2, 1, 4))
  v = jnp.arange(12.0).reshape(1, 3, 1, 4)
  out = layers.dot_product_attention(q, v, v, jnp.zeros((1, 1, 2, 3), bool))
  np.testing.assert_allclose(out[0, 0, 0], v[0, :, 0].mean(0), rtol=1e-6)


def test_attention_bfloat16_compute_keeps_float32_softmax():
  q = _normal((1, 4, 2, 8))
  out = layers.dot_product_attention(q, q, q, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), layers.dot_product_attention(q, q, q), atol=5e-2)


def test_timestep_embedding_layout():
  t = jnp.array([0, 10, 999])
  emb = layers.get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
  assert emb.shape == (3, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)  # cos first, then sin
  freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1, 4:], np.sin(10 * freqs), rtol=1e-5)
  unflipped = layers.get_timestep_embedding(t, 8, flip_sin_to_cos=False)
  np.testing.assert_allclose(unflipped[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  odd = layers.get_timestep_embedding(t, 7)
  assert odd.shape == (3, 7) and np.all(odd[:, -1] == 0)


def test_activations():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(layers.get_activation('quick_gelu')(x), x * jax.nn.sigmoid(1.702 * x))
  np.testing.assert_allclose(layers.get_activation('silu')(x), x * jax.nn.sigmoid(x), rtol=1e-6)
  with pytest.raises(ValueError, match='known'):
    layers.get_activation('nope')


def _param_shapes(module, *args):
  params = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))['params']
  return jax.tree_util.tree_map(lambda a: a.shape, params)


def test_resnet_shortcut_and_time_projection_only_when_needed():
  x = jnp.zeros((1, 4, 4, 16))
  same = _param_shapes(layers.ResnetBlock2D(16, groups=8), x)
  assert set(same) == {'norm1', 'conv1', 'norm2', 'conv2'}
  wider = _param_shapes(layers.ResnetBlock2D(32, groups=8), x, jnp.zeros((1, 64)))
  assert wider['conv_shortcut']['kernel'] == (1, 1, 16, 32)
  assert wider['time_emb_proj']['kernel'] == (64, 32)


def test_resample_shapes_and_padding():
  x = _normal((1, 6, 6, 4))
  for padding in (0, 1):
    down = layers.Downsample2D(4, padding=padding)
    params = {'params': random_params(down, x)}
    assert down.apply(params, x).shape == (1, 3, 3, 4)
  # Asymmetric (0) vs symmetric (1) padding sample different pixels with the same kernel.
  assert not np.allclose(layers.Downsample2D(4, padding=0).apply(params, x), down.apply(params, x))
  up = layers.Upsample2D(8)
  assert up.apply({'params': random_params(up, x)}, x).shape == (1, 12, 12, 8)


@pytest.mark.parametrize('linear', [False, True])
def test_transformer2d_names_and_context_mask(linear):
  model = layers.Transformer2DModel(2, 8, num_layers=2, norm_num_groups=4, use_linear_projection=linear)
  x, ctx = _normal((2, 4, 4, 16)), _normal((2, 5, 12), seed=1)
  apply = jax.jit(lambda p, ctx, mask: model.apply({'params': p}, x, ctx, mask))
  params = random_params(model, x, ctx)
  assert params['proj_in']['kernel'].shape == ((16, 16) if linear else (1, 1, 16, 16))
  block = params['transformer_blocks_1']
  assert set(block) == {'norm1', 'attn1', 'norm2', 'attn2', 'norm3', 'ff'}
  assert set(block['attn2']) == {'to_q', 'to_k', 'to_v', 'to_out_0'}
  assert 'bias' not in block['attn2']['to_k'] and 'bias' in block['attn2']['to_out_0']
  assert block['attn2']['to_k']['kernel'].shape == (12, 16)
  assert block['ff']['net_0']['proj']['kernel'].shape == (16, 128)
  assert block['ff']['net_2']['kernel'].shape == (64, 16)
  mask = jnp.array([[1, 1, 1, 0, 0]] * 2, bool)
  out = apply(params, ctx, mask)
  np.testing.assert_allclose(out, apply(params, ctx.at[:, 3:].set(5.0), mask), atol=1e-6)
  assert not np.allclose(out, apply(params, ctx.at[:, 0].set(5.0), mask))
