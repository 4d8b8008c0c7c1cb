"""Noise schedules (against diffusers), q_sample statistics and the prediction conversions."""

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import process
from diffusion.errors import ConfigError

PREDICTION_TYPES = ('eps', 'x0', 'v', 'flow')


def _config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      schedule='scaled_linear',
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      rescale_zero_terminal_snr=False,
      prediction_type='eps',
    )
  )
  config.update(overrides)
  return config


def _draw(seed, shape=(8, 4, 4, 3)):
  """x0, noise and per-example timesteps (covering both ends of the schedule)."""
  rng = np.random.default_rng(seed)  # numpy: jax.random ops each cost a slow CPU compile.
  t = rng.integers(0, 1000, shape[0])
  t[:2] = 0, 999
  normal = lambda: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return normal(), normal(), jnp.asarray(t)


# ----------------------------------------------------------------------------------------------------------
# Schedules.


def test_scaled_linear_end_points():
  schedule = process.get_noise_schedule(_config())
  betas = np.asarray(schedule.betas)
  assert betas.shape == (1000,) and schedule.num_timesteps == 1000 and betas.dtype == np.float32
  np.testing.assert_allclose([betas[0], betas[-1]], [0.00085, 0.012], rtol=1e-6)
  # Linear in sqrt(beta), not in beta.
  np.testing.assert_allclose(np.sqrt(betas[500]), (np.sqrt(betas[499]) + np.sqrt(betas[501])) / 2, rtol=1e-6)
  assert abs(betas[500] - (betas[499] + betas[501]) / 2) > 1e-10
  np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize(
  'name,diffusers_name', [('linear', 'linear'), ('scaled_linear', 'scaled_linear'), ('cosine', 'squaredcos_cap_v2')]
)
@pytest.mark.parametrize('zero_snr', [False, True])
def test_schedules_match_diffusers(name, diffusers_name, zero_snr):
  ours = process.get_noise_schedule(_config(schedule=name, rescale_zero_terminal_snr=zero_snr))
  reference = diffusers.DDIMScheduler(
    beta_schedule=diffusers_name, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=zero_snr
  )
  # diffusers works in float32 throughout; we compute in float64 and cast, hence the small tolerances.
  np.testing.assert_allclose(ours.betas, reference.betas.numpy(), atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(ours.alphas_cumprod, reference.alphas_cumprod.numpy(), atol=2e-6)


def test_cosine_schedule_follows_squared_cosine():
  schedule = process.get_noise_schedule(_config(schedule='cosine'))
  f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
  t = np.arange(0, 990)  # Before the 0.999 cap on beta bites.
  np.testing.assert_allclose(schedule.alphas_cumprod[t], f((t + 1) / 1000) / f(0), rtol=1e-5)
  assert float(schedule.betas.max()) == pytest.approx(0.999)


@pytest.mark.parametrize('name', ['linear', 'scaled_linear', 'cosine'])
def test_zero_terminal_snr(name):
  plain = process.get_noise_schedule(_config(schedule=name))
  rescaled = process.get_noise_schedule(_config(schedule=name, rescale_zero_terminal_snr=True))
  assert float(rescaled.alphas_cumprod[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 0.0
  np.testing.assert_allclose(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)
  snr = np.asarray(process.snr(rescaled, jnp.arange(1000)))
  assert snr[-1] == 0.0 and np.all(np.diff(snr) < 0)
  # sqrt(alphas_cumprod) is an affine map of the original one (Lin et al., Algorithm 1).
  a, b = np.sqrt(np.asarray(plain.alphas_cumprod, np.float64)), np.sqrt(np.asarray(rescaled.alphas_cumprod))
  np.testing.assert_allclose(b, (a - a[-1]) * a[0] / (a[0] - a[-1]), atol=2e-6)


def test_schedule_errors():
  with pytest.raises(ConfigError, match='cosine, edm, flow, linear, scaled_linear'):
    process.get_noise_schedule(_config(schedule='sigmoid'))
  with pytest.raises(ConfigError, match='num_train_timesteps'):
    process.get_noise_schedule(_config(num_train_timesteps=1))
  with pytest.raises(ValueError, match='already registered'):
    process.register_schedule('linear')(lambda n, b0, b1: np.zeros(n))
  with pytest.raises(ValueError, match='already registered'):
    process.register_schedule('flow')(lambda n, b0, b1: np.zeros(n))
  with pytest.raises(ConfigError, match='flow_t_sampling'):
    process.get_noise_schedule(_config(schedule='flow', flow_t_sampling='beta'))
  with pytest.raises(ConfigError, match='flow_shift'):
    process.get_noise_schedule(_config(schedule='flow', flow_shift=0.0))
  with pytest.raises(ConfigError, match='edm_sigma_max'):
    process.get_noise_schedule(_config(schedule='edm', edm_sigma_min=100.0))


def test_plain_dict_config_and_other_lengths():
  schedule = process.get_noise_schedule(dict(schedule='linear', num_train_timesteps=50, beta_start=1e-4, beta_end=0.02))
  assert schedule.betas.shape == (50,)
  np.testing.assert_allclose(schedule.betas, np.linspace(1e-4, 0.02, 50), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Indexing the schedule, q_sample.


def test_alpha_sigma_and_snr():
  schedule = process.get_noise_schedule(_config())
  t = jnp.array([0, 10, 999])
  alpha, sigma = process.alpha_sigma(schedule, t, ndim=4)
  assert alpha.shape == sigma.shape == (3, 1, 1, 1)
  np.testing.assert_allclose(alpha[:, 0, 0, 0] ** 2 + sigma[:, 0, 0, 0] ** 2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(alpha.ravel() ** 2, schedule.alphas_cumprod[t], rtol=1e-6)
  np.testing.assert_allclose(process.snr(schedule, t), (alpha.ravel() / sigma.ravel()) ** 2, rtol=1e-5)
  # Float timesteps: exact at integers, linear in alphas_cumprod in between.
  a_float, _ = process.alpha_sigma(schedule, t.astype(jnp.float32))
  np.testing.assert_array_equal(a_float, alpha.ravel())
  a_half, _ = process.alpha_sigma(schedule, jnp.array([10.5]))
  ac = schedule.alphas_cumprod
  np.testing.assert_allclose(a_half**2, (ac[10] + ac[11]) / 2, rtol=1e-6)


def test_q_sample_statistics():
  schedule = process.get_noise_schedule(_config())
  n, value = 20000, 0.7
  for t in (0, 300, 999):
    noise = np.random.default_rng(t).standard_normal((n, 1, 1, 2)).astype(np.float32)
    x_t = process.q_sample(schedule, jnp.full((n, 1, 1, 2), value), noise, jnp.full((n,), t))
    alpha, sigma = np.sqrt(schedule.alphas_cumprod[t]), np.sqrt(1 - schedule.alphas_cumprod[t])
    np.testing.assert_allclose(x_t.mean(), alpha * value, atol=4 * sigma / np.sqrt(2 * n))
    np.testing.assert_allclose(x_t.std(), sigma, rtol=0.02)


def test_q_sample_uses_each_examples_timestep():
  schedule = process.get_noise_schedule(_config())
  x0, noise, t = _draw(0)
  x_t = process.q_sample(schedule, x0, noise, t)
  ac = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Prediction types.


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_training_target_converts_back_to_the_truth(prediction_type):
  schedule = process.get_noise_schedule(_config())
  x0, noise, t = _draw(1)
  x_t = process.q_sample(schedule, x0, noise, t)
  target = process.training_target(prediction_type, x0, noise, t, schedule)
  pred = process.convert_prediction(target, x_t, t, schedule, prediction_type)
  alpha, sigma = process.alpha_sigma(schedule, t, 4)
  truth = {'eps': noise, 'x0': x0, 'v': alpha * noise - sigma * x0, 'flow': noise - x0}
  np.testing.assert_allclose(target, truth[prediction_type], rtol=1e-6, atol=1e-6)
  keep = slice(1, None)  # At t = 999 eps -> x0 divides by alpha = 0.07 (larger rounding); check it looser.
  for field in PREDICTION_TYPES:
    np.testing.assert_allclose(getattr(pred, field)[keep], truth[field][keep], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(getattr(pred, field), truth[field], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('source', PREDICTION_TYPES)
@pytest.mark.parametrize('destination', PREDICTION_TYPES)
def test_conversions_round_trip(source, destination):
  """Any output, read as `source`, re-expressed as `destination` and read back, is the same prediction."""
  schedule = process.get_noise_schedule(_config())
  x_t, output, _ = _draw(2)
  t = jnp.arange(8) * 100 + 50
  first = process.convert_prediction(output, x_t, t, schedule, source)
  second = process.convert_prediction(getattr(first, destination), x_t, t, schedule, destination)
  for a, b in zip(first, second):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(getattr(first, source), output)


def test_v_prediction_at_zero_terminal_snr_is_finite():
  schedule = process.get_noise_schedule(_config(rescale_zero_terminal_snr=True))
  x_t, output, _ = _draw(3)
  t = jnp.full((8,), 999)
  pred = process.convert_prediction(output, x_t, t, schedule, 'v')
  np.testing.assert_allclose(pred.x0, -output, atol=1e-6)  # alpha = 0, sigma = 1: x0 = -v, eps = x_t.
  np.testing.assert_allclose(pred.eps, x_t, atol=1e-6)


def test_conversion_is_jittable_and_keeps_dtype_float32():
  schedule = process.get_noise_schedule(_config())
  x_t, output, t = _draw(4)
  jitted = jax.jit(process.convert_prediction, static_argnums=4)
  pred = jitted(output.astype(jnp.bfloat16), x_t, t, schedule, 'v')
  eager = process.convert_prediction(output.astype(jnp.bfloat16), x_t, t, schedule, 'v')
  assert pred.x0.dtype == jnp.float32
  for a, b in zip(pred, eager):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_prediction_type():
  schedule = process.get_noise_schedule(_config())
  x_t, output, t = _draw(5)
  with pytest.raises(ConfigError, match="'score'.*eps, flow, v, x0"):
    process.convert_prediction(output, x_t, t, schedule, 'score')
  with pytest.raises(ConfigError, match='prediction_type'):
    process.training_target('score', x_t, output, t, schedule)
  assert process.available_prediction_types() == ['eps', 'flow', 'v', 'x0']


# ----------------------------------------------------------------------------------------------------------
# EDM and flow schedules, training times, general paths.


def test_edm_schedule():
  schedule = process.get_noise_schedule(_config(schedule='edm', edm_sigma_min=0.002, edm_sigma_max=80.0))
  assert schedule.kind == 'edm' and schedule.num_timesteps == 1000
  alpha, sigma = process.alpha_sigma(schedule, jnp.array([0.0, 499.5, 999.0]))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
  ve = np.asarray(sigma / alpha)
  np.testing.assert_allclose(ve[[0, 2]], [0.002, 80.0], rtol=1e-5)
  np.testing.assert_allclose(ve[1], np.sqrt(0.002 * 80.0), rtol=1e-4)  # Log-linear in t.
  # The discrete table is the continuous schedule at integer t (so DDIM / DDPM run on it).
  np.testing.assert_allclose(
    np.asarray(schedule.alphas_cumprod)[[0, 999]], 1 / (1 + np.array([0.002, 80.0]) ** 2), rtol=1e-5
  )
  np.testing.assert_allclose(np.cumprod(1 - np.asarray(schedule.betas, np.float64)), schedule.alphas_cumprod, rtol=1e-4)


def test_flow_schedule():
  schedule = process.get_noise_schedule(_config(schedule='flow'))
  assert schedule.is_flow
  t = jnp.array([0.0, 250.0, 1000.0])
  alpha, sigma = process.alpha_sigma(schedule, t)
  np.testing.assert_allclose(alpha, [1.0, 0.75, 0.0])
  np.testing.assert_allclose(sigma, [0.0, 0.25, 1.0])
  x0, noise, _ = _draw(6)
  x_t = process.q_sample(schedule, x0, noise, jnp.full((8,), 250.0))
  np.testing.assert_allclose(x_t, 0.75 * x0 + 0.25 * noise, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(process.flow_shift(np.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])


_sample_times = jax.jit(lambda schedule, keys: jax.vmap(lambda k: process.sample_timestep(schedule, k))(keys))


@pytest.mark.parametrize(
  'overrides,check',
  [
    (dict(schedule='scaled_linear'), 'discrete'),
    (dict(schedule='edm'), 'log_normal'),
    (dict(schedule='flow'), 'uniform'),
    (dict(schedule='flow', flow_t_sampling='logit_normal', flow_logit_mean=0.5, flow_logit_std=0.8), 'logit_normal'),
    (dict(schedule='flow', flow_shift=3.0), 'shifted'),
  ],
)
def test_training_time_distributions(overrides, check):
  schedule = process.get_noise_schedule(_config(**overrides))
  n = 20000
  raw = _sample_times(schedule, jax.random.split(jax.random.key(0), n))
  t = np.asarray(raw, np.float64)
  if check == 'discrete':
    assert jnp.issubdtype(raw.dtype, jnp.integer) and t.min() == 0 and t.max() == 999
    assert abs(t.mean() - 499.5) < 4 * 289 / np.sqrt(n)
    return
  assert raw.dtype == jnp.float32
  alpha, sigma = (np.asarray(v, np.float64) for v in process.alpha_sigma(schedule, raw))
  if check == 'log_normal':  # ln(sigma / alpha) ~ N(-1.2, 1.2^2) (clipped to [0.002, 80], a 1e-3 tail).
    log_ve = np.log(sigma / alpha)
    assert abs(log_ve.mean() + 1.2) < 0.03 and abs(log_ve.std() - 1.2) < 0.03
    return
  s = t / 1000
  if check == 'uniform':
    assert abs(s.mean() - 0.5) < 0.01 and abs(s.var() - 1 / 12) < 0.003
  elif check == 'logit_normal':
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
  else:  # shift 3: P(s <= 0.75) = P(u <= 0.5) = 0.5.
    assert abs(np.mean(s <= 0.75) - 0.5) < 0.015
  np.testing.assert_allclose(sigma, s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
@pytest.mark.parametrize('path', ['vp', 'flow', 've'])
def test_convert_on_any_path(prediction_type, path):
  """`convert` inverts each target on any x = alpha x0 + sigma eps, and derives v, flow and score."""
  x0, noise, _ = _draw(7)
  s = jnp.linspace(0.1, 0.9, 8).reshape(8, 1, 1, 1)
  alpha, sigma = {'vp': (jnp.sqrt(1 - s**2), s), 'flow': (1 - s, s), 've': (jnp.ones_like(s), 5 * s)}[path]
  x_t = alpha * x0 + sigma * noise
  target = process.get_prediction_type(prediction_type).target(x0, noise, alpha, sigma)
  pred = process.convert(target, x_t, alpha, sigma, prediction_type)
  np.testing.assert_allclose(pred.x0, x0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred.eps, noise, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred.v, alpha * noise - sigma * x0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred.flow, noise - x0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred.score, -noise / sigma, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_x0_mse_factor(prediction_type):
  """|target - output|^2 = c |x0 - x0_hat|^2 for an output that means x0_hat, on a VP and on a flow path."""
  x0, noise, _ = _draw(8)
  other = _draw(9)[0]
  for alpha, sigma in ((0.6, 0.8), (0.3, 0.7)):
    x_t = alpha * x0 + sigma * noise
    x0_hat = x0 + 0.1 * other
    eps_hat = (x_t - alpha * x0_hat) / sigma
    output = process.get_prediction_type(prediction_type).target(x0_hat, eps_hat, alpha, sigma)
    target = process.get_prediction_type(prediction_type).target(x0, noise, alpha, sigma)
    ratio = jnp.sum((target - output) ** 2) / jnp.sum((x0 - x0_hat) ** 2)
    np.testing.assert_allclose(ratio, process.x0_mse_factor(prediction_type, alpha, sigma), rtol=1e-4)
  snr = 0.6**2 / 0.8**2
  expected = {'eps': snr, 'x0': 1.0, 'v': snr + 1, 'flow': (1 + np.sqrt(snr)) ** 2}[prediction_type]
  np.testing.assert_allclose(process.x0_mse_factor(prediction_type, 0.6, 0.8), expected, rtol=1e-5)


def test_family_rules():
  assert process.check_family('scaled_linear', 'eps') is None and process.check_family('flow', 'flow') is None
  assert process.check_family('flow', 'v') is None
  assert 'schedule' in process.check_family('scaled_linear', 'flow')
  assert 'eps' in process.check_family('flow', 'eps')
