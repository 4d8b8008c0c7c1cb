"""Parity with diffusers' PyTorch schedulers: the same analytic model (in torch and jax), the same start state and
injected noise, the same timesteps -> every intermediate latent agrees to <= 1e-4 max-abs (fp32)."""

import functools
import os
import sys

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_lcm

sys.path.insert(0, os.path.dirname(__file__))
import torch_oracle as oracle  # pylint: disable=g-import-not-at-top
from diffusion import process, samplers

ATOL = 1e-4
WIGGLE = 0.05
SHAPE = (2, 3, 3, 2)


def _schedule(zero_snr=False, kind='scaled_linear', **extra):
  return process.get_noise_schedule(
    dict(
      schedule=kind,
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      rescale_zero_terminal_snr=zero_snr,
      **extra,
    )
  )


@functools.lru_cache(maxsize=None)
def _jitted(name, num_steps, prediction_type, options):
  def run(x_T, rng, schedule):
    return samplers.get_sampler(name)(
      oracle.denoiser(schedule, prediction_type, WIGGLE),
      x_T,
      schedule,
      num_steps=num_steps,
      rng=rng,
      prediction_type=prediction_type,
      return_trajectory=True,
      **dict(options),
    )

  return jax.jit(run)


def _ours(name, schedule, x_T, num_steps, prediction_type, rng=None, **options):
  return _jitted(name, num_steps, prediction_type, tuple(sorted(options.items())))(x_T, rng, schedule)


def _reference(cls, schedule, prediction_type=None, **kwargs):
  """A diffusers scheduler on our alphas_cumprod (schedule values themselves are compared in test_process)."""
  if prediction_type is None:  # Flow-matching schedulers.
    return cls(num_train_timesteps=1000, **kwargs)
  scheduler = cls(
    num_train_timesteps=1000,
    beta_schedule='scaled_linear',
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type=oracle.DIFFUSERS_TYPES[prediction_type],
    **kwargs,
  )
  ac = torch.from_numpy(np.array(schedule.alphas_cumprod))
  if kwargs.get('rescale_betas_zero_snr'):
    ac[-1] = 2.0**-24
  scheduler.alphas_cumprod = ac
  return scheduler


def _compare(ours, reference_states, reference_timesteps):
  np.testing.assert_allclose(
    np.asarray(ours.timesteps), np.asarray(reference_timesteps, np.float32), rtol=1e-5, atol=1e-3
  )
  states = np.asarray(ours.states[1:])
  assert len(states) == len(reference_states)
  for i, (a, b) in enumerate(zip(states, reference_states)):
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b.numpy(), atol=ATOL, rtol=0, err_msg=f'state after step {i}')


def _scale(scheduler, x, t):
  return scheduler.scale_model_input(x, t) if hasattr(type(scheduler), 'scale_model_input') else x


def _run_single_order(scheduler, model, x, noise_kw=None):
  """Steps a one-call-per-step diffusers scheduler; returns the state after each step."""
  states = []
  for i, t in enumerate(scheduler.timesteps):
    out = model(_scale(scheduler, x, t), t)
    kwargs = noise_kw(i, x.shape) if noise_kw else {}
    x = scheduler.step(out, t, x, **kwargs).prev_sample
    states.append(x)
  return states


def _run_heun(scheduler, model, x):
  """Steps a Heun scheduler (two calls per step but the last); returns the state after each completed step."""
  states = []
  for t in scheduler.timesteps:
    x = scheduler.step(model(_scale(scheduler, x, t), t), t, x).prev_sample
    if scheduler.state_in_first_order:
      states.append(x)
  return states + [x]


# ----------------------------------------------------------------------------------------------------------
# Euler, Euler ancestral, Heun (variance-exploding state).

SLOW = pytest.mark.slow
K_CASES = [
  ('linspace', 0, 'eps', False),
  ('leading', 1, 'v', False),
  pytest.param('trailing', 0, 'x0', False, marks=SLOW),
  ('trailing', 0, 'v', True),
  pytest.param('linspace', 0, 'eps', True, marks=SLOW),
]


