"""Text -> image: tokenize, encode, sample latents with guidance, decode. Used by sample.py, eval/ and training.

Image i of a call gets its initial noise (and, for ancestral samplers, its per-step noise) from
`fold_in(PRNGKey(seed), i)`, so neither the batch size nor the device count changes any image.
"""

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import models, process, samplers
from diffusion.config import config_from_json
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.logging import to_uint8


class LatentDiffusionPipeline:
  """Holds the three networks, their params ({'unet', 'text', 'vae'}) and the tokenizer of one trained model."""

  def __init__(self, config: ml_collections.ConfigDict, params: dict, tokenizer: Any):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.unet = models.create_unet(config.model.unet)
    self.text_encoder = models.create_text_encoder(config.model.text)
    self.vae = models.create_vae(config.model.vae)
    self.schedule = process.get_noise_schedule(config.diffusion)
    self.scaling_factor = float(config.model.vae.scaling_factor)
    if self.scaling_factor <= 0:
      raise UserError('model.vae.scaling_factor is not set; it is computed at the start of stage-2 training')
    latent = config.data.image_size // models.vae_downsample_factor(config.model.vae)
    self.latent_shape = (latent, latent, config.model.vae.latent_channels)

  @classmethod
  def from_workdir(cls, workdir: str, use_ema: bool = True, step: int | None = None) -> 'LatentDiffusionPipeline':
    """Loads config, tokenizer and (EMA) params of a stage-2 workdir; nothing else is needed."""
    from diffusion import checkpoint  # Orbax is only needed here, not for in-memory pipelines.

    config = load_workdir_config(workdir, expect='ldm')
    tokenizer = tokenizer_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    if ckpt.latest_step() is None:
      raise UserError(f'no checkpoint in {workdir!r}: train it first')
    trained = ckpt.restore_params(step, 'ema_params' if use_ema else 'params')
    vae_params = checkpoint.load_pytree(os.path.join(workdir, 'frozen', 'vae'))
    return cls(config, {'unet': trained['unet'], 'text': trained['text'], 'vae': vae_params}, tokenizer)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return tokenizer_lib.tokenize(self.tokenizer, list(prompts), self.config.data.max_text_length)

  @functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
  def _generate(self, params: dict, cond_ids: jax.Array, uncond_ids: jax.Array, keys: jax.Array, sampler: str,
                num_steps: int, guidance_scale: float, eta: float) -> jax.Array:
    encode = lambda ids: self.text_encoder.apply({'params': params['text']}, ids)[0]
    cond, uncond = encode(cond_ids), encode(uncond_ids)
    model_fn = lambda x, t, ctx: self.unet.apply({'params': params['unet']}, x, t, ctx)
    denoise_fn = samplers.cfg_denoise_fn(model_fn, cond, uncond, guidance_scale)
    x_T = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    options = {'eta': eta} if sampler == 'ddim' else {}
    z0 = samplers.get_sampler(sampler)(denoise_fn, x_T, self.schedule, num_steps=num_steps, rng=noise_keys,
                                       prediction_type=self.config.diffusion.prediction_type, **options)
    images = self.vae.apply({'params': params['vae']}, z0 / self.scaling_factor, method='decode')
    return jnp.clip(images, -1.0, 1.0)

  def generate(self, prompts: Sequence[str], *, negative_prompt: str = '', seed: int = 0, indices: Sequence[int] = None,
               sampler: str | None = None, num_steps: int | None = None, guidance_scale: float | None = None,
               eta: float | None = None, batch_size: int = 64, params: dict | None = None) -> np.ndarray:
    """Returns uint8 images (N, H, W, 3), one per prompt; image n uses noise index `indices[n]` (default n)."""
    s = self.config.sample
    sampler = sampler or s.sampler
    samplers.get_sampler(sampler)  # Unknown names fail here, before compiling.
    num_steps = int(num_steps or s.num_steps)
    guidance_scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
    eta = float(s.eta if eta is None else eta)
    indices = np.arange(len(prompts)) if indices is None else np.asarray(indices)
    root = jax.random.PRNGKey(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = list(prompts[start:start + batch_size])
      keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices[start:start + batch_size]))
      cond = self.tokenize(chunk)
      uncond = self.tokenize([negative_prompt] * len(chunk))
      images = self._generate(params or self.params, cond, uncond, keys, sampler, num_steps, guidance_scale, eta)
      out.append(to_uint8(images))
    return np.concatenate(out)


def load_workdir_config(workdir: str, expect: str | None = None) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir!r} is not a training workdir (no config.json)')
  try:
    config = config_from_json(open(path).read())
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  if expect and config.get('model_type') != expect:
    raise UserError(f'{workdir!r} holds a {config.get("model_type")!r} model, expected a {expect!r} workdir')
  return config
