"""Tests of diffusion/models/attention.py: the implementations agree with a NumPy closed form and jax's reference,
the splash path (Pallas, interpret mode on CPU) agrees with xla, 'auto' picks per backend, and a kernel the backend
lacks is a config error before compile."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ldm_base, vae_base
from diffusion.config import validate_config
from diffusion.errors import ConfigError
from diffusion.models import attention
from support import run_cli


def _qkv(b=2, lq=5, lk=7, h=3, d=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, n, h, d), np.float32)) for n in (lq, lk, lk))


def _closed_form(q, k, v, mask=None, bias=None, scale=None):
  """softmax(q k^T / sqrt(d) + bias) v in float64; a row without any key to attend takes the mean of the values."""
  q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if mask is not None:
    mask = np.broadcast_to(np.asarray(mask), logits.shape)
    logits = np.where(mask, logits, -np.inf)
    logits = np.where(mask.any(-1, keepdims=True), logits, 0.0)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bhqk,bkhd->bqhd', weights / weights.sum(-1, keepdims=True), v)


def _rel(a, b):
  a, b = np.asarray(jnp.asarray(a, jnp.float32), np.float64), np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _text_masks(b=2, length=7):
  """The text encoder's masks: causal, and padding at the end of row 0 (row 1 is all real tokens)."""
  kv = np.ones((b, length), bool)
  kv[0, 4:] = False
  full = np.tril(np.ones((length, length), bool))[None, None] & kv[:, None, None, :]
  return jnp.asarray(kv), jnp.asarray(full)


# bfloat16: both outputs are rounded to bfloat16 (unit roundoff 2^-8 = 3.9e-3), which alone gives ~2.5e-3 relative.
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)])
@pytest.mark.parametrize('masking', ['none', 'padding', 'causal+padding', 'general'])
def test_xla_matches_closed_form_and_jax(dtype, tol, masking):
  q, k, v = (a.astype(dtype) for a in _qkv(lq=7, lk=7))
  kv, text = _text_masks()
  general = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 3, 7, 7)) < 0.6).at[..., 0].set(True)
  kwargs, mask = {
    'none': ({}, None),
    'padding': ({'kv_mask': kv}, kv[:, None, None, :]),
    'causal+padding': ({'kv_mask': kv, 'causal': True}, text),
    'general': ({'mask': general}, general),
  }[masking]
  ours = attention.dot_product_attention(q, k, v, dtype=dtype, implementation='xla', **kwargs)
  assert ours.dtype == dtype
  reference = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
  # Both compute the matmuls in `dtype`; the closed form sees the same (rounded) inputs in float64.
  assert _rel(ours, reference) <= tol
  assert _rel(ours, _closed_form(q, k, v, mask)) <= (tol if dtype == jnp.float32 else 4e-3)


def test_xla_fully_masked_rows_attend_uniformly():
  q, k, v = _qkv(b=1, lq=3, lk=4)
  kv = jnp.zeros((1, 4), bool)
  out = attention.dot_product_attention(q, k, v, kv_mask=kv)
  np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(1, keepdims=True), out.shape), rtol=1e-6)
  # Causal with leading padding: query 0 has no real key at or before it.
  kv = jnp.array([[False, True, True, True]])
  out = attention.dot_product_attention(*_qkv(b=1, lq=4, lk=4), kv_mask=kv, causal=True)
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize('bias_shape', [(1, 3, 7, 7), (2, 3, 7, 7), (3, 7, 7)])
def test_additive_bias_and_scale_match_closed_form(bias_shape):
  """T5's attention: a position bias (broadcast over the batch or per example) added to unscaled logits, with
  padding, including a row whose every key is padding (it still attends uniformly)."""
  q, k, v = _qkv(lq=7, lk=7)
  bias = jnp.asarray(np.random.default_rng(5).normal(size=bias_shape).astype(np.float32))
  kv = jnp.asarray(np.stack([np.arange(7) < 4, np.zeros(7, bool)]))
  ours = attention.dot_product_attention(q, k, v, kv_mask=kv, bias=bias, scale=1.0)
  expected = _closed_form(q, k, v, kv[:, None, None, :], bias.reshape((1,) * (4 - bias.ndim) + bias.shape), 1.0)
  assert _rel(ours, expected) <= 1e-5
  np.testing.assert_allclose(ours[1], jnp.broadcast_to(v[1].mean(0), ours[1].shape), rtol=1e-5)
  reference = jax.nn.dot_product_attention(q, k, v, bias=bias.reshape((1,) * (4 - bias.ndim) + bias.shape), scale=0.5)
  assert _rel(attention.dot_product_attention(q, k, v, bias=bias, scale=0.5), reference) <= 1e-5


