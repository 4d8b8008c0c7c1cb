"""Text -> image (and image + text -> image): tokenize, encode, sample latents with guidance, decode.

Used by sample.py, eval/ and training. Image i of a call gets its initial noise (and, for stochastic samplers, its
per-step noise) from `fold_in(PRNGKey(seed), i)`, so neither the batch size nor the device count changes any image
(up to float rounding in XLA's kernels: across device counts the odd uint8 value may differ by one). Batches are
split over the process's local devices.

Editing: `init_images` (in [-1, 1], at the model's image size) are encoded with the VAE (posterior mean) and
sampling starts `int(num_steps * strength)` steps before the end from them, noised (img2img); `masks` (1 = repaint,
0 = keep, at image resolution) additionally keep the known region on q(z_t | z_0) at every step (inpainting). A
latent pixel is repainted if any of the image pixels it covers is.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import lora as lora_lib
from diffusion import models, process, samplers
from diffusion import workdir as workdir_lib
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.images import to_uint8


class LatentDiffusionPipeline:
  """Holds the three networks, their params ({'unet', 'text', 'vae'}) and the tokenizer of one trained model."""

  def __init__(self, config: ml_collections.ConfigDict, params: dict, tokenizer: Any):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.step: int | None = None  # The checkpoint step of `params`, when loaded from a workdir.
    self.workdir: str | None = None
    self._replica: tuple[dict, dict] | None = None  # (params, their copy on every local device).
    self.unet = models.create_unet(config.model.unet)
    self.text_encoder = models.create_text_encoder(config.model.text)
    self.vae = models.create_vae(config.model.vae)
    self.schedule = process.get_noise_schedule(config.diffusion)
    self.scaling_factor = float(config.model.vae.scaling_factor)
    if self.scaling_factor <= 0:
      raise UserError('model.vae.scaling_factor is not set; it is computed at the start of stage-2 training')
    self.vae_factor = models.vae_downsample_factor(config.model.vae)
    latent = config.data.image_size // self.vae_factor
    self.latent_shape = (latent, latent, config.model.vae.latent_channels)

  @classmethod
  def from_workdir(cls, workdir: str, use_ema: bool = True, step: int | None = None) -> 'LatentDiffusionPipeline':
    """Loads config, tokenizer and (EMA) params of a stage-2 workdir; nothing else is needed. A LoRA-trained
    workdir (`config.lora.rank > 0`) gives its base's pipeline with the trained LoRA merged in once, under the
    workdir's own config (sampling settings), so every reader of a workdir samples base + LoRA."""
    config = workdir_lib.load_workdir_config(workdir, expect='ldm')
    if lora_lib.trains_lora(config):
      base = cls.from_workdir(config.base_workdir)
      trained, step = workdir_lib.load_trained_params(workdir, 'ema_params' if use_ema else 'params', step)
      params = lora_lib.merge(base.params, [lora_lib.with_alpha(trained, config.lora.alpha)], [1.0])
      # A run that added words (DreamBooth's new concept) saved its own tokenizer: the base's plus those words.
      tokenizer = workdir_lib.load_tokenizer(workdir) if workdir_lib.has_tokenizer(workdir) else base.tokenizer
      pipeline = cls(config, params, tokenizer)
      pipeline.step, pipeline.workdir = step, workdir
      return pipeline
    tokenizer = workdir_lib.load_tokenizer(workdir)
    trained, step = workdir_lib.load_trained_params(workdir, 'ema_params' if use_ema else 'params', step)
    vae_params = workdir_lib.load_frozen(workdir, 'vae')
    pipeline = cls(config, {'unet': trained['unet'], 'text': trained['text'], 'vae': vae_params}, tokenizer)
    pipeline.step, pipeline.workdir = step, workdir  # The step restored (past a damaged latest one).
    return pipeline

  def params_at(self, step: int) -> dict:
    """The pipeline's params with the trained (EMA) params of checkpoint `step` of its workdir in place (a LoRA
    workdir's factors merged into the base), for evaluating each checkpoint with one pipeline."""
    config = self.config
    trained, _ = workdir_lib.load_trained_params(self.workdir, 'ema_params', step)
    if lora_lib.trains_lora(config):
      base = workdir_lib.load_trained_params(config.base_workdir, 'ema_params')[0]
      base = {'unet': base['unet'], 'text': base['text'], 'vae': self.params['vae']}
      return lora_lib.merge(base, [lora_lib.with_alpha(trained, config.lora.alpha)], [1.0])
    return {**self.params, 'unet': trained['unet'], 'text': trained['text']}

  def reconstruct(self, images: np.ndarray, params: dict | None = None, batch_size: int = 32) -> np.ndarray:
    """uint8 reconstructions of uint8 images (N, H, W, 3) through this model's VAE (posterior mean)."""
    return reconstruct(self.vae, (params or self.params)['vae'], images, batch_size)

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Token ids of prompts; a word a word-level tokenizer does not know is a `UserError` (not a silent <unk>)."""
    tokenizer_lib.check_known_words(self.tokenizer, list(prompts), 'prompt')
    return tokenizer_lib.tokenize(self.tokenizer, list(prompts), self.config.data.max_text_length)

  def sampling_settings(self, **overrides: Any) -> samplers.SamplingSettings:
    """The config's sampling settings with the overrides that are not None (see `samplers.SamplingSettings`),
    checked against this model's schedule (a flow sampler for a diffusion model is a `UserError`)."""
    settings = samplers.SamplingSettings.from_config(self.config.sample, **overrides)
    settings.check_schedule(self.schedule)
    return settings

  def _encode_images(self, params: dict, images: jax.Array) -> jax.Array:
    mean, _ = self.vae.apply({'params': params['vae']}, images, method='encode')
    return mean * self.scaling_factor

  def _latent_mask(self, masks: jax.Array) -> jax.Array:
    """(B, H, W, 1) pixel masks -> (B, h, w, 1): 1 where any covered pixel is to be repainted."""
    b, h, w, _ = masks.shape
    f = self.vae_factor
    return masks.reshape(b, h // f, f, w // f, f, 1).max(axis=(2, 4))

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=('settings', 'strength'))
  def _generate(
    self,
    params: dict,
    cond_ids: jax.Array,
    uncond_ids: jax.Array,
    keys: jax.Array,
    init_images: jax.Array | None = None,
    masks: jax.Array | None = None,
    *,
    settings: samplers.SamplingSettings,
    strength: float,
  ) -> jax.Array:
    encode = lambda ids: self.text_encoder.apply({'params': params['text']}, ids)[0]
    cond, uncond = encode(cond_ids), encode(uncond_ids)
    model_fn = lambda x, t, ctx: self.unet.apply({'params': params['unet']}, x, t, ctx)
    denoise_fn = samplers.cfg_denoise_fn(
      model_fn,
      cond,
      uncond,
      settings.guidance_scale,
      settings.guidance_rescale,
      settings.model_time_interval(self.schedule.num_timesteps),
    )
    x_T = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    init_latents = None if init_images is None else self._encode_images(params, init_images)
    mask = None if masks is None else self._latent_mask(masks)
    z0 = samplers.get_sampler(settings.sampler)(
      denoise_fn,
      x_T,
      self.schedule,
      num_steps=settings.num_steps,
      rng=noise_keys,
      prediction_type=self.config.diffusion.prediction_type,
      init_latents=init_latents,
      strength=strength,
      mask=mask,
      **dict(settings.options),
    )
    images = self.vae.apply({'params': params['vae']}, z0 / self.scaling_factor, method='decode')
    return jnp.clip(images, -1.0, 1.0)

  def _editing_inputs(self, count: int, init_images: Any, masks: Any) -> tuple:
    """Checks and batches init images / masks (one for all or one per prompt)."""
    if init_images is None:
      return None, None
    size = self.config.data.image_size
    images = np.asarray(init_images, np.float32)
    images = np.broadcast_to(images, (count,) + images.shape) if images.ndim == 3 else images
    if images.shape != (count, size, size, 3):
      raise UserError(f'init images must be {size}x{size}x3 (one, or one per prompt), got {images.shape[1:]}')
    if masks is not None:
      masks = np.asarray(masks, np.float32)
      masks = masks[..., None] if masks.shape[-1] != 1 else masks
      masks = np.broadcast_to(masks, (count,) + masks.shape) if masks.ndim == 3 else masks
      if masks.shape[1:3] != images.shape[1:3]:
        raise UserError(f'the mask is {masks.shape[2]}x{masks.shape[1]} but the image is {size}x{size}')
    return images, masks

  def generate(
    self,
    prompts: Sequence[str],
    settings: samplers.SamplingSettings | None = None,
    *,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    params: dict | None = None,
    init_images: Any = None,
    masks: Any = None,
    strength: float | None = None,
    key_path: Sequence[int] = (),
  ) -> np.ndarray:
    """Returns uint8 images (N, H, W, 3), one per prompt; image n uses noise index `indices[n]` (default n).

    `key_path`: further indices folded into each image's key, in order (outpainting's windows draw their own noise
    so); the pipeline itself folds 1 into a key for its per-step noise, so paths start with another number.

    `settings`: how to sample (default: the config's, `sampling_settings()`), negative prompt included.
    `batch_size` images are sampled per call, split over the local devices; it never changes an image.
    `init_images` / `masks`: see the module docstring; `strength`: see `samplers.editing_strength`.
    """
    settings = self.sampling_settings() if settings is None else settings
    settings.check_schedule(self.schedule)
    strength = samplers.editing_strength(strength, init_images is not None, masks is not None)
    images, masks = self._editing_inputs(len(prompts), init_images, masks)
    if batch_size < 1:
      raise UserError(f'batch_size must be >= 1, got {batch_size}')
    indices = np.arange(len(prompts)) if indices is None else np.asarray(indices)
    root = jax.random.PRNGKey(seed)
    devices = jax.local_devices()
    params = self._replicated(params or self.params, devices)
    out = []
    for start in range(0, len(prompts), batch_size):
      chunk = slice(start, start + batch_size)
      count = len(indices[chunk])
      keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices[chunk]))
      for index in key_path:
        keys = jax.vmap(lambda k, i=index: jax.random.fold_in(k, i))(keys)
      inputs = {
        'cond_ids': self.tokenize(list(prompts[chunk])),
        'uncond_ids': self.tokenize([settings.negative_prompt] * count),
        'keys': keys,
      }
      if images is not None:
        inputs['init_images'] = images[chunk]
      if masks is not None:
        inputs['masks'] = masks[chunk]
      inputs = _shard_batch(inputs, devices)
      out.append(to_uint8(self._generate(params, settings=settings, strength=strength, **inputs))[:count])
    return np.concatenate(out)

  def _replicated(self, params: dict, devices: Sequence[Any]) -> dict:
    """`params` on every local device (once per params object), so batches can be split over the devices.

    `params` must be addressable by this process (a checkpoint restored here, or `parallel.host_local` of sharded
    training params, as the training loop does for its sample grids).
    """
    cached = self._replica
    if cached is None or cached[0] is not params:
      local = params
      if len(devices) > 1:
        local = jax.device_put(params, NamedSharding(Mesh(np.asarray(devices), ('batch',)), PartitionSpec()))
      self._replica = (params, local)
    return self._replica[1]


