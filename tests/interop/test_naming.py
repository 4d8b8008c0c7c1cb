"""The renaming tables (diffusion/interop/naming.py) on hand-made trees: names, layouts, aliases, all-or-nothing."""

import flax
import jax
import numpy as np
import pytest

from diffusion.errors import UserError
from diffusion.interop import naming


@pytest.mark.parametrize(
  'layout, path, ndim, expected',
  [
    (naming.UNET, ('down_blocks_0', 'resnets_1', 'conv1', 'kernel'), 4, 'down_blocks.0.resnets.1.conv1.weight'),
    (naming.UNET, ('time_embedding', 'linear_1', 'kernel'), 2, 'time_embedding.linear_1.weight'),
    (
      naming.UNET,
      ('down_blocks_1', 'attentions_0', 'transformer_blocks_2', 'ff', 'net_0', 'proj', 'bias'),
      1,
      'down_blocks.1.attentions.0.transformer_blocks.2.ff.net.0.proj.bias',
    ),
    (
      naming.UNET,
      ('mid_block', 'attentions_0', 'transformer_blocks_0', 'attn2', 'to_out_0', 'kernel'),
      2,
      'mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight',
    ),
    (naming.UNET, ('conv_norm_out', 'scale'), 1, 'conv_norm_out.weight'),
    (
      naming.VAE,
      ('decoder', 'up_blocks_2', 'upsamplers_0', 'conv', 'kernel'),
      4,
      'decoder.up_blocks.2.upsamplers.0.conv.weight',
    ),
    (
      naming.CLIP_TEXT,
      ('encoder', 'layers_11', 'self_attn', 'q_proj', 'bias'),
      1,
      'text_model.encoder.layers.11.self_attn.q_proj.bias',
    ),
    (
      naming.CLIP_TEXT,
      ('embeddings', 'token_embedding', 'embedding'),
      2,
      'text_model.embeddings.token_embedding.weight',
    ),
    (naming.CLIP_TEXT, ('text_projection', 'kernel'), 2, 'text_projection.weight'),
  ],
)
def test_torch_key(layout, path, ndim, expected):
  assert layout.torch_key(path, ndim)[0] == expected


def test_unknown_leaf_is_an_error():
  with pytest.raises(ValueError, match='no conversion rule'):
    naming.UNET.torch_key(('conv_in', 'kernel'), 3)


def _tree(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {
    ('conv_in', 'kernel'): (3, 3, 4, 8),
    ('conv_in', 'bias'): (8,),
    ('norm', 'scale'): (8,),
    ('proj', 'kernel'): (8, 6),
    ('embed', 'embedding'): (10, 6),
  }
  return flax.traverse_util.unflatten_dict({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})


def test_layouts_change_like_pytorch():
  params = _tree()
  state = naming.flax_to_torch(params, naming.UNET)
  # Conv2d weight is (out, in, kh, kw); Linear weight is (out, in); norms and embeddings keep their layout.
  np.testing.assert_array_equal(state['conv_in.weight'][5, 2, 0, 1], params['conv_in']['kernel'][0, 1, 2, 5])
  np.testing.assert_array_equal(state['proj.weight'], params['proj']['kernel'].T)
  np.testing.assert_array_equal(state['norm.weight'], params['norm']['scale'])
  np.testing.assert_array_equal(state['embed.weight'], params['embed']['embedding'])
  assert all(v.flags['C_CONTIGUOUS'] for v in state.values())


def test_round_trip_is_exact():
  params = _tree()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  back = naming.torch_to_flax(naming.flax_to_torch(params, naming.UNET), target, naming.UNET)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_legacy_vae_attention_names_and_1x1_convs():
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(8, 8)).astype(np.float32)
  target = {
    'mid_block': {
      'attentions_0': {
        'to_q': {'kernel': jax.ShapeDtypeStruct((8, 8), np.float32), 'bias': jax.ShapeDtypeStruct((8,), np.float32)},
        'to_out_0': {'kernel': jax.ShapeDtypeStruct((8, 8), np.float32)},
      }
    }
  }
  state = {
    'mid_block.attentions.0.query.weight': weight[:, :, None, None],  # Saved as a 1x1 conv.
    'mid_block.attentions.0.query.bias': weight[0],
    'mid_block.attentions.0.proj_attn.weight': weight,
  }
  params = naming.torch_to_flax(state, target, naming.VAE)
  np.testing.assert_array_equal(params['mid_block']['attentions_0']['to_q']['kernel'], weight.T)
  np.testing.assert_array_equal(params['mid_block']['attentions_0']['to_out_0']['kernel'], weight.T)


def test_load_is_all_or_nothing():
  params = _tree()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = naming.flax_to_torch(params, naming.UNET)
  del state['norm.weight']
  state['extra.weight'] = np.zeros(3, np.float32)
  state['proj.weight'] = np.zeros((5, 8), np.float32)
  with pytest.raises(UserError) as info:
    naming.torch_to_flax(state, target, naming.UNET, source='DIR')
  message = str(info.value)
  assert message.startswith('DIR: ')
  assert '1 missing: norm.weight' in message
  assert '1 left over: extra.weight' in message
  assert 'proj.weight (file (5, 8), expected (6, 8))' in message


def test_ignored_entries_are_dropped_but_nothing_else():
  target = {'embeddings': {'position_embedding': {'embedding': jax.ShapeDtypeStruct((4, 2), np.float32)}}}
  state = {
    'text_model.embeddings.position_embedding.weight': np.ones((4, 2), np.float32),
    'text_model.embeddings.position_ids': np.arange(4)[None],  # A buffer older files carry.
    'vision_model.post_layernorm.weight': np.ones(3, np.float32),
    'logit_scale': np.ones((), np.float32),
  }
  params = naming.torch_to_flax(state, target, naming.CLIP_TEXT)
  assert params['embeddings']['position_embedding']['embedding'].shape == (4, 2)
  state['text_model.final_layer_norm.weight'] = np.ones(2, np.float32)
  with pytest.raises(UserError, match='left over: text_model.final_layer_norm.weight'):
    naming.torch_to_flax(state, target, naming.CLIP_TEXT)


def test_two_names_for_one_parameter_is_an_error():
  target = {'mid_block': {'attentions_0': {'to_q': {'bias': jax.ShapeDtypeStruct((2,), np.float32)}}}}
  state = {
    'mid_block.attentions.0.query.bias': np.ones(2, np.float32),
    'mid_block.attentions.0.to_q.bias': np.ones(2, np.float32),
  }
  with pytest.raises(UserError, match='are the same parameter'):
    naming.torch_to_flax(state, target, naming.VAE)
