"""The VAE's adversarial term as taming writes it: the discriminator losses, the adaptive weight (closed form and on a
tiny model), one train step updating the discriminator with its own optimizer, the NaN guard, the config errors,
the NLL's learned log-variance (loss.learn_logvar) and (slow) an exact resume of a run with the discriminator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses
from diffusion.config import validate_config
from diffusion.errors import ConfigError
from diffusion.training import state as state_lib
from diffusion.training.vae_task import LAST_LAYER, VAETask, _with_last_layer
from support import VAE, load_config

GAN = {'loss.adversarial_weight': 0.5, 'model.disc.num_layers': 2, 'model.disc.channels': 8, 'data.image_size': 16}


def test_discriminator_losses_and_adaptive_weight_closed_forms():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.5])
  hinge = 0.5 * (np.mean([0.0, 0.5, 2.0]) + np.mean([0.0, 1.0, 2.5]))
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge, rtol=1e-6)
  softplus = lambda v: np.log1p(np.exp(v))
  vanilla = 0.5 * (np.mean(softplus(-np.asarray(real))) + np.mean(softplus(np.asarray(fake))))
  np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(fake), -np.mean(fake), rtol=1e-6)
  # lambda = ||g_rec|| / (||g_gan|| + 1e-4) * weight, clamped to [0, 1e4] before the weight.
  g_rec, g_gan = {'k': jnp.array([3.0, 4.0])}, {'k': jnp.array([0.0, 2.0])}
  np.testing.assert_allclose(losses.adaptive_weight(g_rec, g_gan, 0.5), 0.5 * 5.0 / (2.0 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(losses.adaptive_weight(g_rec, {'k': jnp.zeros(2)}, 0.5), 0.5 * 1e4)
  grad = jax.grad(lambda s: losses.adaptive_weight({'k': s * g_rec['k']}, g_gan))(1.0)
  assert grad == 0.0  # Detached.
  assert [float(losses.disc_factor(jnp.array(s), 3)) for s in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]


def _gan_task(**overrides):
  config = load_config('vae_base', VAE, '', **{**GAN, **overrides})
  validate_config(config)
  return config, VAETask(config, '/tmp/unused')


def test_train_step_updates_the_discriminator_with_its_adaptive_weight_and_guards_nans():
  config, task = _gan_task()
  aux = task.aux_networks()
  rng = jax.random.PRNGKey(0)
  tx = state_lib.create_optimizer(config.optim, config.train.num_steps)
  state = state_lib.create_train_state(task.init_params(rng), tx, rng, aux.init(jax.random.PRNGKey(1)), aux.tx)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  step = jax.jit(state_lib.make_train_step(task.loss_fn, config.optim.ema_decay))
  first, metrics = step(state, {'image': x}, {})
  new, _ = step(first, {'image': x}, {})  # The learning rate warms up from 0 at step 0.
  changed = lambda a, b: any(
    np.any(np.asarray(u) != np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  assert changed(new.aux_params, first.aux_params) and changed(new.params, first.params)
  assert metrics['skipped'] == 0 and metrics['d_loss'] > 0 and metrics['aux_grad_norm'] > 0
  np.testing.assert_allclose(metrics['loss'], metrics['ae_loss'] + metrics['d_loss'], rtol=1e-6)
  # lambda by hand: the two gradients at the decoder's last layer, taken separately with jax.grad.
  keys = state_lib.per_example_keys(state.rng, state.step, 4)
  mean, logvar = task.vae.apply({'params': state.params}, x, method='encode')
  z = mean + jnp.exp(0.5 * logvar) * jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
  decode = lambda last: task.vae.apply({'params': _with_last_layer(state.params, last)}, z, method='decode')
  nll = lambda last: jnp.sum(jnp.abs(x - decode(last))) / 4
  gan = lambda last: -jnp.mean(task.disc.apply({'params': state.aux_params['disc']}, decode(last)))
  last = state.params[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]
  norm = lambda g: float(np.sqrt(np.sum(np.square(np.asarray(g)))))
  by_hand = min(norm(jax.grad(nll)(last)) / (norm(jax.grad(gan)(last)) + 1e-4), 1e4) * 0.5
  np.testing.assert_allclose(metrics['d_weight'], by_hand, rtol=1e-4)
  # A NaN in the discriminator's loss is caught by the step's guard: nothing moves, the step counts as bad.
  bad = state.replace(aux_params=jax.tree.map(lambda a: a * jnp.nan, state.aux_params))
  after, metrics = step(bad, {'image': x}, {})
  assert metrics['skipped'] == 1 and int(after.bad_steps) == 1
  assert not changed(after.params, bad.params)


def test_bad_adversarial_keys_are_one_error_naming_the_key():
  for key, value, match in [
    ('loss.disc_start', -1, r'^config\.loss\.disc_start: must be an integer step >= 0'),
    ('loss.disc_loss', 'wasserstein', r'^config\.loss\.disc_loss: unknown .wasserstein.; known: hinge, vanilla'),
    ('model.disc.num_layers', 4, r'^config\.model\.disc\.num_layers: 4 layers leave no patch of a 16-px image'),
    ('model.disc.channels', 0, r'^config\.model\.disc\.channels: must be an integer >= 1'),
    ('loss.adversarial_weight', -0.5, r'^config\.loss\.adversarial_weight: must be >= 0'),
  ]:
    config = load_config('vae_base', VAE, '', **{**GAN, key: value})
    with pytest.raises(ConfigError, match=match):
      validate_config(config)


@pytest.mark.slow
def test_resume_with_the_discriminator_is_bit_identical(tmp_path, data_dir):
  """4 steps in one go == 2 steps, a stop, and 2 more from the checkpoint (VAE, discriminator and both optimizers)."""
  from diffusion.training import train_and_evaluate

  overrides = {
    **VAE,
    **GAN,
    'data.image_size': 32,
    'model.disc.num_layers': 3,
    'loss.disc_start': 1,
    'optim.lr_schedule': 'constant',
    'train.eval_every': 0,
    'train.sample_every': 0,
  }
  straight = train_and_evaluate(
    load_config('vae_base', overrides, data_dir, **{'train.num_steps': 4}), str(tmp_path / 'a')
  )
  workdir = str(tmp_path / 'b')
  train_and_evaluate(load_config('vae_base', overrides, data_dir, **{'train.num_steps': 2}), workdir)
  resumed = train_and_evaluate(load_config('vae_base', overrides, data_dir, **{'train.num_steps': 4}), workdir)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert np.any(np.asarray(jax.tree.leaves(straight.aux_params)[0]) != 0)


LOGVAR = {**VAE, 'model.vae.block_out_channels': (8,), 'data.image_size': 8}  # One level: a short compile.


def test_learned_logvar_is_an_aux_param_that_gets_its_gradient_and_moves_and_a_fixed_one_stays():
  pixels, rng = 8 * 8 * 3, jax.random.PRNGKey(0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
  config = load_config('vae_base', LOGVAR, '', **{'loss.learn_logvar': True})
  validate_config(config)
  task = VAETask(config, '/tmp/unused')
  aux = task.aux_networks()
  tx = state_lib.create_optimizer(config.optim, config.train.num_steps)
  state = state_lib.create_train_state(task.init_params(rng), tx, rng, aux.init(rng), aux.tx)
  assert jax.tree.map(np.shape, state.aux_params) == {'logvar': ()}
  step = jax.jit(state_lib.make_train_step(task.loss_fn, config.optim.ema_decay))
  first, _ = step(state, {'image': x}, {})  # The learning rate warms up from 0 at step 0.
  second, metrics = step(first, {'image': x}, {})
  # d/dlogvar of mean_b sum_pixels(|x - rec| / exp(logvar) + logvar) = pixels * (1 - rec_loss / exp(logvar)).
  logvar = float(first.aux_params['logvar'])
  np.testing.assert_allclose(
    metrics['aux_grad_norm'], abs(pixels * (1 - metrics['rec_loss'] / np.exp(logvar))), rtol=1e-4
  )
  assert metrics['aux_grad_norm'] > 0 and float(second.aux_params['logvar']) != logvar
  # learn_logvar=False: no param and no optimizer for it; the NLL uses loss.logvar_init.
  config = load_config('vae_base', LOGVAR, '', **{'loss.logvar_init': 0.5})
  validate_config(config)
  task = VAETask(config, '/tmp/unused')
  assert task.aux_networks() is None
  keys, step0 = jax.random.split(rng, 4), jnp.zeros((), jnp.int32)
  _, metrics = jax.jit(task.loss_fn)(task.init_params(rng), task.frozen, {'image': x}, keys, step0)
  np.testing.assert_allclose(metrics['nll'], pixels * (metrics['rec_loss'] / np.exp(0.5) + 0.5), rtol=1e-5)
