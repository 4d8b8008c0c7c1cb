"""The diffusion process: noise schedules, q(x_t | x_0), and the one place that converts predictions.

Discrete-time variance-preserving process with `T = num_train_timesteps` steps, in diffusers' units:

  x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t])

for integer `t` in [0, T-1]. Schedules are defined exactly like diffusers' `beta_schedule` options (computed in
float64, stored as float32) so that weights trained with either framework see the same process.

A network's raw output is turned into eps / x0 / v by `convert_prediction` only (samplers and losses never
re-derive these relations), and `training_target` says what a network of each prediction type should output.
Both are driven by a registry of prediction types, so new parametrizations are one registration away.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.errors import ConfigError

Array = jax.Array


@flax.struct.dataclass
class NoiseSchedule:
  """The discrete noise schedule: float32 arrays of length T (T is static: the arrays' shape)."""

  betas: Array
  alphas_cumprod: Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def alphas(self) -> Array:
    return 1.0 - self.betas


# ----------------------------------------------------------------------------------------------------------
# Schedules.

BetaFn = Callable[[int, float, float], np.ndarray]
_SCHEDULES: dict[str, BetaFn] = {}


def register_schedule(name: str) -> Callable[[BetaFn], BetaFn]:
  """Registers `fn(num_train_timesteps, beta_start, beta_end) -> float64 betas` under `name`."""

  def decorator(fn: BetaFn) -> BetaFn:
    if name in _SCHEDULES:
      raise ValueError(f'schedule {name!r} is already registered')
    _SCHEDULES[name] = fn
    return fn

  return decorator


def available_schedules() -> list[str]:
  return sorted(_SCHEDULES)


@register_schedule('linear')
def _linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@register_schedule('scaled_linear')
def _scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Stable Diffusion's schedule: linear in sqrt(beta)."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


@register_schedule('cosine')
def _cosine_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule with betas capped at 0.999 (diffusers' squaredcos_cap_v2)."""
  del beta_start, beta_end  # Not used by this schedule.

  def alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array([
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2023, Algorithm 1: shifts and scales sqrt(alphas_cumprod) so the last step has SNR 0.

  The first step's alphas_cumprod is kept; the last becomes exactly 0 (so eps prediction can no longer
  recover x0 there: use v prediction with this option).
  """
  sqrt_ac = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = sqrt_ac[0], sqrt_ac[-1]
  sqrt_ac = (sqrt_ac - last) * (first / (first - last))
  ac = sqrt_ac**2
  alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
  return 1.0 - alphas


def schedule_from_betas(betas: np.ndarray | Array) -> NoiseSchedule:
  """Builds a `NoiseSchedule` from betas; the cumulative product is taken in float64, then cast."""
  betas = np.asarray(betas, np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return NoiseSchedule(betas=jnp.asarray(betas, jnp.float32),
                       alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32))


def get_noise_schedule(diffusion_config: Mapping[str, Any]) -> NoiseSchedule:
  """The schedule named by `diffusion_config.schedule` (with `num_train_timesteps`, `beta_start`,
  `beta_end`, `rescale_zero_terminal_snr`)."""
  name = diffusion_config.get('schedule', 'scaled_linear')
  if name not in _SCHEDULES:
    raise ConfigError('diffusion.schedule', f'unknown schedule {name!r}; known: {", ".join(available_schedules())}')
  num_timesteps = int(diffusion_config.get('num_train_timesteps', 1000))
  if num_timesteps < 2:
    raise ConfigError('diffusion.num_train_timesteps', f'must be >= 2, got {num_timesteps}')
  betas = _SCHEDULES[name](num_timesteps, float(diffusion_config.get('beta_start', 0.00085)),
                           float(diffusion_config.get('beta_end', 0.012)))
  if diffusion_config.get('rescale_zero_terminal_snr', False):
    betas = rescale_zero_terminal_snr(betas)
  return schedule_from_betas(betas)


# ----------------------------------------------------------------------------------------------------------
# Indexing the schedule at timesteps.


def _at(values: Array, t: Array) -> Array:
  """values[t] for integer t; linear interpolation between neighbours for float t (exact at integers)."""
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    return values[t]
  t = jnp.clip(t.astype(jnp.float32), 0, values.shape[0] - 1)
  lo = jnp.floor(t).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, values.shape[0] - 1)
  w = t - lo.astype(jnp.float32)
  return values[lo] * (1.0 - w) + values[hi] * w


def _expand(a: Array, ndim: int | None) -> Array:
  if ndim is None or a.ndim >= ndim:
    return a
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def alpha_sigma(schedule: NoiseSchedule, t: Array, ndim: int | None = None) -> tuple[Array, Array]:
  """(alpha_t, sigma_t) at timesteps `t` (B,), reshaped to (B, 1, ..., 1) of rank `ndim` if given."""
  ac = _at(schedule.alphas_cumprod, t)
  return _expand(jnp.sqrt(ac), ndim), _expand(jnp.sqrt(1.0 - ac), ndim)


def snr(schedule: NoiseSchedule, t: Array) -> Array:
  """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at timesteps `t` (0 at a zero-terminal-SNR end)."""
  ac = _at(schedule.alphas_cumprod, t)
  return ac / (1.0 - ac)


def q_sample(schedule: NoiseSchedule, x0: Array, noise: Array, t: Array) -> Array:
  """Draws x_t ~ q(x_t | x_0) given the noise: alpha_t x0 + sigma_t noise. `t`: (B,) timesteps."""
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return (alpha * x0 + sigma * noise).astype(x0.dtype)


# ----------------------------------------------------------------------------------------------------------
# Prediction types.


class Prediction(NamedTuple):
  """A network output expressed in every parametrization (all shaped like x_t)."""

  eps: Array
  x0: Array
  v: Array


class PredictionType(NamedTuple):
  """How one parametrization relates to the process, at per-example alpha / sigma (broadcastable).

  convert(output, x_t, alpha, sigma) -> Prediction: the raw output in every parametrization.
  target(x0, noise, alpha, sigma) -> what the network should output.
  x0_mse_factor(snr) -> c such that |target - output|^2 = c |x0 - x0_hat|^2 (for loss weightings).
  """

  convert: Callable[[Array, Array, Array, Array], Prediction]
  target: Callable[[Array, Array, Array, Array], Array]
  x0_mse_factor: Callable[[Array], Array]


_PREDICTION_TYPES: dict[str, PredictionType] = {}


def register_prediction_type(name: str, prediction_type: PredictionType) -> None:
  if name in _PREDICTION_TYPES:
    raise ValueError(f'prediction type {name!r} is already registered')
  _PREDICTION_TYPES[name] = prediction_type


def available_prediction_types() -> list[str]:
  return sorted(_PREDICTION_TYPES)


def get_prediction_type(name: str) -> PredictionType:
  """The registered prediction type `name`; a `ConfigError` naming the known ones otherwise."""
  if name not in _PREDICTION_TYPES:
    raise ConfigError('diffusion.prediction_type',
                      f'unknown prediction type {name!r}; known: {", ".join(available_prediction_types())}')
  return _PREDICTION_TYPES[name]


def _v(eps: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
  return alpha * eps - sigma * x0


def _from_eps(out: Array, x_t: Array, alpha: Array, sigma: Array) -> Prediction:
  x0 = (x_t - sigma * out) / alpha
  return Prediction(eps=out, x0=x0, v=_v(out, x0, alpha, sigma))


def _from_x0(out: Array, x_t: Array, alpha: Array, sigma: Array) -> Prediction:
  eps = (x_t - alpha * out) / sigma
  return Prediction(eps=eps, x0=out, v=_v(eps, out, alpha, sigma))


def _from_v(out: Array, x_t: Array, alpha: Array, sigma: Array) -> Prediction:
  return Prediction(eps=alpha * out + sigma * x_t, x0=alpha * x_t - sigma * out, v=out)


register_prediction_type('eps', PredictionType(
    convert=_from_eps, target=lambda x0, noise, a, s: noise, x0_mse_factor=lambda snr_t: snr_t))
register_prediction_type('x0', PredictionType(
    convert=_from_x0, target=lambda x0, noise, a, s: x0, x0_mse_factor=jnp.ones_like))
register_prediction_type('v', PredictionType(
    convert=_from_v, target=lambda x0, noise, a, s: _v(noise, x0, a, s),
    x0_mse_factor=lambda snr_t: snr_t + 1.0))


def convert_prediction(output: Array, x_t: Array, t: Array, schedule: NoiseSchedule,
                       prediction_type: str) -> Prediction:
  """THE conversion of a network's raw `output` at (x_t, t) into eps, x0 and v.

  `t`: (B,) timesteps (integer, or float in the same units). Computed in float32; eps prediction divides
  by alpha_t and x0 prediction by sigma_t, so they are undefined where those are 0.
  """
  spec = get_prediction_type(prediction_type)
  alpha, sigma = alpha_sigma(schedule, t, x_t.ndim)
  return spec.convert(output.astype(jnp.float32), x_t.astype(jnp.float32), alpha, sigma)


def training_target(prediction_type: str, x0: Array, noise: Array, t: Array, schedule: NoiseSchedule) -> Array:
  """What a network of `prediction_type` should output for x_t = q_sample(schedule, x0, noise, t)."""
  spec = get_prediction_type(prediction_type)
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return spec.target(x0.astype(jnp.float32), noise.astype(jnp.float32), alpha, sigma)


def x0_mse_factor(prediction_type: str, snr_t: Array) -> Array:
  """c(snr) with |target - output|^2 = c |x0 - x0_hat|^2: eps -> snr, v -> snr + 1, x0 -> 1."""
  return get_prediction_type(prediction_type).x0_mse_factor(snr_t)
