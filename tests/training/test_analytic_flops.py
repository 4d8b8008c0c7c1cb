"""Analytic U-Net FLOPs: closed forms for one conv / linear, a mechanical count over the traced U-Net, XLA's cost
analysis (which counts only in-bounds conv taps and every elementwise op too), and SD 1.5 at 512 px."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import throughput
from diffusion.models.unet import UNet2DConditionModel

TINY = dict(
  block_out_channels=(64, 128),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  attention_head_dim=4,
  cross_attention_dim=48,
  norm_num_groups=16,
)
SD15 = dict(
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
  up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  attention_head_dim=8,
  cross_attention_dim=768,
)


def _xla_flops(fn, *args) -> float:
  """XLA's cost analysis of the lowered (unoptimized) module: it sees every op, no backend rewrites."""
  return float(jax.jit(fn).lower(*args).cost_analysis()['flops'])


def _matmul_flops(jaxpr) -> float:
  """An independent count: 2 x output size x contraction size of every dot_general and conv in a jaxpr."""
  total = 0.0
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():  # Nested jaxprs: pjit, remat, custom_vjp bodies.
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += _matmul_flops(getattr(sub, 'jaxpr', sub))
    out = np.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      total += 2.0 * out * np.prod([eqn.invars[0].aval.shape[i] for i in contract])
    elif eqn.primitive.name == 'conv_general_dilated':
      total += 2.0 * out * np.prod(eqn.invars[1].aval.shape[:-1])  # HWIO kernel: taps x input channels.
  return total


def _unet_inputs(arch, side, length, batch):
  unet = UNet2DConditionModel(**arch)
  x = jnp.zeros((batch, side, side, 4))
  t = jnp.zeros((batch,), jnp.int32)
  c = jnp.zeros((batch, length, arch['cross_attention_dim']))
  params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x[:1], t[:1], c[:1]))
  return unet, params, x, t, c


@pytest.mark.parametrize('stride, hw', [(1, (9, 7)), (2, (8, 6)), (1, (1, 1))])
def test_one_conv_closed_form_and_xla(stride, hw):
  c_in, c_out, k = 5, 3, 3
  conv = nn.Conv(c_out, (k, k), strides=(stride, stride), padding=((1, 1), (1, 1)))
  x = jnp.zeros((1, *hw, c_in))
  params = conv.init(jax.random.PRNGKey(0), x)
  out_h, out_w = conv.apply(params, x).shape[1:3]
  assert throughput.conv_flops(k, c_in, c_out, *hw, stride=stride) == 2 * out_h * out_w * k * k * c_in * c_out
  valid = throughput.conv_flops(k, c_in, c_out, *hw, stride=stride, valid_taps=True)
  xla = _xla_flops(
    lambda p, x: jax.lax.conv_general_dilated(
      x, p['params']['kernel'], (stride, stride), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    ),
    params,
    x,
  )
  assert xla == valid
  if hw == (1, 1):
    assert valid == 2 * c_in * c_out  # Only the centre tap is inside a 1x1 input.


def test_one_linear_closed_form_and_xla():
  w, x = jnp.zeros((24, 10)), jnp.zeros((7, 24))
  assert throughput.linear_flops(24, 10, tokens=7) == 2 * 7 * 24 * 10 == _xla_flops(lambda w, x: x @ w, w, x)


def test_tiny_unet_count_equals_a_count_over_its_traced_ops():
  unet, params, x, t, c = _unet_inputs(TINY, 16, 8, 2)
  jaxpr = jax.make_jaxpr(lambda p, x, t, c: unet.apply(p, x, t, c))(params, x, t, c)
  assert throughput.unet_forward_flops(TINY, 16, 16, 8, batch=2) == _matmul_flops(jaxpr.jaxpr)
  parts = throughput.unet_flops_breakdown(TINY, 16, 16, 8, batch=2)
  assert {level for level, _ in parts} == {'io', 'down_0', 'down_1', 'mid', 'up_0', 'up_1'}
  assert {kind for _, kind in parts} == {'conv', 'linear', 'attention'}
  assert ('down_1', 'attention') not in parts and ('up_1', 'attention') in parts  # DownBlock2D has none.


def test_tiny_unet_against_xla_forward_and_train_step():
  unet, params, x, t, c = _unet_inputs(TINY, 16, 8, 2)
  valid = throughput.unet_forward_flops(TINY, 16, 16, 8, batch=2, valid_taps=True)
  forward = _xla_flops(lambda p, x, t, c: unet.apply(p, x, t, c), params, x, t, c)
  assert 1.0 <= forward / valid < 1.05  # XLA adds the elementwise ops (norms, activations, softmax).
  grad = _xla_flops(jax.grad(lambda p, x, t, c: jnp.sum(unet.apply(p, x, t, c) ** 2)), params, x, t, c)
  step = throughput.unet_train_step_flops(TINY, 16, 16, 8, batch=2) / throughput.unet_forward_flops(TINY, 16, 16, 8, 2)
  assert step == 3.0
  assert 0.97 <= grad / (3 * valid) < 1.1  # Backward = 2x forward; no input gradient for conv_in; elementwise.


def test_sd15_at_512px():
  forward = throughput.unet_forward_flops(SD15, 64, 64, 77)
  assert forward == pytest.approx(0.8033e12, rel=1e-4)
  attention = sum(
    v for (_, kind), v in throughput.unet_flops_breakdown(SD15, 64, 64, 77).items() if kind == 'attention'
  )
  assert forward - attention == pytest.approx(0.677e12, rel=1e-3)  # The oft-quoted ~0.68 TFLOP leaves these out.
  unet, params, x, t, c = _unet_inputs(SD15, 64, 77, 1)
  xla = _xla_flops(lambda p, x, t, c: unet.apply(p, x, t, c), params, x, t, c)
  assert 1.0 <= xla / throughput.unet_forward_flops(SD15, 64, 64, 77, valid_taps=True) < 1.015


def test_config_train_step_flops():
  unet = ml_collections.ConfigDict(dict(TINY, sample_size=16, in_channels=4, out_channels=4, num_attention_heads=None))
  config = ml_collections.ConfigDict({'model_type': 'ldm', 'model': {'unet': unet}})
  batch = {'image': np.zeros((6, 128, 128, 3)), 'input_ids': np.zeros((6, 8), np.int32)}
  assert throughput.config_train_step_flops(config, batch) == 3 * throughput.unet_forward_flops(TINY, 16, 16, 8, 6)
  cached = {'latent_mean': np.zeros((6, 16, 16, 4)), 'text_embedding': np.zeros((6, 8, 48))}  # A text cache's.
  assert throughput.config_train_step_flops(config, cached) == 3 * throughput.unet_forward_flops(TINY, 16, 16, 8, 6)
  config.model_type = 'vae'
  assert throughput.config_train_step_flops(config, batch) is None
