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
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion import models, process, samplers
from diffusion import workdir as workdir_lib
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.images import to_uint8

# Sampler options the config's sample section supplies (each passed only to samplers that take it).
CONFIG_OPTIONS = ('eta', 'karras', 'timestep_spacing', 's_churn')


class SamplingPlan(NamedTuple):
  """Everything static about one sampling call (hashable: one compile per plan and batch shape)."""

  sampler: str
  num_steps: int
  guidance_scale: float
  guidance_rescale: float = 0.0
  guidance_interval: tuple[float, float] | None = None  # In model-time units.
  strength: float = 1.0
  options: tuple[tuple[str, Any], ...] = ()


def sampler_options(name: str, config_sample: Any, explicit: dict[str, Any]) -> dict[str, Any]:
  """The options for sampler `name`: the config's (those it takes; '' spacing = the sampler's default), then the
  explicit ones (not None), each of which must be an option of that sampler."""
  accepted = samplers.sampler_info(name).options
  options = {}
  for key in CONFIG_OPTIONS:
    value = config_sample.get(key) if config_sample is not None else None
    if key in accepted and value not in (None, ''):
      options[key] = value
  for key, value in explicit.items():
    if value is None:
      continue
    if key not in accepted:
      raise UserError(f'sampler {name!r} has no option {key!r}; its options: {", ".join(accepted)}')
    options[key] = value
  return options


