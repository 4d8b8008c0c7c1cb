"""Training losses: the diffusion loss (with registered per-timestep weightings) and the VAE loss.

Both are pure functions of arrays, so train steps can jit, shard and differentiate them freely. The
diffusion loss returns one value per example; the caller averages (and may mask) it.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from diffusion import process
from diffusion.errors import ConfigError
from diffusion.registry import Registry

Array = jax.Array
DiffusionLossFn = Callable[[Array, Array, Array, Array, process.NoiseSchedule], Array]

# ----------------------------------------------------------------------------------------------------------
# Diffusion loss.

# A weighting factory: (diffusion_config, prediction_type) -> ((alpha, sigma) (B,) -> weight (B,)).
WeightFn = Callable[[Array, Array], Array]
WeightingFactory = Callable[[Mapping[str, Any], str], WeightFn]
WEIGHTINGS: Registry[WeightingFactory] = Registry('loss weighting')


def register_loss_weighting(name: str) -> Callable[[WeightingFactory], WeightingFactory]:
  """Registers a per-timestep loss weighting under `name` (raises on a duplicate)."""
  return WEIGHTINGS.register(name)


def available_loss_weightings() -> list[str]:
  return WEIGHTINGS.names()


def _on_x0_error(prediction_type: str, scaled_x0_weight: WeightFn, at_zero: float = 1.0) -> WeightFn:
  """The weight on the target's error that puts w(alpha, sigma) on the x0 error, given sigma^2 w.

  |target - output|^2 = (g / sigma^2) |x0 - x0_hat|^2 (g = `process.x0_error_scale`), so the weight is
  sigma^2 w / g, finite where sigma = 0; where g is 0 (eps prediction at SNR 0) the weight is `at_zero`.
  """

  def weight(alpha: Array, sigma: Array) -> Array:
    scale = process.x0_error_scale(prediction_type, alpha, sigma)
    ok = scale > 0
    return jnp.where(ok, scaled_x0_weight(alpha, sigma) / jnp.where(ok, scale, 1.0), at_zero)

  return weight


@register_loss_weighting('uniform')
def _uniform(diffusion_config: Mapping[str, Any], prediction_type: str) -> WeightFn:
  """Plain MSE to the training target (the usual 'simple' loss of whatever the network predicts)."""
  del diffusion_config, prediction_type
  return lambda alpha, sigma: jnp.ones_like(alpha * sigma)


@register_loss_weighting('min_snr')
def _min_snr(diffusion_config: Mapping[str, Any], prediction_type: str) -> WeightFn:
  """Min-SNR-gamma (Hang et al. 2023): weight min(snr, gamma) on the x0 error, whatever the target.

  For eps that is min(snr, gamma) / snr on the eps error, for v min(snr, gamma) / (snr + 1); for eps at
  snr = 0 it is the limit 1.
  """
  gamma = float(diffusion_config.get('min_snr_gamma', 5.0))
  if gamma <= 0:
    raise ConfigError('diffusion.min_snr_gamma', f'must be > 0, got {gamma}')
  # sigma^2 min(snr, gamma) = min(alpha^2, gamma sigma^2).
  return _on_x0_error(prediction_type, lambda a, s: jnp.minimum(jnp.square(a), gamma * jnp.square(s)))


@register_loss_weighting('edm')
def _edm(diffusion_config: Mapping[str, Any], prediction_type: str) -> WeightFn:
  """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error (Karras et al. 2022).

  sigma is the VE noise level sigma_t / alpha_t. With sigma_data = 1 and v prediction this is the uniform loss
  (v prediction is EDM's preconditioning at sigma_data = 1).
  """
  sd = float(diffusion_config.get('edm_sigma_data', 0.5))
  if sd <= 0:
    raise ConfigError('diffusion.edm_sigma_data', f'must be > 0, got {sd}')
  # sigma_t^2 lambda = (sigma_t^2 + sd^2 alpha_t^2) / sd^2 (VE sigma = sigma_t / alpha_t).
  return _on_x0_error(prediction_type, lambda a, s: (jnp.square(s) + sd**2 * jnp.square(a)) / sd**2)


@register_loss_weighting('v_loss')
def _v_loss(diffusion_config: Mapping[str, Any], prediction_type: str) -> WeightFn:
  """The squared error of the implied v prediction (snr + 1 on the x0 error), whatever the network predicts."""
  del diffusion_config
  return _on_x0_error(prediction_type, lambda a, s: process.x0_error_scale('v', a, s))


def get_diffusion_loss_fn(diffusion_config: Mapping[str, Any]) -> DiffusionLossFn:
  """loss_fn(output, x0, noise, t, schedule) -> (B,) weighted mean squared error to the training target.

  `output` is the raw network output at x_t = q_sample(schedule, x0, noise, t); the target and the weighting
  follow `diffusion_config.prediction_type` and `diffusion_config.loss_weighting`.
  """
  prediction_type = diffusion_config.get('prediction_type', 'eps')
  process.get_prediction_type(prediction_type)  # Fails early on an unknown type.
  name = diffusion_config.get('loss_weighting', 'uniform')
  if name not in WEIGHTINGS:
    raise ConfigError('diffusion.loss_weighting', WEIGHTINGS.unknown(name))
  weight_fn = WEIGHTINGS.get(name)(diffusion_config, prediction_type)

  def loss_fn(output: Array, x0: Array, noise: Array, t: Array, schedule: process.NoiseSchedule) -> Array:
    target = process.training_target(prediction_type, x0, noise, t, schedule)
    error = jnp.square(output.astype(jnp.float32) - target)
    per_example = jnp.mean(error.reshape(error.shape[0], -1), axis=1)
    return per_example * weight_fn(*process.alpha_sigma(schedule, t))

  return loss_fn


def noised_example(
  t_rng: Array, noise_rng: Array, x0: Array, schedule: process.NoiseSchedule, offset_noise: float = 0.0
) -> tuple[Array, Array, Array]:
  """One training example's (x_t, t, noise) for clean latents `x0` (H, W, C): t from the schedule's training
  distribution (`process.sample_timestep`), noise with the optional offset. vmap it over per-example keys."""
  t = process.sample_timestep(schedule, t_rng)
  noise = sample_noise(noise_rng, (1,) + x0.shape, offset_noise)[0]
  x_t = process.q_sample(schedule, x0[None], noise[None], t[None])[0]
  return x_t, t, noise


def sample_noise(rng: Array, shape: Sequence[int], offset_noise: float = 0.0, dtype: jnp.dtype = jnp.float32) -> Array:
  """N(0, I) noise of `shape` (B, ..., C) plus `offset_noise` * N(0, 1) per (example, channel).

  The offset (shared by all positions of a channel) lets the model learn to change the mean brightness.
  The N(0, I) part does not depend on `offset_noise`, so changing the strength changes only the offset.
  """
  noise_rng, offset_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, shape, jnp.float32)
  if offset_noise:
    offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = noise + offset_noise * jax.random.normal(offset_rng, offset_shape, jnp.float32)
  return noise.astype(dtype)


# ----------------------------------------------------------------------------------------------------------
# VAE loss.

_RECONSTRUCTION = {'l1': jnp.abs, 'l2': jnp.square}


def _per_example_sum(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def vae_loss(
  x: Array,
  reconstruction: Array,
  mean: Array,
  logvar: Array,
  *,
  kl_weight: float,
  rec_loss: str = 'l1',
  perceptual: Array | None = None,
  perceptual_weight: float = 0.0,
  nll_logvar: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """The LDM autoencoder loss: reconstruction (+ perceptual) as taming's NLL, + kl_weight * KL(q(z|x) || N(0, I)).

  As in LDM (taming's `LPIPSWithDiscriminator`), the per-pixel term is |x - x_rec| + perceptual_weight * LPIPS
  (the example's LPIPS `perceptual` (B,) added at every pixel), divided by exp(nll_logvar) plus nll_logvar (the
  learned log-variance; None: 0, the plain sum), summed over each example's pixels and averaged over the batch;
  the KL is summed over latent dims, so LDM's weights (kl_weight 1e-6, perceptual_weight 1.0) mean the same here.
  Metrics: 'rec_loss' (mean per pixel, as LDM logs it), 'kl' (per example), 'perceptual', 'nll', 'loss'.
  """
  if rec_loss not in _RECONSTRUCTION:
    raise ConfigError('loss.rec_loss', f'unknown reconstruction loss {rec_loss!r}; known: {", ".join(_RECONSTRUCTION)}')
  x = x.astype(jnp.float32)
  error = _RECONSTRUCTION[rec_loss](x - reconstruction.astype(jnp.float32))
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  kl = 0.5 * _per_example_sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  metrics = {'rec_loss': jnp.mean(error), 'kl': jnp.mean(kl)}
  pixel = error
  if perceptual is not None:
    metrics['perceptual'] = jnp.mean(perceptual)
    pixel = pixel + perceptual_weight * perceptual.astype(jnp.float32).reshape((-1,) + (1,) * (error.ndim - 1))
  if nll_logvar is not None:
    pixel = pixel / jnp.exp(nll_logvar) + nll_logvar
  metrics['nll'] = jnp.mean(_per_example_sum(pixel))
  loss = metrics['nll'] + kl_weight * metrics['kl']
  metrics['loss'] = loss
  return loss, metrics


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """taming's hinge discriminator loss: (mean relu(1 - real) + mean relu(1 + fake)) / 2."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """taming's vanilla (non-saturating BCE) discriminator loss: (mean softplus(-real) + mean softplus(fake)) / 2."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES = {'hinge': hinge_d_loss, 'vanilla': vanilla_d_loss}


def generator_loss(logits_fake: Array) -> Array:
  """taming's generator term: -mean D(x_rec) (for both discriminator losses)."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: Any, gan_grad: Any, weight: float = 1.0) -> Array:
  """taming's lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4), clamped to [0, 1e4], detached, times `weight`
  (loss.adversarial_weight); the gradients are those w.r.t. the decoder's last layer."""
  norm = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))
  d_weight = jnp.clip(norm(nll_grad) / (norm(gan_grad) + 1e-4), 0.0, 1e4)
  return jax.lax.stop_gradient(d_weight) * weight


