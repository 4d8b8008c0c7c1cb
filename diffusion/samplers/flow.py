"""Flow-matching samplers: Euler and Heun on dx/ds = u(x, s) along x_s = (1 - s) x0 + s eps, from s = 1 to 0,
step for step as diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler.

The model time is s * T. Levels: diffusers' `set_timesteps` spaces n levels linearly between the shifted s_max = 1
and the shifted s_min = 1 / T, then applies the shift (SD3's resolution shift, `shift`) again.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process
from diffusion.samplers.core import Grid, ModelFn, Plan, karras_sigmas, register_sampler

Array = jax.Array


def flow_levels(num_train_timesteps: int, num_steps: int, shift: float, karras: bool = False) -> np.ndarray:
  """The n flow times s (descending, float32) of diffusers' flow-matching schedulers."""
  num = num_train_timesteps
  s_max, s_min = process.flow_shift(1.0, shift), process.flow_shift(1.0 / num, shift)
  s = process.flow_shift(np.linspace(s_max * num, s_min * num, num_steps) / num, shift)
  if karras:
    s = karras_sigmas(s[-1], s[0], num_steps)
  return s.astype(np.float32)


def _grid(schedule: process.NoiseSchedule, num_steps: int, shift: float | None, karras: bool) -> Grid:
  shift = schedule.flow_shift if shift is None else float(shift)
  s = flow_levels(schedule.num_timesteps, num_steps, shift, karras)
  sigmas = jnp.asarray(np.append(s, 0.0), jnp.float32)
  return Grid(timesteps=jnp.asarray(s * schedule.num_timesteps, jnp.float32), alphas=1.0 - sigmas, sigmas=sigmas)


def _velocity(model: ModelFn, x: Array, t: Array, s: Array) -> Array:
  return model(x, t, 1.0 - s, s).flow


@register_sampler('flow_euler', family='flow')
def flow_euler(
  schedule: process.NoiseSchedule, num_steps: int, *, shift: float | None = None, karras: bool = False
) -> Plan:
  """Euler's method on the flow ODE: x <- x + (s_next - s) u (first order). `shift` defaults to the schedule's."""
  grid = _grid(schedule, num_steps, shift, karras)
  ts, sigmas = grid.timesteps, grid.sigmas

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    return x + (sigmas[i + 1] - sigmas[i]) * _velocity(model, x, ts[i], sigmas[i]), carry

  return Plan(grid=grid, step=step)


@register_sampler('flow_heun', family='flow')
def flow_heun(
  schedule: process.NoiseSchedule, num_steps: int, *, shift: float | None = None, karras: bool = False
) -> Plan:
  """Heun's method on the flow ODE (second order; the last step, to s = 0, is an Euler step)."""
  grid = _grid(schedule, num_steps, shift, karras)
  ts, sigmas = grid.timesteps, grid.sigmas

  def step(i: Array, x: Array, carry: Any, model: ModelFn, rng: Array | None) -> tuple[Array, Any]:
    s, s_next = sigmas[i], sigmas[i + 1]
    u = _velocity(model, x, ts[i], s)
    x_euler = x + (s_next - s) * u

    def correct() -> Array:
      u_next = _velocity(model, x_euler, ts[jnp.minimum(i + 1, num_steps - 1)], s_next)
      return x + 0.5 * (u + u_next) * (s_next - s)

    return jax.lax.cond(s_next > 0, correct, lambda: x_euler), carry

  return Plan(grid=grid, step=step)
