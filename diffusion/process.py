"""The diffusion process: noise schedules, q(x_t | x_0), training timesteps, and the one prediction conversion.

Every schedule describes a path x_t = alpha_t * x_0 + sigma_t * eps over a model time `t` in the units the network
sees (0 .. T, T = `num_train_timesteps`, as in diffusers). Three kinds:

  discrete  variance preserving, alpha_t^2 = alphas_cumprod[t] (linear, scaled_linear, cosine; optionally rescaled
            to zero terminal SNR); float t interpolates alphas_cumprod. Training draws integer t uniformly.
  edm       variance preserving with EDM's noise levels (Karras et al. 2022): the VE sigma = sigma_t / alpha_t runs
            log-linearly from `edm_sigma_min` (t = 0) to `edm_sigma_max` (t = T - 1); training draws
            ln(sigma) ~ N(edm_p_mean, edm_p_std^2).
  flow      rectified flow / flow matching: alpha_t = 1 - t / T, sigma_t = t / T; training draws s = t / T uniformly
            or logit-normally (SD3), optionally shifted by `flow_shift`.

Each schedule also carries variance-preserving tables (`alphas_cumprod`, `betas`) at integer t, so the discrete
samplers (DDPM, DDIM) run on any diffusion kind.

`convert` is THE place where a network's raw output becomes eps / x0 / v / flow velocity / score (samplers and losses
never re-derive these relations); `training_target` says what a network of each prediction type should output.
Both are driven by a registry of prediction types (`eps`, `x0`, `v`, `flow`).
"""

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.errors import ConfigError
from diffusion.registry import Registry

Array = jax.Array
KINDS = ('discrete', 'edm', 'flow')


@flax.struct.dataclass
class NoiseSchedule:
  """A noise schedule: variance-preserving tables of length T and the static description of its kind."""

  betas: Array
  alphas_cumprod: Array
  kind: str = flax.struct.field(pytree_node=False, default='discrete')
  name: str = flax.struct.field(pytree_node=False, default='')
  edm_sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
  edm_sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
  edm_p_mean: float = flax.struct.field(pytree_node=False, default=-1.2)
  edm_p_std: float = flax.struct.field(pytree_node=False, default=1.2)
  flow_shift: float = flax.struct.field(pytree_node=False, default=1.0)
  flow_t_sampling: str = flax.struct.field(pytree_node=False, default='uniform')
  flow_logit_mean: float = flax.struct.field(pytree_node=False, default=0.0)
  flow_logit_std: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def alphas(self) -> Array:
    return 1.0 - self.betas

  @property
  def is_flow(self) -> bool:
    return self.kind == 'flow'


# ----------------------------------------------------------------------------------------------------------
# Schedules.

BetaFn = Callable[[int, float, float], np.ndarray]
# name -> beta table function; the continuous schedules (not beta tables) are registered as None.
SCHEDULES: Registry[BetaFn | None] = Registry('schedule')
for _name in ('edm', 'flow'):
  SCHEDULES.add(_name, None)
FLOW_T_SAMPLINGS = ('uniform', 'logit_normal')


def register_schedule(name: str) -> Callable[[BetaFn], BetaFn]:
  """Registers `fn(num_train_timesteps, beta_start, beta_end) -> float64 betas` under `name`."""
  return SCHEDULES.register(name)


def available_schedules() -> list[str]:
  return SCHEDULES.names()


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

  return np.array(
    [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999) for i in range(num_timesteps)],
    dtype=np.float64,
  )


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


def _betas_from_alphas_cumprod(ac: np.ndarray) -> np.ndarray:
  return 1.0 - np.concatenate([ac[:1], ac[1:] / np.maximum(ac[:-1], 1e-300)])


def schedule_from_betas(betas: np.ndarray | Array, **static: Any) -> NoiseSchedule:
  """Builds a `NoiseSchedule` from betas; the cumulative product is taken in float64, then cast."""
  betas = np.asarray(betas, np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  return NoiseSchedule(
    betas=jnp.asarray(betas, jnp.float32), alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32), **static
  )


def _edm_static(c: Mapping[str, Any]) -> dict[str, float]:
  values = {
    k: float(c.get(f'edm_{k}', d))
    for k, d in (('sigma_min', 0.002), ('sigma_max', 80.0), ('p_mean', -1.2), ('p_std', 1.2))
  }
  if not 0 < values['sigma_min'] < values['sigma_max']:
    raise ConfigError('diffusion.edm_sigma_max', 'need 0 < edm_sigma_min < edm_sigma_max')
  if values['p_std'] <= 0:
    raise ConfigError('diffusion.edm_p_std', f'must be > 0, got {values["p_std"]}')
  return {f'edm_{k}': v for k, v in values.items()}


