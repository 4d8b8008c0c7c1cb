"""diffusion.lora: merged kernels against the closed form W + s (alpha / r) (B A)^T and, for convolutions, against the
unmerged LoCon computation (conv down to r channels, 1x1 conv up); init, stacking, targets and their errors; the
unmerged LoRA with dropout (`lora.unmerged`) against the merged model at rate 0 and a hand computation at rate p."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import cli, models
from diffusion import lora as lora_lib
from diffusion.errors import ConfigError, UserError
from support import ONE_LEVEL_UNET, random_params

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
    (_config(dropout=1.0), 'lora.dropout', r'in \[0, 1\)'),
    (_config(targets=('to_q(',)), 'lora.targets', 'not a valid pattern'),
  ]
  lora_lib.validate_config(_config())  # A complete section on a base workdir: LoRA training.
  lora_lib.validate_config(_config(dropout=0.1))
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


TEXT = dict(
  type='transformer',
  vocab_size=50,
  hidden_size=12,
  intermediate_size=24,
  num_hidden_layers=1,
  num_attention_heads=2,
  max_position_embeddings=8,
  hidden_act='quick_gelu',
  layer_norm_eps=1e-5,
  eos_token_id=2,
  projection_dim=None,
  dtype='float32',
)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='fc2')(nn.relu(nn.Dense(8, name='fc1')(x)))


def _mlp(rank: int = 2) -> tuple[dict, dict]:
  """A 2-layer MLP's params and a LoRA of both layers with B off zero (a LoRA that has trained)."""
  params = _MLP().init(jax.random.key(0), jnp.zeros((1, 5)))['params']
  loras = lora_lib.init(jax.random.key(1), params, rank=rank, alpha=3.0, patterns=('fc1', 'fc2'))
  for name, module in loras.items():
    module['b'] = jnp.asarray(RNG.standard_normal(module['b'].shape), jnp.float32)
  return params, lora_lib.factors(loras)


@functools.partial(jax.jit, static_argnums=4)
def _unmerged_mlp(params, factors, x, keys, rate):
  with lora_lib.unmerged(factors, multiplier=1.5, rate=rate, keys=keys):
    return _MLP().apply({'params': params}, x)


def test_unmerged_mlp_is_the_merged_one_at_rate_0_and_the_hand_computation_with_dropout():
  params, factors = _mlp()
  x = jnp.asarray(RNG.standard_normal((4, 5)), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(4))
  merged = _MLP().apply({'params': lora_lib.apply(params, factors, multiplier=1.5)}, x)
  np.testing.assert_allclose(_unmerged_mlp(params, factors, x, keys, 0.0), merged, rtol=1e-5, atol=1e-6)
  rate = 0.4
  h = np.asarray(x)
  for j, name in enumerate(('fc1', 'fc2')):  # Sorted paths: fc1 is module 0, fc2 module 1.
    mask_keys = [jax.random.fold_in(jax.random.fold_in(k, lora_lib.DROPOUT_STREAM), j) for k in keys]
    keep = np.stack([np.asarray(jax.random.bernoulli(k, 1 - rate, h.shape[1:])) for k in mask_keys])
    assert 0 < keep.mean() < 1
    dropped = np.where(keep, h / np.float32(1 - rate), 0)
    a, b = (np.asarray(factors[name][k]) for k in 'ab')
    h = h @ np.asarray(params[name]['kernel']) + np.asarray(params[name]['bias']) + 1.5 * (dropped @ a.T) @ b.T
    h = np.maximum(h, 0) if name == 'fc1' else h
  out = _unmerged_mlp(params, factors, x, keys, rate)
  np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, merged, atol=1e-3)


def test_dropout_masks_are_per_example_whatever_the_batch():
  params, factors = _mlp()
  x = jnp.broadcast_to(jnp.asarray(RNG.standard_normal(5), jnp.float32), (4, 5))  # One input, four examples.
  keys = jax.random.split(jax.random.key(3), 4)
  out = np.asarray(_unmerged_mlp(params, factors, x, keys, 0.5))
  assert all(not np.allclose(out[i], out[j]) for i in range(4) for j in range(i))  # Each example its own masks.
  order = jnp.asarray([2, 0, 3, 1])
  np.testing.assert_allclose(
    _unmerged_mlp(params, factors, x[order], keys[order], 0.5), out[order], rtol=1e-5, atol=1e-6
  )
  alone = _unmerged_mlp(params, factors, x[1:2], keys[1:2], 0.5)  # Rounding may differ with the batch size.
  np.testing.assert_allclose(alone, out[1:2], rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_factor_through_the_unmerged_lora():
  params, factors = _mlp()
  x = jnp.asarray(RNG.standard_normal((4, 5)), jnp.float32)
  keys = jax.random.split(jax.random.key(4), 4)
  loss = lambda f, rate: jnp.sum(_unmerged_mlp(params, f, x, keys, rate) ** 2)
  grads = jax.grad(loss)(factors, 0.3)
  assert jax.tree.structure(grads) == jax.tree.structure(factors)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  merged = jax.grad(lambda f: jnp.sum(_MLP().apply({'params': lora_lib.apply(params, f, multiplier=1.5)}, x) ** 2))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), jax.grad(loss)(factors, 0.0), merged(factors)
  )


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name='conv')(x))


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.remat(_Block)(name='block')(x)
    return nn.Dense(3, name='head')(h.reshape(h.shape[0], -1))


