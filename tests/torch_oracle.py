"""The Gaussian-data model of `diffusion.gaussian_oracle` in PyTorch, for parity tests against diffusers' schedulers,
plus the noise our samplers draw (to inject into diffusers). The JAX names are re-exported, so a parity test needs
one module: `import torch_oracle as oracle`."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from diffusion import samplers
from diffusion.gaussian_oracle import MU, SD, denoiser, normal, ode_error, ode_solution, optimal

__all__ = [
  'DIFFUSERS_TYPES',
  'MU',
  'SD',
  'denoiser',
  'injected_noise',
  'normal',
  'ode_error',
  'ode_solution',
  'optimal',
  'torch_denoiser',
]
DIFFUSERS_TYPES = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}


def torch_denoiser(schedule, prediction_type, wiggle=0.0):
  """The exact model in PyTorch (float32), for diffusers' schedulers: model(x, t) with a scalar t."""
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


@jax.jit
def _noise(rng, step, x):
  return samplers.step_noise(rng, step, x.shape)


def injected_noise(rng, step, shape):
  """The noise our samplers draw at loop index `step`, as a torch tensor (to inject into diffusers)."""
  return torch.from_numpy(np.array(_noise(rng, step, jnp.zeros(tuple(shape)))))
