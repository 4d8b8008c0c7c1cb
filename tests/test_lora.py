"""diffusion.lora: merged kernels against the closed form W + s (alpha / r) (B A)^T and, for convolutions, against the
unmerged LoCon computation (conv down to r channels, 1x1 conv up); init, stacking, targets and their errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import cli
from diffusion import lora as lora_lib
from diffusion.errors import ConfigError, UserError

RNG = np.random.default_rng(0)


def _tree() -> dict:
  """A U-Net-like and CLIP-like parameter tree: attention projections, a feed-forward kernel and a conv."""
  dense = lambda i, o: {'kernel': RNG.standard_normal((i, o)).astype(np.float32)}
  attn = {'to_q': dense(8, 8), 'to_k': dense(6, 8), 'to_v': dense(6, 8), 'to_out_0': dense(8, 8) | {'bias': np.ones(8)}}
  block = {'attn1': attn, 'ff': {'net_2': dense(16, 8)}}
  return {
    'unet': {
      'down_blocks_0': {'attentions_0': {'transformer_blocks_0': block}},
      'conv_in': {'kernel': RNG.standard_normal((3, 3, 4, 8)).astype(np.float32), 'bias': np.zeros(8, np.float32)},
    },
    'text': {'encoder': {'layers_0': {'self_attn': {p: dense(6, 6) for p in lora_lib.TEXT_TARGETS}}}},
  }


def _module(shape: tuple[int, ...], rank: int, alpha: float) -> dict:
  return {
    'a': RNG.standard_normal((rank, *shape[:-1])).astype(np.float32),
    'b': RNG.standard_normal((shape[-1], rank)).astype(np.float32),
    'alpha': np.float32(alpha),
  }


Q = ('unet', 'down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn1', 'to_q')


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _nest(path: tuple[str, ...], value) -> dict:
  for key in reversed(path):
    value = {key: value}
  return value


def test_dense_merge_is_the_closed_form():
  params = _tree()
  module = _module((8, 8), rank=3, alpha=5.0)
  merged = lora_lib.merge(params, [_nest(Q, module)], [0.7])
  kernel = _get(params, Q)['kernel']
  expected = kernel + 0.7 * 5.0 / 3 * (module['b'] @ module['a']).T
  np.testing.assert_allclose(_get(merged, Q)['kernel'], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(_get(merged, Q[:-1] + ('to_k',))['kernel'], _get(params, Q[:-1] + ('to_k',))['kernel'])


def test_conv_merge_equals_the_unmerged_locon():
  """The merged 3x3 kernel computes conv(x, W) + s (alpha / r) conv1x1(conv(x, A), B)."""
  params = _tree()
  path = ('unet', 'conv_in')
  module = _module((3, 3, 4, 8), rank=2, alpha=3.0)
  merged = lora_lib.merge(params, [_nest(path, module)], [0.5])
  x = RNG.standard_normal((1, 6, 6, 4)).astype(np.float32)
  conv = lambda v, k: jax.lax.conv_general_dilated(v, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  down = np.asarray(module['a']).transpose(1, 2, 3, 0)  # (r, kh, kw, in) -> HWIO with r output channels.
  up = np.asarray(module['b']).T[None, None]  # (out, r) -> a 1x1 HWIO kernel.
  expected = conv(x, params['unet']['conv_in']['kernel']) + 0.5 * 3.0 / 2 * conv(conv(x, down), up)
  np.testing.assert_allclose(conv(x, merged['unet']['conv_in']['kernel']), expected, rtol=1e-5, atol=1e-5)


def test_init_targets_and_leaves_the_model_unchanged():
  params = _tree()
  patterns = lora_lib.DEFAULT_TARGETS + lora_lib.TEXT_TARGETS
  loras = lora_lib.init(jax.random.key(0), params, rank=2, alpha=4.0, patterns=patterns)
  modules = lora_lib.modules(loras)
  assert sorted('/'.join(p[-2:]) for p in modules) == [
    'attn1/to_k',
    'attn1/to_out_0',
    'attn1/to_q',
    'attn1/to_v',
    'self_attn/k_proj',
    'self_attn/out_proj',
    'self_attn/q_proj',
    'self_attn/v_proj',
  ]
  assert lora_lib.count_params(loras) == 2 * ((8 + 8) + (6 + 8) + (6 + 8) + (8 + 8) + 4 * (6 + 6))
  assert all(float(m['alpha']) == 4.0 and not np.any(m['b']) and np.any(m['a']) for m in modules.values())
  merged = lora_lib.merge(params, [loras], [1.0])
  jax.tree.map(np.testing.assert_array_equal, merged, jax.tree.map(jnp.asarray, params))


def test_conv_targets_and_their_shapes():
  loras = lora_lib.init(jax.random.key(1), _tree(), rank=3, patterns=(r'conv_\w+',))
  (module,) = lora_lib.modules(loras).values()
  assert module['a'].shape == (3, 3, 3, 4) and module['b'].shape == (8, 3) and float(module['alpha']) == 3.0


def test_stack_equals_merging_one_after_the_other():
  params = _tree()
  k = Q[:-1] + ('to_k',)
  first = _nest(Q, _module((8, 8), 2, 3.0))  # to_q only; the second LoRA adapts to_q (rank 3) and to_k.
  second = _nest(Q, _module((8, 8), 3, 1.0))
  _get(second, Q[:-1])['to_k'] = _module((6, 8), 1, 2.0)
  sequential = lora_lib.merge(params, [first, second], [0.7, -0.4])
  stacked = lora_lib.stack([first, second], [0.7, -0.4])
  modules = lora_lib.modules(stacked)
  assert modules[Q]['a'].shape == (5, 8) and modules[k]['a'].shape == (1, 6)
  at_once = lora_lib.merge(params, [stacked], [1.0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), at_once, sequential)


def test_errors_name_the_module():
  params = _tree()
  with pytest.raises(
    UserError, match=r'rank 7 is larger than the dimensions of text/encoder/layers_0/self_attn/q_proj'
  ):
    lora_lib.init(jax.random.key(0), params, rank=7, patterns=('q_proj',))
  with pytest.raises(UserError, match=r"targets \['to_z'\] name no Dense or Conv kernel"):
    lora_lib.init(jax.random.key(0), params, rank=2, patterns=('to_q', 'to_z'))
  other = _nest(Q, _module((16, 8), 2, 2.0))  # A LoRA trained on a base with 16 input channels.
  with pytest.raises(
    UserError, match=r'another base\?\): unet/down_blocks_0/.*/to_q \(kernel \(8, 8\), LoRA A \(2, 16\)'
  ):
    lora_lib.merge(params, [other], [1.0])
  nowhere = _nest(('unet', 'up_blocks_3', 'to_q'), _module((8, 8), 2, 2.0))
  with pytest.raises(UserError, match=r'match no kernel of the model: unet/up_blocks_3/to_q'):
    lora_lib.merge(params, [nowhere], [1.0])


def _config(**lora) -> ml_collections.ConfigDict:
  section = dict(rank=4, alpha=4.0, dropout=0.0, targets=lora_lib.DEFAULT_TARGETS, text_encoder=False) | lora
  return ml_collections.ConfigDict({'base_workdir': '/w', 'lora': section})


def test_validate_config():
  lora_lib.validate_config(ml_collections.ConfigDict({'base_workdir': '', 'lora': {'rank': 0}}))  # Off.
  config = _config()
  config.base_workdir = ''
  cases = [
    (config, 'base_workdir', 'needs the workdir of the frozen base'),
    (_config(rank=-1), 'lora.rank', 'integer >= 0'),
    (_config(alpha=0.0), 'lora.alpha', '> 0'),
    (_config(dropout=0.1), 'lora.dropout', 'not implemented'),
    (_config(targets=('to_q(',)), 'lora.targets', 'not a valid pattern'),
  ]
  lora_lib.validate_config(_config())  # A complete section on a base workdir: LoRA training.
  for bad, key, message in cases:
    with pytest.raises(ConfigError, match=message) as error:
      lora_lib.validate_config(bad)
    assert error.value.key == key
  assert lora_lib.config_targets(_config(text_encoder=True).lora)[-4:] == lora_lib.TEXT_TARGETS


def test_the_ldm_config_has_lora_off_and_checks_it():
  from configs import ldm_base
  from diffusion.config import validate_config

  config = ldm_base.get_config('tiny')
  assert config.lora.rank == 0 and tuple(config.lora.targets) == lora_lib.DEFAULT_TARGETS
  config.lora.rank = 4
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  assert error.value.key == 'base_workdir'


def test_adapter_and_scale(tmp_path):
  assert cli.adapter_and_scale('style.safetensors:0.7', 'lora') == ('style.safetensors', 0.7)
  assert cli.adapter_and_scale('style.safetensors', 'lora') == ('style.safetensors', 1.0)
  assert cli.adapter_and_scale('a:-1e-1', 'lora') == ('a', -0.1)
  assert cli.adapter_and_scale('gs://bucket/lora', 'lora') == ('gs://bucket/lora', 1.0)
  odd = tmp_path / 'odd:name'
  odd.write_text('')
  assert cli.adapter_and_scale(str(odd), 'lora') == (str(odd), 1.0)
  for bad in ('style.safetensors:strong', 'style.safetensors:', 'style.safetensors:nan'):
    with pytest.raises(UserError, match=r'--lora .*: the scale .* is not a number'):
      cli.adapter_and_scale(bad, 'lora')
