"""The diffusion loss and its weightings, offset noise, and the VAE loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import losses, process
from diffusion.errors import ConfigError

PREDICTION_TYPES = ('eps', 'x0', 'v')
WEIGHTINGS = ('uniform', 'min_snr', 'edm', 'v_loss')


def _config(**overrides):
  config = ml_collections.ConfigDict(
    dict(
      schedule='scaled_linear',
      num_train_timesteps=1000,
      beta_start=0.00085,
      beta_end=0.012,
      rescale_zero_terminal_snr=False,
      prediction_type='eps',
      loss_weighting='uniform',
      min_snr_gamma=5.0,
      offset_noise=0.0,
      edm_sigma_data=0.5,
    )
  )
  config.update(overrides)
  return config


def _normal(seed, shape):
  """Test data (numpy: jax.random ops each cost a slow CPU compile)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _batch(seed, zero_snr=False):
  schedule = process.get_noise_schedule(_config(rescale_zero_terminal_snr=zero_snr))
  x0, noise, other = jnp.asarray(_normal(seed, (3, 6, 4, 4, 3)))
  t = jnp.array([0, 20, 150, 400, 700, 999])
  return schedule, x0, noise, t, other


def _outputs_for_x0_guess(schedule, x0, noise, t, x0_hat):
  """The outputs of every prediction type that all mean the same guess x0_hat at x_t = q_sample(x0, noise)."""
  x_t = process.q_sample(schedule, x0, noise, t)
  return process.convert_prediction(x0_hat, x_t, t, schedule, 'x0')


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
@pytest.mark.parametrize('weighting', WEIGHTINGS)
def test_loss_is_zero_at_the_target_and_positive_elsewhere(prediction_type, weighting):
  schedule, x0, noise, t, other = _batch(0)
  loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type=prediction_type, loss_weighting=weighting))
  target = process.training_target(prediction_type, x0, noise, t, schedule)
  np.testing.assert_allclose(loss_fn(target, x0, noise, t, schedule), 0.0, atol=1e-10)
  loss = loss_fn(target + 0.1 * other, x0, noise, t, schedule)
  assert loss.shape == (6,) and np.all(loss > 0)


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_uniform_loss_is_mse_to_the_target(prediction_type):
  schedule, x0, noise, t, output = _batch(1)
  loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type=prediction_type))
  target = process.training_target(prediction_type, x0, noise, t, schedule)
  expected = np.mean((np.asarray(output) - np.asarray(target)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(loss_fn(output, x0, noise, t, schedule), expected, rtol=1e-5)


def test_uniform_losses_relate_through_snr():
  """For one x0 guess, |eps error|^2 = snr |x0 error|^2 and |v error|^2 = (snr + 1) |x0 error|^2."""
  schedule, x0, noise, t, other = _batch(2)
  pred = _outputs_for_x0_guess(schedule, x0, noise, t, x0 + 0.3 * other)
  per_type = {
    p: losses.get_diffusion_loss_fn(_config(prediction_type=p))(getattr(pred, p), x0, noise, t, schedule)
    for p in PREDICTION_TYPES
  }
  snr = process.snr(schedule, t)
  np.testing.assert_allclose(per_type['eps'], snr * per_type['x0'], rtol=1e-3)
  np.testing.assert_allclose(per_type['v'], (snr + 1) * per_type['x0'], rtol=1e-3)


@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_min_snr_weights_equal_min_snr_gamma_on_the_x0_error(gamma):
  """Hang et al. 2023: every prediction type gets min(snr, gamma) * |x0 error|^2 for the same x0 guess."""
  schedule, x0, noise, t, other = _batch(3)
  pred = _outputs_for_x0_guess(schedule, x0, noise, t, x0 + 0.3 * other)
  x0_mse = np.mean(np.asarray(pred.x0 - x0) ** 2, axis=(1, 2, 3))
  snr = np.asarray(process.snr(schedule, t))
  expected = np.minimum(snr, gamma) * x0_mse
  assert snr.min() < gamma < snr.max()  # Both branches of the min are exercised.
  for prediction_type in PREDICTION_TYPES:
    loss_fn = losses.get_diffusion_loss_fn(
      _config(prediction_type=prediction_type, loss_weighting='min_snr', min_snr_gamma=gamma)
    )
    loss = loss_fn(getattr(pred, prediction_type), x0, noise, t, schedule)
    np.testing.assert_allclose(loss, expected, rtol=2e-3, err_msg=prediction_type)


def test_min_snr_weights_per_prediction_type_in_closed_form():
  schedule, x0, noise, t, _ = _batch(4)
  snr = np.asarray(process.snr(schedule, t), np.float64)
  gamma = 5.0
  expected = {
    'eps': np.minimum(snr, gamma) / snr,
    'v': np.minimum(snr, gamma) / (snr + 1),
    'x0': np.minimum(snr, gamma),
  }
  for prediction_type, weight in expected.items():
    loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type=prediction_type, loss_weighting='min_snr'))
    target = process.training_target(prediction_type, x0, noise, t, schedule)
    loss = loss_fn(target + 1.0, x0, noise, t, schedule)  # Squared error exactly 1 everywhere.
    np.testing.assert_allclose(loss, weight, rtol=1e-5, err_msg=prediction_type)


