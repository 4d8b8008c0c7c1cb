"""Parity of the networks with diffusers' / transformers' PyTorch models on shared random weights.

The PyTorch state dict is renamed mechanically (`a.0.b.weight` -> a_0/b/kernel, with the usual layout
changes); the renamed tree must equal our parameter tree exactly, and the outputs must agree.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import models

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

ATOL = 2e-5  # float32 outputs of magnitude ~1; observed max differences are 2e-7 to 2.5e-6.


def _flax_path(name: str) -> list[str]:
  """'down_blocks.0.resnets.1.conv1' -> ['down_blocks_0', 'resnets_1', 'conv1']."""
  path = []
  for part in name.split('.') if name else []:
    if part.isdigit():
      path[-1] += f'_{part}'
    else:
      path.append(part)
  return path


def torch_to_flax(module: 'torch.nn.Module', strip_prefix: str = '') -> dict:
  """A PyTorch module's parameters as our Flax parameter tree (names + layouts)."""
  flat = {}
  for name, mod in module.named_modules():
    for pname, param in mod.named_parameters(recurse=False):
      value = param.detach().cpu().numpy()
      leaf = pname
      if pname == 'weight':
        if isinstance(mod, torch.nn.Conv2d):
          leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
        elif isinstance(mod, torch.nn.Linear):
          leaf, value = 'kernel', value.T
        elif isinstance(mod, torch.nn.Embedding):
          leaf = 'embedding'
        else:
          assert isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)), type(mod)
          leaf = 'scale'
      name = name[len(strip_prefix) :] if name.startswith(strip_prefix) else name
      flat[tuple(_flax_path(name)) + (leaf,)] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def _perturb_vectors(model: 'torch.nn.Module', seed: int = 0) -> None:
  """Moves norm scales / biases off their 1 / 0 init so that a swapped mapping would show."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _assert_same_tree(ours: dict, converted: dict) -> None:
  shapes = lambda t: {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(t).items()}
  a, b = shapes(ours), shapes(converted)
  assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
  assert a == b, [k for k in a if a[k] != b[k]][:5]


def _nchw(x) -> 'torch.Tensor':
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _nhwc(x: 'torch.Tensor') -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def test_vae_matches_diffusers():
  torch.manual_seed(0)
  channels = (8, 16, 16)
  ref = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=('DownEncoderBlock2D',) * 3,
    up_block_types=('UpDecoderBlock2D',) * 3,
    block_out_channels=channels,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    act_fn='silu',
  ).eval()
  _perturb_vectors(ref)
  ours = models.AutoencoderKL(block_out_channels=channels, layers_per_block=1, norm_num_groups=4)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = torch_to_flax(ref)
  _assert_same_tree(jax.eval_shape(lambda: ours.init(jax.random.key(0), x, sample_posterior=False))['params'], params)
  with torch.no_grad():
    posterior = ref.encode(_nchw(x)).latent_dist
    rec = ref.decode(posterior.mean).sample
  mean, logvar = ours.apply({'params': params}, x, method='encode')
  np.testing.assert_allclose(mean, _nhwc(posterior.mean), atol=ATOL)
  np.testing.assert_allclose(logvar, _nhwc(posterior.logvar), atol=ATOL)
  ours_rec = ours.apply({'params': params}, mean, method='decode')
  np.testing.assert_allclose(ours_rec, _nhwc(rec), atol=ATOL)
  assert np.std(ours_rec) > 1e-2


UNET_CASES = {
  'sd1': dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_head_dim=2,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    transformer_layers_per_block=1,
    use_linear_projection=False,
    freq_shift=0,
  ),
  'sd2_like': dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    attention_head_dim=(1, 2, 4),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True,
    freq_shift=1,
  ),
}


@pytest.mark.parametrize('case', sorted(UNET_CASES))
def test_unet_matches_diffusers(case):
  torch.manual_seed(0)
  kw = dict(
    UNET_CASES[case],
    in_channels=4,
    out_channels=4,
    cross_attention_dim=12,
    norm_num_groups=8,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    act_fn='silu',
    mid_block_type='UNetMidBlock2DCrossAttn',
  )
  ref = diffusers.UNet2DConditionModel(sample_size=8, **kw).eval()
  _perturb_vectors(ref)
  ours = models.UNet2DConditionModel(**kw)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([3.0, 917.0], np.float32)
  ctx = rng.normal(size=(2, 5, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = torch_to_flax(ref)
  _assert_same_tree(jax.eval_shape(lambda: ours.init(jax.random.key(0), x, t, ctx))['params'], params)
  with torch.no_grad():
    expected = ref(
      _nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), encoder_attention_mask=torch.from_numpy(mask)
    ).sample
  out = jax.jit(lambda p: ours.apply({'params': p}, x, t, ctx, mask))(params)
  np.testing.assert_allclose(out, _nhwc(expected), atol=ATOL)
  assert np.std(out) > 1e-2


@pytest.mark.parametrize('projection_dim', [None, 6])
def test_text_encoder_matches_transformers(projection_dim):
  torch.manual_seed(0)
  kw = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=8,
    hidden_act='quick_gelu',
    layer_norm_eps=1e-5,
    eos_token_id=3,
  )
  config = transformers.CLIPTextConfig(**kw, projection_dim=projection_dim or 8, bos_token_id=0, pad_token_id=1)
  cls = transformers.CLIPTextModel if projection_dim is None else transformers.CLIPTextModelWithProjection
  ref = cls(config).eval()
  _perturb_vectors(ref)
  ours = models.CLIPTextTransformer(**kw, projection_dim=projection_dim)
  ids = np.array([[1, 7, 9, 11, 3, 0, 0, 0], [1, 5, 6, 8, 12, 13, 3, 40]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8], np.int32)
  params = torch_to_flax(ref, strip_prefix='text_model.')
  _assert_same_tree(jax.eval_shape(lambda: ours.init(jax.random.key(0), ids))['params'], params)
  with torch.no_grad():
    out = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
    # transformers 5's CLIPTextModel is the text transformer itself; WithProjection nests `text_model`.
    final_layer_norm = getattr(ref, 'text_model', ref).final_layer_norm
    penultimate = final_layer_norm(out.hidden_states[-2]).numpy()
  pooled_ref = out.pooler_output if projection_dim is None else out.text_embeds
  last, pooled = ours.apply({'params': params}, ids, mask)
  np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=ATOL)
  np.testing.assert_allclose(pooled, pooled_ref.numpy(), atol=ATOL)
  skip, _ = ours.apply({'params': params}, ids, mask, output_hidden_state_index=-2)
  np.testing.assert_allclose(skip, penultimate, atol=ATOL)


def test_timestep_embedding_matches_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding as ref_embedding

  from diffusion.models.layers import get_timestep_embedding

  t = np.array([0.0, 1.5, 250.0, 999.0], np.float32)
  for flip, shift, dim in ((True, 0, 32), (False, 1, 33)):
    ref = ref_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ours = get_timestep_embedding(jnp.asarray(t), dim, flip, shift)
    # float32 sin/cos of arguments up to ~1000 rad differ by ~1 ulp of the argument (6e-5) across libraries.
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4)
