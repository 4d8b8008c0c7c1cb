"""Gaussian data x0 ~ N(MU, SD^2) per channel: the exact denoiser and the exact probability-flow ODE solution on any
path x = alpha x0 + sigma eps (VP, VE or flow), so a sampler's error can be measured against the truth.

Used by the sampler tests and by scripts/convergence_order.py (the table in docs/samplers.md); tests/torch_oracle.py
is the same model in PyTorch for parity tests with diffusers.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process, samplers

MU = np.array([0.5, -0.3], np.float32)
SD = np.array([0.4, 0.8], np.float32)


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal test data, from numpy (jax.random ops each cost a slow CPU compile)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def optimal(x: Any, a: Any, s: Any, prediction_type: str, xp: Any = jnp) -> Any:
  """The minimiser of the training loss for Gaussian data at x = a x0 + s eps, in the given parametrization
  (`xp`: the array namespace, jax.numpy by default)."""
  mu, sd = xp.asarray(MU), xp.asarray(SD)
  var = a**2 * sd**2 + s**2
  eps = s * (x - a * mu) / var
  x0 = mu + a * sd**2 * (x - a * mu) / var
  return {'eps': eps, 'x0': x0, 'v': a * eps - s * x0, 'flow': eps - x0}[prediction_type]


def denoiser(schedule: process.NoiseSchedule, prediction_type: str, wiggle: float = 0.0) -> Callable:
  """denoise_fn(x, t) of the exact model (plus `wiggle` * sin(3x) cos(t / 300), an analytic nonlinearity)."""

  def denoise_fn(x, t):
    a, s = process.alpha_sigma(schedule, t, x.ndim)
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return optimal(x, a, s, prediction_type) + wiggle * jnp.sin(3 * x) * jnp.cos(tt / 300)

  return denoise_fn


def ode_solution(x_start: Any, a0: Any, s0: Any, a1: Any, s1: Any) -> np.ndarray:
  """The probability-flow ODE maps x at level (a0, s0) to level (a1, s1) affinely for Gaussian data: it keeps
  z = (x - a MU) / sqrt(a^2 SD^2 + s^2) constant (on any path, VP, VE or flow)."""
  a0, s0, a1, s1 = (np.asarray(v, np.float64) for v in (a0, s0, a1, s1))
  z = (np.asarray(x_start, np.float64) - a0 * MU) / np.sqrt(a0**2 * SD**2 + s0**2)
  return a1 * MU + np.sqrt(a1**2 * SD**2 + s1**2) * z


def ode_error(
  name: str,
  schedule: process.NoiseSchedule,
  prediction_type: str,
  num_steps: int,
  x_T: np.ndarray,
  measure_t: float | None = None,
  **options,
) -> float:
  """Max-abs error of sampler `name` run with the exact denoiser against the exact ODE solution from its start
  state: at the step that starts at model time `measure_t` if given, else at the last nonzero noise level."""

  @jax.jit
  def run(x):
    return samplers.get_sampler(name)(
      denoiser(schedule, prediction_type),
      x,
      schedule,
      num_steps=num_steps,
      rng=None,
      prediction_type=prediction_type,
      return_trajectory=True,
      **options,
    )

  traj = jax.device_get(run(x_T))
  if measure_t is not None:
    k = int(np.flatnonzero(np.isclose(traj.timesteps, measure_t))[0])
  else:
    k = -1 if traj.sigmas[-1] > 0 else -2
  exact = ode_solution(traj.states[0], traj.alphas[0], traj.sigmas[0], traj.alphas[k], traj.sigmas[k])
  return float(np.abs(traj.states[k] - exact).max())
