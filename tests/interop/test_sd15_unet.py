"""The full SD 1.5 U-Net from its published config (slow), and rematerialisation (fast, on a tiny U-Net)."""

import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import models
from diffusion.interop import configs, naming
from support import ONE_LEVEL_UNET

# stable-diffusion-v1-5/unet/config.json as published (diffusers 0.6 era keys).
SD15_CONFIG = {
  '_class_name': 'UNet2DConditionModel',
  '_diffusers_version': '0.6.0',
  'act_fn': 'silu',
  'attention_head_dim': 8,
  'block_out_channels': [320, 640, 1280, 1280],
  'center_input_sample': False,
  'cross_attention_dim': 768,
  'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  'downsample_padding': 1,
  'flip_sin_to_cos': True,
  'freq_shift': 0,
  'in_channels': 4,
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'norm_eps': 1e-05,
  'norm_num_groups': 32,
  'out_channels': 4,
  'sample_size': 64,
  'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
}
SD15_PARAMS = 859_520_964


def _unet(fields: dict, **overrides) -> models.UNet2DConditionModel:
  return models.create_unet(ml_collections.ConfigDict({**fields, 'dtype': 'float32', **overrides}))


def _numpy_params(shapes, seed=0):
  """Generic random values drawn with numpy (XLA's CPU compile of a whole network's init takes long)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * scale)
    return jnp.asarray((name == 'scale') + 0.1 * rng.standard_normal(leaf.shape, np.float32))

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.slow
def test_sd15_unet_builds_counts_and_runs(ref):
  fields = configs.unet_from_diffusers(SD15_CONFIG, 'sd15/unet/config.json')
  unet = _unet(fields)
  x, t, ctx = jnp.zeros((1, 64, 64, 4)), jnp.array([500.0]), jnp.zeros((1, 77, 768))
  shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, ctx))['params']
  assert models.count_params(shapes) == SD15_PARAMS

  with ref.torch.device('meta'):  # diffusers' own SD 1.5 U-Net, shapes only.
    reference = ref.diffusers.UNet2DConditionModel(**{k: v for k, v in SD15_CONFIG.items() if k[0] != '_'})
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  ours = {
    name: naming.LEAF_RULES[(path[-1], len(leaf.shape))].to_torch(np.empty(leaf.shape, np.int8)).shape
    for path, leaf in flax.traverse_util.flatten_dict(shapes).items()
    for name in [naming.UNET.torch_key(path, len(leaf.shape))[0]]
  }
  assert ours == expected

  params = _numpy_params(shapes)
  rng = np.random.default_rng(1)
  sample = jnp.asarray(rng.standard_normal((1, 64, 64, 4), np.float32))
  context = jnp.asarray(rng.standard_normal((1, 77, 768), np.float32))
  out = jax.jit(lambda p: unet.apply({'params': p}, sample, t, context))(params)
  assert out.shape == (1, 64, 64, 4)
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


TINY = ONE_LEVEL_UNET


def test_remat_gives_the_same_results_and_gradients():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
  t = jnp.array([10.0, 700.0])
  ctx = jnp.asarray(rng.standard_normal((2, 5, 12), np.float32))
  plain, remat = _unet(TINY), _unet(TINY, remat=True, remat_policy='nothing_saveable')
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x, t, ctx))['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(
    jax.eval_shape(lambda: remat.init(jax.random.key(0), x, t, ctx))['params']
  )
  params = _numpy_params(shapes)

  forward = lambda unet: lambda p: unet.apply({'params': p}, x, t, ctx)
  count = lambda unet: len(re.findall(r'\b(?:checkpoint|remat2?)\[', str(jax.make_jaxpr(forward(unet))(params))))
  assert (count(plain), count(remat)) == (0, 9)  # Each of the 5 resnets and 4 transformers is one remat region.

  grad_fn = lambda unet: jax.jit(jax.value_and_grad(lambda p: jnp.mean(jnp.square(forward(unet)(p)))))
  (loss_a, grads_a), (loss_b, grads_b) = grad_fn(plain)(params), grad_fn(remat)(params)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_a, grads_b)


def test_unknown_remat_policy_is_an_error():
  unet = _unet(TINY, remat=True, remat_policy='everything')
  with pytest.raises(ValueError, match="Unknown remat_policy 'everything'"):
    jax.eval_shape(
      lambda: unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 5, 12)))
    )