@pytest.mark.parametrize('spacing,offset,prediction_type,karras', K_CASES)
def test_euler(spacing, offset, prediction_type, karras):
  schedule, x_T, n = _schedule(), oracle.normal(0, SHAPE), 10
  ours = _ours('euler', schedule, x_T, n, prediction_type, timestep_spacing=spacing, steps_offset=offset, karras=karras)
  ref = _reference(
    diffusers.EulerDiscreteScheduler,
    schedule,
    prediction_type,
    timestep_spacing=spacing,
    steps_offset=offset,
    use_karras_sigmas=karras,
  )
  ref.set_timesteps(n)
  x = torch.from_numpy(x_T) * torch.sqrt(ref.sigmas[0] ** 2 + 1)
  states = _run_single_order(ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), x)
  _compare(ours, states, ref.timesteps)


@pytest.mark.parametrize(
  'spacing,offset,prediction_type',
  [('linspace', 0, 'eps'), ('trailing', 0, 'v'), pytest.param('leading', 1, 'eps', marks=SLOW)],
)
def test_euler_ancestral(spacing, offset, prediction_type, monkeypatch):
  schedule, x_T, n, rng = _schedule(), oracle.normal(1, SHAPE), 10, jax.random.key(1)
  ours = _ours('euler_a', schedule, x_T, n, prediction_type, rng=rng, timestep_spacing=spacing, steps_offset=offset)
  ref = _reference(
    diffusers.EulerAncestralDiscreteScheduler, schedule, prediction_type, timestep_spacing=spacing, steps_offset=offset
  )
  ref.set_timesteps(n)
  step = [0]
  monkeypatch.setattr(
    scheduling_euler_ancestral_discrete, 'randn_tensor', lambda shape, **_: oracle.injected_noise(rng, step[0], shape)
  )

  def noise_kw(i, shape):
    step[0] = i
    return {}

  x = torch.from_numpy(x_T) * torch.sqrt(ref.sigmas[0] ** 2 + 1)
  states = _run_single_order(ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), x, noise_kw)
  _compare(ours, states, ref.timesteps)


@pytest.mark.parametrize(
  'spacing,offset,prediction_type,karras',
  [
    ('linspace', 0, 'eps', False),
    pytest.param('trailing', 0, 'v', False, marks=SLOW),
    ('linspace', 0, 'x0', True),
    pytest.param('leading', 1, 'eps', True, marks=SLOW),
  ],
)
def test_heun(spacing, offset, prediction_type, karras):
  schedule, x_T, n = _schedule(), oracle.normal(2, SHAPE), 8
  ours = _ours('heun', schedule, x_T, n, prediction_type, timestep_spacing=spacing, steps_offset=offset, karras=karras)
  ref = _reference(
    diffusers.HeunDiscreteScheduler,
    schedule,
    prediction_type,
    timestep_spacing=spacing,
    steps_offset=offset,
    use_karras_sigmas=karras,
  )
  ref.set_timesteps(n)
  x = torch.from_numpy(x_T) * torch.sqrt(ref.sigmas[0] ** 2 + 1)
  states = _run_heun(ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), x)
  _compare(ours, states, ref.timesteps[0::2])


# ----------------------------------------------------------------------------------------------------------
# DPM-Solver++ 2M and its SDE variant (variance-preserving state).

DPM_CASES = [
  ('dpmpp_2m', 'linspace', 0, 'eps', False, False),
  pytest.param('dpmpp_2m', 'trailing', 0, 'v', False, False, marks=SLOW),
  pytest.param('dpmpp_2m', 'leading', 1, 'x0', False, False, marks=SLOW),
  ('dpmpp_2m', 'linspace', 0, 'eps', True, False),
  ('dpmpp_2m', 'trailing', 0, 'v', True, True),
  pytest.param('dpmpp_2m_sde', 'linspace', 0, 'eps', False, False, marks=SLOW),
  ('dpmpp_2m_sde', 'linspace', 0, 'v', True, False),
  ('dpmpp_2m_sde', 'trailing', 0, 'x0', False, True),
]


