"""Samplers of the probability-flow ODE in the variance-exploding space x / alpha = x0 + sigma eps (Karras et al.
2022): Euler, Euler ancestral and Heun, step for step as diffusers' EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler and HeunDiscreteScheduler, with optional Karras levels.

The state is the VE x; the model sees it rescaled to unit variance (x / sqrt(1 + sigma^2), what diffusers'
`scale_model_input` does). x_T is the unit-variance state at the first level, so the start state is
x_T * sqrt(1 + sigma_max^2) (diffusers' `init_noise_sigma` is sigma_max except with 'leading' spacing).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from diffusion import process
from diffusion.errors import UserError
from diffusion.samplers.core import (
  Grid,
  ModelFn,
  Plan,
  k_timesteps,
  register_sampler,
  step_noise,
  t_at_ve_sigma,
  ve_grid,
)

Array = jax.Array


def _grid(schedule: process.NoiseSchedule, num_steps: int, spacing: str, steps_offset: int, karras: bool) -> Grid:
  timesteps = k_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
  ts, sigmas = ve_grid(schedule, timesteps, karras)
  return Grid(timesteps=ts, alphas=jnp.ones_like(sigmas), sigmas=sigmas)


def _derivative(model: ModelFn, x: Array, t: Array, sigma: Array) -> Array:
  """dx/dsigma = (x - D(x; sigma)) / sigma."""
  return (x - model(x, t, 1.0, sigma).x0) / sigma


@register_sampler('euler')
def euler(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'linspace',
  steps_offset: int = 0,
  karras: bool = False,
) -> Plan:
  """Euler's method on the probability-flow ODE (first order; diffusers' EulerDiscreteScheduler)."""
  grid = _grid(schedule, num_steps, timestep_spacing, steps_offset, karras)
  ts, sigmas = grid.timesteps, grid.sigmas

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    return x + _derivative(model, x, ts[i], sigmas[i]) * (sigmas[i + 1] - sigmas[i]), carry

  return Plan(grid=grid, step=step, vp_input=True)


@register_sampler('euler_a')
def euler_ancestral(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'linspace',
  steps_offset: int = 0,
  karras: bool = False,
) -> Plan:
  """Euler ancestral (k-diffusion's sample_euler_ancestral, diffusers' EulerAncestralDiscreteScheduler): an Euler
  step down to sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2."""
  grid = _grid(schedule, num_steps, timestep_spacing, steps_offset, karras)
  ts, sigmas = grid.timesteps, grid.sigmas

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
    sigma_up = jnp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = jnp.sqrt(sigma_to**2 - sigma_up**2)
    x = x + _derivative(model, x, ts[i], sigma_from) * (sigma_down - sigma_from)
    return x + step_noise(rng, i, x.shape) * sigma_up, carry

  return Plan(grid=grid, step=step, needs_rng=True, vp_input=True)


@register_sampler('heun')
def heun(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'linspace',
  steps_offset: int = 0,
  karras: bool = False,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = math.inf,
  s_noise: float = 1.0,
) -> Plan:
  """Heun's second-order method (Karras et al. 2022, Algorithm 2; diffusers' HeunDiscreteScheduler at s_churn=0).

  Every step but the last (to sigma = 0, an Euler step) evaluates the model twice. With `s_churn` > 0, each level
  in [s_tmin, s_tmax] is first raised to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / n, sqrt(2) - 1), by
  adding noise of std s_noise sqrt(sigma_hat^2 - sigma^2) (EDM's stochastic sampler).
  """
  if s_churn < 0:
    raise UserError(f's_churn must be >= 0, got {s_churn}')
  grid = _grid(schedule, num_steps, timestep_spacing, steps_offset, karras)
  ts, sigmas = grid.timesteps, grid.sigmas
  gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    sigma, sigma_next, t = sigmas[i], sigmas[i + 1], ts[i]
    if s_churn > 0:
      gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma_max, 0.0)
      sigma_hat = sigma * (1.0 + gamma)
      # sqrt(sigma_hat^2 - sigma^2), written so that it is exactly 0 at gamma = 0 (no fused-multiply-add NaN).
      x = x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * step_noise(rng, i, x.shape)
      t = jnp.where(gamma > 0, t_at_ve_sigma(schedule, sigma_hat), t)
      sigma = sigma_hat
    d = _derivative(model, x, t, sigma)
    x_euler = x + d * (sigma_next - sigma)

    def correct() -> Array:
      d_next = _derivative(model, x_euler, ts[jnp.minimum(i + 1, num_steps - 1)], sigma_next)
      return x + 0.5 * (d + d_next) * (sigma_next - sigma)

    return jax.lax.cond(sigma_next > 0, correct, lambda: x_euler), carry

  return Plan(grid=grid, step=step, needs_rng=s_churn > 0, vp_input=True)
