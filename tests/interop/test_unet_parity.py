"""load_unet / save_unet against diffusers' UNet2DConditionModel on random weights saved with save_pretrained:
outputs agree to 1e-4 and diffusers -> ours -> diffusers gives back the identical tensors."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from diffusion import interop

ATOL = 1e-4

UNET_CASES = {
  # SD 1.x: conv projections in the transformers, one head count for every level.
  'sd1': dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_head_dim=2,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=12,
    norm_num_groups=8,
  ),
  # SD 2.x: linear projections, per-level heads, deeper transformers on one level, freq_shift 1, upcasting.
  'sd2': dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    attention_head_dim=(1, 2, 4),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True,
    freq_shift=1,
    upcast_attention=True,
    cross_attention_dim=12,
    norm_num_groups=8,
  ),
  # Uneven: plain and cross-attention levels mixed differently on the way down and up, per-level resnet counts,
  # no mid block, 9 -> 8 channels, GroupNorm with 4 groups (diffusers-Flax could not express 4 groups).
  'uneven': dict(
    in_channels=9,
    out_channels=8,
    block_out_channels=(8, 16, 24),
    layers_per_block=(1, 2, 1),
    attention_head_dim=(2, 4, 2),
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D', 'CrossAttnUpBlock2D'),
    mid_block_type=None,
    cross_attention_dim=6,
    norm_num_groups=4,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    act_fn='silu',
  ),
}


def _listed(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def _inputs(kw, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 8, 8, kw.get('in_channels', 4))).astype(np.float32)
  t = np.array([3.0, 917.0], np.float32)
  ctx = rng.normal(size=(2, 5, kw['cross_attention_dim'])).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  return x, t, ctx, mask


@pytest.mark.parametrize('case', sorted(UNET_CASES))
def test_load_unet_matches_diffusers_and_round_trips(case, ref, tmp_path):
  kw = UNET_CASES[case]
  ref.torch.manual_seed(0)
  model = ref.perturb(ref.diffusers.UNet2DConditionModel(sample_size=8, **kw))
  model.save_pretrained(tmp_path / 'in')
  unet, params = interop.load_unet(str(tmp_path / 'in'))

  x, t, ctx, mask = _inputs(kw)
  with ref.torch.no_grad():
    expected = ref.nhwc(
      model(
        ref.nchw(x),
        ref.torch.from_numpy(t),
        ref.torch.from_numpy(ctx),
        encoder_attention_mask=ref.torch.from_numpy(mask),
      ).sample
    )
  out = jax.jit(lambda p: unet.apply({'params': p}, x, t, ctx, mask))(params)
  assert out.shape == (2, 8, 8, kw.get('out_channels', 4))
  np.testing.assert_allclose(out, expected, atol=ATOL)
  assert np.std(expected) > 1e-2

  interop.save_unet(str(tmp_path / 'out'), interop.load_unet_config(str(tmp_path / 'in')), params)
  original = load_file(tmp_path / 'in' / 'diffusion_pytorch_model.safetensors')
  exported = load_file(tmp_path / 'out' / 'diffusion_pytorch_model.safetensors')
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  reloaded, info = ref.diffusers.UNet2DConditionModel.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not any(info.values()), info
  for key in (
    'block_out_channels',
    'down_block_types',
    'up_block_types',
    'mid_block_type',
    'layers_per_block',
    'transformer_layers_per_block',
    'use_linear_projection',
    'in_channels',
    'out_channels',
    'freq_shift',
    'flip_sin_to_cos',
    'norm_num_groups',
    'norm_eps',
    'cross_attention_dim',
  ):
    assert _listed(reloaded.config[key]) == _listed(model.config[key]), key
  assert _listed(reloaded.config.attention_head_dim) == _listed(model.config.attention_head_dim)


def test_load_unet_in_bfloat16(ref, tmp_path):
  ref.torch.manual_seed(0)
  ref.diffusers.UNet2DConditionModel(sample_size=8, **UNET_CASES['sd1']).save_pretrained(tmp_path)
  unet, params = interop.load_unet(str(tmp_path), dtype='bfloat16', param_dtype='bfloat16')
  _, full = interop.load_unet(str(tmp_path))
  assert str(unet.dtype) == 'bfloat16'
  assert {str(p.dtype) for p in jax.tree.leaves(params)} == {'bfloat16'}
  kernel = np.asarray(params['conv_in']['kernel'], np.float32)
  np.testing.assert_allclose(kernel, full['conv_in']['kernel'], rtol=1e-2, atol=1e-6)
  assert not np.array_equal(kernel, full['conv_in']['kernel'])  # Really rounded to bfloat16.
