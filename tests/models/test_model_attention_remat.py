"""The networks' `attention` field ('xla' computes exactly what the default does, and reaches every attention
layer) and the U-Net's per-block-type remat (`remat_blocks`: same params, outputs and gradients, fewer regions)."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from diffusion.models import attention as attention_lib
from diffusion.models.clip_vision import CLIPVisionTransformer
from diffusion.models.unet import UNetMidBlock2DCrossAttn, remat_block_types
from support import ONE_LEVEL_UNET

TINY_UNET = {**ONE_LEVEL_UNET, 'dtype': 'float32'}
TINY_TEXT = dict(
  type='transformer',
  vocab_size=50,
  hidden_size=16,
  intermediate_size=32,
  num_hidden_layers=2,
  num_attention_heads=2,
  max_position_embeddings=8,
  hidden_act='quick_gelu',
  layer_norm_eps=1e-5,
  eos_token_id=2,
  projection_dim=None,
  dtype='float32',
)
TINY_VAE = dict(
  in_channels=3,
  out_channels=3,
  block_out_channels=(8, 16),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=4,
  act_fn='silu',
  mid_block_add_attention=True,
  dtype='float32',
)


def _unet(**overrides) -> models.UNet2DConditionModel:
  return models.create_unet(ml_collections.ConfigDict({**TINY_UNET, **overrides}))


def _unet_inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
  ctx = jnp.asarray(rng.standard_normal((2, 5, 12), np.float32))
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  return x, jnp.array([10.0, 700.0]), ctx, mask


def _spy(monkeypatch) -> list[str]:
  """Records the `implementation` argument of every attention call the networks make from now on."""
  seen = []
  original = attention_lib.dot_product_attention

  def spy(*args, **kwargs):
    seen.append(args[5] if len(args) > 5 else kwargs.get('implementation', 'xla'))
    return original(*args, **kwargs)

  monkeypatch.setattr('diffusion.models.layers.dot_product_attention', spy)
  monkeypatch.setattr('diffusion.models.text.dot_product_attention', spy)
  return seen


def _same_program(module_a, module_b, params, *args, **kwargs) -> bool:
  """Whether two modules trace to the same jaxpr on these inputs: then their outputs are identical, bit for bit
  (checked by tracing only; compiling these networks op by op on CPU takes minutes)."""
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({'params': p}, *args, **kwargs))(params))
  return jaxpr(module_a) == jaxpr(module_b)


def _shapes(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']


def test_unet_attention_xla_is_the_default_program_on_cpu(monkeypatch):
  x, t, ctx, mask = _unet_inputs()
  default, xla = _unet(), _unet(attention='xla')
  assert default.attention == 'auto'
  params = _shapes(default, x, t, ctx, mask)
  seen = _spy(monkeypatch)
  assert _same_program(default, xla, params, x, t, ctx, mask)
  # 4 spatial transformers (down 1, mid 1, up 2) x (self + cross attention): every one gets the field.
  assert seen == ['auto'] * 8 + ['xla'] * 8


def test_text_vae_and_vision_attention_xla_is_the_default_program_on_cpu(monkeypatch):
  ids = jnp.asarray([[1, 5, 7, 2, 0, 0], [1, 9, 9, 9, 9, 2]])
  attention_mask = (ids != 0) | (jnp.arange(6) == 0)
  text = models.create_text_encoder(ml_collections.ConfigDict(TINY_TEXT))
  text_xla = models.create_text_encoder(ml_collections.ConfigDict({**TINY_TEXT, 'attention': 'xla'}))
  images = jnp.zeros((1, 8, 8, 3))
  vae = models.create_vae(ml_collections.ConfigDict(TINY_VAE))
  vae_xla = models.create_vae(ml_collections.ConfigDict({**TINY_VAE, 'attention': 'xla'}))
  vision = CLIPVisionTransformer(16, 32, 1, 2, image_size=8, patch_size=4, projection_dim=None)
  vision_xla = vision.clone(attention='xla')
  shapes = [_shapes(text, ids, attention_mask), _shapes(vae, images, sample_posterior=False), _shapes(vision, images)]
  seen = _spy(monkeypatch)
  assert _same_program(text, text_xla, shapes[0], ids, attention_mask)
  assert seen == ['auto'] * 2 + ['xla'] * 2  # Two encoder layers.
  seen.clear()
  assert _same_program(vae, vae_xla, shapes[1], images, sample_posterior=False)
  assert seen == ['auto'] * 2 + ['xla'] * 2  # The encoder's and the decoder's mid-block attention.
  seen.clear()
  assert _same_program(vision, vision_xla, shapes[2], images)
  assert seen == ['auto', 'xla']


def test_remat_block_selection():
  assert remat_block_types(False) == remat_block_types(False, 'attention') == ()
  assert remat_block_types(True) == ('resnet', 'attention')  # remat=True keeps its meaning: every block.
  assert remat_block_types(True, 'resnet') == remat_block_types('resnet') == ('resnet',)
  assert remat_block_types(True, 'attention') == ('attention',)
  with pytest.raises(ValueError, match="Unknown remat_blocks 'mlp'"):
    remat_block_types(True, 'mlp')


def _remat_regions(fn, *args) -> int:
  return len(re.findall(r'\b(?:checkpoint|remat2?)\[', str(jax.make_jaxpr(fn)(*args))))


def test_remat_per_block_type_keeps_params_outputs_and_gradients():
  """Region counts on the whole tiny U-Net (tracing only); compiled outputs and gradients on its mid block
  (resnet, spatial transformer, resnet), where they are cheap to compile."""
  x, t, ctx, mask = _unet_inputs()
  unets = {k: _unet(**f) for k, f in {'off': {}, 'resnet': {'remat': True, 'remat_blocks': 'resnet'},
           'attention': {'remat': True, 'remat_blocks': 'attention'}, 'all': {'remat': True}}.items()}  # fmt: skip
  shapes = {k: _shapes(u, x, t, ctx, mask) for k, u in unets.items()}
  assert all(s == shapes['off'] for s in shapes.values())  # Same names, shapes and dtypes.
  regions = {
    k: _remat_regions(lambda p, u=u: u.apply({'params': p}, x, t, ctx, mask), shapes['off']) for k, u in unets.items()
  }
  assert regions == {'off': 0, 'resnet': 5, 'attention': 4, 'all': 9}  # 5 resnets, 4 transformers in this U-Net.

  h = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 16)), np.float32)
  temb = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64)), np.float32)
  block = lambda types, policy='nothing_saveable': UNetMidBlock2DCrossAttn(
    out_channels=16, num_attention_heads=2, resnet_groups=8, remat_types=types, remat_policy=policy
  )
  blocks = {'off': block(()), 'resnet': block(('resnet',)), 'attention': block(('attention',), 'dots_saveable')}
  shapes = {k: _shapes(b, h, temb, ctx, mask) for k, b in blocks.items()}
  assert all(s == shapes['off'] for s in shapes.values())
  rng = np.random.default_rng(4)  # Random values drawn with numpy: an eager `init` compiles op by op (slow on CPU).
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes['off'])
  losses = {
    k: lambda p, b=b: jnp.mean(jnp.square(b.apply({'params': p}, h, temb, ctx, mask))) for k, b in blocks.items()
  }
  results = jax.jit(lambda p: {k: jax.value_and_grad(f)(p) for k, f in losses.items()})(params)  # One compile.
  for name in ('resnet', 'attention'):
    np.testing.assert_allclose(results[name][0], results['off'][0], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[name][1], results['off'][1]
    )
