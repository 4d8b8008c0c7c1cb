"""The evals spec (validated, errors naming the key), the per-process shares, the prompts' noise and the oracle sums."""

import ml_collections
import pytest

from diffusion.errors import ConfigError, UserError
from diffusion.evaluation import METRICS, EvalContext, build_suite, parse_evals, parse_evaluator, reference, suite
from support import LDM, load_config


@pytest.fixture(scope='module')
def config():
  return load_config('ldm_base', LDM, '')


def test_defaults_and_overrides(config):
  spec = parse_evaluator('guided', {'type': 'oracle', 'num_samples': 12, 'guidance_scale': 2, 'every': 5}, config)
  assert (spec.type, spec.num_samples, spec.batch_size, spec.seed, spec.split) == (
    'oracle',
    12,
    50,
    config.seed,
    config.data.train_split,
  )
  assert spec.sampling == {'guidance_scale': 2} and spec.options == {}
  assert spec.due(10, False) and not spec.due(11, False) and spec.due(11, True)
  assert not parse_evaluator('fid', {}, config).due(1500, False)  # every=0: only at the last step.
  assert parse_evaluator('fid', {}, config).type == 'fid'  # The type defaults to the evaluator's name.


@pytest.mark.parametrize(
  'entry,key,needle',
  [
    ({'num_samples': 0}, 'fid.num_samples', 'integer >= 1'),
    ({'every': -1}, 'fid.every', '>= 0'),
    ({'batch_sizes': 4}, 'fid.batch_sizes', 'unknown key'),
    ({'type': 'nope'}, 'fid.type', "unknown metric 'nope'"),
    ({'sampler': 'nope'}, 'fid.sampler', "unknown sampler 'nope'"),
    ({'num_steps': 0}, 'fid.num_steps', 'num_steps'),
    ({'guidance_scale': -1.0}, 'fid.guidance_scale', 'guidance_scale'),
    ({'prompts': 'a red circle'}, 'fid.prompts', 'tuple of strings'),
    ({'seed': 1.5}, 'fid.seed', 'integer or None'),
  ],
  ids=['num_samples', 'every', 'unknown-key', 'type', 'sampler', 'num_steps', 'guidance', 'prompts', 'seed'],
)
def test_bad_values_name_the_key(config, entry, key, needle):
  with pytest.raises(ConfigError, match=needle) as error:
    parse_evaluator('fid', entry, config)
  assert str(error.value).startswith(f'config.evals.{key}: ')


def test_config_section(config):
  assert parse_evals(config) == [] and build_suite(config, 'unused', None) is None
  with_evals = ml_collections.ConfigDict(config.to_dict())
  with_evals.evals = ml_collections.ConfigDict(
    {'oracle': {'type': 'oracle', 'num_samples': 4}, 'fid': {'num_samples': 0}}
  )
  with pytest.raises(ConfigError, match=r'^config\.evals\.fid\.num_samples: '):
    parse_evals(with_evals)


def test_one_process_share_is_everything_in_batches():
  batches = reference.process_batches(7, 3)
  assert [list(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_prompt_seeds_fix_their_noise_as_in_sample_py():
  noise = suite.sample_noise(6, 2, 5, [None, 9])
  assert noise == [(5, 0), (9, 0), (5, 2), (9, 1), (5, 4), (9, 2)]


def test_oracle_counts_and_control(config):
  from diffusion.data import shapes

  images, captions = shapes.generate_arrays(8, 32, 1, seed=(0, 1))
  context = EvalContext('unused', config, None, '', prompts=list(captions), seed=0)
  metric = METRICS.get('oracle')(context)
  metric.reset()
  metric.update(images[:5], captions[:5])
  metric.update(images[5:], captions[5:])
  result = metric.result()
  assert result['oracle_caption_accuracy'] == 1.0 and result['oracle_shuffled_prompts'] < 1.0
  assert list(metric.counts) == [8.0, 8.0, 8.0 * result['oracle_shuffled_prompts']]
  metric.reset()
  with pytest.raises(UserError, match='no images'):
    metric.result()