def test_bias_falls_back_to_xla_with_one_log_line(caplog, monkeypatch):
  attention._log_fallback_once.cache_clear()
  with caplog.at_level(logging.INFO, logger='absl'):
    assert attention.resolve_implementation('auto', 64, jnp.bfloat16, backend='gpu', bias=True) == 'xla'
    assert attention.resolve_implementation('auto', 64, jnp.float32, backend='tpu', bias=True) == 'xla'
    assert attention.resolve_implementation('cudnn', 64, jnp.bfloat16, backend='gpu', bias=True) == 'xla'
    assert attention.resolve_implementation('xla', 64, jnp.bfloat16, backend='gpu', bias=True) == 'xla'
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('attention: ')]
  assert len(lines) == 2 and all('no additive bias' in line for line in lines), lines
  # An explicit kernel on a backend that lacks it stays an error, bias or not.
  with pytest.raises(ValueError, match="'splash' needs a"):
    attention.resolve_implementation('splash', 64, jnp.float32, bias=True)
  # On a (pretend) TPU the splash kernel is never called with a bias: the xla path runs instead.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  monkeypatch.setattr(attention, 'splash_attention', lambda *a, **k: pytest.fail('splash called with a bias'))
  q, k, v = _qkv()
  bias = jnp.ones((1, 3, 5, 7))
  np.testing.assert_allclose(
    attention.dot_product_attention(q, k, v, implementation='splash', bias=bias),
    _closed_form(q, k, v, bias=bias),
    rtol=1e-5,
    atol=1e-6,
  )


def _splash(q, k, v, causal, kv, dtype=jnp.float32):
  """The 'splash' implementation's own code path, with the Pallas kernel in interpret mode (runs on CPU)."""
  return attention.splash_attention(q, k, v, causal, kv, dtype, interpret=True)


@pytest.mark.parametrize(
  'lq,lk,d,causal,padding',
  [
    (77, 77, 64, True, True),
    (64, 77, 40, False, True),
    (256, 256, 160, False, False),
  ],
  ids=['text-causal+padding', 'cross-attention-padding', 'self-attention'],
)
def test_splash_kernel_in_interpret_mode_matches_xla(lq, lk, d, causal, padding):
  q, k, v = _qkv(b=2, lq=lq, lk=lk, h=2, d=d)
  kv = None
  if padding:
    kv = jnp.asarray(np.arange(lk)[None, :] < np.array([[lk - 20], [lk]]))
  ours = jax.jit(lambda q, k, v: _splash(q, k, v, causal, kv))(q, k, v)
  xla = attention.dot_product_attention(q, k, v, implementation='xla', causal=causal, kv_mask=kv)
  assert _rel(ours, xla) <= 1e-5


def _leading_padding_and_empty_row():
  """Row 0: three padding tokens first (under a causal mask its first queries see no real key); row 1: no real key."""
  return _qkv(b=2, lq=20, lk=20, h=2, d=16), jnp.asarray(np.stack([np.arange(20) >= 3, np.zeros(20, bool)]))


@pytest.mark.parametrize('causal', [True, False])
def test_splash_rows_without_a_key_take_the_mean_like_xla(causal):
  (q, k, v), kv = _leading_padding_and_empty_row()
  ours = jax.jit(lambda q, k, v: _splash(q, k, v, causal, kv))(q, k, v)
  assert _rel(ours, attention.dot_product_attention(q, k, v, causal=causal, kv_mask=kv)) <= 1e-5


def test_splash_gradients_match_xla():
  (q, k, v), kv = _leading_padding_and_empty_row()
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  splash_grads = jax.jit(jax.grad(loss(lambda q, k, v: _splash(q, k, v, True, kv)), argnums=(0, 1, 2)))(q, k, v)
  xla_fn = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True, kv_mask=kv)
  xla_grads = jax.grad(loss(xla_fn), argnums=(0, 1, 2))(q, k, v)
  for ours, theirs in zip(splash_grads, xla_grads, strict=True):
    assert bool(jnp.all(jnp.isfinite(ours)))
    assert _rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize('causal,lk', [(True, 7), (False, 5)], ids=['text-causal+padding', 'cross-attention-odd-keys'])