def _shard_batch(inputs: dict, devices: Sequence[Any]) -> dict:
  """Pads the batch to a multiple of the local device count and splits it over the devices (data parallel).

  Every image is computed from its own noise key alone, so the device count does not change any image.
  """
  if len(devices) == 1:
    return inputs
  mesh = Mesh(np.asarray(devices), ('batch',))
  sharding = NamedSharding(mesh, PartitionSpec('batch'))
  pad = -len(inputs['keys']) % len(devices)
  padded = {
    k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], pad, axis=0)]) if pad else np.asarray(v)
    for k, v in inputs.items()
  }
  return {k: jax.device_put(v, sharding) for k, v in padded.items()}


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_decode(vae: Any, params: Any, images: jax.Array) -> jax.Array:
  mean, _ = vae.apply({'params': params}, images, method='encode')
  return jnp.clip(vae.apply({'params': params}, mean, method='decode'), -1.0, 1.0)


def reconstruct(vae: Any, params: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """uint8 reconstructions (posterior mean, decoded) of uint8 images (N, H, W, 3); batches padded to `batch_size`, so
  one shape compiles once."""
  images = np.asarray(images)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    pad = batch_size - len(chunk)
    x = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    out.append(to_uint8(_encode_decode(vae, params, jnp.asarray(x, jnp.float32) / 127.5 - 1.0))[: len(chunk)])
  return np.concatenate(out)


class AutoencoderPipeline:
  """A stage-1 model (AutoencoderKL) and its params: what reconstruction evaluators need of a VAE workdir."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any):
    self.config, self.params = config, params
    self.vae = models.create_vae(config.model.vae)
    self.step: int | None = None
    self.workdir: str | None = None

  @classmethod
  def from_workdir(cls, workdir: str, use_ema: bool = True, step: int | None = None) -> 'AutoencoderPipeline':
    config = workdir_lib.load_workdir_config(workdir, expect='vae')
    params, step = workdir_lib.load_trained_params(workdir, 'ema_params' if use_ema else 'params', step)
    pipeline = cls(config, params)
    pipeline.step, pipeline.workdir = step, workdir
    return pipeline

  def params_at(self, step: int) -> Any:
    """The EMA params of checkpoint `step` of the workdir."""
    return workdir_lib.load_trained_params(self.workdir, 'ema_params', step)[0]

  def reconstruct(self, images: np.ndarray, params: Any = None, batch_size: int = 32) -> np.ndarray:
    """uint8 reconstructions of uint8 images. `params`: the VAE's (extra top-level entries, such as the frozen
    parts a training run passes beside them, are not read)."""
    return reconstruct(self.vae, self.params if params is None else params, images, batch_size)


def load_pipeline(workdir: str) -> 'LatentDiffusionPipeline | AutoencoderPipeline':
  """The pipeline of a workdir of either stage (by its config's model_type), with its latest EMA params."""
  config = workdir_lib.load_workdir_config(workdir)
  if config.get('model_type') == 'vae':
    return AutoencoderPipeline.from_workdir(workdir)
  return LatentDiffusionPipeline.from_workdir(workdir)
