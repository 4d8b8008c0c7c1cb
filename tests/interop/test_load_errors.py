"""Bad model directories are clear user errors naming the offending key or tensor, never partial loads."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion import interop
from diffusion.errors import UserError

UNET = dict(
  sample_size=8,
  block_out_channels=(8, 16),
  layers_per_block=1,
  attention_head_dim=2,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=8,
  norm_num_groups=4,
)
WEIGHTS = 'diffusion_pytorch_model.safetensors'


@pytest.fixture(scope='module')
def unet_dir(ref, tmp_path_factory) -> str:
  directory = tmp_path_factory.mktemp('unet')
  ref.torch.manual_seed(0)
  ref.diffusers.UNet2DConditionModel(**UNET).save_pretrained(directory)
  return str(directory)


@pytest.fixture
def copy(unet_dir, tmp_path):
  target = tmp_path / 'unet'
  shutil.copytree(unet_dir, target)
  return target


def _edit_config(directory, **changes):
  path = directory / 'config.json'
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_the_fixture_loads(unet_dir):
  unet, params = interop.load_unet(unet_dir)
  assert unet.block_out_channels == (8, 16) and params['conv_in']['kernel'].shape == (3, 3, 4, 8)


def test_missing_directory_config_and_weights(copy, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    interop.load_unet(str(tmp_path / 'nowhere'))
  (copy / 'config.json').unlink()
  with pytest.raises(UserError, match=r'has no config.json \(nor unet/config.json\)'):
    interop.load_unet(str(copy))
  (copy / 'config.json').write_text('{"_class_name": "UNet2DConditionModel"')
  with pytest.raises(UserError, match='cannot read .*config.json'):
    interop.load_unet(str(copy))


def test_missing_weights(copy):
  (copy / WEIGHTS).unlink()
  with pytest.raises(UserError, match='has no weights: expected diffusion_pytorch_model.safetensors'):
    interop.load_unet(str(copy))


@pytest.mark.parametrize(
  'changes, message',
  [
    (
      dict(down_block_types=['SimpleCrossAttnDownBlock2D', 'DownBlock2D']),
      "down_block_types has unknown block type 'SimpleCrossAttnDownBlock2D'",
    ),
    (dict(up_block_types=['UpBlock2D', 'AttnUpBlock2D']), "up_block_types has unknown block type 'AttnUpBlock2D'"),
    (dict(mid_block_type='UNetMidBlock2DSimpleCrossAttn'), "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    (dict(addition_embed_type='text_time'), "addition_embed_type='text_time' is not supported"),
    (dict(class_embed_type='timestep'), "class_embed_type='timestep' is not supported"),
    (dict(time_embedding_type='fourier'), "time_embedding_type='fourier' is not supported"),
    (dict(some_new_option=3), 'unknown option some_new_option=3'),
    (dict(_class_name='AutoencoderKL'), "_class_name='AutoencoderKL', expected 'UNet2DConditionModel'"),
    (dict(layers_per_block=[1, 1, 1]), 'layers_per_block=\\[1, 1, 1\\] must be an int or one int per level'),
    (dict(act_fn='mish'), "act_fn='mish' is not a supported activation"),
    (dict(transformer_layers_per_block=[[1], [1]]), 'transformer_layers_per_block=\\[\\[1\\], \\[1\\]\\] must be'),
  ],
)
def test_unsupported_configs_name_the_key(copy, changes, message):
  _edit_config(copy, **changes)
  with pytest.raises(UserError, match=message) as info:
    interop.load_unet(str(copy))
  assert 'config.json' in str(info.value)


def test_shapes_that_do_not_match_the_config(copy):
  _edit_config(copy, cross_attention_dim=12)  # The file's to_k / to_v were built for 8.
  with pytest.raises(UserError) as info:
    interop.load_unet(str(copy))
  message = str(info.value)
  assert 'with the wrong shape' in message
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  assert f'{key} (file (8, 8), expected (8, 12))' in message
  assert 'missing' not in message and 'left over' not in message


def test_missing_and_left_over_tensors_are_listed(copy):
  state = load_file(copy / WEIGHTS)
  del state['conv_in.weight']
  state['conv_in.weight_v2'] = np.zeros(1, np.float32)
  save_file(state, copy / WEIGHTS)
  with pytest.raises(UserError, match=r'1 missing: conv_in.weight; 1 left over: conv_in.weight_v2'):
    interop.load_unet(str(copy))


def test_fewer_levels_in_the_config_than_in_the_file(copy):
  _edit_config(copy, block_out_channels=[8], down_block_types=['DownBlock2D'], up_block_types=['UpBlock2D'])
  with pytest.raises(UserError) as info:
    interop.load_unet(str(copy))
  message = str(info.value)
  assert '118 left over: down_blocks.0.attentions.0.norm.bias' in message  # Level 1 is gone, level 0 moved.
  assert 'mid_block.attentions.0.norm.bias (file (16,), expected (8,))' in message


def test_sharded_weights(copy, unet_dir):
  state = load_file(copy / WEIGHTS)
  names = sorted(state)
  half = len(names) // 2
  shards = {'part-1.safetensors': names[:half], 'part-2.safetensors': names[half:]}
  for shard, keys in shards.items():
    save_file({k: state[k] for k in keys}, copy / shard)
  (copy / f'{WEIGHTS}.index.json').write_text(
    json.dumps({'weight_map': {k: shard for shard, keys in shards.items() for k in keys}})
  )
  (copy / WEIGHTS).unlink()
  _, sharded = interop.load_unet(str(copy))
  _, single = interop.load_unet(unet_dir)
  np.testing.assert_array_equal(sharded['conv_out']['kernel'], single['conv_out']['kernel'])
  (copy / 'part-2.safetensors').unlink()
  with pytest.raises(UserError, match="shard files missing: \\['part-2.safetensors'\\]"):
    interop.load_unet(str(copy))


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(UserError, match="'nobody-here/no-such-model' is not a local directory and could not be"):
    interop.load_unet('nobody-here/no-such-model')


def test_wrong_component_and_vae_errors(unet_dir, ref, tmp_path):
  with pytest.raises(UserError, match="_class_name='UNet2DConditionModel', expected 'AutoencoderKL'"):
    interop.load_vae(unet_dir)
  ref.diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path / 'vae')
  _edit_config(tmp_path / 'vae', shift_factor=0.1)
  with pytest.raises(UserError, match='shift_factor=0.1 is not supported'):
    interop.load_vae(str(tmp_path / 'vae'))
  _edit_config(tmp_path / 'vae', shift_factor=None, up_block_types=['UpDecoderBlock2DMagic'])
  with pytest.raises(UserError, match="up_block_types has unknown block type 'UpDecoderBlock2DMagic'"):
    interop.load_vae(str(tmp_path / 'vae'))
  with pytest.raises(UserError, match="model_type='clip_vision_model'"):
    (tmp_path / 'vision').mkdir()
    (tmp_path / 'vision' / 'config.json').write_text(json.dumps({'model_type': 'clip_vision_model'}))
    save_file({'x': np.zeros(1, np.float32)}, tmp_path / 'vision' / 'model.safetensors')
    interop.load_text_encoder(str(tmp_path / 'vision'))
