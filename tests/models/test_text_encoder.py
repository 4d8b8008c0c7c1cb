"""Tests of CLIPTextTransformer (diffusion/models/text.py), the model registry and count_params."""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from diffusion.errors import UserError
from diffusion.models import text
from support import random_params

VOCAB, WIDTH, FFN, LAYERS, MAXLEN = 50, 16, 32, 2, 8


def text_config(**overrides) -> ml_collections.ConfigDict:
  config = dict(
    type='transformer',
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    max_position_embeddings=MAXLEN,
    hidden_act='quick_gelu',
    layer_norm_eps=1e-5,
    eos_token_id=2,
    projection_dim=None,
    dtype='float32',
  )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


# Row 0: eos (2) at position 4, then padding 0; row 1: eos at 6, a larger id after it.
IDS = jnp.array([[1, 7, 9, 11, 2, 0, 0, 0], [1, 5, 6, 8, 12, 13, 2, 40]], jnp.int32)


@pytest.fixture(scope='module')
def encoder_and_params():
  encoder = models.create_text_encoder(text_config())
  params = random_params(encoder, IDS)
  apply = jax.jit(lambda p, ids: encoder.apply({'params': p}, ids))
  return encoder, params, apply


def test_param_names_follow_transformers(encoder_and_params):
  _, params, _ = encoder_and_params
  paths = {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}
  layer = 'encoder/layers_1'
  expected = [
    'embeddings/token_embedding/embedding',
    'embeddings/position_embedding/embedding',
    f'{layer}/self_attn/q_proj/bias',
    f'{layer}/self_attn/k_proj/kernel',
    f'{layer}/self_attn/v_proj/kernel',
    f'{layer}/self_attn/out_proj/bias',
    f'{layer}/layer_norm1/scale',
    f'{layer}/mlp/fc1/kernel',
    f'{layer}/mlp/fc2/bias',
    f'{layer}/layer_norm2/bias',
    'final_layer_norm/scale',
  ]
  missing = [p for p in expected if p not in paths]
  assert not missing, missing
  assert 'encoder/layers_2/mlp/fc1/kernel' not in paths and 'text_projection/kernel' not in paths
  assert params['embeddings']['token_embedding']['embedding'].shape == (VOCAB, WIDTH)
  assert params['embeddings']['position_embedding']['embedding'].shape == (MAXLEN, WIDTH)
  assert params['encoder']['layers_0']['mlp']['fc1']['kernel'].shape == (WIDTH, FFN)


def test_count_params_matches_formula(encoder_and_params):
  _, params, _ = encoder_and_params
  per_layer = 4 * (WIDTH * WIDTH + WIDTH) + 2 * WIDTH * FFN + FFN + WIDTH + 4 * WIDTH
  assert models.count_params(params) == (VOCAB + MAXLEN) * WIDTH + LAYERS * per_layer + 2 * WIDTH


def test_shapes_and_causality(encoder_and_params):
  _, params, apply = encoder_and_params
  last, pooled = apply(params, IDS)
  assert last.shape == (2, MAXLEN, WIDTH) and pooled.shape == (2, WIDTH)
  changed, _ = apply(params, IDS.at[:, 5].set(33))
  np.testing.assert_allclose(changed[:, :5], last[:, :5], atol=1e-6)
  assert not np.allclose(changed[:, 5:], last[:, 5:])


def test_pooled_output_at_first_eos(encoder_and_params):
  _, params, apply = encoder_and_params
  last, pooled = apply(params, IDS)
  np.testing.assert_allclose(pooled, last[jnp.arange(2), jnp.array([4, 6])], atol=1e-6)
  np.testing.assert_array_equal(text.eos_positions(IDS, 2), [4, 6])
  np.testing.assert_array_equal(text.eos_positions(IDS, None), [3, 7])  # argmax(ids), CLIP-style
  np.testing.assert_array_equal(text.eos_positions(IDS, -1), [3, 7])


def test_padding_attention_mask():
  encoder = models.create_text_encoder(text_config())
  params = random_params(encoder, IDS)
  apply = jax.jit(lambda ids, mask: encoder.apply({'params': params}, ids, mask))
  mask = jnp.ones_like(IDS).at[:, 2].set(0)
  out, _ = apply(IDS, mask)
  other, _ = apply(IDS.at[:, 2].set(44), mask)
  np.testing.assert_allclose(other[:, 3:], out[:, 3:], atol=1e-6)  # masked token is invisible
  unmasked, _ = apply(IDS, jnp.ones_like(IDS))
  assert not np.allclose(unmasked[:, 3:], out[:, 3:])


def test_penultimate_hidden_state_is_one_layer_shallower(encoder_and_params):
  """clip skip: index -2 == a 1-layer model with the same first layer and final_layer_norm."""
  encoder, params, _ = encoder_and_params
  skip, pooled = encoder.apply({'params': params}, IDS, output_hidden_state_index=-2)
  shallow = models.create_text_encoder(text_config(num_hidden_layers=1))
  shallow_params = dict(params, encoder={'layers_0': params['encoder']['layers_0']})
  expected, _ = shallow.apply({'params': shallow_params}, IDS)
  np.testing.assert_allclose(skip, expected, atol=1e-5)
  _, full_pooled = encoder.apply({'params': params}, IDS)
  np.testing.assert_allclose(pooled, full_pooled, atol=1e-6)  # pooled always from the last layer
  with pytest.raises(ValueError, match='out of range'):
    encoder.apply({'params': params}, IDS, output_hidden_state_index=LAYERS + 1)


def test_projection_and_bfloat16():
  encoder = models.create_text_encoder(text_config(projection_dim=6, dtype='bfloat16'))
  params = random_params(encoder, IDS)
  assert set(params['text_projection']) == {'kernel'}  # no bias
  assert params['text_projection']['kernel'].shape == (WIDTH, 6)
  last, pooled = encoder.apply({'params': params}, IDS)
  assert pooled.shape == (2, 6) and last.dtype == jnp.bfloat16


def test_errors_and_registry():
  with pytest.raises(ValueError, match='vocab_size'):
    models.create_text_encoder(text_config(vocab_size=-1))
  with pytest.raises(UserError, match='text/transformer'):
    models.create_text_encoder(text_config(type='nope'))
  with pytest.raises(ValueError, match='already registered'):
    models.register_model('unet')(models.create_unet)
  assert {'vae', 'unet', 'text/transformer'} <= set(models.MODELS)
  assert isinstance(models.get_model_factory('text/transformer')(text_config()), models.CLIPTextTransformer)
  encoder = models.create_text_encoder(text_config())
  with pytest.raises(ValueError, match='max_position_embeddings'):
    jax.eval_shape(lambda: encoder.init(jax.random.key(0), jnp.zeros((1, MAXLEN + 1), jnp.int32)))