def disc_factor(step: Array, disc_start: int) -> Array:
  """taming's adopt_weight: 1 from step `disc_start` on (loss.disc_start), 0 before."""
  return jnp.where(step >= disc_start, 1.0, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Config checks.

LPIPS_NETS = ('vgg', 'alex')


def _validate_vae_loss(loss: Mapping[str, Any]) -> None:
  if loss['rec_loss'] not in _RECONSTRUCTION:
    raise ConfigError('loss.rec_loss', f'unknown {loss["rec_loss"]!r}; known: {", ".join(_RECONSTRUCTION)}')
  for key in ('kl_weight', 'perceptual_weight', 'adversarial_weight'):
    if not loss.get(key, 0.0) >= 0:
      raise ConfigError(f'loss.{key}', f'must be >= 0, got {loss[key]!r}')
  if loss.get('perceptual_weight', 0.0) > 0 and loss.get('lpips_net', 'vgg') not in LPIPS_NETS:
    raise ConfigError('loss.lpips_net', f'unknown {loss["lpips_net"]!r}; known: {", ".join(LPIPS_NETS)}')
  if loss.get('disc_loss', 'hinge') not in DISC_LOSSES:
    raise ConfigError('loss.disc_loss', f'unknown {loss["disc_loss"]!r}; known: {", ".join(DISC_LOSSES)}')
  start = loss.get('disc_start', 0)
  if not (isinstance(start, int) and not isinstance(start, bool) and start >= 0):
    raise ConfigError('loss.disc_start', f'must be an integer step >= 0, got {start!r}')


def validate_config(config: Mapping[str, Any]) -> None:
  """Checks the loss keys: `config.loss` for stage 1 (vae), `diffusion.loss_weighting` and its parameters for
  stage 2 (ldm). Raises `ConfigError` naming the key. (The LPIPS weight files are read, and checked, when the VAE
  task is built: still before anything is compiled.)"""
  if config['model_type'] == 'vae':
    _validate_vae_loss(config['loss'])
  if config['model_type'] == 'ldm':
    get_diffusion_loss_fn(config['diffusion'])  # Checks the weighting, min_snr_gamma and edm_sigma_data.