@pytest.mark.parametrize('name,spacing,offset,prediction_type,karras,zero_snr', DPM_CASES)
def test_dpm_solver(name, spacing, offset, prediction_type, karras, zero_snr):
  schedule, x_T, n, rng = _schedule(zero_snr), oracle.normal(3, SHAPE), 10, jax.random.key(3)
  ours = _ours(
    name, schedule, x_T, n, prediction_type, rng=rng, timestep_spacing=spacing, steps_offset=offset, karras=karras
  )
  algorithm = 'sde-dpmsolver++' if name.endswith('sde') else 'dpmsolver++'
  ref = _reference(
    diffusers.DPMSolverMultistepScheduler,
    schedule,
    prediction_type,
    timestep_spacing=spacing,
    steps_offset=offset,
    use_karras_sigmas=karras,
    algorithm_type=algorithm,
    solver_order=2,
    rescale_betas_zero_snr=zero_snr,
  )
  ref.set_timesteps(n)
  noise_kw = None
  if algorithm.startswith('sde'):
    noise_kw = lambda i, shape: {'variance_noise': oracle.injected_noise(rng, i, shape)}
  states = _run_single_order(
    ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), torch.from_numpy(x_T), noise_kw
  )
  _compare(ours, states, ref.timesteps)


# ----------------------------------------------------------------------------------------------------------
# Flow matching.


@pytest.mark.parametrize(
  'name,shift,karras',
  [
    pytest.param('flow_euler', 1.0, False, marks=SLOW),
    ('flow_euler', 3.0, False),
    ('flow_euler', 1.0, True),
    pytest.param('flow_heun', 1.0, False, marks=SLOW),
    ('flow_heun', 3.0, False),
  ],
)
def test_flow_matching(name, shift, karras):
  schedule, x_T, n = _schedule(kind='flow', flow_shift=shift), oracle.normal(4, SHAPE), 8
  options = {'karras': True} if karras else {}
  ours = _ours(name, schedule, x_T, n, 'flow', **options)
  model = oracle.torch_denoiser(schedule, 'flow', WIGGLE)
  x = torch.from_numpy(x_T)
  if name == 'flow_euler':
    ref = _reference(diffusers.FlowMatchEulerDiscreteScheduler, schedule, shift=shift, use_karras_sigmas=karras)
    ref.set_timesteps(n)
    states, timesteps = _run_single_order(ref, model, x), ref.timesteps
  else:
    ref = _reference(diffusers.FlowMatchHeunDiscreteScheduler, schedule, shift=shift)
    ref.set_timesteps(n)
    states, timesteps = _run_heun(ref, model, x), ref.timesteps[0::2]
  _compare(ours, states, timesteps)


# ----------------------------------------------------------------------------------------------------------
# DDIM and DDPM (variance-preserving state, integer timesteps).

DDIM_CASES = [
  ('leading', 1, 'eps', 0.0, False),
  pytest.param('trailing', 0, 'eps', 0.0, False, marks=SLOW),
  ('linspace', 0, 'eps', 0.0, False),
  pytest.param('leading', 1, 'v', 0.0, False, marks=SLOW),
  ('trailing', 0, 'x0', 0.0, False),
  ('leading', 1, 'eps', 1.0, False),
  ('trailing', 0, 'v', 0.0, True),
  pytest.param('trailing', 0, 'v', 0.5, False, marks=pytest.mark.slow),
  pytest.param('trailing', 0, 'v', 1.0, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('spacing,offset,prediction_type,eta,zero_snr', DDIM_CASES)
def test_ddim(spacing, offset, prediction_type, eta, zero_snr):
  schedule, n, rng = _schedule(zero_snr), 10, jax.random.key(8)
  x_T = oracle.normal(9, SHAPE)
  ours = _ours(
    'ddim', schedule, x_T, n, prediction_type, rng=rng, eta=eta, timestep_spacing=spacing, steps_offset=offset
  )
  ref = _reference(
    diffusers.DDIMScheduler,
    schedule,
    prediction_type,
    timestep_spacing=spacing,
    steps_offset=offset,
    set_alpha_to_one=False,
    rescale_betas_zero_snr=zero_snr,
    clip_sample=False,
  )
  ref.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))  # DDIM keeps the exact 0.
  ref.final_alpha_cumprod = ref.alphas_cumprod[0]
  ref.set_timesteps(n)
  noise_kw = lambda i, shape: {'eta': eta, 'variance_noise': oracle.injected_noise(rng, i, shape) if eta else None}
  states = _run_single_order(
    ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), torch.from_numpy(x_T), noise_kw
  )
  _compare(ours, states, ref.timesteps)


