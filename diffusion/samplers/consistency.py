"""Multistep latent-consistency sampling (Luo et al. 2023), step for step as diffusers' LCMScheduler.

Timesteps: the n steps are a subset of the `original_inference_steps` (N, 50 by default) skipping-step timesteps
k - 1, 2k - 1, ..., N k - 1 (k = T // N) the model was distilled on: n of them evenly spaced in index, from the
highest down. Each step maps x_t to the consistency function's output

  denoised = c_out(t) x0_hat + c_skip(t) x_t,  c_skip = sd^2 / ((s t)^2 + sd^2),  c_out = s t / sqrt((s t)^2 + sd^2)

(sd = 0.5, s = `timestep_scaling`: the boundary condition f(x, 0) = x) and then re-noises it with fresh noise to the
next timestep, x = sqrt(a_next) denoised + sqrt(1 - a_next) noise; the last step returns `denoised`. The state is the
variance-preserving x_t; x0_hat is the model's output through `process.convert`, so any eps / v / x0 model runs.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process
from diffusion.errors import UserError
from diffusion.samplers.core import Grid, ModelFn, Plan, register_sampler, step_noise

Array = jax.Array
SIGMA_DATA = 0.5  # diffusers' fixed sigma_data of the boundary-condition scalings.


def lcm_timesteps(num_train_timesteps: int, num_steps: int, original_inference_steps: int = 50) -> np.ndarray:
  """Descending int timesteps of diffusers' LCMScheduler.set_timesteps(num_steps, original_inference_steps)."""
  num, original = num_train_timesteps, original_inference_steps
  if not 1 <= original <= num:
    raise UserError(f'original_inference_steps must be in [1, {num}] (the training steps), got {original}')
  if not 1 <= num_steps <= original:
    raise UserError(
      f'num_steps must be in [1, original_inference_steps = {original}] for the lcm sampler (its timesteps are a '
      f'subset of that many), got {num_steps}'
    )
  skipping = np.arange(1, original + 1) * (num // original) - 1
  indices = np.floor(np.linspace(0, original, num=num_steps, endpoint=False)).astype(np.int64)
  return skipping[::-1][indices]


def boundary_scalings(timesteps: Any, timestep_scaling: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
  """(c_skip, c_out) of the consistency boundary condition at `timesteps` (float32, as diffusers computes them)."""
  scaled = np.asarray(timesteps, np.float32) * np.float32(timestep_scaling)
  denominator = scaled**2 + np.float32(SIGMA_DATA**2)
  return np.float32(SIGMA_DATA**2) / denominator, scaled / np.sqrt(denominator)


@register_sampler('lcm')
def lcm(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  original_inference_steps: int = 50,
  timestep_scaling: float = 10.0,
  clip_sample: bool = False,
  clip_sample_range: float = 1.0,
) -> Plan:
  """Latent-consistency sampling as diffusers' LCMScheduler: `num_steps` <= `original_inference_steps` steps, fresh
  noise between steps (so `rng` is needed for num_steps > 1). With an ordinary (non-distilled) model it is a
  few-step stochastic sampler; classifier-free guidance wraps denoise_fn as for every sampler."""
  if not (isinstance(timestep_scaling, (int, float)) and math.isfinite(timestep_scaling) and timestep_scaling > 0):
    raise UserError(f'timestep_scaling must be a finite number > 0, got {timestep_scaling!r}')
  timesteps = lcm_timesteps(schedule.num_timesteps, num_steps, original_inference_steps)
  ts = jnp.asarray(timesteps, jnp.int32)
  c_skip, c_out = (jnp.asarray(c) for c in boundary_scalings(timesteps, timestep_scaling))
  ac = schedule.alphas_cumprod
  levels = jnp.concatenate([ac[ts], jnp.ones((1,), jnp.float32)])  # After the last step: the clean latents.
  alphas, sigmas = jnp.sqrt(levels), jnp.sqrt(1.0 - levels)

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    x0 = model(x, ts[i], alphas[i], sigmas[i]).x0
    if clip_sample:
      x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    denoised = c_out[i] * x0 + c_skip[i] * x
    if num_steps == 1:
      return denoised, carry
    # alphas[n] = 1, sigmas[n] = 0: the last step returns `denoised` exactly.
    return alphas[i + 1] * denoised + sigmas[i + 1] * step_noise(rng, i, x.shape), carry

  grid = Grid(timesteps=jnp.asarray(timesteps, jnp.float32), alphas=alphas, sigmas=sigmas)
  return Plan(grid=grid, step=step, needs_rng=num_steps > 1)
