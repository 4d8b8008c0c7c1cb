"""The task protocol: a third, test-only task trains through the unchanged loop; what a run is built on
(`init_from`, `base_workdir`, stage 2's `vae_workdir`) is recorded and checked; config-derived errors name their key."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import checkpoint
from diffusion import workdir as workdir_lib
from diffusion.errors import ConfigError
from diffusion.images import make_grid, to_uint8
from diffusion.training import TASKS, train_and_evaluate
from diffusion.training.task import resolved_copy
from support import LDM, VAE, load_config


class RegressionTask:
  """Predicts each image's per-channel std from its per-channel mean (a 3x3 linear map plus a frozen offset)."""

  frozen_param_groups = ()

  def __init__(self, config, workdir):
    del workdir
    self.config = resolved_copy(config)
    self.tokenizer = None
    self.frozen = {'offset': jnp.full((3,), 0.1)}
    self.images = None

  def built_on(self):
    return {}

  def calibrate(self, batches):
    del batches
    return None

  def init_params(self, rng):
    return {'w': 0.1 * jax.random.normal(rng, (3, 3)), 'b': jnp.zeros((3,))}

  def aux_networks(self):
    return None

  def _error(self, params, frozen, batch):
    x = batch['image']
    pred = x.mean(axis=(1, 2)) @ params['w'] + params['b'] + frozen['offset']
    return jnp.mean(jnp.square(pred - x.std(axis=(1, 2))))

  def loss_fn(self, params, frozen, batch, keys, step):
    del keys, step
    return self._error(params, frozen, batch), {}

  def eval_step(self, params, frozen, batch, keys):
    del keys
    return {'mse': self._error(params, frozen, batch)}

  def prepare_sampling(self, held_out):
    self.images = np.asarray(held_out()['image'][:4])

  def sample_grid(self, params, frozen):
    del params, frozen
    return make_grid(to_uint8(self.images), ncols=4), 'held-out images'

  def sampling_params(self, params, frozen):
    return params

  def sampling_pipeline(self):
    return None

  def meta(self):
    return {'model_type': 'regress'}


if 'regress' not in TASKS:
  TASKS.add('regress', RegressionTask)


