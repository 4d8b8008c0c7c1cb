"""Samplers: a registry name -> sampler, each running its whole loop as one `lax.fori_loop`.

Every sampler has the signature

  sampler(denoise_fn, x_T, schedule, *, num_steps, rng, prediction_type, **options) -> x_0

where `denoise_fn(x_t, t)` returns the raw network output for float32 timesteps `t` (B,) in diffusers' units
(0..T-1). Samplers turn that output into eps / x0 through `process.convert_prediction` only. `num_steps` and
the options are static (Python values); the caller jits, so there is one compile per (sampler, steps,
shape). The discrete samplers here reproduce diffusers' `DDPMScheduler` / `DDIMScheduler` step for step.

Randomness is per example: the ancestral noise of example b at loop index i is drawn from
fold_in(key_b, i), where key_b is the b-th of a batch of keys passed as `rng`, or fold_in(rng, b) for a single
key. So an example's sample never depends on the batch it was drawn in.

`cfg_denoise_fn` wraps a conditional model into a classifier-free-guided `denoise_fn` (the negative prompt is
the unconditional context).
"""

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process
from diffusion.errors import UserError

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


class Sampler(Protocol):

  def __call__(self, denoise_fn: DenoiseFn, x_T: Array, schedule: process.NoiseSchedule, *, num_steps: int,
               rng: Array | None, prediction_type: str, **options: Any) -> Array:
    ...


_SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
  """Registers a sampler under `name`; registering a name twice is an error."""

  def decorator(fn: Sampler) -> Sampler:
    if name in _SAMPLERS:
      raise ValueError(f'sampler {name!r} is already registered')
    _SAMPLERS[name] = fn
    return fn

  return decorator


def get_sampler(name: str) -> Sampler:
  """The sampler registered as `name`; a `UserError` listing the known names otherwise."""
  if name not in _SAMPLERS:
    raise UserError(f'unknown sampler {name!r}; known: {", ".join(available_samplers())}')
  return _SAMPLERS[name]


def available_samplers() -> list[str]:
  return sorted(_SAMPLERS)


# ----------------------------------------------------------------------------------------------------------
# Timesteps and noise.

_SPACINGS = ('leading', 'trailing', 'linspace')


def make_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = 'leading',
                   steps_offset: int = 0) -> np.ndarray:
  """The descending int timesteps of a `num_steps` sampler, as diffusers' `set_timesteps` makes them.

  'leading': 0, r, 2r, ... (r = T // n) plus `steps_offset`; 'trailing': from T-1 down in steps of T / n;
  'linspace': n points rounded from [0, T-1] (Lin et al. 2023, Table 2).
  """
  if not 1 <= num_steps <= num_train_timesteps:
    raise UserError(f'num_steps must be in [1, {num_train_timesteps}], got {num_steps}')
  if spacing == 'linspace':
    return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
  if spacing == 'leading':
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  if spacing == 'trailing':
    ratio = num_train_timesteps / num_steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
  raise UserError(f'unknown timestep_spacing {spacing!r}; known: {", ".join(_SPACINGS)}')


def _is_key_batch(rng: Array) -> bool:
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def step_noise(rng: Array, step: int | Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
  """N(0, I) noise of `shape` for loop index `step`: example b's from fold_in(key_b, step).

  `rng` is one key (then key_b = fold_in(rng, b)) or a batch of `shape[0]` keys (one per example).
  """
  keys = rng if _is_key_batch(rng) else jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(shape[0]))
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:], dtype))(keys)


def _alpha_prev(alphas_cumprod: Array, prev: Array, final: Array | float) -> Array:
  """alphas_cumprod[prev], or `final` where prev < 0 (past the last step)."""
  return jnp.where(prev >= 0, alphas_cumprod[jnp.maximum(prev, 0)], final)


def _model_prediction(denoise_fn: DenoiseFn, x: Array, t: Array, schedule: process.NoiseSchedule,
                      prediction_type: str) -> process.Prediction:
  """Calls the model at the scalar int timestep `t` and converts its output."""
  t_batch = jnp.full((x.shape[0],), t, jnp.int32)
  output = denoise_fn(x, t_batch.astype(jnp.float32))
  return process.convert_prediction(output, x, t_batch, schedule, prediction_type)


def _check_common(x_T: Array, rng: Array | None, prediction_type: str, needs_rng: bool) -> None:
  process.get_prediction_type(prediction_type)
  if needs_rng and rng is None:
    raise UserError('this sampler draws noise: pass rng')
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise UserError(f'x_T must be floating point, got {x_T.dtype}')


# ----------------------------------------------------------------------------------------------------------
# DDIM and DDPM.