def _flow_static(c: Mapping[str, Any]) -> dict[str, Any]:
  sampling = c.get('flow_t_sampling', 'uniform')
  if sampling not in FLOW_T_SAMPLINGS:
    raise ConfigError('diffusion.flow_t_sampling', f'unknown {sampling!r}; known: {", ".join(FLOW_T_SAMPLINGS)}')
  shift, std = float(c.get('flow_shift', 1.0)), float(c.get('flow_logit_std', 1.0))
  if shift <= 0:
    raise ConfigError('diffusion.flow_shift', f'must be > 0, got {shift}')
  if std <= 0:
    raise ConfigError('diffusion.flow_logit_std', f'must be > 0, got {std}')
  return dict(
    flow_shift=shift, flow_t_sampling=sampling, flow_logit_mean=float(c.get('flow_logit_mean', 0.0)), flow_logit_std=std
  )


def get_noise_schedule(diffusion_config: Mapping[str, Any]) -> NoiseSchedule:
  """The schedule named by `diffusion_config.schedule` (with `num_train_timesteps`, `beta_start`, `beta_end`,
  `rescale_zero_terminal_snr`, and the `edm_*` / `flow_*` keys of those kinds)."""
  c = diffusion_config
  name = c.get('schedule', 'scaled_linear')
  if name not in SCHEDULES:
    raise ConfigError('diffusion.schedule', SCHEDULES.unknown(name))
  num_timesteps = int(c.get('num_train_timesteps', 1000))
  if num_timesteps < 2:
    raise ConfigError('diffusion.num_train_timesteps', f'must be >= 2, got {num_timesteps}')
  if SCHEDULES.get(name) is not None:
    betas = SCHEDULES.get(name)(num_timesteps, float(c.get('beta_start', 0.00085)), float(c.get('beta_end', 0.012)))
    if c.get('rescale_zero_terminal_snr', False):
      betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas, kind='discrete', name=name)
  static = _edm_static(c) if name == 'edm' else _flow_static(c)
  probe = NoiseSchedule(
    betas=jnp.zeros(num_timesteps), alphas_cumprod=jnp.zeros(num_timesteps), kind=name, name=name, **static
  )
  t = np.arange(num_timesteps, dtype=np.float64)
  alpha, sigma = _continuous_alpha_sigma(probe, t, np)
  ac = alpha**2 / (alpha**2 + sigma**2)
  return NoiseSchedule(
    betas=jnp.asarray(_betas_from_alphas_cumprod(ac), jnp.float32),
    alphas_cumprod=jnp.asarray(ac, jnp.float32),
    kind=name,
    name=name,
    **static,
  )


# ----------------------------------------------------------------------------------------------------------
# Indexing the schedule at (float) model times.


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


def edm_sigma_at(schedule: NoiseSchedule, t: Any, xp: Any = jnp) -> Any:
  """The VE noise level sigma_t / alpha_t of an 'edm' schedule at model time t (log-linear in t)."""
  lo, hi = math.log(schedule.edm_sigma_min), math.log(schedule.edm_sigma_max)
  return xp.exp(lo + (hi - lo) * t / (schedule.num_timesteps - 1))


def edm_t_at(schedule: NoiseSchedule, ve_sigma: Any, xp: Any = jnp) -> Any:
  """The inverse of `edm_sigma_at`: model time of a VE noise level (not clipped)."""
  lo, hi = math.log(schedule.edm_sigma_min), math.log(schedule.edm_sigma_max)
  return (xp.log(ve_sigma) - lo) / (hi - lo) * (schedule.num_timesteps - 1)


def flow_shift(s: Any, shift: float) -> Any:
  """SD3's resolution shift of flow times: shift * s / (1 + (shift - 1) * s) (identity at shift = 1)."""
  return shift * s / (1 + (shift - 1) * s)


def _continuous_alpha_sigma(schedule: NoiseSchedule, t: Any, xp: Any) -> tuple[Any, Any]:
  if schedule.kind == 'edm':
    ve = edm_sigma_at(schedule, t, xp)
    alpha = 1.0 / xp.sqrt(1.0 + ve**2)
    return alpha, ve * alpha
  s = t / schedule.num_timesteps  # flow
  return 1.0 - s, s


def alpha_sigma(schedule: NoiseSchedule, t: Array, ndim: int | None = None) -> tuple[Array, Array]:
  """(alpha_t, sigma_t) at model times `t` (B,), reshaped to (B, 1, ..., 1) of rank `ndim` if given."""
  if schedule.kind == 'discrete':
    ac = _at(schedule.alphas_cumprod, t)
    alpha, sigma = jnp.sqrt(ac), jnp.sqrt(1.0 - ac)
  else:
    alpha, sigma = _continuous_alpha_sigma(schedule, jnp.asarray(t, jnp.float32), jnp)
  return _expand(alpha, ndim), _expand(sigma, ndim)


