"""The text-to-image pipeline on an untrained tiny model (random weights, in memory): one compile per plan, no host
round trips inside the sampling loop, img2img, inpainting, sampler options and their errors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import LDM, load_config  # pylint: disable=g-import-not-at-top

from diffusion import models
from diffusion.data import shapes
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.logging import to_uint8
from diffusion.pipeline import LatentDiffusionPipeline, SamplingPlan


def _pipeline(**diffusion) -> LatentDiffusionPipeline:
  config = load_config('ldm_base', LDM, '/nonexistent', **{f'diffusion.{k}': v for k, v in diffusion.items()})
  config.model.vae.block_out_channels = (8, 16, 16)
  config.model.vae.scaling_factor = 1.0
  tokenizer = tokenizer_lib.build_word_tokenizer(shapes.vocabulary(), config.data.max_text_length)
  config.model.text.vocab_size = len(tokenizer)
  k_unet, k_text, k_vae = jax.random.split(jax.random.key(0), 3)
  c = config
  unet = models.create_unet(c.model.unet).init(
      k_unet, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, c.data.max_text_length,
                                                                  c.model.unet.cross_attention_dim)))['params']
  text = models.create_text_encoder(c.model.text).init(k_text, jnp.zeros((1, c.data.max_text_length),
                                                                         jnp.int32))['params']
  vae = models.create_vae(c.model.vae).init(k_vae, jnp.zeros((1, 32, 32, 3)))['params']
  return LatentDiffusionPipeline(config, {'unet': unet, 'text': text, 'vae': vae}, tokenizer)


@pytest.fixture(scope='module')
def pipeline():
  return _pipeline()


def _image(seed):
  return np.tanh(np.random.default_rng(seed).standard_normal((32, 32, 3))).astype(np.float32)


def test_sampling_compiles_once_and_runs_50_ddim_steps_on_device(pipeline):
  prompts = ['a red circle', 'a blue square']
  first = pipeline.generate(prompts, sampler='ddim', num_steps=50, guidance_scale=3.0)
  size = pipeline._generate._cache_size()  # pylint: disable=protected-access
  second = pipeline.generate(prompts[::-1], sampler='ddim', num_steps=50, guidance_scale=3.0, seed=1)
  assert pipeline._generate._cache_size() == size  # Same shapes and plan: no new compile.  # pylint: disable=protected-access
  assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8 and not np.array_equal(first, second)
  plan = pipeline.plan(sampler='ddim', num_steps=50, guidance_scale=3.0)
  ids = pipeline.tokenize(prompts)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(2))
  jaxpr = str(jax.make_jaxpr(lambda p, c, u, k: pipeline._generate(p, c, u, k, plan=plan))(  # pylint: disable=protected-access
      pipeline.params, ids, ids, keys))
  assert jaxpr.count('length=50') == 1  # The 50 steps are one device loop...
  assert 'callback' not in jaxpr and 'infeed' not in jaxpr  # ... with no host round trips.


def test_plan_from_config_and_overrides(pipeline):
  plan = pipeline.plan()
  assert plan == SamplingPlan(sampler='ddim', num_steps=3, guidance_scale=3.0, guidance_rescale=0.0,
                              guidance_interval=None, strength=1.0, options=(('eta', 0.0),))
  plan = pipeline.plan(sampler='dpmpp_2m', karras=True, timestep_spacing='trailing', guidance_interval=(0.2, 0.8),
                       guidance_rescale=0.7)
  assert dict(plan.options) == {'karras': True, 'timestep_spacing': 'trailing'}
  assert plan.guidance_interval == (200.0, 800.0) and plan.guidance_rescale == 0.7
  assert dict(pipeline.plan(sampler='heun').options) == {'karras': False, 's_churn': 0.0}


@pytest.mark.parametrize('kwargs,needle', [
    (dict(sampler='flow_euler'), 'diffusion model'), (dict(sampler='ddpm', eta=0.5), "no option 'eta'"),
    (dict(sampler='magic'), 'unknown sampler'), (dict(guidance_interval=(0.8, 0.2)), 'guidance_interval'),
    (dict(num_steps=-1), 'num_steps')])
def test_plan_errors(pipeline, kwargs, needle):
  with pytest.raises(UserError, match=needle):
    pipeline.plan(**kwargs)


def test_editing_input_errors(pipeline):
  with pytest.raises(UserError, match='init image'):
    pipeline.generate(['a red circle'], masks=np.ones((32, 32)))
  with pytest.raises(UserError, match='init image'):
    pipeline.generate(['a red circle'], strength=0.5)
  with pytest.raises(UserError, match='32x32x3'):
    pipeline.generate(['a red circle'], init_images=np.zeros((16, 16, 3)))
  with pytest.raises(UserError, match='mask is 16x16'):
    pipeline.generate(['a red circle'], init_images=_image(0), masks=np.ones((16, 16)))
  with pytest.raises(UserError, match='strength'):
    pipeline.generate(['a red circle'], init_images=_image(0), strength=0.0)


def _reconstruction(pipeline, image):
  """decode(encode(image)): what sampling returns where every latent is known."""
  params = pipeline.params['vae']
  mean, _ = pipeline.vae.apply({'params': params}, image[None], method='encode')
  return to_uint8(jnp.clip(pipeline.vae.apply({'params': params}, mean, method='decode'), -1, 1))[0]


def test_img2img_and_inpainting(pipeline):
  image = _image(1)
  prompts = ['a red circle'] * 2
  recon = _reconstruction(pipeline, image)
  common = dict(sampler='ddim', num_steps=10, guidance_scale=3.0)
  free = pipeline.generate(prompts, **common)
  weak = pipeline.generate(prompts, init_images=image, strength=0.1, **common)
  strong = pipeline.generate(prompts, init_images=image, strength=0.9, **common)
  distance = lambda a: np.abs(a.astype(np.float32) - recon).mean()
  assert distance(weak[0]) < distance(strong[0]) < distance(free[0])
  # Inpainting with nothing to repaint returns the known latents exactly; batch size does not change images.
  keep_all = pipeline.generate(prompts, init_images=image, masks=np.zeros((32, 32)), **common)
  np.testing.assert_array_equal(keep_all[0], recon)
  mask = np.zeros((32, 32), np.float32)
  mask[:, :16] = 1.0  # Repaint the left half.
  half = pipeline.generate(prompts, init_images=image, masks=mask, batch_size=1, **common)
  again = pipeline.generate(prompts, init_images=image, masks=mask, batch_size=2, **common)
  np.testing.assert_array_equal(half, again)
  assert np.abs(half[0, :, :16].astype(np.float32) - recon[:, :16]).mean() > distance(keep_all[0]) + 1.0


def test_flow_matching_pipeline():
  pipeline = _pipeline(prediction_type='flow', schedule='flow')
  with pytest.raises(UserError, match="'ddim' is a diffusion sampler but the model is a flow model"):
    pipeline.plan()  # The config's default sampler is ddim.
  images = pipeline.generate(['a red circle'], sampler='flow_heun', num_steps=3)
  assert images.shape == (1, 32, 32, 3)
  image = _image(2)
  keep_all = pipeline.generate(['a red circle'], sampler='flow_euler', num_steps=4, init_images=image,
                               masks=np.zeros((32, 32)))
  np.testing.assert_array_equal(keep_all[0], _reconstruction(pipeline, image))
