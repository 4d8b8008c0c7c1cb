"""Gaussian data x0 ~ N(MU, SD^2) per channel: the exact denoiser and probability-flow ODE solution on any path
x = alpha x0 + sigma eps, in JAX and in PyTorch (the same analytic model for parity tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffusion import process

MU = np.array([0.5, -0.3], np.float32)
SD = np.array([0.4, 0.8], np.float32)
DIFFUSERS_TYPES = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}


def normal(seed, shape):
  """Test data (numpy: jax.random ops each cost a slow CPU compile)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def optimal(x, a, s, prediction_type, xp=jnp):
  """The minimiser of the training loss for Gaussian data at x = a x0 + s eps, in the given parametrization."""
  mu, sd = xp.asarray(MU), xp.asarray(SD)
  var = a**2 * sd**2 + s**2
  eps = s * (x - a * mu) / var
  x0 = mu + a * sd**2 * (x - a * mu) / var
  return {'eps': eps, 'x0': x0, 'v': a * eps - s * x0, 'flow': eps - x0}[prediction_type]


def denoiser(schedule, prediction_type, wiggle=0.0):
  """denoise_fn(x, t) of the exact model (plus `wiggle` * sin(3x) cos(t / 300), an analytic nonlinearity)."""

  def denoise_fn(x, t):
    a, s = process.alpha_sigma(schedule, t, x.ndim)
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return optimal(x, a, s, prediction_type) + wiggle * jnp.sin(3 * x) * jnp.cos(tt / 300)

  return denoise_fn


def torch_denoiser(schedule, prediction_type, wiggle=0.0):
  """The same model in PyTorch (float32), for diffusers' schedulers: model(x, t) with a scalar t."""
  ac = torch.from_numpy(np.array(schedule.alphas_cumprod))
  num = schedule.num_timesteps

  def model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    if schedule.kind == 'flow':
      s = t / num
      a = 1.0 - s
    else:
      tc = torch.clamp(t, 0, num - 1)
      lo = torch.floor(tc).long()
      hi = torch.clamp(lo + 1, max=num - 1)
      w = tc - lo.float()
      value = ac[lo] * (1.0 - w) + ac[hi] * w
      a, s = torch.sqrt(value), torch.sqrt(1.0 - value)
    out = optimal(x, a, s, prediction_type, xp=_TorchNp)
    return out + wiggle * torch.sin(3 * x) * torch.cos(t / 300)

  return model


class _TorchNp:
  """Just enough of a numpy namespace for `optimal` on torch tensors."""

  @staticmethod
  def asarray(a):
    return torch.from_numpy(np.asarray(a))


def ode_solution(x_start, a0, s0, a1, s1):
  """The probability-flow ODE maps x at level (a0, s0) to level (a1, s1) affinely for Gaussian data: it keeps
  z = (x - a MU) / sqrt(a^2 SD^2 + s^2) constant (on any path, VP, VE or flow)."""
  a0, s0, a1, s1 = (np.asarray(v, np.float64) for v in (a0, s0, a1, s1))
  z = (np.asarray(x_start, np.float64) - a0 * MU) / np.sqrt(a0**2 * SD**2 + s0**2)
  return a1 * MU + np.sqrt(a1**2 * SD**2 + s1**2) * z


@jax.jit
def _noise(rng, step, x):
  from diffusion import samplers
  return samplers.step_noise(rng, step, x.shape)


def injected_noise(rng, step, shape):
  """The noise our samplers draw at loop index `step`, as a torch tensor (to inject into diffusers)."""
  return torch.from_numpy(np.array(_noise(rng, step, jnp.zeros(tuple(shape)))))


def ode_error(name, schedule, prediction_type, num_steps, x_T, measure_t=None, **options):
  """Max-abs error of a sampler run with the exact denoiser against the exact ODE solution from its start state:
  at the step that starts at model time `measure_t` if given, else at the last nonzero noise level."""
  from diffusion import samplers

  @jax.jit
  def run(x):
    return samplers.get_sampler(name)(denoiser(schedule, prediction_type), x, schedule, num_steps=num_steps,
                                      rng=None, prediction_type=prediction_type, return_trajectory=True, **options)

  traj = jax.device_get(run(x_T))
  if measure_t is not None:
    k = int(np.flatnonzero(np.isclose(traj.timesteps, measure_t))[0])
  else:
    k = -1 if traj.sigmas[-1] > 0 else -2
  exact = ode_solution(traj.states[0], traj.alphas[0], traj.sigmas[0], traj.alphas[k], traj.sigmas[k])
  return float(np.abs(traj.states[k] - exact).max())
