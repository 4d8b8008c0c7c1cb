"""Every config file loads and validates; bad keys and values fail before anything is compiled, naming the key."""

import glob
import os

import pytest

from diffusion.config import config_from_json, config_to_json, validate_config
from diffusion.errors import ConfigError
from support import LDM, ROOT, VAE, device_env, load_config, load_config_file

CONFIG_FILES = sorted(
  f for f in glob.glob(os.path.join(ROOT, 'configs', '*.py')) if not f.endswith(('__init__.py', 'common.py'))
)
PRESETS = {'vae_base.py': ('base', 'tiny'), 'ldm_base.py': ('base', 'tiny')}


load = load_config_file


def ldm_tiny():
  return load(os.path.join(ROOT, 'configs', 'ldm_base.py'), 'tiny')


def test_there_are_configs():
  assert {os.path.basename(f) for f in CONFIG_FILES} >= {'vae_base.py', 'ldm_base.py'}


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_and_preset_validates(path):
  for preset in PRESETS.get(os.path.basename(path), (None,)):
    config = load(path, preset)
    validate_config(config)
    assert config.train.num_steps > 0


def test_unknown_preset_is_an_error():
  with pytest.raises(ValueError, match='unknown preset'):
    load(os.path.join(ROOT, 'configs', 'ldm_base.py'), 'nope')


def test_json_round_trip_keeps_values():
  config = ldm_tiny()
  back = config_from_json(config_to_json(config))
  assert back.model.unet.block_out_channels == tuple(config.model.unet.block_out_channels)
  assert back.optim.lr == config.optim.lr
  validate_config(back)


BAD = [
  ('optim.lr', lambda c: setattr(c.optim, 'lr', -1e-3)),
  ('train.num_steps', lambda c: setattr(c.train, 'num_steps', 0)),
  ('data.image_size', lambda c: setattr(c.data, 'image_size', 30)),
  ('model.unet.attention_head_dim', lambda c: setattr(c.model.unet, 'attention_head_dim', 5)),
  ('model.unet.cross_attention_dim', lambda c: setattr(c.model.unet, 'cross_attention_dim', 32)),
  ('model.unet.in_channels', lambda c: setattr(c.model.unet, 'in_channels', 3)),
  ('model.unet.sample_size', lambda c: setattr(c.model.unet, 'sample_size', 16)),
  ('diffusion.prediction_type', lambda c: setattr(c.diffusion, 'prediction_type', 'noise')),
  ('sample.sampler', lambda c: setattr(c.sample, 'sampler', 'magic')),
  ('optim.ema_decay', lambda c: setattr(c.optim, 'ema_decay', 1.0)),
  ('wandb.mode', lambda c: setattr(c.wandb, 'mode', 'sometimes')),
  ('data.max_text_length', lambda c: setattr(c.data, 'max_text_length', 100)),
  ('model.unet.block_out_channels', lambda c: setattr(c.model.unet, 'block_out_channels', (64, 100))),
  ('diffusion.caption_dropout', lambda c: setattr(c.diffusion, 'caption_dropout', 1.5)),
  ('model.text.num_attention_heads', lambda c: setattr(c.model.text, 'num_attention_heads', 5)),
  ('model.vae.block_out_channels', lambda c: setattr(c.model.vae, 'block_out_channels', (16, 20, 32))),
  ('model.unet.down_block_types', lambda c: setattr(c.model.unet, 'down_block_types', ('DownBlock2D',))),
  ('model.unet.up_block_types', lambda c: setattr(c.model.unet, 'up_block_types', ('UpBlock2D', 'MagicBlock'))),
  (
    'model.unet.transformer_layers_per_block',
    lambda c: setattr(c.model.unet, 'transformer_layers_per_block', (1, 1, 1)),
  ),
  ('sample.num_steps', lambda c: setattr(c.sample, 'num_steps', 5000)),
  ('optim.lr_schedule', lambda c: setattr(c.optim, 'lr_schedule', 'wavy')),
  ('optim.warmup_steps', lambda c: setattr(c.optim, 'warmup_steps', -5)),
  ('diffusion.schedule', lambda c: setattr(c.diffusion, 'schedule', 'quadratic')),
  ('diffusion.loss_weighting', lambda c: setattr(c.diffusion, 'loss_weighting', 'heavy')),
  ('data.shapes.max_objects', lambda c: setattr(c.data.shapes, 'max_objects', 3)),
  ('mesh.tensor', lambda c: setattr(c.mesh, 'tensor', 0)),
  ('model_type', lambda c: setattr(c, 'model_type', '')),
]


