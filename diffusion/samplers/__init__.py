"""Samplers: a registry name -> sampler, each running its whole loop as one `lax.scan`.

Every sampler has the signature

  sampler(denoise_fn, x_T, schedule, *, num_steps, rng, prediction_type, init_latents=None, strength=1.0,
          mask=None, return_trajectory=False, **options) -> x_0

where `denoise_fn(x_t, t)` returns the raw network output for float32 model times `t` (B,) in diffusers' units
(0..T) on the model's own path x_t = alpha_t x0 + sigma_t eps. Samplers turn that output into eps / x0 / flow
velocity through `process.convert` only. `num_steps` and the options are static (Python values); the caller jits,
so there is one compile per (sampler, steps, shape, options). Each sampler reproduces the diffusers scheduler of
the same name step for step (see docs/samplers.md).

  diffusion family (discrete / edm schedules): ddpm, ddim, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, lcm
  flow family ('flow' schedule):               flow_euler, flow_heun

A sampler of the other family than the model's schedule is a `UserError`.

Randomness is per example: the noise of example b at loop index i is drawn from fold_in(key_b, i), where key_b
is the b-th of a batch of keys passed as `rng`, or fold_in(rng, b) for a single key. So an example's sample never
depends on the batch it was drawn in.

img2img: `init_latents` (clean latents) with `strength` in (0, 1) starts int(num_steps * strength) steps before the
end, from the init latents noised to that level with x_T as the noise (strength 1: from pure noise); its range and
default are `editing_strength`'s. Inpainting: `mask` (1 = generate, 0 = keep; broadcastable to x_T) re-noises the
known region to each next level with the same noise (x0 itself at the end).

`SamplingSettings` (settings.py) is the validated description of a sampling call (sampler, steps, guidance, the
sampler's options) that the pipeline, sample.py, the eval tools and config validation share.
"""

from diffusion.samplers import consistency, discrete, dpm, flow, karras  # Registers the samplers.
from diffusion.samplers.consistency import lcm_timesteps
from diffusion.samplers.core import (
  FAMILIES,
  SAMPLERS,
  SPACINGS,
  Grid,
  Plan,
  SamplerInfo,
  Trajectory,
  available_samplers,
  dpm_timesteps,
  editing_strength,
  family_error,
  get_sampler,
  k_timesteps,
  karras_sigmas,
  make_timesteps,
  register_sampler,
  sampler_info,
  step_noise,
  t_at_ve_sigma,
  ve_sigma_at,
)
from diffusion.samplers.guidance import cfg_denoise_fn
from diffusion.samplers.settings import CONFIG_OPTIONS, SamplingSettings

ddim = discrete.ddim
ddpm = discrete.ddpm
euler = karras.euler
euler_a = karras.euler_ancestral
heun = karras.heun
dpmpp_2m = dpm.dpmpp_2m
dpmpp_2m_sde = dpm.dpmpp_2m_sde
flow_euler = flow.flow_euler
flow_heun = flow.flow_heun
lcm = consistency.lcm
