"""The text-to-image pipeline on an untrained tiny model (random weights, in memory): one compile per sampling
settings, no host round trips inside the sampling loop, img2img, inpainting, sampler options and their errors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from diffusion import models
from diffusion.data import shapes
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.images import to_uint8
from diffusion.pipeline import LatentDiffusionPipeline
from diffusion.samplers import SamplingSettings
from support import LDM, device_env, load_config


def _config(**diffusion):
  config = load_config('ldm_base', LDM, '/nonexistent', **{f'diffusion.{k}': v for k, v in diffusion.items()})
  config.model.vae.block_out_channels = (8, 16, 16)
  config.model.vae.scaling_factor = 1.0
  return config


def _random_params(init_fn, *args, seed=0):
  """Params of the right structure without compiling an initializer: kernels ~ N(0, 1 / fan_in), scales 1,
  biases 0, embeddings ~ N(0, 0.02^2)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1])
    if 'scale' in name:
      return np.ones(leaf.shape, np.float32)
    if 'bias' in name:
      return np.zeros(leaf.shape, np.float32)
    std = 0.02 if 'embedding' in name or len(leaf.shape) < 2 else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  shapes_tree = jax.eval_shape(init_fn, jax.random.key(0), *args)['params']
  return jax.tree_util.tree_map_with_path(fill, shapes_tree)


def _pipeline() -> LatentDiffusionPipeline:
  config = _config()
  tokenizer = tokenizer_lib.build_word_tokenizer(shapes.vocabulary(), config.data.max_text_length)
  config.model.text.vocab_size = len(tokenizer)
  length, width = config.data.max_text_length, config.model.unet.cross_attention_dim
  vae = models.create_vae(config.model.vae)
  params = {
    'unet': _random_params(
      models.create_unet(config.model.unet).init,
      jnp.zeros((1, 8, 8, 4)),
      jnp.zeros((1,)),
      jnp.zeros((1, length, width)),
    ),
    'text': _random_params(models.create_text_encoder(config.model.text).init, jnp.zeros((1, length), jnp.int32)),
    'vae': _random_params(lambda k, x: vae.init(k, x, sample_posterior=False), jnp.zeros((1, 32, 32, 3))),
  }
  return LatentDiffusionPipeline(config, params, tokenizer)


@pytest.fixture(scope='module')
def pipeline():
  return _pipeline()


COMMON = SamplingSettings('ddim', num_steps=50, guidance_scale=3.0)  # One settings: compiled once for the module.


def _image(seed):
  return np.tanh(np.random.default_rng(seed).standard_normal((32, 32, 3))).astype(np.float32)


def test_sampling_compiles_once_and_runs_50_ddim_steps_on_device(pipeline):
  prompts = ['a red circle', 'a blue square']
  first = pipeline.generate(prompts, COMMON)
  size = pipeline._generate._cache_size()  # pylint: disable=protected-access
  second = pipeline.generate(prompts[::-1], COMMON.replace(num_steps=50), seed=1)  # Equal settings: one compile.
  assert pipeline._generate._cache_size() == size  # Same shapes and settings: no new compile.  # pylint: disable=protected-access
  assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8 and not np.array_equal(first, second)
  ids = pipeline.tokenize(prompts)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(2))
  jaxpr = str(
    jax.make_jaxpr(lambda p, c, u, k: pipeline._generate(p, c, u, k, settings=COMMON, strength=1.0))(  # pylint: disable=protected-access
      pipeline.params, ids, ids, keys
    )
  )
  assert jaxpr.count('length=50') == 1  # The 50 steps are one device loop...
  assert 'callback' not in jaxpr and 'infeed' not in jaxpr  # ... with no host round trips.


def test_settings_from_config_and_overrides(pipeline):
  settings = pipeline.sampling_settings()
  assert settings == SamplingSettings(sampler='ddim', num_steps=3, guidance_scale=3.0, options=(('eta', 0.0),))
  settings = pipeline.sampling_settings(
    sampler='dpmpp_2m', karras=True, timestep_spacing='trailing', guidance_interval=(0.2, 0.8), guidance_rescale=0.7
  )
  assert dict(settings.options) == {'karras': True, 'timestep_spacing': 'trailing'}
  assert settings.model_time_interval(1000) == (200.0, 800.0) and settings.guidance_rescale == 0.7
  assert dict(pipeline.sampling_settings(sampler='heun').options) == {'karras': False, 's_churn': 0.0}


