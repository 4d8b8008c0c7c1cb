"""DDPM and DDIM: samplers on the integer timesteps of the variance-preserving table (diffusers' DDPMScheduler and
DDIMScheduler step for step). The state is the variance-preserving x_t."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process
from diffusion.errors import UserError
from diffusion.samplers.core import Grid, ModelFn, Plan, make_timesteps, register_sampler, step_noise

Array = jax.Array


def _alpha_prev(alphas_cumprod: Array, prev: Array, final: Array | float) -> Array:
  """alphas_cumprod[prev], or `final` where prev < 0 (past the last step)."""
  return jnp.where(prev >= 0, alphas_cumprod[jnp.maximum(prev, 0)], final)


def _vp_grid(ac: Array, timesteps: np.ndarray, final: Array | float) -> Grid:
  levels = jnp.concatenate([ac[jnp.asarray(timesteps)], jnp.reshape(jnp.asarray(final, jnp.float32), (1,))])
  return Grid(timesteps=jnp.asarray(timesteps, jnp.float32), alphas=jnp.sqrt(levels), sigmas=jnp.sqrt(1.0 - levels))


@register_sampler('ddim')
def ddim(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  eta: float = 0.0,
  timestep_spacing: str = 'leading',
  steps_offset: int = 0,
  set_alpha_to_one: bool = False,
  clip_sample: bool = False,
  clip_sample_range: float = 1.0,
  use_clipped_model_output: bool = False,
) -> Plan:
  """DDIM (Song et al. 2021) as diffusers' DDIMScheduler: eta = 0 deterministic, eta = 1 DDPM-like.

  As in diffusers, each step goes from t to t - T // num_steps whatever the spacing (with 'linspace' that is
  not the next timestep), and past the last step alphas_cumprod is 1 if `set_alpha_to_one` else
  alphas_cumprod[0] (Stable Diffusion's setting). `eta` is static.
  """
  if eta < 0:
    raise UserError(f'eta must be >= 0, got {eta}')
  num_train = schedule.num_timesteps
  timesteps = make_timesteps(num_train, num_steps, timestep_spacing, steps_offset)
  ts = jnp.asarray(timesteps, jnp.int32)
  prevs = jnp.asarray(timesteps - num_train // num_steps, jnp.int32)
  ac = schedule.alphas_cumprod
  final = 1.0 if set_alpha_to_one else ac[0]

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    a_t = ac[ts[i]]
    a_prev = _alpha_prev(ac, prevs[i], final)
    pred = model(x, ts[i], jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t))
    x0, eps = pred.x0, pred.eps
    if clip_sample:
      x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
      if use_clipped_model_output:
        eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
    ratio = (1.0 - a_t / a_prev) / (1.0 - a_t)
    std = eta * jnp.sqrt((1.0 - a_prev) * ratio)
    # sqrt(1 - a_prev - std^2), factored so that it is exactly 0 where it should be (eta = 1 at SNR 0).
    direction = jnp.sqrt(jnp.maximum((1.0 - a_prev) * (1.0 - eta**2 * ratio), 0.0))
    x_prev = jnp.sqrt(a_prev) * x0 + direction * eps
    if eta > 0:
      x_prev = x_prev + std * step_noise(rng, i, x.shape)
    return x_prev, carry

  return Plan(grid=_vp_grid(ac, timesteps, final), step=step, needs_rng=eta > 0)


@register_sampler('ddpm')
def ddpm(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'leading',
  steps_offset: int = 0,
  clip_sample: bool = False,
  clip_sample_range: float = 1.0,
) -> Plan:
  """Ancestral sampling (Ho et al. 2020) as diffusers' DDPMScheduler with variance_type='fixed_small'.

  With num_steps < T the chain jumps between the strided timesteps, each step drawing from the posterior
  q(x_prev | x_t, x0_hat) of that jump; no noise is added at timestep 0.
  """
  timesteps = make_timesteps(schedule.num_timesteps, num_steps, timestep_spacing, steps_offset)
  ts = jnp.asarray(timesteps, jnp.int32)
  prevs = jnp.asarray(np.append(timesteps[1:], -1), jnp.int32)
  ac = schedule.alphas_cumprod

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    a_t = ac[ts[i]]
    a_prev = _alpha_prev(ac, prevs[i], 1.0)
    pred = model(x, ts[i], jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t))
    x0 = jnp.clip(pred.x0, -clip_sample_range, clip_sample_range) if clip_sample else pred.x0
    beta_t, beta_prev = 1.0 - a_t, 1.0 - a_prev
    current_alpha = a_t / a_prev
    current_beta = 1.0 - current_alpha
    mean = (jnp.sqrt(a_prev) * current_beta / beta_t) * x0 + (jnp.sqrt(current_alpha) * beta_prev / beta_t) * x
    variance = jnp.maximum(beta_prev / beta_t * current_beta, 1e-20)
    std = jnp.where(ts[i] > 0, jnp.sqrt(variance), 0.0)
    return mean + std * step_noise(rng, i, x.shape), carry

  return Plan(grid=_vp_grid(ac, timesteps, 1.0), step=step, needs_rng=True)
