"""Config translation (diffusion/interop/configs.py) on the published SD 1.5 / 2.1 configs, both directions."""

import pytest

from diffusion.errors import UserError
from diffusion.interop import configs

# stable-diffusion-2-1/unet/config.json as published: per-level heads in `attention_head_dim` (diffusers'
# historical spelling of the head count), linear projections, upcast attention.
SD21_UNET = {
  '_class_name': 'UNet2DConditionModel',
  '_diffusers_version': '0.10.0.dev0',
  'act_fn': 'silu',
  'attention_head_dim': [5, 10, 20, 20],
  'block_out_channels': [320, 640, 1280, 1280],
  'center_input_sample': False,
  'cross_attention_dim': 1024,
  'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  'downsample_padding': 1,
  'dual_cross_attention': False,
  'flip_sin_to_cos': True,
  'freq_shift': 0,
  'in_channels': 4,
  'layers_per_block': 2,
  'mid_block_scale_factor': 1,
  'norm_eps': 1e-05,
  'norm_num_groups': 32,
  'num_class_embeds': None,
  'only_cross_attention': False,
  'out_channels': 4,
  'sample_size': 96,
  'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
  'upcast_attention': True,
  'use_linear_projection': True,
}
SD21_SCHEDULER = {
  '_class_name': 'DDIMScheduler',
  '_diffusers_version': '0.8.0',
  'beta_end': 0.012,
  'beta_schedule': 'scaled_linear',
  'beta_start': 0.00085,
  'clip_sample': False,
  'num_train_timesteps': 1000,
  'prediction_type': 'v_prediction',
  'set_alpha_to_one': False,
  'skip_prk_steps': True,
  'steps_offset': 1,
  'trained_betas': None,
}
SD21_TEXT = {
  'architectures': ['CLIPTextModel'],
  'attention_dropout': 0.0,
  'bos_token_id': 0,
  'dropout': 0.0,
  'eos_token_id': 2,
  'hidden_act': 'gelu',
  'hidden_size': 1024,
  'initializer_factor': 1.0,
  'initializer_range': 0.02,
  'intermediate_size': 4096,
  'layer_norm_eps': 1e-05,
  'max_position_embeddings': 77,
  'model_type': 'clip_text_model',
  'num_attention_heads': 16,
  'num_hidden_layers': 23,
  'pad_token_id': 1,
  'projection_dim': 512,
  'torch_dtype': 'float32',
  'transformers_version': '4.25.0.dev0',
  'vocab_size': 49408,
}


def test_sd21_unet_config_both_ways():
  ours = configs.unet_from_diffusers(SD21_UNET, 'unet/config.json')
  assert ours['attention_head_dim'] == (5, 10, 20, 20) and ours['num_attention_heads'] is None
  assert ours['use_linear_projection'] and ours['cross_attention_dim'] == 1024 and ours['sample_size'] == 96
  back = configs.unet_to_diffusers(ours)
  for key, value in SD21_UNET.items():
    if not key.startswith('_') and key != 'upcast_attention':
      assert back[key] == value, key
  assert back['num_attention_heads'] is None  # diffusers refuses num_attention_heads for this class.


def test_scheduler_translation():
  ours = configs.diffusion_from_scheduler(SD21_SCHEDULER, 'scheduler_config.json')
  assert ours == {
    'schedule': 'scaled_linear',
    'prediction_type': 'v',
    'num_train_timesteps': 1000,
    'beta_start': 0.00085,
    'beta_end': 0.012,
    'rescale_zero_terminal_snr': False,
  }
  back = configs.scheduler_from_diffusion(ours)
  assert (back['beta_schedule'], back['prediction_type']) == ('scaled_linear', 'v_prediction')
  cosine = configs.diffusion_from_scheduler(
    {'beta_schedule': 'squaredcos_cap_v2', 'prediction_type': 'sample', 'rescale_betas_zero_snr': True}, 's'
  )
  assert (cosine['schedule'], cosine['prediction_type'], cosine['rescale_zero_terminal_snr']) == ('cosine', 'x0', True)
  with pytest.raises(UserError, match=r's: trained_betas is not supported'):
    configs.diffusion_from_scheduler({'trained_betas': [0.1, 0.2]}, 's')
  with pytest.raises(UserError, match="prediction_type='flow' has no diffusers equivalent"):
    configs.scheduler_from_diffusion({**ours, 'prediction_type': 'flow'})


def test_text_config_both_ways():
  ours = configs.text_from_transformers(SD21_TEXT, 'text_encoder/config.json', has_projection=False)
  assert ours['eos_token_id'] == -1  # transformers' legacy 2: pool at argmax.
  assert (ours['hidden_act'], ours['num_hidden_layers'], ours['projection_dim']) == ('gelu', 23, None)
  back = configs.text_to_transformers(ours, {'bos': 0, 'pad': 1})
  assert (back.eos_token_id, back.hidden_size, back.architectures) == (2, 1024, ['CLIPTextModel'])
  with_projection = configs.text_from_transformers({**SD21_TEXT, 'eos_token_id': 49407}, 't', has_projection=True)
  assert (with_projection['eos_token_id'], with_projection['projection_dim']) == (49407, 512)
  assert configs.text_to_transformers(with_projection).architectures == ['CLIPTextModelWithProjection']
  with pytest.raises(UserError, match="t: hidden_act='swiglu' is not a supported activation"):
    configs.text_from_transformers({**SD21_TEXT, 'hidden_act': 'swiglu'}, 't', has_projection=False)
  assert not configs.eos_id_representable({**ours, 'eos_token_id': 2})


def test_vae_config_both_ways():
  sd_vae = {
    '_class_name': 'AutoencoderKL',
    'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'in_channels': 3,
    'latent_channels': 4,
    'layers_per_block': 2,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 512,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
  }
  ours = configs.vae_from_diffusers(sd_vae, 'vae/config.json')
  assert ours['scaling_factor'] == 0.18215  # diffusers' default when the file has none.
  back = configs.vae_to_diffusers(ours)
  assert all(back[k] == v for k, v in sd_vae.items() if k != 'sample_size')
