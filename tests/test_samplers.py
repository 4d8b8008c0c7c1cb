"""Samplers against Gaussian data (exact answers known) and against diffusers' schedulers step for step."""

import functools

import diffusers
from diffusers.schedulers import scheduling_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion import process
from diffusion import samplers
from diffusion.errors import UserError

# Gaussian data x0 ~ N(MU, SD^2) per channel (NHWC, 2 channels).
MU = np.array([0.5, -0.3], np.float32)
SD = np.array([0.4, 0.8], np.float32)
PREDICTION_TYPES = ('eps', 'x0', 'v')
DIFFUSERS_TYPES = {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}


def _normal(seed, shape):
  """Test data (numpy: jax.random ops each cost a slow CPU compile)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _schedule(zero_snr: bool = False) -> process.NoiseSchedule:
  return process.get_noise_schedule(dict(schedule='scaled_linear', num_train_timesteps=1000, beta_start=0.00085,
                                         beta_end=0.012, rescale_zero_terminal_snr=zero_snr))


def _optimal_output(x, t, schedule, prediction_type):
  """The exact minimiser of the training loss for Gaussian data, in the given parametrization."""
  a, s = process.alpha_sigma(schedule, t, x.ndim)
  var = a**2 * SD**2 + s**2
  eps = s * (x - a * MU) / var
  x0 = MU + a * SD**2 * (x - a * MU) / var  # E[x0 | x_t], computed without dividing by alpha.
  return {'eps': eps, 'x0': x0, 'v': a * eps - s * x0}[prediction_type]


def _denoiser(schedule, prediction_type):
  return lambda x, t: _optimal_output(x, t, schedule, prediction_type)


def _ode_endpoint(x_T, a_start, a_end):
  """The probability-flow ODE keeps z = (x - a MU) / sqrt(a^2 SD^2 + 1 - a^2) constant for Gaussian data."""
  z = (x_T - a_start * MU) / np.sqrt(a_start**2 * SD**2 + 1 - a_start**2)
  return a_end * MU + np.sqrt(a_end**2 * SD**2 + 1 - a_end**2) * z


@functools.lru_cache(maxsize=None)
def _jitted_sampler(name, num_steps, prediction_type, options):
  def run(x_T, rng, schedule):
    return samplers.get_sampler(name)(_denoiser(schedule, prediction_type), x_T, schedule, num_steps=num_steps,
                                      rng=rng, prediction_type=prediction_type, **dict(options))

  return jax.jit(run)


def _run(name, schedule, x_T, num_steps, prediction_type, rng=None, **options):
  """Runs a sampler on the optimal denoiser, jitted with the schedule traced (one compile per setting)."""
  fn = _jitted_sampler(name, num_steps, prediction_type, tuple(sorted(options.items())))
  return np.asarray(fn(x_T, rng, schedule))


# ----------------------------------------------------------------------------------------------------------
# Registry and timesteps.


def test_registry():
  assert {'ddim', 'ddpm'} <= set(samplers.available_samplers())
  assert samplers.get_sampler('ddim') is samplers.ddim
  with pytest.raises(UserError, match='ddim.*ddpm'):
    samplers.get_sampler('no-such-sampler')
  with pytest.raises(ValueError, match='already registered'):
    samplers.register_sampler('ddim')(samplers.ddpm)


@pytest.mark.parametrize('spacing,offset', [('leading', 0), ('leading', 1), ('trailing', 0), ('linspace', 0)])
@pytest.mark.parametrize('num_steps', [1, 3, 7, 50, 1000])
def test_timesteps_match_diffusers(spacing, offset, num_steps):
  reference = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
  reference.set_timesteps(num_steps)
  ours = samplers.make_timesteps(1000, num_steps, spacing, offset)
  np.testing.assert_array_equal(ours, reference.timesteps.numpy())


def test_timesteps_errors():
  with pytest.raises(UserError, match='num_steps'):
    samplers.make_timesteps(1000, 1001)
  with pytest.raises(UserError, match='leading, trailing, linspace'):
    samplers.make_timesteps(1000, 10, 'quadratic')


# ----------------------------------------------------------------------------------------------------------
# Exact answers for Gaussian data.


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_ddim_converges_to_ode_solution(prediction_type):
  schedule = _schedule()
  ac = np.asarray(schedule.alphas_cumprod)
  x_T = _normal(0, (4, 3, 3, 2))
  errors = []
  for n in (5, 20, 100, 500):  # Dividing T: diffusers steps t -> t - T // n, the next timestep only then.
    start = samplers.make_timesteps(1000, n, 'trailing')[0]
    exact = _ode_endpoint(x_T, np.sqrt(ac[start]), np.sqrt(ac[0]))
    out = _run('ddim', schedule, x_T, n, prediction_type, timestep_spacing='trailing')
    errors.append(np.abs(out - exact).max())
  # First order: each 4-5x more steps cuts the error about as much.
  assert all(e2 < 0.35 * e1 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[-1] < 0.01, errors


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
    var = (k0 * c1 + k1)**2 * var + noise_var
  return mean, var


def test_chain_moments_approach_the_data_with_more_steps():
  """The closed-form chain moments (used below) approach N(MU, SD^2) as steps grow: a check of the check.

  Not exactly: 'fixed_small' variance leaves out Var(x0 | x_t), so even 1000 steps are ~1% under-dispersed.
  """
  ac = np.asarray(_schedule().alphas_cumprod)
  gaps = [np.abs(np.sqrt(_chain_moments('ddpm', ac, samplers.make_timesteps(1000, n))[1]) - SD).max()
          for n in (10, 100, 1000)]
  assert gaps[0] > 3 * gaps[1] > 9 * gaps[2] and gaps[2] < 0.01, gaps


@pytest.mark.parametrize('name,options,prediction_type', [
    ('ddpm', {}, 'eps'), ('ddpm', {}, 'v'), ('ddim', dict(eta=1.0, set_alpha_to_one=True), 'x0'),
    pytest.param('ddpm', {}, 'x0', marks=pytest.mark.slow)])
def test_stochastic_samplers_match_exact_chain_moments(name, options, prediction_type):
  """Sample moments over many draws equal the chain's exact moments (which are near MU, SD, see above)."""
  schedule, num_steps, n = _schedule(), 50, 8192
  x_T = _normal(1, (n // 4, 2, 2, 2))
  out = _run(name, schedule, x_T, num_steps, prediction_type, rng=jax.random.key(2), **options).reshape(-1, 2)
  mean, var = _chain_moments(name, np.asarray(schedule.alphas_cumprod), samplers.make_timesteps(1000, num_steps))
  # Within 4 standard errors of the exact values.
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)
  np.testing.assert_allclose(mean, MU, atol=0.02)
  np.testing.assert_allclose(np.sqrt(var), SD, rtol=0.15)


def test_ddim_eta0_transports_noise_to_data():
  """DDIM(eta=0) maps N(0, 1) onto the data distribution too: the ODE transports the marginals."""
  schedule, n = _schedule(), 8192
  x_T = _normal(3, (n // 4, 2, 2, 2))
  out = _run('ddim', schedule, x_T, 100, 'v', set_alpha_to_one=True, timestep_spacing='trailing').reshape(-1, 2)
  timesteps = samplers.make_timesteps(1000, 100, 'trailing')
  mean, var = _chain_moments('ddim', np.asarray(schedule.alphas_cumprod), timesteps, eta=0.0)
  assert np.all(np.abs(out.mean(0) - mean) < 4 * np.sqrt(var / n)), (out.mean(0), mean)
  assert np.all(np.abs(out.var(0) - var) < 4 * var * np.sqrt(2 / n)), (out.var(0), var)
  # Not exact: x_T ~ N(0, 1) ignores the small signal left at t = 999 (mean 0.07 MU), which the ODE keeps.
  np.testing.assert_allclose(mean, MU, atol=0.03)
  np.testing.assert_allclose(np.sqrt(var), SD, rtol=0.05)


# ----------------------------------------------------------------------------------------------------------
# Tracing, timesteps seen by the model, per-example randomness.


def test_loop_is_traced_once_and_passes_float_timesteps():
  schedule = _schedule()
  calls = []

  def denoise_fn(x, t):
    calls.append((t.shape, t.dtype))
    return _optimal_output(x, t, schedule, 'eps')

  fn = jax.jit(lambda x: samplers.ddim(denoise_fn, x, schedule, num_steps=50, rng=None, prediction_type='eps'))
  fn(jnp.zeros((3, 2, 2, 2)))
  fn(jnp.ones((3, 2, 2, 2)))
  assert calls == [((3,), jnp.float32)]


def test_ancestral_noise_is_per_example():
  schedule = _schedule()
  rng = jax.random.key(5)
  x_T = _normal(6, (4, 2, 2, 2))
  full = _run('ddpm', schedule, x_T, 10, 'eps', rng=rng)
  # One key per example (example b of a single key gets fold_in(rng, b)): the batch does not matter.
  keys = jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(4))
  head = _run('ddpm', schedule, x_T[2:], 10, 'eps', rng=keys[2:])
  np.testing.assert_allclose(head, full[2:], atol=1e-6)
  other = _run('ddpm', schedule, x_T, 10, 'eps', rng=jax.random.key(7))
  assert np.abs(other - full).max() > 1e-2


def test_sampler_errors():
  schedule = _schedule()
  with pytest.raises(UserError, match='rng'):
    samplers.ddpm(_denoiser(schedule, 'eps'), jnp.zeros((1, 2, 2, 2)), schedule, num_steps=2, rng=None,
                  prediction_type='eps')
  with pytest.raises(ValueError, match='flow'):
    samplers.ddim(_denoiser(schedule, 'eps'), jnp.zeros((1, 2, 2, 2)), schedule, num_steps=2, rng=None,
                  prediction_type='flow')
  with pytest.raises(TypeError):
    samplers.ddim(_denoiser(schedule, 'eps'), jnp.zeros((1, 2, 2, 2)), schedule, num_steps=2, rng=None,
                  prediction_type='eps', no_such_option=1)


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers' schedulers, stepping the same denoiser from the same x_T with the same noise.


def _reference(cls, schedule, prediction_type, **kwargs):
  """A diffusers scheduler using our alphas_cumprod (schedule values are compared in test_process)."""
  scheduler = cls(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, prediction_type=DIFFUSERS_TYPES[prediction_type], **kwargs)
  scheduler.alphas_cumprod = torch.from_numpy(np.array(schedule.alphas_cumprod))
  if not kwargs.get('set_alpha_to_one', True):
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
  return scheduler


_jitted_output = jax.jit(_optimal_output, static_argnums=3)
_jitted_noise = jax.jit(samplers.step_noise, static_argnums=2)


def _reference_output(schedule, prediction_type, x, t):
  t_batch = jnp.full((x.shape[0],), int(t), jnp.int32)
  return torch.from_numpy(np.array(_jitted_output(x.numpy(), t_batch, schedule, prediction_type)))


def _reference_noise(rng, step, shape):
  return torch.from_numpy(np.array(_jitted_noise(rng, step, tuple(shape))))


DDIM_CASES = [
    ('leading', 1, 'eps', 0.0, False), ('trailing', 0, 'eps', 0.0, False), ('linspace', 0, 'eps', 0.0, False),
    ('leading', 1, 'v', 0.0, False), ('trailing', 0, 'x0', 0.0, False), ('leading', 1, 'eps', 1.0, False),
    ('trailing', 0, 'v', 0.0, True), pytest.param('trailing', 0, 'v', 0.5, False, marks=pytest.mark.slow),
    pytest.param('trailing', 0, 'v', 1.0, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize('spacing,offset,prediction_type,eta,zero_snr', DDIM_CASES)
def test_ddim_matches_diffusers(spacing, offset, prediction_type, eta, zero_snr):
  schedule, num_steps, rng = _schedule(zero_snr), 10, jax.random.key(8)
  x_T = _normal(9, (2, 3, 3, 2))
  ours = _run('ddim', schedule, x_T, num_steps, prediction_type, rng=rng, eta=eta, timestep_spacing=spacing,
              steps_offset=offset)
  reference = _reference(diffusers.DDIMScheduler, schedule, prediction_type, timestep_spacing=spacing,
                         steps_offset=offset, set_alpha_to_one=False, rescale_betas_zero_snr=zero_snr)
  reference.set_timesteps(num_steps)
  x = torch.from_numpy(np.array(x_T))
  for i, t in enumerate(reference.timesteps):
    noise = _reference_noise(rng, i, x_T.shape) if eta > 0 else None
    x = reference.step(_reference_output(schedule, prediction_type, x, t), t, x, eta=eta,
                       variance_noise=noise).prev_sample
  assert np.isfinite(ours).all()
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-5, rtol=1e-5)


DDPM_CASES = [('leading', 1, 'eps', 10, False), ('trailing', 0, 'v', 10, False), ('linspace', 0, 'x0', 10, False),
              pytest.param('leading', 0, 'eps', 1000, False, marks=pytest.mark.slow), ('trailing', 0, 'v', 10, True)]


@pytest.mark.parametrize('spacing,offset,prediction_type,num_steps,zero_snr', DDPM_CASES)
def test_ddpm_matches_diffusers(spacing, offset, prediction_type, num_steps, zero_snr, monkeypatch):
  schedule, rng = _schedule(zero_snr), jax.random.key(10)
  x_T = _normal(11, (2, 3, 3, 2))
  ours = _run('ddpm', schedule, x_T, num_steps, prediction_type, rng=rng, timestep_spacing=spacing,
              steps_offset=offset)
  reference = _reference(diffusers.DDPMScheduler, schedule, prediction_type, timestep_spacing=spacing,
                         steps_offset=offset, variance_type='fixed_small', rescale_betas_zero_snr=zero_snr)
  reference.set_timesteps(num_steps)
  step = [0]
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                      lambda shape, **_: _reference_noise(rng, step[0], shape))
  x = torch.from_numpy(np.array(x_T))
  for i, t in enumerate(reference.timesteps):
    step[0] = i
    x = reference.step(_reference_output(schedule, prediction_type, x, t), t, x).prev_sample
  assert np.isfinite(ours).all()
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-5, rtol=1e-5)


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
  x, t = _normal(0, (3, 2, 2, 2)), jnp.full((3,), 500.0)
  out = samplers.cfg_denoise_fn(model_fn, cond, uncond, 1.0)(x, t)
  np.testing.assert_allclose(out, model_fn(x, t, cond), atol=0)
  assert calls == [3, 3]  # Our call, then the reference call: one conditional call of batch 3 each.


@pytest.mark.parametrize('scale', [0.0, 4.0, 7.5])
def test_cfg_formula_with_one_batched_call(scale):
  model_fn, calls = _counting_model()
  cond, uncond = _contexts(3)
  x, t = _normal(1, (3, 2, 2, 2)), jnp.full((3,), 250.0)
  out = samplers.cfg_denoise_fn(model_fn, cond, uncond, scale)(x, t)
  assert calls == [6]
  c, u = model_fn(x, t, cond), model_fn(x, t, uncond)
  np.testing.assert_allclose(out, u + scale * (c - u), rtol=1e-6, atol=1e-6)
  if scale != 1.0:
    assert np.abs(out - c).max() > 1e-3


def test_cfg_rescale_matches_lin_et_al():
  model_fn, _ = _counting_model()
  cond, uncond = _contexts(2)
  x, t = _normal(2, (2, 4, 4, 2)), jnp.full((2,), 100.0)
  out = np.asarray(samplers.cfg_denoise_fn(model_fn, cond, uncond, 5.0, guidance_rescale=0.7)(x, t))
  c, u = np.asarray(model_fn(x, t, cond)), np.asarray(model_fn(x, t, uncond))
  guided = u + 5.0 * (c - u)
  std = lambda a: a.reshape(2, -1).std(axis=1, ddof=1)[:, None, None, None]  # diffusers uses torch's ddof=1.
  expected = 0.7 * guided * std(c) / std(guided) + 0.3 * guided
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_cfg_inside_jitted_sampler_with_traced_scale():
  schedule = _schedule()
  model_fn, calls = _counting_model()
  cond, uncond = _contexts(2)

  @jax.jit
  def sample(x_T, scale):
    denoise_fn = samplers.cfg_denoise_fn(model_fn, cond, uncond, scale)
    return samplers.ddim(denoise_fn, x_T, schedule, num_steps=5, rng=None, prediction_type='v')

  x_T = _normal(3, (2, 2, 2, 2))
  a, b = sample(x_T, 1.0), sample(x_T, 3.0)
  assert calls == [4]  # Traced once, batched (2 x 2) even at a traced scale of 1.
  assert np.isfinite(a).all() and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