def test_cudnn_path_keeps_the_xla_semantics(monkeypatch, causal, lk):
  """The 'cudnn' path's own masking (rows without a key, an odd key count padded with a masked-out key) around
  jax's kernel call, checked with jax's xla implementation standing in for the cuDNN kernel (no GPU here)."""
  reference = jax.nn.dot_product_attention
  calls = []

  def fake_cudnn(q, k, v, mask=None, scale=None, implementation=None):
    calls.append((implementation, k.shape[1]))
    return reference(q, k, v, mask=mask, scale=scale, implementation='xla')

  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake_cudnn)
  q, k, v = _qkv(b=2, lq=7, lk=lk)
  kv = jnp.asarray(np.stack([np.arange(lk) >= 2, np.zeros(lk, bool)]))  # Leading padding; a row of padding only.
  full = attention.combined_mask(None, causal, kv, 7, lk)
  ours = attention._cudnn_attention(q, k, v, full, jnp.float32)
  assert calls == [('cudnn', lk + lk % 2)]
  assert _rel(ours, attention.dot_product_attention(q, k, v, causal=causal, kv_mask=kv)) <= 1e-6


def test_auto_resolves_per_backend_and_logs_a_fallback_once(caplog):
  assert jax.default_backend() == 'cpu'
  assert attention.resolve_implementation('auto', 64, jnp.bfloat16) == 'xla'
  assert attention.resolve_implementation('auto', 64, jnp.bfloat16, backend='gpu') == 'cudnn'
  assert attention.resolve_implementation('auto', 64, jnp.float32, backend='tpu') == 'splash'
  attention._log_fallback_once.cache_clear()
  # The absl logger's own level: another test (or absl.app) may have set its verbosity to warnings only.
  with caplog.at_level(logging.INFO, logger='absl'):
    for _ in range(3):
      assert attention.resolve_implementation('auto', 64, jnp.float32, backend='gpu') == 'xla'
    assert attention.resolve_implementation('auto', 12, jnp.bfloat16, backend='gpu') == 'xla'
    assert attention.resolve_implementation('auto', 64, jnp.float32, general_mask=True, backend='tpu') == 'xla'
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('attention: ')]
  assert len(lines) == 3, lines  # One line per reason: float32 on cuDNN, head dim 12, a general mask on splash.
  assert 'float32' in lines[0] and 'got 12' in lines[1] and 'general mask' in lines[2]


def test_explicit_kernel_the_backend_lacks_is_an_error():
  q, k, v = _qkv()
  for implementation in ('cudnn', 'splash'):
    with pytest.raises(ValueError, match=f"'{implementation}' needs a"):
      attention.dot_product_attention(q, k, v, implementation=implementation)
  with pytest.raises(ValueError, match='unknown attention implementation'):
    attention.dot_product_attention(q, k, v, implementation='flash')


@pytest.mark.parametrize(
  'get_config,key,value,needles',
  [
    (lambda: ldm_base.get_config('tiny'), 'unet', 'cudnn', ['model.unet.attention', "'cudnn' needs a GPU"]),
    (lambda: ldm_base.get_config('tiny'), 'text', 'splash', ['model.text.attention', "'splash' needs a TPU"]),
    (lambda: vae_base.get_config('tiny'), 'vae', 'cudnn', ['model.vae.attention', 'GPU']),
    (lambda: ldm_base.get_config('tiny'), 'unet', 'flash', ['model.unet.attention', 'auto, xla, cudnn, splash']),
  ],
)
def test_config_validation_names_the_attention_key(get_config, key, value, needles):
  config = get_config()
  validate_config(config)  # The defaults ('auto') are valid.
  config.model[key].attention = value
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  for needle in needles:
    assert needle in str(error.value)


def test_config_validation_checks_kernel_limits_on_a_gpu(monkeypatch):
  """On a GPU backend, explicit cuDNN needs a half-precision dtype and supported head dims (checked at load)."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = ldm_base.get_config('tiny')
  config.model.unet.attention = 'cudnn'
  with pytest.raises(ConfigError, match=r'model\.unet\.attention.*bfloat16 or float16'):
    validate_config(config)
  config.model.unet.dtype = 'bfloat16'  # The tiny U-Net's head dims are 8 and 16.
  validate_config(config)
  config.model.unet.attention_head_dim = 8  # 32 / 8 = 4: not a multiple of 8.
  with pytest.raises(ConfigError, match='multiple of 8'):
    validate_config(config)


@pytest.mark.slow  # A train.py process (~10 s, a minute under load); the config-validation tests are the fast check.
def test_train_cli_refuses_cudnn_on_cpu_in_one_line(tmp_path):
  result = run_cli(
    'train.py', '--config', 'configs/ldm_base.py:tiny', '--workdir', str(tmp_path / 'w'),
    '--config.model.unet.attention=cudnn',
  )  # fmt: skip
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and 'model.unet.attention' in lines[0] and 'Traceback' not in result.stderr, result.stderr