@pytest.mark.parametrize('key,mutate', BAD, ids=[b[0] for b in BAD])
def test_bad_values_name_the_key(key, mutate):
  config = ldm_tiny()
  mutate(config)
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert info.value.key == key
  assert f'config.{key}' in str(info.value)


def test_vae_loss_terms_must_be_registered():
  config = load(os.path.join(ROOT, 'configs', 'vae_base.py'), 'tiny')
  config.loss.perceptual_weight = -0.1
  with pytest.raises(ConfigError, match='perceptual'):
    validate_config(config)
  config.loss.perceptual_weight = 0.0
  config.loss.kl_weight = -1.0
  with pytest.raises(ConfigError, match='loss.kl_weight'):
    validate_config(config)


def test_mesh_and_batch_must_fit_the_devices():
  import jax

  from diffusion import parallel

  config = ldm_tiny()
  config.mesh.data = jax.device_count() + 1
  with pytest.raises(ConfigError, match='mesh'):
    parallel.create_mesh(config.mesh)
  config.mesh.data = -1
  config.mesh.fsdp = -1
  with pytest.raises(ConfigError, match='only one mesh axis'):
    parallel.create_mesh(config.mesh)


def test_batch_not_divisible_by_data_parallelism_in_a_subprocess():
  """8 CPU devices: a global batch of 12 cannot be split over data=8."""
  import subprocess
  import sys

  code = (
    'import jax; from diffusion import parallel; import ml_collections as mc;'
    'm = parallel.create_mesh(mc.ConfigDict(dict(data=-1, fsdp=1, tensor=1)));'
    'print(parallel.check_batch_size(16, m));'
    'parallel.check_batch_size(12, m)'
  )
  env = device_env(8)
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == '16'
  assert 'train.batch_size: 12 is not divisible by the data parallelism 8' in result.stderr


def test_each_section_is_checked_by_its_owner():
  """config.validate_config dispatches: an error from each component still names its key."""
  from diffusion import losses, models, parallel, process
  from diffusion.data import validation as data_validation

  vae = load_config('vae_base', VAE, '/nonexistent')
  vae.loss.disc_start = -1
  with pytest.raises(ConfigError) as info:
    validate_config(vae)
  assert str(info.value) == 'config.loss.disc_start: must be an integer step >= 0, got -1'
  ldm = load_config('ldm_base', LDM, '/nonexistent')
  cases = [
    (models.validate_config, 'model.unet.down_block_types', 'model.unet.down_block_types', ('Nope',) * 2),
    (parallel.validate_config, 'mesh.rules', 'mesh.rules', (('embed', 'pipeline'),)),
    (data_validation.validate_config, 'data.worker_count', 'data.worker_count', -1),
    (lambda c: process.validate_config(c.diffusion), 'diffusion.caption_dropout', 'diffusion.caption_dropout', 1.0),
    (losses.validate_config, 'diffusion.loss_weighting', 'diffusion.loss_weighting', 'huber'),
  ]
  for check, key, expected, value in cases:
    config = load_config('ldm_base', LDM, '/nonexistent', **{key: value})
    for fn in (check, validate_config):
      with pytest.raises(ConfigError) as info:
        fn(config)
      assert info.value.key == expected, (key, fn)
  validate_config(ldm)


def test_constants_have_one_definition():
  from configs import common
  from diffusion import models, parallel
  from diffusion.models import unet

  assert common.get_mesh_config().rules == parallel.DEFAULT_RULES
  assert models.vae_downsample_factor(load_config('ldm_base', LDM, '/nonexistent').model.vae) == 4
  assert unet.DOWN_BLOCK_TYPES == ('CrossAttnDownBlock2D', 'DownBlock2D')
