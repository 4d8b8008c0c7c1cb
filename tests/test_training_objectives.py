"""Training with every prediction type, schedule and loss weighting: the noising and loss path of the LDM task
(`losses.noised_example` + `losses.get_diffusion_loss_fn`) on a tiny network, the config rules, and the tiny LDM
trained with flow matching (and v prediction) by config overrides alone."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from diffusion import losses, process
from diffusion.config import validate_config
from diffusion.errors import ConfigError
from support import LDM, load_config  # pylint: disable=g-import-not-at-top

FLOW = {'diffusion.prediction_type': 'flow', 'diffusion.schedule': 'flow', 'sample.sampler': 'flow_euler'}


class TinyDenoiser(nn.Module):
  """(x, t) -> output: a 1x1 conv on x and a time embedding (enough to fit a Gaussian's optimal denoiser)."""

  @nn.compact
  def __call__(self, x, t):
    s = (t / 1000.0)[:, None, None, None] * jnp.ones(x.shape[:-1] + (1,))
    features = jnp.concatenate([x, jnp.sin(3 * s), jnp.cos(3 * s), s, x * s], axis=-1)
    return nn.Conv(x.shape[-1], (1, 1))(nn.gelu(nn.Conv(32, (1, 1))(features)))


def _train(diffusion_config, steps=60):
  """Adam steps on the objective; returns the loss on a fixed held-out draw (noise, t) before and after."""
  schedule = process.get_noise_schedule(diffusion_config)
  loss_fn = losses.get_diffusion_loss_fn(diffusion_config)
  model = TinyDenoiser()
  x0 = jnp.asarray(np.random.default_rng(0).normal([0.5, -0.3], [0.4, 0.8], (64, 2, 2, 2)), jnp.float32)
  params = model.init(jax.random.key(0), x0, jnp.zeros((64,)))
  optimizer = optax.adam(1e-2)

  def loss(p, i):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), i), 128).reshape(2, 64)
    x_t, t, noise = jax.vmap(lambda kt, kn, z: losses.noised_example(kt, kn, z, schedule, 0.1))(*keys, x0)
    return jnp.mean(loss_fn(model.apply(p, x_t, t), x0, noise, t, schedule))

  @jax.jit
  def step(params, opt_state, i):
    value, grads = jax.value_and_grad(loss)(params, i)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  held_out = jax.jit(lambda p: jnp.mean(jax.vmap(lambda i: loss(p, i))(-1 - jnp.arange(8))))
  before, opt_state = float(held_out(params)), optimizer.init(params)
  for i in range(steps):
    params, opt_state, value = step(params, opt_state, i)
    assert np.isfinite(float(value))
  return before, float(held_out(params))


# Every prediction type and every weighting at least once (each case compiles its own train step).
OBJECTIVES = [
  ('eps', 'scaled_linear', 'uniform'),
  ('x0', 'cosine', 'min_snr'),
  ('v', 'scaled_linear', 'v_loss'),
  ('v', 'edm', 'edm'),
  ('eps', 'scaled_linear', 'min_snr'),
  ('flow', 'flow', 'uniform'),
  ('flow', 'flow', 'edm'),
]


@pytest.mark.parametrize('prediction_type,schedule,weighting', OBJECTIVES)
def test_each_objective_trains(prediction_type, schedule, weighting):
  config = dict(
    prediction_type=prediction_type,
    schedule=schedule,
    loss_weighting=weighting,
    min_snr_gamma=5.0,
    edm_sigma_data=0.5,
    flow_t_sampling='logit_normal' if weighting == 'edm' else 'uniform',
  )
  before, after = _train(config)
  assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
  'overrides,key',
  [
    ({'diffusion.prediction_type': 'flow'}, 'diffusion.prediction_type'),
    (
      {'diffusion.schedule': 'flow', 'diffusion.prediction_type': 'eps', 'sample.sampler': 'flow_euler'},
      'diffusion.prediction_type',
    ),
    ({'diffusion.schedule': 'flow', 'diffusion.prediction_type': 'flow'}, 'sample.sampler'),
    ({'sample.sampler': 'flow_heun'}, 'sample.sampler'),
    ({'sample.karras': True}, 'sample.karras'),
    ({'sample.sampler': 'ddpm', 'sample.eta': 0.5}, 'sample.eta'),
    ({'sample.sampler': 'euler', 'sample.s_churn': 1.0}, 'sample.s_churn'),
    ({'sample.timestep_spacing': 'cubic'}, 'sample.timestep_spacing'),
    ({'sample.guidance_interval': (0.9, 0.1)}, 'sample.guidance_interval'),
    ({'diffusion.loss_weighting': 'snr'}, 'diffusion.loss_weighting'),
    ({'diffusion.flow_t_sampling': 'beta', **FLOW}, 'diffusion.flow_t_sampling'),
    ({'diffusion.edm_sigma_data': -1.0, 'diffusion.loss_weighting': 'edm'}, 'diffusion.edm_sigma_data'),
  ],
)
def test_config_rules(overrides, key):
  config = load_config('ldm_base', {}, '/nonexistent', **overrides)
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    validate_config(config)


@pytest.mark.parametrize(
  'overrides',
  [
    {'diffusion.prediction_type': 'v'},
    FLOW,
    {**FLOW, 'diffusion.flow_t_sampling': 'logit_normal', 'diffusion.flow_shift': 3.0, 'sample.karras': True},
    {
      'diffusion.schedule': 'edm',
      'diffusion.prediction_type': 'v',
      'diffusion.loss_weighting': 'edm',
      'sample.sampler': 'heun',
      'sample.karras': True,
      'sample.s_churn': 10.0,
    },
    {
      'diffusion.rescale_zero_terminal_snr': True,
      'diffusion.prediction_type': 'v',
      'sample.sampler': 'dpmpp_2m_sde',
      'sample.timestep_spacing': 'trailing',
      'sample.guidance_rescale': 0.7,
    },
  ],
)
def test_quickstart_variants_are_valid_configs(overrides):
  validate_config(load_config('ldm_base', {}, '/nonexistent', **overrides))


def _train_ldm(tmp_path, data_dir, vae_workdir, overrides):
  from diffusion.training import train_and_evaluate

  workdir = str(tmp_path / 'ldm')
  train_and_evaluate(load_config('ldm_base', {**LDM, **overrides}, data_dir, vae_workdir=vae_workdir), workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert os.path.exists(os.path.join(workdir, 'samples', 'samples_0000002.png'))  # Sampled with the config's sampler.
  return workdir


@pytest.mark.slow
def test_tiny_ldm_trains_with_flow_matching_by_config_alone(tmp_path, data_dir, vae_workdir):
  _train_ldm(tmp_path, data_dir, vae_workdir, FLOW)


@pytest.mark.slow
def test_tiny_ldm_trains_with_v_prediction_by_config_alone(tmp_path, data_dir, vae_workdir):
  _train_ldm(tmp_path, data_dir, vae_workdir, {'diffusion.prediction_type': 'v', 'sample.sampler': 'dpmpp_2m'})
