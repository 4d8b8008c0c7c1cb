"""Stage 1: the AutoencoderKL task, as latent diffusion trains it: reconstruction (+ LPIPS) as taming's NLL + KL;
PSNR, L1 (and LPIPS) on held-out images.

With `loss.perceptual_weight` > 0 the LPIPS network (`diffusion.models.lpips`; weights from `loss.vgg_weights` and
`loss.lpips_weights`, or 'random') is a frozen part of the task (`frozen['lpips']`): read at every start, never
trained or saved.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import losses, models
from diffusion.images import make_grid, to_uint8
from diffusion.interop import lpips as lpips_weights
from diffusion.models import lpips
from diffusion.training.state import with_compute_dtype
from diffusion.training.task import TASKS, Batches, resolved_copy


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


@TASKS.register('vae')
class VAETask:
  """The task protocol (`diffusion.training.task.Task`) for stage 1: params, loss, eval metrics and a picture."""

  name = 'vae'
  frozen_param_groups: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = resolved_copy(config)
    self.workdir = workdir
    self.vae = models.create_vae(with_compute_dtype(self.config.model.vae, self.config.train))
    self.tokenizer = None
    self.frozen = {}
    self.lpips = None
    loss = self.config.loss
    if loss.get('perceptual_weight', 0.0) > 0:
      net = loss.get('lpips_net', 'vgg')
      self.lpips = lpips.LPIPS(net, dtype=jnp.dtype(with_compute_dtype(self.config.model.vae, self.config.train).dtype))
      self.frozen['lpips'] = lpips_weights.load_params(
        loss.get('vgg_weights', ''),
        loss.get('lpips_weights', ''),
        net,
        backbone_key='loss.vgg_weights',
        head_key='loss.lpips_weights',
      )
    self._held_out = None

  def built_on(self) -> dict[str, Any]:
    return {}  # A VAE is trained from scratch (or from `init_from`, which the loop handles).

  def calibrate(self, batches: Batches) -> str | None:
    del batches
    return None

  def init_params(self, rng: jax.Array) -> Any:
    size = self.config.data.image_size
    x = jnp.zeros((1, size, size, self.config.model.vae.in_channels), jnp.float32)
    return self.vae.init({'params': rng}, x, rng)['params']

  def _perceptual(self, frozen: Any, x: jax.Array, rec: jax.Array) -> jax.Array | None:
    """Per-example LPIPS(x, rec) (B,), float32; None without the perceptual term."""
    if self.lpips is None:
      return None
    return self.lpips.apply({'params': frozen['lpips']}, x, rec).astype(jnp.float32)

  def loss_fn(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, step: jax.Array):
    del step
    x = batch['image']
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # Losses in float32 whatever the compute dtype.
    mean, logvar = f32(self.vae.apply({'params': params}, x, method='encode'))
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)  # Per-example draws.
    rec = f32(self.vae.apply({'params': params}, mean + jnp.exp(0.5 * logvar) * noise, method='decode'))
    loss_cfg = self.config.loss
    loss, metrics = losses.vae_loss(
      x,
      rec,
      mean,
      logvar,
      kl_weight=loss_cfg.kl_weight,
      rec_loss=loss_cfg.rec_loss,
      perceptual=self._perceptual(frozen, x, rec),
      perceptual_weight=loss_cfg.get('perceptual_weight', 0.0),
    )
    metrics = {k: v for k, v in metrics.items() if k != 'loss'}
    metrics['psnr'] = jnp.mean(psnr(x, rec))
    return loss, metrics

  def eval_step(self, params: Any, frozen: Any, batch: dict, keys: jax.Array) -> dict:
    del keys  # Reconstructions from the posterior mean: no randomness.
    x = batch['image']
    mean, _ = self.vae.apply({'params': params}, x, method='encode')
    rec = self.vae.apply({'params': params}, mean, method='decode')
    metrics = {'psnr': jnp.mean(psnr(x, rec)), 'l1': jnp.mean(jnp.abs(jnp.clip(rec, -1, 1) - x))}
    if self.lpips is not None:
      metrics['lpips'] = jnp.mean(self._perceptual(frozen, x, jnp.clip(rec, -1, 1)))
    return metrics

  def prepare_sampling(self, held_out: Callable[[], dict]) -> None:
    """Keeps the first 8 images of the held-out batch: the grid shows the same images at every step."""
    self._held_out = np.asarray(held_out()['image'][:8])

  def sample_grid(self, params: Any, frozen: Any) -> tuple[np.ndarray, str]:
    """Originals (top row) above their reconstructions from the posterior mean (bottom row)."""
    del frozen
    x = self._held_out
    mean, _ = self.vae.apply({'params': params}, x, method='encode')
    rec = self.vae.apply({'params': params}, mean, method='decode')
    images = np.concatenate([to_uint8(x), to_uint8(rec)])
    return make_grid(images, ncols=len(x)), 'top: held-out images, bottom: reconstructions'

  def sampling_pipeline(self) -> None:
    return None  # Reconstructs; generates nothing from text.

  def meta(self) -> dict:
    return {'model_type': 'vae'}