@pytest.mark.parametrize(
  'kwargs,needle',
  [
    (dict(sampler='flow_euler'), 'diffusion model'),
    (dict(sampler='ddpm', eta=0.5), "no option 'eta'"),
    (dict(sampler='magic'), 'unknown sampler'),
    (dict(guidance_interval=(0.8, 0.2)), 'guidance_interval'),
    (dict(num_steps=-1), 'num_steps'),
    (dict(num_steps=5000), r'num_steps must be in \[1, 1000\]'),
  ],
)
def test_settings_errors(pipeline, kwargs, needle):
  with pytest.raises(UserError, match=needle):
    pipeline.sampling_settings(**kwargs)


def test_generate_refuses_settings_of_the_other_family(pipeline):
  with pytest.raises(UserError, match="'flow_euler' is a flow sampler"):
    pipeline.generate(['a red circle'], SamplingSettings('flow_euler', num_steps=2, guidance_scale=1.0))


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
  prompts = ['a red circle', 'a blue square']
  recon = _reconstruction(pipeline, image)
  free = pipeline.generate(prompts, COMMON)
  weak = pipeline.generate(prompts, COMMON, init_images=image, strength=0.3)
  assert np.abs(weak.astype(np.float32) - free).max() > 8
  # Inpainting with nothing to repaint returns the known latents exactly (decoded at batch 2 against batch 1: the
  # odd uint8 value may round the other way).
  keep_all = pipeline.generate(prompts, COMMON, init_images=image, masks=np.zeros((32, 32)))
  for kept in keep_all:
    assert np.abs(kept.astype(np.int32) - recon).max() <= 1 and np.mean(kept != recon) < 1e-3
  mask = np.zeros((2, 32, 32), np.float32)
  mask[0, :, :16] = 1.0  # Repaint the left half of the first image, all of the second (strength 1: pure noise).
  mask[1] = 1.0
  painted = pipeline.generate(prompts, COMMON, init_images=image, masks=mask)
  assert np.abs(painted[0, :, :16].astype(np.float32) - recon[:, :16]).max() > 8
  # Everything repainted from pure noise is plain sampling (up to rounding: another compiled program).
  assert np.abs(painted[1].astype(np.int32) - free[1]).max() <= 1


def test_flow_matching_pipeline(pipeline):
  config = _config(prediction_type='flow', schedule='flow')
  config.model.text.vocab_size = pipeline.config.model.text.vocab_size
  flow = LatentDiffusionPipeline(config, pipeline.params, pipeline.tokenizer)
  with pytest.raises(UserError, match="'ddim' is a diffusion sampler but the model is a flow model"):
    flow.sampling_settings()  # The config's default sampler is ddim.
  image = _image(2)
  keep_all = flow.generate(
    ['a red circle'],
    flow.sampling_settings(sampler='flow_heun', num_steps=3),
    init_images=image,
    masks=np.zeros((32, 32)),
  )
  np.testing.assert_array_equal(keep_all[0], _reconstruction(pipeline, image))


_SHARDED_SCRIPT = """
import sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_pipeline_editing as t
assert jax.local_device_count() == 4, jax.devices()
images = t._pipeline().generate(t.SHARDED_PROMPTS, t.SHARDED_SETTINGS, seed=7, batch_size=4)
np.save(sys.argv[2], images)
"""
SHARDED_PROMPTS = ['a red circle', 'a blue square', 'a green triangle', 'a red square', 'a cyan circle']
SHARDED_SETTINGS = SamplingSettings('euler_a', num_steps=3, guidance_scale=3.0, options=(('karras', False),))


def test_images_do_not_depend_on_the_device_count(pipeline, tmp_path):
  """5 images on 4 devices (global batches of 4 split over the devices, the last one padded) equal those on 1
  device, up to float rounding."""
  import subprocess  # pylint: disable=g-import-not-at-top

  env = device_env(4)
  out = tmp_path / 'sharded.npy'
  subprocess.run(
    [sys.executable, '-c', _SHARDED_SCRIPT, os.path.dirname(__file__), str(out)], env=env, check=True, timeout=600
  )
  single = pipeline.generate(SHARDED_PROMPTS, SHARDED_SETTINGS, seed=7, batch_size=2).astype(np.int32)
  sharded = np.load(out).astype(np.int32)
  assert sharded.shape == single.shape == (5, 32, 32, 3)
  # The same computation per image; XLA's CPU kernels at another per-device batch may round differently, which
  # flips the odd uint8 value by one.
  assert np.abs(sharded - single).max() <= 1
  assert np.mean(sharded != single) < 1e-3