class LatentDiffusionPipeline:
  """Holds the three networks, their params ({'unet', 'text', 'vae'}) and the tokenizer of one trained model."""

  def __init__(self, config: ml_collections.ConfigDict, params: dict, tokenizer: Any):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.step: int | None = None  # The checkpoint step of `params`, when loaded from a workdir.
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
    """Loads config, tokenizer and (EMA) params of a stage-2 workdir; nothing else is needed."""
    config = workdir_lib.load_workdir_config(workdir, expect='ldm')
    tokenizer = workdir_lib.load_tokenizer(workdir)
    trained, step = workdir_lib.load_trained_params(workdir, 'ema_params' if use_ema else 'params', step)
    vae_params = workdir_lib.load_frozen(workdir, 'vae')
    pipeline = cls(config, {'unet': trained['unet'], 'text': trained['text'], 'vae': vae_params}, tokenizer)
    pipeline.step = step  # The step restored (past a damaged latest one).
    return pipeline

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return tokenizer_lib.tokenize(self.tokenizer, list(prompts), self.config.data.max_text_length)

  def plan(self, sampler: str | None = None, num_steps: int | None = None, guidance_scale: float | None = None,
           guidance_rescale: float | None = None, guidance_interval: Sequence[float] | None = None,
           strength: float = 1.0, **options: Any) -> SamplingPlan:
    """The sampling plan from the config's sample section, overridden by the arguments that are not None.

    `options` are sampler options (eta, karras, timestep_spacing, s_churn, ...); one the sampler does not take
    is a `UserError`, as is a sampler of the other family than the model. `guidance_interval` is a fraction of
    the training time range, (0, 1) = everywhere.
    """
    s = self.config.sample
    name = sampler or s.sampler
    why = samplers.family_error(name, self.schedule)  # Unknown names fail here too, before compiling.
    if why:
      raise UserError(why)
    num_steps = int(num_steps or s.num_steps)
    if num_steps < 1:
      raise UserError(f'num_steps must be >= 1, got {num_steps}')
    lo, hi = (float(v) for v in (s.get('guidance_interval', (0.0, 1.0)) if guidance_interval is None
                                 else guidance_interval))
    if not 0.0 <= lo <= hi <= 1.0:
      raise UserError(f'guidance_interval must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})')
    num = self.schedule.num_timesteps
    return SamplingPlan(
        sampler=name, num_steps=num_steps,
        guidance_scale=float(s.guidance_scale if guidance_scale is None else guidance_scale),
        guidance_rescale=float(s.get('guidance_rescale', 0.0) if guidance_rescale is None else guidance_rescale),
        guidance_interval=None if (lo, hi) == (0.0, 1.0) else (lo * num, hi * num), strength=float(strength),
        options=tuple(sorted(sampler_options(name, s, options).items())))

  def _encode_images(self, params: dict, images: jax.Array) -> jax.Array:
    mean, _ = self.vae.apply({'params': params['vae']}, images, method='encode')
    return mean * self.scaling_factor

  def _latent_mask(self, masks: jax.Array) -> jax.Array:
    """(B, H, W, 1) pixel masks -> (B, h, w, 1): 1 where any covered pixel is to be repainted."""
    b, h, w, _ = masks.shape
    f = self.vae_factor
    return masks.reshape(b, h // f, f, w // f, f, 1).max(axis=(2, 4))

  @functools.partial(jax.jit, static_argnums=(0,), static_argnames=('plan',))
  def _generate(self, params: dict, cond_ids: jax.Array, uncond_ids: jax.Array, keys: jax.Array,
                init_images: jax.Array | None = None, masks: jax.Array | None = None, *,
                plan: SamplingPlan) -> jax.Array:
    encode = lambda ids: self.text_encoder.apply({'params': params['text']}, ids)[0]
    cond, uncond = encode(cond_ids), encode(uncond_ids)
    model_fn = lambda x, t, ctx: self.unet.apply({'params': params['unet']}, x, t, ctx)
    denoise_fn = samplers.cfg_denoise_fn(model_fn, cond, uncond, plan.guidance_scale, plan.guidance_rescale,
                                         plan.guidance_interval)
    x_T = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    init_latents = None if init_images is None else self._encode_images(params, init_images)
    mask = None if masks is None else self._latent_mask(masks)
    z0 = samplers.get_sampler(plan.sampler)(
        denoise_fn, x_T, self.schedule, num_steps=plan.num_steps, rng=noise_keys,
        prediction_type=self.config.diffusion.prediction_type, init_latents=init_latents, strength=plan.strength,
        mask=mask, **dict(plan.options))
    images = self.vae.apply({'params': params['vae']}, z0 / self.scaling_factor, method='decode')
    return jnp.clip(images, -1.0, 1.0)

  def _editing_inputs(self, count: int, init_images: Any, masks: Any, strength: float | None) -> tuple:
    """Checks and batches init images / masks (one for all or one per prompt); returns them and the strength."""
    if init_images is None:
      if masks is not None or strength not in (None, 1.0):
        raise UserError('a mask or a strength < 1 needs an init image')
      return None, None, 1.0
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
    return images, masks, float((1.0 if masks is not None else 0.8) if strength is None else strength)

  def generate(self, prompts: Sequence[str], *, negative_prompt: str = '', seed: int = 0,
               indices: Sequence[int] | None = None, batch_size: int = 64, params: dict | None = None,
               init_images: Any = None, masks: Any = None, strength: float | None = None,
               **settings: Any) -> np.ndarray:
    """Returns uint8 images (N, H, W, 3), one per prompt; image n uses noise index `indices[n]` (default n).

    `settings` are those of `plan` (sampler, num_steps, guidance_scale, guidance_rescale, guidance_interval and
    sampler options such as eta, karras, timestep_spacing). `init_images` / `masks`: see the module docstring;
    `strength` defaults to 0.8 for img2img and 1.0 for inpainting.
    """
    images, masks, strength = self._editing_inputs(len(prompts), init_images, masks, strength)
    plan = self.plan(strength=strength, **settings)
    indices = np.arange(len(prompts)) if indices is None else np.asarray(indices)
    root = jax.random.PRNGKey(seed)
    devices = jax.local_devices()
    per_call = batch_size * len(devices)
    params = self._replicated(params or self.params, devices)
    out = []
    for start in range(0, len(prompts), per_call):
      chunk = slice(start, start + per_call)
      count = len(indices[chunk])
      keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices[chunk]))
      inputs = {'cond_ids': self.tokenize(list(prompts[chunk])),
                'uncond_ids': self.tokenize([negative_prompt] * count), 'keys': keys}
      if images is not None:
        inputs['init_images'] = images[chunk]
      if masks is not None:
        inputs['masks'] = masks[chunk]
      inputs = _shard_batch(inputs, devices)
      out.append(to_uint8(self._generate(params, plan=plan, **inputs))[:count])
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
  padded = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], pad, axis=0)]) if pad else np.asarray(v)
            for k, v in inputs.items()}
  return {k: jax.device_put(v, sharding) for k, v in padded.items()}