def test_min_snr_is_finite_at_zero_terminal_snr():
  schedule, x0, noise, t, _ = _batch(5, zero_snr=True)
  for prediction_type, last_weight in (('eps', 1.0), ('v', 0.0), ('x0', 0.0)):
    loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type=prediction_type, loss_weighting='min_snr'))
    target = process.training_target(prediction_type, x0, noise, t, schedule)
    loss = np.asarray(loss_fn(target + 1.0, x0, noise, t, schedule))
    assert np.all(np.isfinite(loss)) and loss[-1] == pytest.approx(last_weight), prediction_type


def test_loss_is_differentiable_and_jittable():
  schedule, x0, noise, t, output = _batch(6)
  loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type='v', loss_weighting='min_snr'))
  grad = jax.jit(jax.grad(lambda o: loss_fn(o, x0, noise, t, schedule).mean()))(output)
  target = process.training_target('v', x0, noise, t, schedule)
  weight = loss_fn(target + 1.0, x0, noise, t, schedule)
  expected = 2 * (output - target) * weight[:, None, None, None] / (6 * 4 * 4 * 3)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_loss_config_errors():
  with pytest.raises(ConfigError, match='loss_weighting.*edm, min_snr, uniform, v_loss'):
    losses.get_diffusion_loss_fn(_config(loss_weighting='huber'))
  with pytest.raises(ConfigError, match='prediction_type'):
    losses.get_diffusion_loss_fn(_config(prediction_type='score'))
  with pytest.raises(ConfigError, match='edm_sigma_data'):
    losses.get_diffusion_loss_fn(_config(loss_weighting='edm', edm_sigma_data=0.0))
  with pytest.raises(ConfigError, match='min_snr_gamma'):
    losses.get_diffusion_loss_fn(_config(loss_weighting='min_snr', min_snr_gamma=0.0))
  with pytest.raises(ValueError, match='already registered'):
    losses.register_loss_weighting('uniform')(lambda config, prediction_type: jnp.ones_like)


@pytest.mark.parametrize('sigma_data', [0.5, 1.0])
def test_edm_weighting_is_lambda_sigma_on_the_x0_error(sigma_data):
  """Karras et al. 2022: lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on |x0 - D|^2, sigma = sigma_t / alpha_t."""
  schedule, x0, noise, t, other = _batch(7)
  pred = _outputs_for_x0_guess(schedule, x0, noise, t, x0 + 0.3 * other)
  x0_mse = np.mean(np.asarray(pred.x0 - x0, np.float64) ** 2, axis=(1, 2, 3))
  alpha, sigma = (np.asarray(v, np.float64) for v in process.alpha_sigma(schedule, t))
  ve = sigma / alpha
  expected = (ve**2 + sigma_data**2) / (ve * sigma_data) ** 2 * x0_mse
  for prediction_type in PREDICTION_TYPES:
    loss_fn = losses.get_diffusion_loss_fn(
      _config(prediction_type=prediction_type, loss_weighting='edm', edm_sigma_data=sigma_data)
    )
    loss = loss_fn(getattr(pred, prediction_type), x0, noise, t, schedule)
    np.testing.assert_allclose(loss, expected, rtol=2e-3, err_msg=prediction_type)
  if sigma_data == 1.0:  # v prediction is EDM's preconditioning at sigma_data = 1: the weighting is uniform.
    uniform = losses.get_diffusion_loss_fn(_config(prediction_type='v'))(pred.v, x0, noise, t, schedule)
    np.testing.assert_allclose(loss_fn(pred.v, x0, noise, t, schedule), uniform, rtol=1e-4)