def test_unmerged_parts_remat_and_locon_convs():
  """Two networks as parts (the LoRA task's 'unet' / 'text'), a conv inside a remat block: unmerged = merged at rate
  0; at rate p every part's output moves."""
  image, vector = _ConvNet(), _MLP()
  x, y = jnp.asarray(RNG.standard_normal((2, 6, 6, 3)), jnp.float32), jnp.asarray(RNG.standard_normal((2, 5)))
  params = {
    'image': image.init(jax.random.key(0), x)['params'],
    'vector': vector.init(jax.random.key(1), y)['params'],
  }
  loras = lora_lib.init(jax.random.key(2), params, rank=2, alpha=2.0, patterns=('conv', 'head', 'fc1'))
  loras = jax.tree_util.tree_map_with_path(
    lambda p, v: jnp.asarray(RNG.standard_normal(v.shape), jnp.float32) if p[-1].key == 'b' else v, loras
  )
  assert lora_lib.modules(loras)[('image', 'block', 'conv')]['a'].shape == (2, 3, 3, 3)
  forward = lambda p: (image.apply({'params': p['image']}, x), vector.apply({'params': p['vector']}, y))
  parts = {'image': image, 'vector': vector}

  @functools.partial(jax.jit, static_argnums=2)
  def unmerged(p, f, rate):  # The multiplier is each module's alpha / r.
    with lora_lib.unmerged(f, rate=rate, keys=jax.random.split(jax.random.key(3), 2), parts=parts):
      return forward(p)

  want = jax.jit(forward)(lora_lib.apply(params, loras))
  got = unmerged(params, loras, 0.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  dropped = unmerged(params, loras, 0.5)
  assert all(not np.allclose(a, b, atol=1e-3) for a, b in zip(dropped, want))


@pytest.mark.slow
def test_unmerged_unet_and_text_at_rate_0_are_the_merged_ones():
  """The LoRA task's networks (parts keyed 'unet' / 'text', remat blocks, LoCon convs): unmerged = merged."""
  unet = models.create_unet(ml_collections.ConfigDict({**ONE_LEVEL_UNET, 'dtype': 'float32', 'remat': True}))
  text = models.create_text_encoder(ml_collections.ConfigDict(TEXT))
  x, t = jnp.asarray(RNG.standard_normal((2, 8, 8, 4)), jnp.float32), jnp.asarray([10, 700])
  ids = jnp.asarray([[1, 5, 7, 2, 0, 0], [1, 9, 9, 9, 9, 2]])
  params = {
    'unet': random_params(unet, x, t, jnp.zeros((2, 6, 12))),
    'text': random_params(text, ids),
  }
  patterns = lora_lib.DEFAULT_TARGETS + lora_lib.TEXT_TARGETS + (r'resnets_\d+/conv[12]',)
  loras = lora_lib.init(jax.random.key(0), params, rank=2, alpha=2.0, patterns=patterns)
  loras = jax.tree_util.tree_map_with_path(
    lambda p, v: jnp.asarray(RNG.standard_normal(v.shape), jnp.float32) if p[-1].key == 'b' else v, loras
  )
  assert any(len(m['a'].shape) == 4 for m in lora_lib.modules(loras).values())

  def forward(p):
    context = text.apply({'params': p['text']}, ids)[0]
    return unet.apply({'params': p['unet']}, x, t, context)

  def unmerged(p, f):
    with lora_lib.unmerged(f, multiplier=1.0, parts={'unet': unet, 'text': text}):
      return forward(p)

  want = jax.jit(forward)(lora_lib.apply(params, loras, multiplier=1.0))
  np.testing.assert_allclose(jax.jit(unmerged)(params, lora_lib.factors(loras)), want, rtol=1e-4, atol=1e-4)


def test_unmerged_errors():
  params, factors = _mlp()
  x = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match='needs the per-example keys'):
    _unmerged_mlp(params, factors, x, None, 0.1)
  with pytest.raises(ValueError, match='input batch 2 but 3 example keys'):
    _unmerged_mlp(params, factors, x, jax.random.split(jax.random.key(0), 3), 0.1)
  with pytest.raises(ValueError, match='no Dense or Conv call reached: fc3'):
    _unmerged_mlp(params, {**factors, 'fc3': factors['fc2']}, x, None, 0.0)