DDPM_CASES = [
  ('leading', 1, 'eps', 10, False),
  pytest.param('trailing', 0, 'v', 10, False, marks=SLOW),
  ('linspace', 0, 'x0', 10, False),
  pytest.param('leading', 0, 'eps', 1000, False, marks=pytest.mark.slow),
  ('trailing', 0, 'v', 10, True),
]


@pytest.mark.parametrize('spacing,offset,prediction_type,num_steps,zero_snr', DDPM_CASES)
def test_ddpm(spacing, offset, prediction_type, num_steps, zero_snr, monkeypatch):
  schedule, rng = _schedule(zero_snr), jax.random.key(10)
  x_T = oracle.normal(11, SHAPE)
  ours = _ours(
    'ddpm', schedule, x_T, num_steps, prediction_type, rng=rng, timestep_spacing=spacing, steps_offset=offset
  )
  ref = _reference(
    diffusers.DDPMScheduler,
    schedule,
    prediction_type,
    timestep_spacing=spacing,
    steps_offset=offset,
    variance_type='fixed_small',
    rescale_betas_zero_snr=zero_snr,
    clip_sample=False,
  )
  ref.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
  ref.set_timesteps(num_steps)
  step = [0]
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor', lambda shape, **_: oracle.injected_noise(rng, step[0], shape))

  def noise_kw(i, shape):
    step[0] = i
    return {}

  states = _run_single_order(
    ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), torch.from_numpy(x_T), noise_kw
  )
  _compare(ours, states, ref.timesteps)


# ----------------------------------------------------------------------------------------------------------
# LCM (variance-preserving state, the skipping-step timesteps, fresh noise between steps).

LCM_CASES = [
  (1, 'eps', {}, False),
  (2, 'eps', {}, False),
  (4, 'eps', {}, False),
  (8, 'eps', {}, False),
  (1, 'v', {}, False),
  (2, 'v', {}, False),
  (4, 'v', {}, False),
  (8, 'v', {}, False),
  (4, 'v', dict(timestep_scaling=0.002), False),  # c_skip 0.06 .. 0.48: the boundary condition matters.
  pytest.param(4, 'x0', {}, False, marks=SLOW),
  pytest.param(4, 'v', {}, True, marks=SLOW),
  pytest.param(7, 'eps', dict(original_inference_steps=30, timestep_scaling=0.005), False, marks=SLOW),
  pytest.param(50, 'v', {}, False, marks=SLOW),
  pytest.param(3, 'eps', dict(clip_sample=True, clip_sample_range=0.6), False, marks=SLOW),
]


@pytest.mark.parametrize('num_steps,prediction_type,options,zero_snr', LCM_CASES)
def test_lcm(num_steps, prediction_type, options, zero_snr, monkeypatch):
  schedule, rng = _schedule(zero_snr), jax.random.key(14)
  x_T = oracle.normal(15, SHAPE)
  ours = _ours('lcm', schedule, x_T, num_steps, prediction_type, rng=rng, **options)
  ref = _reference(diffusers.LCMScheduler, schedule, prediction_type, rescale_betas_zero_snr=zero_snr, **options)
  ref.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))  # LCM keeps the exact 0.
  ref.set_timesteps(num_steps)
  step = [0]
  monkeypatch.setattr(scheduling_lcm, 'randn_tensor', lambda shape, **_: oracle.injected_noise(rng, step[0], shape))

  def noise_kw(i, shape):
    step[0] = i
    return {}

  states = _run_single_order(
    ref, oracle.torch_denoiser(schedule, prediction_type, WIGGLE), torch.from_numpy(x_T), noise_kw
  )
  _compare(ours, states, ref.timesteps)
  np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy().astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Timestep lists.

SPACINGS = [('leading', 0), ('leading', 1), ('trailing', 0), ('linspace', 0)]