def test_v_loss_is_the_v_error_for_every_prediction_type():
  schedule, x0, noise, t, other = _batch(8)
  pred = _outputs_for_x0_guess(schedule, x0, noise, t, x0 + 0.3 * other)
  v_error = losses.get_diffusion_loss_fn(_config(prediction_type='v'))(pred.v, x0, noise, t, schedule)
  for prediction_type in ('eps', 'x0'):
    loss_fn = losses.get_diffusion_loss_fn(_config(prediction_type=prediction_type, loss_weighting='v_loss'))
    np.testing.assert_allclose(
      loss_fn(getattr(pred, prediction_type), x0, noise, t, schedule)[1:],
      v_error[1:],
      rtol=2e-3,
      err_msg=prediction_type,
    )


@pytest.mark.parametrize('weighting', WEIGHTINGS)
@pytest.mark.parametrize('sampling', ['uniform', 'logit_normal'])
def test_flow_matching_loss(weighting, sampling):
  """Flow matching: target eps - x0 on x_t = (1 - s) x0 + s eps; weightings stay finite at s -> 0 and 1."""
  config = _config(schedule='flow', prediction_type='flow', loss_weighting=weighting, flow_t_sampling=sampling)
  schedule = process.get_noise_schedule(config)
  x0, noise, other = (jnp.asarray(a) for a in _normal(9, (3, 6, 4, 4, 3)))
  t = jnp.array([0.0, 1.0, 250.0, 500.0, 999.0, 1000.0])
  loss_fn = losses.get_diffusion_loss_fn(config)
  np.testing.assert_allclose(loss_fn(noise - x0, x0, noise, t, schedule), 0.0, atol=1e-10)
  loss = np.asarray(loss_fn(noise - x0 + 0.1 * other, x0, noise, t, schedule))
  assert np.all(np.isfinite(loss)) and np.all(loss >= 0) and np.all(loss[1:-1] > 0), loss
  if weighting in ('edm', 'v_loss'):  # Their weights on the flow error are positive at both ends.
    assert np.all(loss > 0), loss
  if weighting == 'uniform':
    np.testing.assert_allclose(loss, np.mean(np.asarray(0.1 * other) ** 2, axis=(1, 2, 3)), rtol=1e-5)


_noised = jax.jit(
  lambda schedule, kt, kn, x0: jax.vmap(lambda a, b, z: losses.noised_example(a, b, z, schedule, 0.0))(kt, kn, x0)
)