@pytest.fixture
def regress_config(data_dir):
  """A factory of tiny configs for the regression task (the VAE preset's data, train and optim sections)."""

  def make(**more):
    settings = {
      'model_type': 'regress',
      'optim.lr': 1e-2,
      'train.num_steps': 3,
      'train.eval_every': 3,
      'train.sample_every': 3,
      **more,
    }
    return load_config('vae_base', VAE, data_dir, **settings)

  return make


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_a_registered_task_trains_checkpoints_and_resumes_bit_identically(tmp_path, regress_config):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  final = train_and_evaluate(regress_config(), straight)
  train_and_evaluate(regress_config(**{'train.num_steps': 2}), resumed)
  final_resumed = train_and_evaluate(regress_config(), resumed)
  assert int(final_resumed.step) == 3
  for a, b in zip(
    _leaves((final.params, final.ema_params, final.opt_state)),
    _leaves((final_resumed.params, final_resumed.ema_params, final_resumed.opt_state)),
  ):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(
    np.asarray(final.params['w']),
    np.asarray(RegressionTask(regress_config(), '').init_params(jax.random.PRNGKey(0))['w']),
  )
  rows = [json.loads(line) for line in open(os.path.join(straight, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3] and any('eval/mse' in r for r in rows)
  assert os.path.exists(os.path.join(straight, 'samples', 'samples_0000003.png'))
  assert workdir_lib.load_workdir_config(straight, expect='regress').optim.lr == 1e-2
  assert checkpoint.Checkpointer(straight, read_only=True).restore_meta()['model_type'] == 'regress'
  assert train_and_evaluate(regress_config(), resumed) is None  # Finished: says so, does nothing.


def test_the_given_config_is_not_changed(tmp_path, regress_config):
  config = regress_config()
  before = config.to_dict()
  train_and_evaluate(config, str(tmp_path / 'run'))
  assert config.to_dict() == before


@pytest.fixture
def trained_regress(tmp_path, regress_config) -> str:
  workdir = str(tmp_path / 'source')
  train_and_evaluate(regress_config(**{'train.eval_every': 0, 'train.sample_every': 0}), workdir)
  return workdir


def test_init_from_starts_from_the_source_ema_params_and_records_them(tmp_path, regress_config, trained_regress):
  workdir = str(tmp_path / 'tuned')
  config = regress_config(
    **{
      'init_from': trained_regress,
      'optim.lr': 1e-30,
      'train.num_steps': 1,
      'train.eval_every': 0,
      'train.sample_every': 0,
    }
  )
  state = train_and_evaluate(config, workdir)
  source = checkpoint.Checkpointer(trained_regress, read_only=True).restore_params(item='ema_params')
  for a, b in zip(_leaves(state.params), _leaves(source)):  # lr ~0: the params are still those it started from.
    np.testing.assert_allclose(a, b, rtol=1e-6)
  record = json.load(open(os.path.join(workdir, 'built_on.json')))
  assert record == {'init_from': {'path': trained_regress, 'params_sha256': checkpoint.params_hash(source)}}
  with pytest.raises(ConfigError, match=r'^config\.base_workdir: .* was started without one'):
    train_and_evaluate(regress_config(**{'base_workdir': trained_regress, 'train.num_steps': 2}), workdir)


def test_a_base_whose_params_changed_is_refused_at_resume(tmp_path, regress_config, trained_regress):
  workdir = str(tmp_path / 'on_base')
  quick = {'train.eval_every': 0, 'train.sample_every': 0}
  train_and_evaluate(regress_config(**{'base_workdir': trained_regress, 'train.num_steps': 1, **quick}), workdir)
  record = workdir_lib.load_built_on(workdir)
  assert set(record) == {'base_workdir'} and record['base_workdir']['path'] == trained_regress
  with pytest.raises(ConfigError, match=r'^config\.base_workdir: is empty, but the run in .* is built on'):
    train_and_evaluate(regress_config(**{'train.num_steps': 2, **quick}), workdir)
  train_and_evaluate(regress_config(**{'train.num_steps': 4, **quick}), trained_regress)  # The base trains on.
  with pytest.raises(ConfigError, match=r'^config\.base_workdir: the params of .* changed since the run'):
    train_and_evaluate(regress_config(**{'base_workdir': trained_regress, 'train.num_steps': 2, **quick}), workdir)


def test_init_from_with_other_shapes_names_the_first_mismatching_param(tmp_path, data_dir, vae_workdir):
  config = load_config(
    'vae_base', VAE, data_dir, init_from=vae_workdir, **{'model.vae.block_out_channels': (8, 16, 32)}
  )
  with pytest.raises(ConfigError) as error:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(error.value) == (
    f"config.init_from: param ['decoder']['conv_in']['bias'] has shape (16,) in '{vae_workdir}', this task wants (32,)"
  )  # The first in tree order that differs.
  assert not os.path.exists(os.path.join(tmp_path, 'run', 'config.json'))


@pytest.mark.parametrize('key', ['init_from', 'base_workdir'])
def test_a_missing_workdir_error_names_its_key(tmp_path, regress_config, key):
  missing = str(tmp_path / 'nope')
  expected = rf"^config\.{key}: '{missing}' (is not a training workdir \(no config\.json\)|has no checkpoints)"
  with pytest.raises(ConfigError, match=expected):
    train_and_evaluate(regress_config(**{key: missing}), str(tmp_path / 'run'))


def test_a_missing_or_empty_vae_workdir_error_names_its_key(tmp_path, data_dir):
  missing = str(tmp_path / 'nope')
  config = load_config('ldm_base', LDM, data_dir, vae_workdir=missing)
  with pytest.raises(ConfigError) as error:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(error.value) == f"config.vae_workdir: '{missing}' is not a training workdir (no config.json)"
  with pytest.raises(ConfigError, match=r'^config\.vae_workdir: is empty'):
    train_and_evaluate(load_config('ldm_base', LDM, data_dir), str(tmp_path / 'run2'))


def test_a_vae_workdir_of_the_wrong_kind_names_its_key(tmp_path, data_dir, trained_regress):
  config = load_config('ldm_base', LDM, data_dir, vae_workdir=trained_regress)
  with pytest.raises(ConfigError, match=r"^config\.vae_workdir: .* holds a 'regress' model, expected a 'vae'"):
    train_and_evaluate(config, str(tmp_path / 'run'))


def test_record_built_on_checks_the_copy_a_run_holds(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  config = load_config('ldm_base', LDM, data_dir, vae_workdir=str(tmp_path / 'vae'))
  params = {'kernel': np.arange(6.0).reshape(2, 3)}
  record = workdir_lib.record_built_on(workdir, config, {'vae_workdir': params}, resume=False)
  assert record == workdir_lib.load_built_on(workdir)
  assert record['vae_workdir']['params_sha256'] == checkpoint.params_hash(params)
  config.vae_workdir = ''  # A self-contained run resumes without its source.
  workdir_lib.record_built_on(workdir, config, {'vae_workdir': params}, resume=True)
  with pytest.raises(ConfigError, match=r'^config\.vae_workdir: the params of .* changed'):
    workdir_lib.record_built_on(workdir, config, {'vae_workdir': {'kernel': params['kernel'] + 1}}, resume=True)
  with pytest.raises(ValueError, match='not keys naming'):
    workdir_lib.record_built_on(workdir, config, {'teacher': params}, resume=True)


def test_unknown_task_lists_the_registered_ones():
  with pytest.raises(Exception, match=r"unknown model_type 'nope'; known: .*ldm.*regress.*vae"):
    TASKS.get('nope')


def test_unknown_model_type_lists_the_registered_tasks(regress_config, tmp_path):
  config = regress_config(model_type='gan')
  with pytest.raises(ConfigError, match=r"config.model_type: unknown model_type 'gan'; known: .*ldm.*regress.*vae"):
    train_and_evaluate(config, str(tmp_path / 'run'))
