"""Stage 1: the AutoencoderKL task, as latent diffusion trains it (taming's `LPIPSWithDiscriminator`):
reconstruction (+ LPIPS) as an NLL with a log-variance, + KL, + an adaptively weighted PatchGAN term; PSNR, L1 (and
LPIPS) on held-out images.

With `loss.perceptual_weight` > 0 the LPIPS network (`diffusion.models.lpips`; weights from `loss.vgg_weights` and
`loss.lpips_weights`, or 'random') is a frozen part of the task (`frozen['lpips']`): read at every start, never
trained or saved. With `loss.adversarial_weight` > 0 the discriminator (`model.disc`) and, with `loss.learn_logvar`,
the NLL's log-variance are the task's auxiliary networks (`state.AuxNetworks`): trained beside the VAE with their own
Adam (the autoencoder's `config.optim` settings, as LDM uses the same for both), checkpointed, not EMA'd, and not in
the params that stage 2 and the exporters read.

The autoencoder and the discriminator update in the same step from one gradient: the generator term sees the
discriminator through stop_gradient, the discriminator's hinge / vanilla loss sees the images through stop_gradient.
(taming alternates two optimizer steps on the same batch, so its discriminator sees the reconstructions of the
already-updated autoencoder; here both see this step's.) The adaptive weight is taming's, from the gradients of the
NLL and of the generator term w.r.t. the decoder's last layer (`decoder/conv_out/kernel`), per micro-batch under
gradient accumulation.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import losses, models
from diffusion.errors import ConfigError
from diffusion.images import make_grid, to_uint8
from diffusion.interop import lpips as lpips_weights
from diffusion.models import discriminator, lpips
from diffusion.pipeline import AutoencoderPipeline
from diffusion.training.state import AuxNetworks, create_optimizer, with_compute_dtype
from diffusion.training.task import TASKS, Batches, resolved_copy

LAST_LAYER = ('decoder', 'conv_out', 'kernel')  # The layer taming's adaptive weight takes gradients at.
ENCODER_GROUPS = ('encoder', 'quant_conv')  # What `train.freeze_encoder` leaves alone: x -> q(z|x) stays the same.


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def _with_last_layer(params: Any, kernel: jax.Array) -> Any:
  decoder = params['decoder']
  return {**params, 'decoder': {**decoder, 'conv_out': {**decoder['conv_out'], 'kernel': kernel}}}


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
    if self.config.train.get('freeze_encoder', False):  # SD's ft-EMA / ft-MSE: the latent space stays valid.
      if not self.config.get('init_from'):
        raise ConfigError('train.freeze_encoder', 'needs config.init_from: the VAE workdir whose decoder to fine-tune')
      self.frozen_param_groups = ENCODER_GROUPS
    self.disc = None
    if loss.get('adversarial_weight', 0.0) > 0:
      d = self.config.model.disc
      self.disc = discriminator.NLayerDiscriminator(d.num_layers, d.channels, dtype=self.vae.dtype)
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

  def aux_networks(self) -> AuxNetworks | None:
    """The discriminator ('disc') and the learned NLL log-variance ('logvar'), when the config asks for them."""
    loss, size = self.config.loss, self.config.data.image_size
    if self.disc is None and not loss.get('learn_logvar', False):
      return None
    image = jnp.zeros((1, size, size, self.config.model.vae.out_channels), jnp.float32)

    def init(rng: jax.Array) -> dict:
      aux = {}
      if self.disc is not None:
        aux['disc'] = self.disc.init(rng, image)['params']
      if loss.get('learn_logvar', False):
        aux['logvar'] = jnp.full((), loss.get('logvar_init', 0.0), jnp.float32)
      return aux

    return AuxNetworks(init, create_optimizer(self.config.optim, self.config.train.num_steps))

  def _nll_logvar(self, aux: dict) -> jax.Array | None:
    """taming's log-variance of the NLL: learned (aux), fixed at loss.logvar_init, or None (0: the plain sum)."""
    if 'logvar' in aux:
      return aux['logvar']
    init = self.config.loss.get('logvar_init', 0.0)
    return jnp.asarray(init, jnp.float32) if init else None

  def _perceptual(self, frozen: Any, x: jax.Array, rec: jax.Array) -> jax.Array | None:
    """Per-example LPIPS(x, rec) (B,), float32; None without the perceptual term."""
    if self.lpips is None:
      return None
    return self.lpips.apply({'params': frozen['lpips']}, x, rec).astype(jnp.float32)

  def loss_fn(self, params: Any, frozen: Any, batch: dict, keys: jax.Array, step: jax.Array):
    x = batch['image']
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # Losses in float32 whatever the compute dtype.
    mean, logvar = f32(self.vae.apply({'params': params}, x, method='encode'))
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)  # Per-example draws.
    z = mean + jnp.exp(0.5 * logvar) * noise
    aux = frozen.get('aux', {})
    loss_cfg = self.config.loss

    def autoencoder_terms(last: jax.Array):
      rec = f32(self.vae.apply({'params': _with_last_layer(params, last)}, z, method='decode'))
      loss, metrics = losses.vae_loss(
        x,
        rec,
        mean,
        logvar,
        kl_weight=loss_cfg.kl_weight,
        rec_loss=loss_cfg.rec_loss,
        perceptual=self._perceptual(frozen, x, rec),
        perceptual_weight=loss_cfg.get('perceptual_weight', 0.0),
        nll_logvar=self._nll_logvar(aux),
      )
      if self.disc is None:
        return (metrics['nll'], jnp.zeros(())), (rec, loss, metrics)
      logits_fake = self.disc.apply({'params': jax.lax.stop_gradient(aux['disc'])}, rec)
      return (metrics['nll'], losses.generator_loss(logits_fake)), (rec, loss, metrics)

    last = params[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]
    if self.disc is None:
      _, (rec, loss, metrics) = autoencoder_terms(last)
    else:
      loss, rec, metrics = self._adversarial(autoencoder_terms, last, aux, x, step)
    metrics = {k: v for k, v in metrics.items() if k != 'loss'}
    metrics['psnr'] = jnp.mean(psnr(x, rec))
    return loss, metrics

  def _adversarial(self, autoencoder_terms: Callable, last: jax.Array, aux: dict, x: jax.Array, step: jax.Array):
    """(autoencoder loss + lambda * factor * generator term + the discriminator's loss, reconstructions, metrics)."""
    loss_cfg = self.config.loss
    (nll, g_loss), vjp, (rec, ae_loss, metrics) = jax.vjp(autoencoder_terms, last, has_aux=True)
    (nll_grad,), (gan_grad,) = vjp((jnp.ones(()), jnp.zeros(()))), vjp((jnp.zeros(()), jnp.ones(())))
    d_weight = losses.adaptive_weight(nll_grad, gan_grad, loss_cfg.adversarial_weight)
    factor = losses.disc_factor(step, loss_cfg.get('disc_start', 0))
    ae_loss = ae_loss + d_weight * factor * g_loss
    # The discriminator's own loss, on images it cannot move (real and fake: separate calls, as taming).
    logits_real = self.disc.apply({'params': aux['disc']}, jax.lax.stop_gradient(x))
    logits_fake = self.disc.apply({'params': aux['disc']}, jax.lax.stop_gradient(rec))
    d_loss = factor * losses.DISC_LOSSES[loss_cfg.get('disc_loss', 'hinge')](logits_real, logits_fake)
    metrics = {
      **metrics,
      'ae_loss': ae_loss,
      'g_loss': g_loss,
      'd_loss': d_loss,
      'd_weight': d_weight,
      'disc_factor': factor,
      'logits_real': jnp.mean(logits_real),
      'logits_fake': jnp.mean(logits_fake),
    }
    del nll
    return ae_loss + d_loss, rec, metrics

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

  def sampling_params(self, params: Any, frozen: Any) -> dict:
    return {**params, **frozen}  # The VAE's params; the frozen parts beside them are not read.

  def sampling_pipeline(self) -> AutoencoderPipeline:
    """What reconstruction evaluators (`config.evals`: psnr, ssim, lpips, rfid) reconstruct held-out images with."""
    return AutoencoderPipeline(self.config, None)

  def meta(self) -> dict:
    return {'model_type': 'vae'}
