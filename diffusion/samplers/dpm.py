"""DPM-Solver++ (Lu et al. 2022): the second-order multistep solver of the probability-flow ODE in data prediction
(`dpmpp_2m`) and its SDE variant (`dpmpp_2m_sde`), step for step as diffusers' DPMSolverMultistepScheduler with
algorithm_type 'dpmsolver++' / 'sde-dpmsolver++', solver_order=2, solver_type='midpoint', final_sigmas_type='zero'
(the first and the last step are first order). The state is the variance-preserving x_t.
"""

from typing import Any

import jax
import jax.numpy as jnp

from diffusion import process
from diffusion.samplers.core import (
  Grid,
  ModelFn,
  Plan,
  dpm_timesteps,
  register_sampler,
  step_noise,
  ve_grid,
  ve_sigma_at,
)

Array = jax.Array


def _grid(schedule: process.NoiseSchedule, num_steps: int, spacing: str, steps_offset: int, karras: bool) -> Grid:
  timesteps = dpm_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
  num = schedule.num_timesteps
  karras_range = None
  if karras:  # diffusers spans the whole table here, and rounds the model times of discrete schedules.
    karras_range = (ve_sigma_at(schedule, jnp.zeros(())), ve_sigma_at(schedule, jnp.full((), num - 1.0)))
  ts, sigmas = ve_grid(schedule, timesteps, karras, round_karras=schedule.kind == 'discrete', karras_range=karras_range)
  alphas = jax.lax.rsqrt(1.0 + sigmas**2)
  return Grid(timesteps=ts, alphas=alphas, sigmas=sigmas * alphas)


def _dpmpp_2m(
  schedule: process.NoiseSchedule, num_steps: int, spacing: str, steps_offset: int, karras: bool, sde: bool
) -> Plan:
  grid = _grid(schedule, num_steps, spacing, steps_offset, karras)
  ts, alphas, sigmas = grid
  lambdas = jnp.log(alphas) - jnp.log(sigmas)  # +inf at the final level (sigma = 0).

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    prev_x0, taken = carry
    x0 = model(x, ts[i], alphas[i], sigmas[i]).x0
    alpha_t, sigma_t = alphas[i + 1], sigmas[i + 1]
    h = lambdas[i + 1] - lambdas[i]
    first_order = (taken == 0) | (i == num_steps - 1)
    r0 = (lambdas[i] - lambdas[jnp.maximum(i - 1, 0)]) / h
    d1 = jnp.where(first_order, 0.0, (x0 - prev_x0) / jnp.where(first_order, 1.0, r0))
    if sde:
      x = (
        (sigma_t / sigmas[i] * jnp.exp(-h)) * x
        + (alpha_t * (1.0 - jnp.exp(-2.0 * h))) * (x0 + 0.5 * d1)
        + sigma_t * jnp.sqrt(1.0 - jnp.exp(-2.0 * h)) * step_noise(rng, i, x.shape)
      )
    else:
      x = (sigma_t / sigmas[i]) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * (x0 + 0.5 * d1)
    return x, (x0, taken + 1)

  init = lambda x: (jnp.zeros_like(x), jnp.zeros((), jnp.int32))  # (previous x0, steps taken).
  return Plan(grid=grid, step=step, init_carry=init, needs_rng=sde)


@register_sampler('dpmpp_2m')
def dpmpp_2m(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'linspace',
  steps_offset: int = 0,
  karras: bool = False,
) -> Plan:
  """DPM-Solver++(2M): second-order multistep exponential integrator in x0 prediction (deterministic)."""
  return _dpmpp_2m(schedule, num_steps, timestep_spacing, steps_offset, karras, sde=False)


@register_sampler('dpmpp_2m_sde')
def dpmpp_2m_sde(
  schedule: process.NoiseSchedule,
  num_steps: int,
  *,
  timestep_spacing: str = 'linspace',
  steps_offset: int = 0,
  karras: bool = False,
) -> Plan:
  """SDE-DPM-Solver++(2M): the same multistep solver of the reverse SDE (fresh noise every step)."""
  return _dpmpp_2m(schedule, num_steps, timestep_spacing, steps_offset, karras, sde=True)
