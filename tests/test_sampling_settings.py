"""samplers.SamplingSettings: the one owner of the sampling-setting rules (config keys vs overrides, per-sampler
options, the model's family), and its JSON record."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from diffusion import process
from diffusion.errors import ConfigError, UserError
from diffusion.samplers import SamplingSettings
from support import LDM, load_config  # pylint: disable=g-import-not-at-top


@pytest.fixture
def sample():
  return load_config('ldm_base', LDM, '/nonexistent').sample


def test_from_config_takes_only_the_options_the_sampler_takes(sample):
  settings = SamplingSettings.from_config(sample)
  assert (settings.sampler, settings.num_steps, settings.options) == ('ddim', sample.num_steps, (('eta', 0.0),))
  heun = SamplingSettings.from_config(sample, sampler='heun', num_steps=None, s_churn=0.5)
  assert heun.options == (('karras', False), ('s_churn', 0.5)) and heun.num_steps == sample.num_steps
  sample.timestep_spacing = 'trailing'
  assert dict(SamplingSettings.from_config(sample, sampler='euler').options) == {
    'karras': False,
    'timestep_spacing': 'trailing',
  }
  sample.eta = 0.3  # Set for ddim: dropped (not an error) when an override picks a sampler without eta.
  assert 'eta' not in dict(SamplingSettings.from_config(sample, sampler='euler').options)


@pytest.mark.parametrize(
  'key,value,needle',
  [
    ('sampler', 'magic', 'unknown sampler'),
    ('num_steps', 0, 'integer >= 1'),
    ('guidance_scale', -1.0, '>= 0'),
    ('guidance_rescale', 1.5, '[0, 1]'),
    ('guidance_interval', (0.9, 0.1), 'lo <= hi'),
    ('eta', -0.1, '>= 0'),
    ('s_churn', 1.0, "sampler 'ddim' has no option 's_churn'"),
    ('timestep_spacing', 'sideways', 'leading'),
    ('karras', True, "no option 'karras'"),
  ],
)
def test_a_bad_config_value_is_a_config_error_naming_its_key(sample, key, value, needle):
  sample[key] = value
  with pytest.raises(ConfigError, match=needle) as info:
    SamplingSettings.from_config(sample)
  assert info.value.key == f'sample.{key}'


@pytest.mark.parametrize(
  'overrides,needle',
  [
    (dict(sampler='magic'), "unknown sampler 'magic'; known: ddim"),
    (dict(s_churn=1.0), "sampler 'ddim' has no option 's_churn'; its options: eta, timestep_spacing"),
    (dict(sampler='euler', eta=0.5), "sampler 'euler' has no option 'eta'"),
    (dict(num_steps=0), 'num_steps must be an integer >= 1'),
    (dict(eta=-1.0), 'eta must be a number >= 0'),
    (dict(guidance_interval=(0.5, 2.0)), 'guidance_interval must be'),
    (dict(karras=1, sampler='euler'), 'karras'),
  ],
)
def test_a_bad_override_is_a_user_error_naming_the_option(sample, overrides, needle):
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')) as info:
    SamplingSettings.from_config(sample, **overrides)
  assert not isinstance(info.value, ConfigError)
  with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    SamplingSettings.from_config(sample).replace(**overrides)


def test_lcm_steps_are_at_most_original_inference_steps(sample):
  sample.sampler, sample.num_steps = 'lcm', 50
  settings = SamplingSettings.from_config(sample)
  assert (settings.num_steps, settings.options) == (50, ())  # The default original_inference_steps is 50.
  assert SamplingSettings.from_config(sample, num_steps=4, original_inference_steps=8).options == (
    ('original_inference_steps', 8),
  )
  sample.num_steps = 51
  with pytest.raises(ConfigError, match=r"must be <= original_inference_steps \(50\) with sampler 'lcm'") as info:
    SamplingSettings.from_config(sample)
  assert info.value.key == 'sample.num_steps'
  with pytest.raises(UserError, match=r'^num_steps must be <= original_inference_steps \(4\).*got 8'):
    SamplingSettings.from_config(sample, num_steps=8, original_inference_steps=4)
  with pytest.raises(UserError, match=r'^--num_steps must be <= original_inference_steps \(50\)'):
    SamplingSettings.check_overrides(flag_prefix='--', sampler='lcm', num_steps=60)
  for key, value, needle in (
    ('original_inference_steps', 0, 'original_inference_steps must be an integer >= 1, got 0'),
    ('timestep_scaling', -1.0, 'timestep_scaling must be a finite number > 0'),
    ('timestep_scaling', float('inf'), 'timestep_scaling must be a finite number > 0'),
  ):
    with pytest.raises(UserError, match=needle):
      SamplingSettings.from_config(sample, num_steps=4, **{key: value})
  settings = SamplingSettings.from_config(sample, num_steps=4, original_inference_steps=2000)
  schedule = process.get_noise_schedule(load_config('ldm_base', LDM, '/nonexistent').diffusion)
  with pytest.raises(UserError, match=r'original_inference_steps must be in \[1, 1000\].*got 2000'):
    settings.check_schedule(schedule, config_keys=True)
  settings.replace(original_inference_steps=1000).check_schedule(schedule)


def test_check_overrides_without_a_config():
  SamplingSettings.check_overrides(eta=0.5, karras=None)  # No sampler given: only ranges are checked.
  SamplingSettings.check_overrides(sampler='heun', s_churn=1.0, karras=True)
  with pytest.raises(UserError, match="sampler 'ddim' has no option 'karras'"):
    SamplingSettings.check_overrides(sampler='ddim', karras=True)


def test_replace_validates_and_keeps_only_the_new_samplers_options(sample):
  settings = SamplingSettings.from_config(sample, eta=0.4)
  euler = settings.replace(sampler='euler', karras=True)
  assert euler.options == (('karras', True),) and euler.guidance_scale == settings.guidance_scale
  assert settings.replace(num_steps=None) == settings  # None keeps the value.
  with pytest.raises(UserError, match="'ddim' has no option 's_churn'"):
    settings.replace(s_churn=1.0)
  with pytest.raises(UserError, match='guidance_rescale'):
    settings.replace(guidance_rescale=-0.1)


def test_to_dict_round_trips_through_json(sample):
  settings = SamplingSettings.from_config(
    sample,
    sampler='dpmpp_2m',
    karras=True,
    timestep_spacing='trailing',
    guidance_interval=(0.1, 0.9),
    negative_prompt='blurry',
    num_steps=7,
  )
  record = json.loads(json.dumps(settings.to_dict()))
  assert record['options'] == {'karras': True, 'timestep_spacing': 'trailing'} and record['num_steps'] == 7
  assert SamplingSettings.from_dict(record) == settings
  assert hash(SamplingSettings.from_dict(record)) == hash(settings)  # A static jit argument: equal = one compile.


def test_check_schedule_owns_the_family_and_step_count(sample):
  diffusion_schedule = process.get_noise_schedule(load_config('ldm_base', LDM, '/nonexistent').diffusion)
  SamplingSettings.from_config(sample).check_schedule(diffusion_schedule)
  flow = SamplingSettings.from_config(sample, sampler='flow_euler')
  with pytest.raises(UserError, match="'flow_euler' is a flow sampler but the model is a diffusion model") as info:
    flow.check_schedule(diffusion_schedule)
  assert not isinstance(info.value, ConfigError)
  with pytest.raises(ConfigError, match='sample.num_steps'):
    flow.replace(sampler='ddim', num_steps=5000).check_schedule(diffusion_schedule, config_keys=True)