def snr(schedule: NoiseSchedule, t: Array) -> Array:
  """Signal-to-noise ratio alpha_t^2 / sigma_t^2 at model times `t` (0 at a zero-terminal-SNR end)."""
  if schedule.kind == 'discrete':
    ac = _at(schedule.alphas_cumprod, t)
    return ac / (1.0 - ac)
  alpha, sigma = alpha_sigma(schedule, t)
  return alpha**2 / sigma**2


def q_sample(schedule: NoiseSchedule, x0: Array, noise: Array, t: Array) -> Array:
  """Draws x_t ~ q(x_t | x_0) given the noise: alpha_t x0 + sigma_t noise. `t`: (B,) model times."""
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return (alpha * x0 + sigma * noise).astype(x0.dtype)


def sample_timestep(schedule: NoiseSchedule, rng: Array) -> Array:
  """One training time (a scalar; vmap it over per-example keys) from the schedule's training distribution.

  discrete: integer t ~ U{0..T-1}; edm: ln(sigma) ~ N(p_mean, p_std^2) clipped to the schedule's range; flow:
  s ~ U(0, 1) or sigmoid(N(m, s^2)), shifted by `flow_shift`, t = T * s. Continuous times are float32.
  """
  num = schedule.num_timesteps
  if schedule.kind == 'discrete':
    return jax.random.randint(rng, (), 0, num)
  if schedule.kind == 'edm':
    ve = jnp.exp(schedule.edm_p_mean + schedule.edm_p_std * jax.random.normal(rng, ()))
    return jnp.clip(edm_t_at(schedule, ve), 0.0, num - 1.0)
  if schedule.flow_t_sampling == 'logit_normal':
    s = jax.nn.sigmoid(schedule.flow_logit_mean + schedule.flow_logit_std * jax.random.normal(rng, ()))
  else:
    s = jax.random.uniform(rng, ())
  return num * flow_shift(s, schedule.flow_shift)


# ----------------------------------------------------------------------------------------------------------
# Prediction types.


class Prediction(NamedTuple):
  """A network output expressed in every parametrization (all shaped like x_t).

  eps: the noise; x0: the clean data; v: alpha eps - sigma x0 (Salimans & Ho); flow: the rectified-flow velocity
  eps - x0 (= dx_t/dt on the flow path); score: grad log p(x_t) = -eps / sigma (infinite where sigma = 0).
  """

  eps: Array
  x0: Array
  v: Array
  flow: Array
  score: Array


class PredictionType(NamedTuple):
  """How one parametrization relates to the path x_t = alpha x0 + sigma eps (alpha, sigma broadcastable).

  to_x0_eps(output, x_t, alpha, sigma) -> (x0, eps) the output stands for.
  target(x0, noise, alpha, sigma) -> what the network should output.
  x0_error_scale(alpha, sigma) -> g with |target - output|^2 = (g / sigma^2) |x0 - x0_hat|^2 at fixed x_t (finite
  at sigma = 0, for loss weightings).
  """

  to_x0_eps: Callable[[Array, Array, Array, Array], tuple[Array, Array]]
  target: Callable[[Array, Array, Array, Array], Array]
  x0_error_scale: Callable[[Array, Array], Array]


PREDICTION_TYPES: Registry[PredictionType] = Registry('prediction type')


def register_prediction_type(name: str, prediction_type: PredictionType) -> None:
  PREDICTION_TYPES.add(name, prediction_type)


def available_prediction_types() -> list[str]:
  return PREDICTION_TYPES.names()


def get_prediction_type(name: str) -> PredictionType:
  """The registered prediction type `name`; a `ConfigError` naming the known ones otherwise."""
  if name not in PREDICTION_TYPES:
    raise ConfigError('diffusion.prediction_type', PREDICTION_TYPES.unknown(name))
  return PREDICTION_TYPES.get(name)


def _v_to_x0_eps(out: Array, x: Array, a: Array, s: Array) -> tuple[Array, Array]:
  norm = a * a + s * s  # 1 on variance-preserving paths.
  return (a * x - s * out) / norm, (s * x + a * out) / norm


def _flow_to_x0_eps(out: Array, x: Array, a: Array, s: Array) -> tuple[Array, Array]:
  return (x - s * out) / (a + s), (x + a * out) / (a + s)


register_prediction_type(
  'eps',
  PredictionType(
    to_x0_eps=lambda out, x, a, s: ((x - s * out) / a, out),
    target=lambda x0, noise, a, s: noise,
    x0_error_scale=lambda a, s: a * a,
  ),
)
register_prediction_type(
  'x0',
  PredictionType(
    to_x0_eps=lambda out, x, a, s: (out, (x - a * out) / s),
    target=lambda x0, noise, a, s: x0,
    x0_error_scale=lambda a, s: s * s,
  ),
)
register_prediction_type(
  'v',
  PredictionType(
    to_x0_eps=_v_to_x0_eps,
    target=lambda x0, noise, a, s: a * noise - s * x0,
    x0_error_scale=lambda a, s: (a * a + s * s) ** 2,
  ),
)
register_prediction_type(
  'flow',
  PredictionType(
    to_x0_eps=_flow_to_x0_eps, target=lambda x0, noise, a, s: noise - x0, x0_error_scale=lambda a, s: (a + s) ** 2
  ),
)