@pytest.mark.parametrize('spacing,offset', SPACINGS)
@pytest.mark.parametrize('num_steps', [1, 7, 25, 999])
def test_timestep_lists_match_diffusers(spacing, offset, num_steps):
  for cls, ours in (
    (diffusers.DDIMScheduler, samplers.make_timesteps),
    (diffusers.DDPMScheduler, samplers.make_timesteps),
    (diffusers.EulerDiscreteScheduler, samplers.k_timesteps),
    (diffusers.EulerAncestralDiscreteScheduler, samplers.k_timesteps),
    (diffusers.DPMSolverMultistepScheduler, samplers.dpm_timesteps),
  ):
    reference = cls(timestep_spacing=spacing, steps_offset=offset)
    reference.set_timesteps(num_steps)
    np.testing.assert_array_equal(
      ours(1000, num_steps, spacing, offset), reference.timesteps.numpy(), err_msg=cls.__name__
    )
  heun = diffusers.HeunDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
  heun.set_timesteps(num_steps)
  np.testing.assert_array_equal(samplers.k_timesteps(1000, num_steps, spacing, offset), heun.timesteps.numpy()[::2])


def test_lcm_timestep_lists_match_diffusers():
  for num_train, original in ((1000, 50), (1000, 30), (1000, 1), (1000, 1000), (100, 7)):
    for num_steps in sorted({1, 2, 3, 4, 8, max(original // 2, 1), original}):
      if num_steps > original:
        continue
      reference = diffusers.LCMScheduler(num_train_timesteps=num_train, original_inference_steps=original)
      reference.set_timesteps(num_steps)
      np.testing.assert_array_equal(
        samplers.lcm_timesteps(num_train, num_steps, original), reference.timesteps.numpy(), err_msg=str(original)
      )


@pytest.mark.parametrize('num_steps', [1, 4, 25])
@pytest.mark.parametrize('shift', [1.0, 3.0])
def test_flow_timesteps_match_diffusers(num_steps, shift):
  from diffusion.samplers import flow

  reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
  reference.set_timesteps(num_steps)
  np.testing.assert_allclose(flow.flow_levels(1000, num_steps, shift) * 1000, reference.timesteps.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# img2img + inpainting, as diffusers' StableDiffusionInpaintPipeline steps a 4-channel U-Net.


@pytest.mark.parametrize(
  'name,cls,kwargs',
  [
    (
      'ddim',
      diffusers.DDIMScheduler,
      dict(timestep_spacing='leading', steps_offset=1, set_alpha_to_one=False, clip_sample=False),
    ),
    pytest.param('euler', diffusers.EulerDiscreteScheduler, dict(timestep_spacing='linspace'), marks=SLOW),
  ],
)
def test_masked_img2img_matches_the_diffusers_pipeline_loop(name, cls, kwargs):
  schedule, n, strength = _schedule(), 10, 0.6
  x_T, x0 = oracle.normal(12, SHAPE), oracle.normal(13, SHAPE)
  mask = np.zeros(SHAPE[:-1] + (1,), np.float32)
  mask[:, :2] = 1.0
  options = {k: v for k, v in kwargs.items() if k not in ('set_alpha_to_one', 'clip_sample')}
  ours = samplers.get_sampler(name)(
    oracle.denoiser(schedule, 'eps', WIGGLE),
    x_T,
    schedule,
    num_steps=n,
    prediction_type='eps',
    init_latents=x0,
    strength=strength,
    mask=mask,
    return_trajectory=True,
    **options,
  )
  ref = _reference(cls, schedule, 'eps', **kwargs)
  if name == 'ddim':
    ref.final_alpha_cumprod = ref.alphas_cumprod[0]
  ref.set_timesteps(n)
  start = n - int(n * strength)
  timesteps = ref.timesteps[start:]
  if hasattr(ref, 'set_begin_index'):
    ref.set_begin_index(start)
  image, noise, m = (torch.from_numpy(a) for a in (x0, x_T, mask))
  x = ref.add_noise(image, noise, timesteps[:1])
  model, states = oracle.torch_denoiser(schedule, 'eps', WIGGLE), []
  for i, t in enumerate(timesteps):
    x = ref.step(model(_scale(ref, x, t), t), t, x).prev_sample
    known = ref.add_noise(image, noise, timesteps[i + 1 : i + 2]) if i < len(timesteps) - 1 else image
    x = (1 - m) * known + m * x
    states.append(x)
  _compare(ours, states, timesteps)