@pytest.mark.parametrize('schedule_name', ['scaled_linear', 'edm', 'flow'])
def test_noised_example(schedule_name):
  schedule = process.get_noise_schedule(_config(schedule=schedule_name))
  x0 = jnp.asarray(_normal(10, (64, 2, 2, 3)))
  kt, kn = jax.random.split(jax.random.key(0), 128).reshape(2, 64)
  x_t, t, noise = _noised(schedule, kt, kn, x0)
  np.testing.assert_allclose(x_t, process.q_sample(schedule, x0, noise, t), rtol=1e-5, atol=1e-6)
  assert len(np.unique(np.asarray(t))) > 50  # Per-example times.
  again = _noised(schedule, kt[:8], kn[:8], x0[:8])  # Per-example keys: the batch does not matter.
  np.testing.assert_allclose(again[0], x_t[:8], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Offset noise.


def test_sample_noise_without_offset_is_standard_normal():
  noise = np.asarray(losses.sample_noise(jax.random.key(0), (256, 8, 8, 4)))
  assert noise.shape == (256, 8, 8, 4) and noise.dtype == np.float32
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_offset_noise_shifts_each_example_channel():
  rng, shape, strength = jax.random.key(1), (256, 8, 8, 4), 0.3
  plain = np.asarray(losses.sample_noise(rng, shape, 0.0))
  offset = np.asarray(losses.sample_noise(rng, shape, strength))
  shift = offset - plain  # The N(0, I) part is the same, so the difference is the offset alone.
  np.testing.assert_allclose(shift, shift[:, :1, :1, :] * np.ones(shape), atol=1e-6)  # Constant over H, W.
  per_example_channel = shift[:, 0, 0, :]
  assert abs(per_example_channel.std() - strength) < 0.03
  assert np.abs(np.corrcoef(per_example_channel.T) - np.eye(4)).max() < 0.2  # Independent channels.


# ----------------------------------------------------------------------------------------------------------
# VAE loss.


def _posterior(seed, shape=(4, 2, 2, 3)):
  mean, logvar = _normal(seed, (2,) + shape)
  return jnp.asarray(0.5 * mean), jnp.asarray(0.3 * logvar)


def test_vae_loss_terms():
  x = jnp.asarray(np.tanh(_normal(0, (4, 8, 8, 3))))
  rec = x + 0.1 * _normal(1, x.shape)
  mean, logvar = _posterior(1)
  kl = 0.5 * np.sum(np.asarray(mean) ** 2 + np.exp(logvar) - 1 - np.asarray(logvar), axis=(1, 2, 3)).mean()
  for name, err in (('l1', np.abs(np.asarray(x - rec))), ('l2', np.asarray(x - rec) ** 2)):
    loss, metrics = losses.vae_loss(x, rec, mean, logvar, kl_weight=0.01, rec_loss=name)
    np.testing.assert_allclose(metrics['rec_loss'], err.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics['kl'], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, err.sum(axis=(1, 2, 3)).mean() + 0.01 * kl, rtol=1e-5)
    assert metrics['loss'] is loss


def test_vae_loss_is_zero_for_a_perfect_standard_normal_autoencoder():
  x = jnp.linspace(-1, 1, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3)
  loss, metrics = losses.vae_loss(x, x, jnp.zeros((4, 2, 2, 3)), jnp.zeros((4, 2, 2, 3)), kl_weight=1.0)
  assert float(loss) == 0.0 and float(metrics['kl']) == 0.0


def test_vae_kl_matches_monte_carlo():
  mean, logvar = _posterior(2, shape=(1, 1, 1, 1))
  z = mean + jnp.exp(0.5 * logvar) * _normal(3, (200000, 1, 1, 1))
  log_q = jax.scipy.stats.norm.logpdf(z, mean, jnp.exp(0.5 * logvar))
  log_p = jax.scipy.stats.norm.logpdf(z)
  _, metrics = losses.vae_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)), mean, logvar, kl_weight=1.0)
  np.testing.assert_allclose(metrics['kl'], jnp.mean(log_q - log_p), atol=0.01)


def test_vae_loss_errors_and_not_implemented_terms():
  x, rec = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
  mean, logvar = _posterior(4)
  with pytest.raises(ConfigError, match='loss.rec_loss.*l1, l2'):
    losses.vae_loss(x, rec, mean, logvar, kl_weight=0.1, rec_loss='huber')
  config = {
    'model_type': 'vae',
    'loss': {'rec_loss': 'l1', 'kl_weight': 1e-6, 'perceptual_weight': 0.0, 'adversarial_weight': 0.0},
  }
  losses.validate_config(config)
  with pytest.raises(ConfigError) as info:
    losses.validate_config({**config, 'loss': {**config['loss'], 'disc_loss': 'nope'}})
  assert str(info.value) == "config.loss.disc_loss: unknown 'nope'; known: hinge, vanilla"
  with pytest.raises(ConfigError, match='loss.kl_weight'):
    losses.validate_config({**config, 'loss': {**config['loss'], 'kl_weight': -1.0}})


def test_vae_loss_gradients_flow_to_the_posterior():
  x = jnp.zeros((2, 4, 4, 3))
  mean, logvar = _posterior(5, shape=(2, 2, 2, 3))
  grad_mean, grad_logvar = jax.grad(lambda m, lv: losses.vae_loss(x, x, m, lv, kl_weight=1.0)[0], argnums=(0, 1))(
    mean, logvar
  )
  np.testing.assert_allclose(grad_mean, mean / 2, rtol=1e-5)  # d/dm of mean over batch of 0.5 sum m^2.
  np.testing.assert_allclose(grad_logvar, 0.5 * (jnp.exp(logvar) - 1) / 2, rtol=1e-5, atol=1e-7)