def convert(output: Array, x_t: Array, alpha: Array, sigma: Array, prediction_type: str) -> Prediction:
  """THE conversion of a network's raw `output` at x_t = alpha x0 + sigma eps into every parametrization.

  `alpha`, `sigma` broadcast against x_t (per example). Computed in float32; eps prediction divides by alpha and
  x0 prediction by sigma, so they are undefined where those are 0.
  """
  spec = get_prediction_type(prediction_type)
  output, x_t = output.astype(jnp.float32), x_t.astype(jnp.float32)
  alpha, sigma = jnp.asarray(alpha, jnp.float32), jnp.asarray(sigma, jnp.float32)
  x0, eps = spec.to_x0_eps(output, x_t, alpha, sigma)
  pred = Prediction(eps=eps, x0=x0, v=alpha * eps - sigma * x0, flow=eps - x0, score=-eps / sigma)
  if prediction_type in Prediction._fields:  # The network's own parametrization is returned as it is.
    pred = pred._replace(**{prediction_type: output})
  return pred


def convert_prediction(
  output: Array, x_t: Array, t: Array, schedule: NoiseSchedule, prediction_type: str
) -> Prediction:
  """`convert` at the schedule's (alpha_t, sigma_t) for model times `t` (B,) (integer or float)."""
  alpha, sigma = alpha_sigma(schedule, t, x_t.ndim)
  return convert(output, x_t, alpha, sigma, prediction_type)


def training_target(prediction_type: str, x0: Array, noise: Array, t: Array, schedule: NoiseSchedule) -> Array:
  """What a network of `prediction_type` should output for x_t = q_sample(schedule, x0, noise, t)."""
  spec = get_prediction_type(prediction_type)
  alpha, sigma = alpha_sigma(schedule, t, x0.ndim)
  return spec.target(x0.astype(jnp.float32), noise.astype(jnp.float32), alpha, sigma)


def x0_error_scale(prediction_type: str, alpha: Array, sigma: Array) -> Array:
  """sigma^2 * `x0_mse_factor`: finite everywhere (a^2, sigma^2, (a^2 + sigma^2)^2, (a + sigma)^2)."""
  return get_prediction_type(prediction_type).x0_error_scale(jnp.asarray(alpha), jnp.asarray(sigma))


def x0_mse_factor(prediction_type: str, alpha: Array, sigma: Array) -> Array:
  """c(alpha, sigma) with |target - output|^2 = c |x0 - x0_hat|^2: eps -> snr, v -> snr + 1 (VP), x0 -> 1,
  flow -> (1 + sqrt(snr))^2."""
  return x0_error_scale(prediction_type, alpha, sigma) / jnp.square(jnp.asarray(sigma))


def check_family(schedule_name: str, prediction_type: str) -> str | None:
  """Why `prediction_type` cannot be used with the schedule `schedule_name`, or None if it can."""
  if prediction_type == 'flow' and schedule_name != 'flow':
    return (
      f"prediction_type 'flow' (the rectified-flow velocity) needs diffusion.schedule='flow', got {schedule_name!r}"
    )
  if schedule_name == 'flow' and prediction_type == 'eps':
    return "prediction_type 'eps' cannot recover x0 at t = T on the 'flow' schedule: use 'flow', 'v' or 'x0'"
  return None


def validate_config(diffusion_config: Mapping[str, Any]) -> NoiseSchedule:
  """Checks `config.diffusion` (schedule, prediction type and their pairing, ranges); returns the schedule.
  Raises `ConfigError` naming the key."""
  d = diffusion_config
  get_prediction_type(d['prediction_type'])
  schedule = get_noise_schedule(d)  # Checks the schedule name, num_train_timesteps and the edm_* / flow_* keys.
  why = check_family(d['schedule'], d['prediction_type'])
  if why:
    raise ConfigError('diffusion.prediction_type', why)
  if not 0.0 <= d['caption_dropout'] < 1.0:
    raise ConfigError('diffusion.caption_dropout', f'must be in [0, 1), got {d["caption_dropout"]!r}')
  if not 0 < d['beta_start'] < d['beta_end'] < 1:
    raise ConfigError('diffusion.beta_end', 'need 0 < beta_start < beta_end < 1')
  if not d.get('offset_noise', 0.0) >= 0:
    raise ConfigError('diffusion.offset_noise', 'must be >= 0')
  return schedule
