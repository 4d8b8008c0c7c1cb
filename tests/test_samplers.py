"""Samplers against Gaussian data, where the exact denoiser and the exact ODE solution are known; the driver's
img2img / inpainting; classifier-free guidance. Parity with diffusers is in test_sampler_parity.py."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from diffusion import gaussian_oracle as oracle  # pylint: disable=g-import-not-at-top
from diffusion import process, samplers
from diffusion.errors import UserError

MU, SD = oracle.MU, oracle.SD
DIFFUSION = ('ddim', 'ddpm', 'dpmpp_2m', 'dpmpp_2m_sde', 'euler', 'euler_a', 'heun', 'lcm')
VP = dict(schedule='scaled_linear', num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def _schedule(zero_snr: bool = False, **config) -> process.NoiseSchedule:
  return process.get_noise_schedule({**VP, 'rescale_zero_terminal_snr': zero_snr, **config})


@functools.lru_cache(maxsize=None)
def _jitted_sampler(name, num_steps, prediction_type, options):
  def run(x_T, rng, schedule, init_latents=None, mask=None):
    opts = dict(options)
    return samplers.get_sampler(name)(
      oracle.denoiser(schedule, prediction_type),
      x_T,
      schedule,
      num_steps=num_steps,
      rng=rng,
      prediction_type=prediction_type,
      init_latents=init_latents,
      mask=mask,
      **opts,
    )

  return jax.jit(run)


def _run(name, schedule, x_T, num_steps, prediction_type, rng=None, init_latents=None, mask=None, **options):
  """Runs a sampler on the optimal denoiser, jitted with the schedule traced (one compile per setting)."""
  fn = _jitted_sampler(name, num_steps, prediction_type, tuple(sorted(options.items())))
  return jax.device_get(fn(x_T, rng, schedule, init_latents, mask))


# ----------------------------------------------------------------------------------------------------------
# Registry and families.


def test_registry_and_families():
  assert set(samplers.available_samplers()) == set(DIFFUSION) | {'flow_euler', 'flow_heun'}
  assert samplers.available_samplers('flow') == ['flow_euler', 'flow_heun']
  assert samplers.get_sampler('ddim') is samplers.ddim and samplers.get_sampler('euler_a') is samplers.euler_a
  assert samplers.sampler_info('heun').options == (
    'timestep_spacing',
    'steps_offset',
    'karras',
    's_churn',
    's_tmin',
    's_tmax',
    's_noise',
  )
  with pytest.raises(UserError, match='ddim.*ddpm'):
    samplers.get_sampler('no-such-sampler')
  with pytest.raises(ValueError, match='already registered'):
    samplers.register_sampler('ddim')(samplers.ddpm.spec)


@pytest.mark.parametrize(
  'name,schedule_name,prediction_type',
  [
    ('flow_euler', 'scaled_linear', 'eps'),
    ('flow_heun', 'edm', 'v'),
    ('ddim', 'flow', 'flow'),
    ('dpmpp_2m', 'flow', 'v'),
  ],
)
def test_sampler_of_the_other_family_is_a_clear_error(name, schedule_name, prediction_type):
  schedule = _schedule(schedule=schedule_name)
  other = 'flow' if schedule_name != 'flow' else 'diffusion'
  with pytest.raises(UserError, match=f'{name!r} is a {other} sampler but the model is a .* model.*use one of'):
    samplers.get_sampler(name)(
      oracle.denoiser(schedule, prediction_type),
      jnp.zeros((1, 2, 2, 2)),
      schedule,
      num_steps=2,
      rng=jax.random.key(0),
      prediction_type=prediction_type,
    )


def test_sampler_errors():
  schedule = _schedule()
  x, d = jnp.zeros((1, 2, 2, 2)), oracle.denoiser(schedule, 'eps')
  for name in ('ddpm', 'euler_a', 'dpmpp_2m_sde'):
    with pytest.raises(UserError, match='rng'):
      samplers.get_sampler(name)(d, x, schedule, num_steps=2, rng=None, prediction_type='eps')
  with pytest.raises(UserError, match='rng'):
    samplers.heun(d, x, schedule, num_steps=2, rng=None, prediction_type='eps', s_churn=1.0)
  with pytest.raises(ValueError, match='flow'):
    samplers.ddim(d, x, schedule, num_steps=2, prediction_type='flow')
  with pytest.raises(TypeError):
    samplers.ddim(d, x, schedule, num_steps=2, prediction_type='eps', no_such_option=1)
  with pytest.raises(UserError, match='strength'):
    samplers.ddim(d, x, schedule, num_steps=10, prediction_type='eps', init_latents=x, strength=0.05)
  with pytest.raises(UserError, match='init_latents'):
    samplers.ddim(d, x, schedule, num_steps=10, prediction_type='eps', strength=0.5)
  with pytest.raises(UserError, match='mask'):
    samplers.ddim(d, x, schedule, num_steps=10, prediction_type='eps', init_latents=x, mask=jnp.ones((1, 3, 3, 1)))
  with pytest.raises(UserError, match='num_steps'):
    samplers.euler(d, x, schedule, num_steps=0, prediction_type='eps')


def test_lcm_errors():
  schedule = _schedule()
  x, d = jnp.zeros((1, 2, 2, 2)), oracle.denoiser(schedule, 'eps')
  with pytest.raises(UserError, match=r'num_steps must be in \[1, original_inference_steps = 50\].*got 51'):
    samplers.lcm(d, x, schedule, num_steps=51, rng=jax.random.key(0), prediction_type='eps')
  with pytest.raises(UserError, match=r'num_steps .* got 5'):
    samplers.lcm(d, x, schedule, num_steps=5, rng=jax.random.key(0), prediction_type='eps', original_inference_steps=4)
  with pytest.raises(UserError, match=r'original_inference_steps must be in \[1, 1000\]'):
    samplers.lcm_timesteps(1000, 4, 1001)
  with pytest.raises(UserError, match='timestep_scaling'):
    samplers.lcm(d, x, schedule, num_steps=1, prediction_type='eps', timestep_scaling=0.0)
  with pytest.raises(UserError, match='rng'):  # Fresh noise between steps.
    samplers.lcm(d, x, schedule, num_steps=2, rng=None, prediction_type='eps')
  assert np.isfinite(samplers.lcm(d, x, schedule, num_steps=1, rng=None, prediction_type='eps')).all()


def test_timesteps_errors():
  with pytest.raises(UserError, match='num_steps'):
    samplers.make_timesteps(1000, 1001)
  with pytest.raises(UserError, match='leading, trailing, linspace'):
    samplers.k_timesteps(1000, 10, 'quadratic')


# ----------------------------------------------------------------------------------------------------------
# Exact answers for Gaussian data: deterministic samplers converge to the ODE solution at their order.

ORDER_CASES = [
  ('ddim', VP, 'v', dict(timestep_spacing='trailing'), 1),
  ('euler', dict(schedule='edm'), 'eps', dict(karras=True), 1),
  ('heun', dict(schedule='edm'), 'v', dict(karras=True), 2),
  ('dpmpp_2m', VP, 'x0', dict(timestep_spacing='trailing', measure_t=199), 2),
  ('flow_euler', dict(schedule='flow'), 'flow', {}, 1),
  ('flow_heun', dict(schedule='flow'), 'flow', {}, 2),
]


@pytest.mark.parametrize('name,config,prediction_type,options,order', ORDER_CASES)
def test_deterministic_samplers_converge_at_their_order(name, config, prediction_type, options, order):
  """The error against the exact ODE solution from the same x_T falls as steps^-order (scripts/convergence_order.py
  prints the full table)."""
  schedule = process.get_noise_schedule({**VP, **config})
  x_T = oracle.normal(0, (16, 2, 2, 2))
  steps = (10, 20, 40)
  errors = [oracle.ode_error(name, schedule, prediction_type, n, x_T, **options) for n in steps]
  observed = -np.diff(np.log(errors)) / np.log(2)
  assert np.all(np.abs(observed - order) < 0.4), (errors, observed)


def _chain_moments(name, ac, timesteps, eta=1.0):
  """Exact per-channel mean and variance of a DDPM / DDIM chain run with the optimal denoiser from N(0, 1).

  Every step is affine in x plus independent Gaussian noise, so moments propagate in closed form (float64).
  """
  mean, var = np.zeros(2), np.ones(2)
  ac = ac.astype(np.float64)
  step = 1000 // len(timesteps)
  for i, t in enumerate(timesteps):
    prev = (timesteps[i + 1] if i + 1 < len(timesteps) else -1) if name == 'ddpm' else t - step
    a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else 1.0)
    d = a_t * SD**2 + 1 - a_t
    c1, c0 = np.sqrt(a_t) * SD**2 / d, MU * (1 - a_t * SD**2 / d)  # x0_hat = c1 x + c0.
    if name == 'ddpm':
      k0 = np.sqrt(a_prev) * (1 - a_t / a_prev) / (1 - a_t)
      k1 = np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
      noise_var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev) if t > 0 else 0.0
    else:  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s noise, eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t).
      noise_var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
      direction = np.sqrt(1 - a_prev - noise_var) / np.sqrt(1 - a_t)
      k0, k1 = np.sqrt(a_prev) - direction * np.sqrt(a_t), direction
    mean = k0 * (c1 * mean + c0) + k1 * mean
    var = (k0 * c1 + k1) ** 2 * var + noise_var
  return mean, var


@pytest.mark.parametrize(
  'name,options,prediction_type',
  [
    ('ddpm', {}, 'eps'),
    ('ddim', dict(eta=1.0, set_alpha_to_one=True), 'x0'),
    pytest.param('ddpm', {}, 'v', marks=pytest.mark.slow),
  ],
)
def test_ancestral_samplers_match_exact_chain_moments(name, options, prediction_type):
  """Sample moments over many draws equal the chain's exact moments, which are near MU, SD."""
  schedule, num_steps, n = _schedule(), 50, 8192
  x_T = oracle.normal(1, (n // 4, 2, 2, 2))
  out = _run(name, schedule, x_T, num_steps, prediction_type, rng=jax.random.key(2), **options).reshape(-1, 2)
  mean, var = _chain_moments(name, np.asarray(schedule.alphas_cumprod), samplers.make_timesteps(1000, num_steps))
  # Within 4 standard errors of the exact values.
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)
  np.testing.assert_allclose(mean, MU, atol=0.02)
  np.testing.assert_allclose(np.sqrt(var), SD, rtol=0.15)


def _euler_ancestral_moments(sigmas):
  """Exact per-channel mean and variance of the Euler-ancestral chain with the optimal denoiser: every step is
  affine in x (D(x) = MU + c (x - MU), c = SD^2 / (SD^2 + sigma^2)) plus independent noise."""
  sigmas = np.asarray(sigmas, np.float64)
  mean, var = np.zeros(2), np.full(2, 1.0 + sigmas[0] ** 2)
  for sigma, sigma_to in zip(sigmas[:-1], sigmas[1:]):
    sigma_up = np.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
    sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
    c = SD**2 / (SD**2 + sigma**2)
    k = 1.0 + (1.0 - c) / sigma * (sigma_down - sigma)  # x' = k x + (1 - k) MU + sigma_up noise.
    mean, var = k * mean + (1.0 - k) * MU, k**2 * var + sigma_up**2
  return mean, var


def test_euler_ancestral_matches_exact_chain_moments():
  """Euler ancestral is first order in its noise: at 40 steps the exact chain is ~15% under-dispersed, and the
  samples match the exact chain, not the data."""
  schedule, n, num_steps = _schedule(), 8192, 40
  x_T = oracle.normal(3, (n // 4, 2, 2, 2))
  out = _run('euler_a', schedule, x_T, num_steps, 'eps', rng=jax.random.key(4)).reshape(-1, 2)
  mean, var = _euler_ancestral_moments(samplers.euler_a.spec(schedule, num_steps).grid.sigmas)
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)
  np.testing.assert_allclose(mean, MU, atol=0.02)
  np.testing.assert_allclose(np.sqrt(var), SD, rtol=0.2)
  finer = _euler_ancestral_moments(samplers.euler_a.spec(schedule, 400).grid.sigmas)[1]
  assert np.all(np.abs(np.sqrt(finer) - SD) < 0.3 * np.abs(np.sqrt(var) - SD))  # First order: 10x steps, ~10x.


@pytest.mark.parametrize(
  'name,config,options',
  [
    ('dpmpp_2m_sde', VP, dict(karras=True)),
    ('heun', dict(schedule='edm'), dict(karras=True, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)),
  ],
)
def test_stochastic_samplers_reach_the_data_distribution(name, config, options):
  """Over many draws the samples' per-channel mean and std match N(MU, SD^2)."""
  schedule, n = process.get_noise_schedule({**VP, **config}), 8192
  x_T = oracle.normal(3, (n // 4, 2, 2, 2))
  out = _run(name, schedule, x_T, 40, 'v', rng=jax.random.key(4), **options).reshape(-1, 2)
  assert np.all(np.abs(out.mean(0) - MU) < 4 * SD / np.sqrt(n) + 0.01), out.mean(0)
  np.testing.assert_allclose(out.std(0), SD, rtol=0.05)
  other = _run(name, schedule, x_T, 40, 'v', rng=jax.random.key(5), **options).reshape(-1, 2)
  assert np.abs(other - out).max() > 0.1  # The noise matters, so this is a stochastic sampler.


def test_ddim_eta0_transports_noise_to_data():
  """DDIM(eta=0) maps N(0, 1) onto the data distribution too: the ODE transports the marginals."""
  schedule, n = _schedule(), 8192
  x_T = oracle.normal(3, (n // 4, 2, 2, 2))
  out = _run('ddim', schedule, x_T, 100, 'v', set_alpha_to_one=True, timestep_spacing='trailing').reshape(-1, 2)
  timesteps = samplers.make_timesteps(1000, 100, 'trailing')
  mean, var = _chain_moments('ddim', np.asarray(schedule.alphas_cumprod), timesteps, eta=0.0)
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)
  np.testing.assert_allclose(mean, MU, atol=0.03)
  np.testing.assert_allclose(np.sqrt(var), SD, rtol=0.05)


@pytest.mark.parametrize('prediction_type', ['eps', 'v', 'x0'])
def test_lcm_one_step_is_the_boundary_condition_formula(prediction_type):
  """One LCM step from x_T at t = 999: c_out x0_hat + c_skip x_T, with x0_hat the exact posterior mean and
  c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2) (sd = 0.5; s small, so both terms count)."""
  schedule, scaling = _schedule(), 0.001
  x_T = oracle.normal(13, (4, 2, 2, 2))
  out = _run('lcm', schedule, x_T, 1, prediction_type, timestep_scaling=scaling)
  a_t = np.float64(schedule.alphas_cumprod[999])
  x0_hat = oracle.optimal(x_T.astype(np.float64), np.sqrt(a_t), np.sqrt(1 - a_t), 'x0', xp=np)
  st = scaling * 999
  c_skip, c_out = 0.25 / (st**2 + 0.25), st / np.sqrt(st**2 + 0.25)
  assert c_skip > 0.1 and c_out > 0.1
  np.testing.assert_allclose(out, c_out * x0_hat + c_skip * x_T, rtol=0, atol=1e-5)


def test_lcm_matches_its_exact_chain_moments():
  """With the exact denoiser every LCM step is affine in x plus fresh noise (x0_hat = c1 x + c0), so the per-channel
  mean and variance of the output are known in closed form; 8192 draws match them within 4 standard errors."""
  schedule, n, scaling = _schedule(), 8192, 0.002
  x_T = oracle.normal(14, (n // 4, 2, 2, 2))
  out = _run('lcm', schedule, x_T, 4, 'v', rng=jax.random.key(15), timestep_scaling=scaling).reshape(-1, 2)
  timesteps = samplers.lcm_timesteps(1000, 4)
  ac = np.asarray(schedule.alphas_cumprod, np.float64)
  mean, var = np.zeros(2), np.ones(2)
  for i, t in enumerate(timesteps):
    a_t = ac[t]
    d = a_t * SD**2 + 1 - a_t
    c1, c0 = np.sqrt(a_t) * SD**2 / d, MU * (1 - a_t * SD**2 / d)
    st = scaling * t
    c_skip, c_out = 0.25 / (st**2 + 0.25), st / np.sqrt(st**2 + 0.25)
    k, b = c_out * c1 + c_skip, c_out * c0  # denoised = k x + b.
    mean, var = k * mean + b, k**2 * var
    if i < len(timesteps) - 1:
      a_next = ac[timesteps[i + 1]]
      mean, var = np.sqrt(a_next) * mean, a_next * var + (1 - a_next)
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)


# ----------------------------------------------------------------------------------------------------------
# Tracing, timesteps seen by the model, per-example randomness.


@pytest.mark.parametrize('name', ['ddim', 'dpmpp_2m', 'lcm'])
def test_loop_is_traced_once_and_compiled_once(name):
  schedule = _schedule()
  calls = []

  def denoise_fn(x, t):
    calls.append((t.shape, t.dtype))
    return oracle.optimal(x, *process.alpha_sigma(schedule, t, x.ndim), 'eps')

  rng = jax.random.key(0)
  fn = jax.jit(
    lambda x: samplers.get_sampler(name)(denoise_fn, x, schedule, num_steps=50, rng=rng, prediction_type='eps')
  )
  fn(jnp.zeros((3, 2, 2, 2)))
  fn(jnp.ones((3, 2, 2, 2)))
  assert calls == [((3,), jnp.float32)] and fn._cache_size() == 1  # pylint: disable=protected-access
  jaxpr = str(jax.make_jaxpr(fn)(jnp.zeros((3, 2, 2, 2))))
  # One device loop over the 50 steps, no host round trips.
  assert jaxpr.count('length=50') == 1 and 'callback' not in jaxpr


def test_ancestral_noise_is_per_example():
  schedule = _schedule()
  rng = jax.random.key(5)
  x_T = oracle.normal(6, (4, 2, 2, 2))
  full = _run('ddpm', schedule, x_T, 10, 'eps', rng=rng)
  # One key per example (example b of a single key gets fold_in(rng, b)): the batch does not matter.
  keys = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(4))
  head = _run('ddpm', schedule, x_T[2:], 10, 'eps', rng=keys[2:])
  np.testing.assert_allclose(head, full[2:], atol=1e-6)
  other = _run('ddpm', schedule, x_T, 10, 'eps', rng=jax.random.key(7))
  assert np.abs(other - full).max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# img2img and inpainting.


@pytest.mark.parametrize(
  'name,schedule_name,prediction_type',
  [('ddim', 'scaled_linear', 'eps'), ('euler', 'scaled_linear', 'v'), ('flow_euler', 'flow', 'flow')],
)
def test_img2img_starts_from_the_noised_init_at_the_right_step(name, schedule_name, prediction_type):
  schedule = _schedule(schedule=schedule_name)
  x_T, x0 = oracle.normal(7, (2, 2, 2, 2)), oracle.normal(8, (2, 2, 2, 2))
  sampler = samplers.get_sampler(name)
  full = sampler(
    oracle.denoiser(schedule, prediction_type),
    x_T,
    schedule,
    num_steps=10,
    prediction_type=prediction_type,
    return_trajectory=True,
  )
  part = sampler(
    oracle.denoiser(schedule, prediction_type),
    x_T,
    schedule,
    num_steps=10,
    prediction_type=prediction_type,
    init_latents=x0,
    strength=0.6,
    return_trajectory=True,
  )
  assert part.states.shape[0] == 7 and part.timesteps.shape == (6,)  # int(10 * 0.6) steps, the last 6.
  np.testing.assert_array_equal(part.timesteps, full.timesteps[4:])
  np.testing.assert_allclose(part.states[0], full.alphas[4] * x0 + full.sigmas[4] * x_T, rtol=1e-6, atol=1e-6)
  weak = sampler(
    oracle.denoiser(schedule, prediction_type),
    x_T,
    schedule,
    num_steps=10,
    prediction_type=prediction_type,
    init_latents=x0,
    strength=0.1,
  )
  strong = part.x0
  assert np.abs(np.asarray(weak) - x0).max() < np.abs(np.asarray(strong) - x0).max()


@pytest.mark.parametrize(
  'name',
  ['ddpm', 'flow_heun', pytest.param('dpmpp_2m', marks=pytest.mark.slow), pytest.param('heun', marks=pytest.mark.slow)],
)
def test_inpainting_keeps_the_known_region(name):
  flow = name.startswith('flow')
  schedule = _schedule(schedule='flow' if flow else 'scaled_linear')
  prediction_type = 'flow' if flow else 'eps'
  x_T, x0 = oracle.normal(9, (2, 4, 4, 2)), oracle.normal(10, (2, 4, 4, 2))
  mask = np.zeros((2, 4, 4, 1), np.float32)
  mask[:, :2] = 1.0  # Repaint the top half.
  rng = jax.random.key(11)
  out = _run(name, schedule, x_T, 8, prediction_type, rng=rng, init_latents=x0, mask=mask)
  np.testing.assert_array_equal(out[:, 2:], x0[:, 2:])  # Exactly the known latents at the end.
  assert np.abs(out[:, :2] - x0[:, :2]).max() > 0.1
  plain = _run(name, schedule, x_T, 8, prediction_type, rng=rng, init_latents=x0)  # Strength 1: x0 is ignored.
  everywhere = _run(name, schedule, x_T, 8, prediction_type, rng=rng, init_latents=x0, mask=np.ones_like(mask))
  np.testing.assert_allclose(everywhere, plain, atol=1e-6)
  np.testing.assert_allclose(plain, _run(name, schedule, x_T, 8, prediction_type, rng=rng), atol=1e-6)


def test_inpainting_with_the_exact_denoiser_samples_the_conditional():
  """With independent channels, the repainted half is a sample of the data whatever the known half holds."""
  schedule, n = _schedule(), 4096
  x_T = oracle.normal(12, (n, 2, 1, 2))
  x0 = np.broadcast_to(np.array([[[[3.0, -3.0]]]], np.float32), x_T.shape).copy()  # Far from the data.
  mask = np.zeros((n, 2, 1, 1), np.float32)
  mask[:, 0] = 1.0
  out = _run('ddim', schedule, x_T, 50, 'eps', init_latents=x0, mask=mask, timestep_spacing='trailing')
  np.testing.assert_allclose(out[:, 0, 0].mean(0), MU, atol=0.05)
  np.testing.assert_allclose(out[:, 0, 0].std(0), SD, rtol=0.08)
  np.testing.assert_array_equal(out[:, 1], x0[:, 1])


# ----------------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def _counting_model():
  calls = []

  def model_fn(x, t, context):
    calls.append(x.shape[0])
    return x * context['scale'][:, None, None, None] + t[:, None, None, None] * 1e-3

  return model_fn, calls


def _contexts(batch):
  cond = {'scale': jnp.linspace(1.0, 2.0, batch)}
  uncond = {'scale': jnp.full((batch,), -0.5)}
  return cond, uncond


def test_cfg_scale_one_is_the_conditional_model():
  model_fn, calls = _counting_model()
  cond, uncond = _contexts(3)
  x, t = oracle.normal(0, (3, 2, 2, 2)), jnp.full((3,), 500.0)
  out = samplers.cfg_denoise_fn(model_fn, cond, uncond, 1.0)(x, t)
  np.testing.assert_allclose(out, model_fn(x, t, cond), atol=0)
  assert calls == [3, 3]  # Our call, then the reference call: one conditional call of batch 3 each.


@pytest.mark.parametrize('scale', [0.0, 4.0, 7.5])
def test_cfg_formula_with_one_batched_call(scale):
  model_fn, calls = _counting_model()
  cond, uncond = _contexts(3)
  x, t = oracle.normal(1, (3, 2, 2, 2)), jnp.full((3,), 250.0)
  out = samplers.cfg_denoise_fn(model_fn, cond, uncond, scale)(x, t)
  assert calls == [6]
  c, u = model_fn(x, t, cond), model_fn(x, t, uncond)
  np.testing.assert_allclose(out, u + scale * (c - u), rtol=1e-6, atol=1e-6)
  if scale != 1.0:
    assert np.abs(out - c).max() > 1e-3


def test_cfg_rescale_matches_lin_et_al():
  model_fn, _ = _counting_model()
  cond, uncond = _contexts(2)
  x, t = oracle.normal(2, (2, 4, 4, 2)), jnp.full((2,), 100.0)
  out = np.asarray(samplers.cfg_denoise_fn(model_fn, cond, uncond, 5.0, guidance_rescale=0.7)(x, t))
  c, u = np.asarray(model_fn(x, t, cond)), np.asarray(model_fn(x, t, uncond))
  guided = u + 5.0 * (c - u)
  std = lambda a: a.reshape(2, -1).std(axis=1, ddof=1)[:, None, None, None]  # diffusers uses torch's ddof=1.
  expected = 0.7 * guided * std(c) / std(guided) + 0.3 * guided
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_cfg_guidance_interval():
  model_fn, _ = _counting_model()
  cond, uncond = _contexts(3)
  x, t = oracle.normal(3, (3, 2, 2, 2)), jnp.array([100.0, 500.0, 900.0])
  out = np.asarray(samplers.cfg_denoise_fn(model_fn, cond, uncond, 4.0, guidance_interval=(200.0, 800.0))(x, t))
  c, u = np.asarray(model_fn(x, t, cond)), np.asarray(model_fn(x, t, uncond))
  np.testing.assert_allclose(out[[0, 2]], c[[0, 2]], rtol=1e-6)  # Outside: the conditional output.
  np.testing.assert_allclose(out[1], (u + 4.0 * (c - u))[1], rtol=1e-5, atol=1e-6)


def test_cfg_inside_jitted_sampler_with_traced_scale():
  schedule = _schedule()
  model_fn, calls = _counting_model()
  cond, uncond = _contexts(2)

  @jax.jit
  def sample(x_T, scale):
    denoise_fn = samplers.cfg_denoise_fn(model_fn, cond, uncond, scale)
    return samplers.ddim(denoise_fn, x_T, schedule, num_steps=5, rng=None, prediction_type='v')

  x_T = oracle.normal(3, (2, 2, 2, 2))
  a, b = sample(x_T, 1.0), sample(x_T, 3.0)
  assert calls == [4]  # Traced once, batched (2 x 2) even at a traced scale of 1.
  assert np.isfinite(a).all() and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