@register_sampler('ddim')
def ddim(denoise_fn: DenoiseFn, x_T: Array, schedule: process.NoiseSchedule, *, num_steps: int,
         rng: Array | None = None, prediction_type: str, eta: float = 0.0, timestep_spacing: str = 'leading',
         steps_offset: int = 0, set_alpha_to_one: bool = False, clip_sample: bool = False,
         clip_sample_range: float = 1.0, use_clipped_model_output: bool = False) -> Array:
  """DDIM (Song et al. 2021) as diffusers' DDIMScheduler: eta = 0 deterministic, eta = 1 DDPM-like.

  As in diffusers, each step goes from t to t - T // num_steps whatever the spacing (with 'linspace' that is
  not the next timestep), and past the last step alphas_cumprod is 1 if `set_alpha_to_one` else
  alphas_cumprod[0] (Stable Diffusion's setting). `eta` is static.
  """
  if eta < 0:
    raise UserError(f'eta must be >= 0, got {eta}')
  _check_common(x_T, rng, prediction_type, needs_rng=eta > 0)
  num_train = schedule.num_timesteps
  timesteps = make_timesteps(num_train, num_steps, timestep_spacing, steps_offset)
  ts = jnp.asarray(timesteps, jnp.int32)
  prevs = jnp.asarray(timesteps - num_train // num_steps, jnp.int32)
  ac = schedule.alphas_cumprod
  final = 1.0 if set_alpha_to_one else ac[0]

  def body(i: Array, x: Array) -> Array:
    a_t = ac[ts[i]]
    a_prev = _alpha_prev(ac, prevs[i], final)
    pred = _model_prediction(denoise_fn, x, ts[i], schedule, prediction_type)
    x0, eps = pred.x0, pred.eps
    if clip_sample:
      x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
      if use_clipped_model_output:
        eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
    if eta > 0:
      x_prev = x_prev + std * step_noise(rng, i, x.shape)
    return x_prev.astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, body, x_T.astype(jnp.float32)).astype(x_T.dtype)


@register_sampler('ddpm')
def ddpm(denoise_fn: DenoiseFn, x_T: Array, schedule: process.NoiseSchedule, *, num_steps: int,
         rng: Array | None, prediction_type: str, timestep_spacing: str = 'leading', steps_offset: int = 0,
         clip_sample: bool = False, clip_sample_range: float = 1.0) -> Array:
  """Ancestral sampling (Ho et al. 2020) as diffusers' DDPMScheduler with variance_type='fixed_small'.

  With num_steps < T the chain jumps between the strided timesteps, each step drawing from the posterior
  q(x_prev | x_t, x0_hat) of that jump; no noise is added at timestep 0.
  """
  _check_common(x_T, rng, prediction_type, needs_rng=True)
  timesteps = make_timesteps(schedule.num_timesteps, num_steps, timestep_spacing, steps_offset)
  ts = jnp.asarray(timesteps, jnp.int32)
  prevs = jnp.asarray(np.append(timesteps[1:], -1), jnp.int32)
  ac = schedule.alphas_cumprod

  def body(i: Array, x: Array) -> Array:
    a_t = ac[ts[i]]
    a_prev = _alpha_prev(ac, prevs[i], 1.0)
    pred = _model_prediction(denoise_fn, x, ts[i], schedule, prediction_type)
    x0 = jnp.clip(pred.x0, -clip_sample_range, clip_sample_range) if clip_sample else pred.x0
    beta_t, beta_prev = 1.0 - a_t, 1.0 - a_prev
    current_alpha = a_t / a_prev
    current_beta = 1.0 - current_alpha
    mean = (jnp.sqrt(a_prev) * current_beta / beta_t) * x0 + (jnp.sqrt(current_alpha) * beta_prev / beta_t) * x
    variance = jnp.maximum(beta_prev / beta_t * current_beta, 1e-20)
    std = jnp.where(ts[i] > 0, jnp.sqrt(variance), 0.0)
    return (mean + std * step_noise(rng, i, x.shape)).astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, body, x_T.astype(jnp.float32)).astype(x_T.dtype)


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def _concat(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def _rescale_guidance(guided: Array, cond: Array, phi: float) -> Array:
  """Lin et al. 2023, Eq. 15-16: match the guided output's per-example std to the conditional one's."""
  axes = tuple(range(1, guided.ndim))
  rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
  return phi * rescaled + (1.0 - phi) * guided


def cfg_denoise_fn(model_fn: Callable[[Array, Array, Any], Array], cond_context: Any, uncond_context: Any,
                   guidance_scale: float | Array, guidance_rescale: float = 0.0) -> DenoiseFn:
  """A classifier-free-guided denoise_fn: uncond + s * (cond - uncond), from one batched model call.

  `model_fn(x_t, t, context)` returns the raw output; contexts are pytrees with a leading batch axis equal to
  x_t's (the negative prompt is `uncond_context`). With a Python `guidance_scale == 1` only the conditional
  branch runs. `guidance_rescale` (phi, static) blends in the std-rescaled output as diffusers does.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    return lambda x_t, t: model_fn(x_t, t, cond_context)

  context = _concat(uncond_context, cond_context)

  def denoise_fn(x_t: Array, t: Array) -> Array:
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), context)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
      guided = _rescale_guidance(guided, cond, guidance_rescale)
    return guided

  return denoise_fn
