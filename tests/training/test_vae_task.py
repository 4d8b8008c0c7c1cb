"""The VAE task's loss as latent diffusion writes it: the LPIPS term (taming's per-pixel NLL form), its config keys
and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses
from diffusion.config import validate_config
from diffusion.errors import ConfigError
from diffusion.models import lpips
from diffusion.training.vae_task import VAETask
from support import VAE, load_config


def test_vae_loss_with_perceptual_term_and_logvar_is_taming_nll():
  rng = np.random.default_rng(0)
  x, rec = rng.uniform(-1, 1, (2, 4, 4, 3)), rng.uniform(-1, 1, (2, 4, 4, 3))
  mean, logvar = rng.normal(size=(2, 2, 2, 1)), 0.1 * rng.normal(size=(2, 2, 2, 1))
  p, lv = np.array([0.2, 0.5]), 0.3
  loss, metrics = losses.vae_loss(
    x, rec, mean, logvar, kl_weight=0.01, perceptual=jnp.asarray(p), perceptual_weight=2.0, nll_logvar=jnp.asarray(lv)
  )
  pixel = (np.abs(x - rec) + 2.0 * p[:, None, None, None]) / np.exp(lv) + lv  # taming: rec + w * p at every pixel.
  kl = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(loss, pixel.reshape(2, -1).sum(1).mean() + 0.01 * kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['perceptual'], p.mean(), rtol=1e-6)
  plain, _ = losses.vae_loss(x, rec, mean, logvar, kl_weight=0.01)  # No perceptual term, no logvar: L1 + KL.
  np.testing.assert_allclose(plain, np.abs(x - rec).reshape(2, -1).sum(1).mean() + 0.01 * kl.mean(), rtol=1e-5)


@pytest.mark.slow  # A VGG16 compile inside the VAE's loss: ~20-40 s on 2 loaded cores.
def test_vae_task_adds_lpips_of_its_random_weights():
  config = load_config('vae_base', VAE, '', **{'loss.perceptual_weight': 0.5, 'data.image_size': 16})
  config.loss.vgg_weights = config.loss.lpips_weights = 'random'
  validate_config(config)
  task = VAETask(config, '/tmp/unused')
  params = task.init_params(jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  loss, metrics = jax.jit(task.loss_fn)(params, task.frozen, {'image': x}, keys, jnp.zeros((), jnp.int32))
  # L1 + KL plus 0.5 * LPIPS at each of the 16 * 16 * 3 pixels of each example (logvar 0: the plain sum).
  assert metrics['perceptual'] > 0
  pixels = 16 * 16 * 3
  expected = pixels * (metrics['rec_loss'] + 0.5 * metrics['perceptual']) + config.loss.kl_weight * metrics['kl']
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert jax.tree.map(np.shape, task.frozen['lpips']) == jax.tree.map(np.shape, lpips.random_params('vgg'))


def test_bad_perceptual_keys_are_one_error_naming_the_key(tmp_path):
  config = load_config('vae_base', VAE, '', **{'loss.perceptual_weight': 1.0})
  config.loss.lpips_net = 'squeeze'
  with pytest.raises(ConfigError, match=r'^config\.loss\.lpips_net: unknown'):
    validate_config(config)
  config.loss.lpips_net = 'vgg'
  config.loss.vgg_weights, config.loss.lpips_weights = str(tmp_path / 'vgg16.pth'), 'random'
  with pytest.raises(ConfigError, match=r'^config\.loss\.vgg_weights: weight file .*vgg16\.pth. does not exist'):
    VAETask(config, str(tmp_path))


def test_sd_decoder_ft_freezes_the_encoder_and_needs_a_workdir_to_start_from():
  from configs import vae_base

  config = vae_base.get_config('sd_decoder_ft')
  config.loss.vgg_weights = config.loss.lpips_weights = 'random'
  validate_config(config)
  with pytest.raises(ConfigError, match=r'^config\.train\.freeze_encoder: needs config\.init_from'):
    VAETask(config, '/tmp/unused')
  config.init_from = '/some/imported/vae'
  task = VAETask(config, '/tmp/unused')
  assert task.frozen_param_groups == ('encoder', 'quant_conv')
  assert (config.loss.rec_loss, config.loss.perceptual_weight, config.train.freeze_encoder) == ('l2', 0.1, True)
  shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  assert set(task.frozen_param_groups) < set(shapes)  # Top-level groups of the params, as the optimizer sees them.
