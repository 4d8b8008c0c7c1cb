"""load_vae / load_text_encoder (and their savers) against diffusers' AutoencoderKL and transformers' CLIP text
models on random weights saved with save_pretrained: outputs agree to 1e-4, round trips give identical tensors."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffusion import interop

ATOL = 1e-4

VAE_CASES = {
  'sd_like': dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, scaling_factor=0.18215
  ),
  'deep_no_mid_attention': dict(
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=2,
    latent_channels=3,
    norm_num_groups=8,
    mid_block_add_attention=False,
    scaling_factor=0.5,
  ),
}


def _vae_outputs(vae, params, x):
  mean, logvar = jax.jit(lambda p: vae.apply({'params': p}, x, method='encode'))(params)
  image = jax.jit(lambda p: vae.apply({'params': p}, mean, method='decode'))(params)
  return mean, logvar, image


@pytest.mark.parametrize('case', sorted(VAE_CASES))
def test_load_vae_matches_diffusers_and_round_trips(case, ref, tmp_path):
  kw = VAE_CASES[case]
  levels = len(kw['block_out_channels'])
  ref.torch.manual_seed(0)
  model = ref.perturb(
    ref.diffusers.AutoencoderKL(
      down_block_types=('DownEncoderBlock2D',) * levels, up_block_types=('UpDecoderBlock2D',) * levels, **kw
    )
  )
  model.save_pretrained(tmp_path / 'in')
  vae, params = interop.load_vae(str(tmp_path / 'in'))
  assert interop.load_vae_config(str(tmp_path / 'in')).scaling_factor == kw['scaling_factor']

  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with ref.torch.no_grad():
    posterior = model.encode(ref.nchw(x)).latent_dist
    decoded = model.decode(posterior.mean).sample
  mean, logvar, image = _vae_outputs(vae, params, x)
  np.testing.assert_allclose(mean, ref.nhwc(posterior.mean), atol=ATOL)
  np.testing.assert_allclose(logvar, ref.nhwc(posterior.logvar), atol=ATOL)
  np.testing.assert_allclose(image, ref.nhwc(decoded), atol=ATOL)
  assert np.std(image) > 1e-2

  interop.save_vae(str(tmp_path / 'out'), interop.load_vae_config(str(tmp_path / 'in')), params)
  original = load_file(tmp_path / 'in' / 'diffusion_pytorch_model.safetensors')
  exported = load_file(tmp_path / 'out' / 'diffusion_pytorch_model.safetensors')
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  reloaded, info = ref.diffusers.AutoencoderKL.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not any(info.values()), info
  assert reloaded.config.scaling_factor == kw['scaling_factor']
  assert list(reloaded.config.block_out_channels) == list(kw['block_out_channels'])


def test_legacy_vae_attention_names_load(ref, tmp_path):
  """SD VAE files from before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
  ref.torch.manual_seed(0)
  model = ref.perturb(
    ref.diffusers.AutoencoderKL(
      **dict(
        VAE_CASES['sd_like'], down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3
      )
    )
  )
  model.save_pretrained(tmp_path)
  path = tmp_path / 'diffusion_pytorch_model.safetensors'
  state = load_file(path)
  renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  legacy = {}
  for name, value in state.items():
    for new, old in renames.items():
      if f'attentions.0.{new}.' in name:
        name = name.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
        value = value[:, :, None, None] if value.ndim == 2 else value  # As 1x1 convs, like the LDM originals.
    legacy[name] = value
  assert sum('proj_attn' in k for k in legacy) == 4
  _, params = interop.load_vae(str(tmp_path))
  save_file(legacy, path)
  _, legacy_params = interop.load_vae(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, legacy_params, params)


TEXT_CASES = {
  # SD 1.x's CLIP ViT-L text tower, in small: quick-GELU, legacy eos_token_id 2 (pool at argmax).
  'clip_legacy_eos': dict(cls='CLIPTextModel', hidden_act='quick_gelu', eos_token_id=2, layer_norm_eps=1e-5),
  # OpenCLIP-style with projection: exact GELU, a real eos id, another LayerNorm eps.
  'openclip_projection': dict(
    cls='CLIPTextModelWithProjection', hidden_act='gelu', eos_token_id=3, layer_norm_eps=1e-6, projection_dim=6
  ),
}


def _text_reference(ref, model, ids, mask):
  with ref.torch.no_grad():
    out = model(
      ref.torch.from_numpy(ids).long(), attention_mask=ref.torch.from_numpy(mask).long(), output_hidden_states=True
    )
    final_layer_norm = getattr(model, 'text_model', model).final_layer_norm
    penultimate = final_layer_norm(out.hidden_states[-2]).numpy()
  pooled = out.text_embeds if hasattr(out, 'text_embeds') else out.pooler_output
  return out.last_hidden_state.numpy(), penultimate, pooled.numpy()


@pytest.mark.parametrize('case', sorted(TEXT_CASES))
def test_load_text_encoder_matches_transformers_and_round_trips(case, ref, tmp_path):
  kw = dict(TEXT_CASES[case])
  cls = getattr(ref.transformers, kw.pop('cls'))
  ref.torch.manual_seed(0)
  config = ref.transformers.CLIPTextConfig(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=8,
    bos_token_id=0,
    pad_token_id=1,
    **kw,
  )
  model = ref.perturb(cls(config))
  model.save_pretrained(tmp_path / 'in')
  text, params = interop.load_text_encoder(str(tmp_path / 'in'))
  assert text.projection_dim == kw.get('projection_dim')

  # Row 0: eos (3) inside padding; row 1: the largest id last, eos in the middle (argmax and first-eos differ).
  ids = np.array([[0, 7, 9, 11, 3, 1, 1, 1], [0, 5, 3, 8, 12, 13, 6, 40]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8], np.int32)
  last_ref, penultimate_ref, pooled_ref = _text_reference(ref, model, ids, mask)
  apply = jax.jit(
    lambda p, index: text.apply({'params': p}, ids, mask, output_hidden_state_index=index), static_argnums=1
  )
  last, pooled = apply(params, None)
  np.testing.assert_allclose(last, last_ref, atol=ATOL)
  np.testing.assert_allclose(pooled, pooled_ref, atol=ATOL)
  penultimate, _ = apply(params, -2)
  np.testing.assert_allclose(penultimate, penultimate_ref, atol=ATOL)

  interop.save_text_encoder(
    str(tmp_path / 'out'),
    interop.load_text_encoder_config(str(tmp_path / 'in')),
    params,
    special_ids={'bos': 0, 'pad': 1},
  )
  original = load_file(tmp_path / 'in' / 'model.safetensors')
  exported = load_file(tmp_path / 'out' / 'model.safetensors')
  # Written with the `text_model.` prefix of transformers 4 files, which transformers 5 reads too.
  prefixed = lambda name: name if name.startswith(('text_model.', 'text_projection.')) else f'text_model.{name}'
  assert sorted(exported) == sorted(prefixed(name) for name in original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[prefixed(name)], value, err_msg=name)
  reloaded, info = cls.from_pretrained(tmp_path / 'out', output_loading_info=True)
  assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  for got, want in zip(_text_reference(ref, reloaded, ids, mask), (last_ref, penultimate_ref, pooled_ref)):
    np.testing.assert_array_equal(got, want)


def test_text_tower_of_a_full_clip_model(ref, tmp_path):
  """A CLIPModel directory (as used for CLIP scores): the text tower and projection load, the vision tower is
  left out on purpose."""
  ref.torch.manual_seed(0)
  config = ref.transformers.CLIPConfig(
    text_config=dict(
      vocab_size=50,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=8,
      eos_token_id=2,
    ),
    vision_config=dict(
      hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    ),
    projection_dim=6,
  )
  model = ref.perturb(ref.transformers.CLIPModel(config))
  model.save_pretrained(tmp_path)
  text, params = interop.load_text_encoder(str(tmp_path))
  ids = np.array([[0, 7, 9, 49 % 50, 1, 1, 1, 1]], np.int32)
  with ref.torch.no_grad():
    features = model.get_text_features(input_ids=ref.torch.from_numpy(ids).long())
  features = getattr(features, 'pooler_output', features)
  np.testing.assert_allclose(text.apply({'params': params}, ids)[1], features.numpy(), atol=ATOL)
