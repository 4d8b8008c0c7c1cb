"""The T5 encoder (transformers' `T5EncoderModel`): original T5 (ReLU FFN) and v1.1 / flan (gated-GELU FFN).

Pre-norm blocks with T5's RMS layer norm (no mean subtraction, no bias, the variance in float32), attention without
the 1/sqrt(d) scale and with a learned relative position bias: bidirectional buckets of the key - query offset
(exact below num_buckets / 4, logarithmic up to max_distance, one bucket beyond), looked up in the first block's
`relative_attention_bias` table and shared by every block. Dropout is left out (frozen encoder / inference).

Parameter names mirror transformers' state dict (`shared`, `encoder/block_i/layer_0/SelfAttention/q`, ...,
`encoder/block_i/layer_1/DenseReluDense/wi_0`, `encoder/final_layer_norm`), so `diffusion.interop` converts them
mechanically. The output is `TextEncoderOutput` (no pooled output: T5 has none).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.layers import Array, Dtype, dot_product_attention, get_activation
from diffusion.models.text import TextEncoderOutput


def relative_position_bucket(
  relative_position: np.ndarray, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """transformers' `T5Attention._relative_position_bucket` in NumPy (float32 logarithms, as PyTorch computes them):
  the bucket in [0, num_buckets) of each relative position (key - query)."""
  relative_position = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
  else:
    distance = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide='ignore'):  # log(0) for distances below max_exact, which take the exact branch.
    ratio = np.log(distance.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + np.nan_to_num(ratio * np.float32(num_buckets - max_exact), neginf=0.0).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class T5LayerNorm(nn.Module):
  """T5's RMS norm: x / sqrt(mean(x^2) + eps) * weight (the mean of squares in float32; no bias, no centring)."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return scale.astype(self.dtype) * (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)


class T5Attention(nn.Module):
  """Self-attention with bias-free q / k / v / o (inner width num_heads * d_kv), unscaled logits and the position
  bias; the first block owns `relative_attention_bias` (num_buckets, num_heads) and computes the bias."""

  d_model: int
  d_kv: int
  num_heads: int
  has_relative_attention_bias: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None, position_bias: Array | None) -> tuple[Array, Array]:
    """x (B, L, d_model), kv_mask (B, L) True for real tokens -> (output, the position bias for later blocks)."""
    b, length, _ = x.shape
    inner = self.num_heads * self.d_kv
    dense = lambda features, name: nn.Dense(
      features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    q, k, v = (dense(inner, name)(x).reshape(b, length, self.num_heads, self.d_kv) for name in ('q', 'k', 'v'))
    if position_bias is None:
      if self.has_relative_attention_bias:
        # (1, num_heads, L, L) from the bucket table; positions are static, so the buckets are a constant.
        relative = np.arange(length)[None, :] - np.arange(length)[:, None]
        buckets = relative_position_bucket(
          relative, True, self.relative_attention_num_buckets, self.relative_attention_max_distance
        )
        table = nn.Embed(
          self.relative_attention_num_buckets,
          self.num_heads,
          embedding_init=nn.initializers.normal(self.d_model**-0.5),
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name='relative_attention_bias',
        )
        position_bias = table(jnp.asarray(buckets, jnp.int32)).transpose(2, 0, 1)[None]
      else:
        position_bias = jnp.zeros((1, self.num_heads, length, length), self.dtype)
    out = dot_product_attention(
      q, k, v, None, self.dtype, self.attention, kv_mask=kv_mask, bias=position_bias, scale=1.0
    )
    return dense(self.d_model, 'o')(out.reshape(b, length, inner)), position_bias


class T5DenseActDense(nn.Module):
  """Original T5's FFN: wo(act(wi(x))), bias-free."""

  d_model: int
  d_ff: int
  dense_act_fn: str = 'relu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    h = get_activation(self.dense_act_fn)(nn.Dense(self.d_ff, name='wi', **kw)(x))
    return nn.Dense(self.d_model, name='wo', **kw)(h)


class T5DenseGatedActDense(nn.Module):
  """T5 v1.1 / flan's gated FFN: wo(act(wi_0(x)) * wi_1(x)), bias-free ('gelu_new' for gated-gelu)."""

  d_model: int
  d_ff: int
  dense_act_fn: str = 'gelu_new'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = get_activation(self.dense_act_fn)(nn.Dense(self.d_ff, name='wi_0', **kw)(x))
    return nn.Dense(self.d_model, name='wo', **kw)(gate * nn.Dense(self.d_ff, name='wi_1', **kw)(x))


class T5LayerSelfAttention(nn.Module):
  """x + SelfAttention(layer_norm(x))."""

  d_model: int
  d_kv: int
  num_heads: int
  has_relative_attention_bias: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None, position_bias: Array | None) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = T5LayerNorm(self.layer_norm_epsilon, name='layer_norm', **kw)(x)
    h, position_bias = T5Attention(
      self.d_model,
      self.d_kv,
      self.num_heads,
      self.has_relative_attention_bias,
      self.relative_attention_num_buckets,
      self.relative_attention_max_distance,
      self.attention,
      name='SelfAttention',
      **kw,
    )(h, kv_mask, position_bias)
    return x + h, position_bias


class T5LayerFF(nn.Module):
  """x + DenseReluDense(layer_norm(x)) (the gated FFN keeps transformers' name `DenseReluDense`)."""

  d_model: int
  d_ff: int
  dense_act_fn: str = 'relu'
  is_gated_act: bool = False
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = T5LayerNorm(self.layer_norm_epsilon, name='layer_norm', **kw)(x)
    ffn = T5DenseGatedActDense if self.is_gated_act else T5DenseActDense
    return x + ffn(self.d_model, self.d_ff, self.dense_act_fn, name='DenseReluDense', **kw)(h)


class T5Block(nn.Module):
  """layer_0 (self-attention) then layer_1 (FFN); returns the output and the position bias for later blocks."""

  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  has_relative_attention_bias: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = 'relu'
  is_gated_act: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None, position_bias: Array | None) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, position_bias = T5LayerSelfAttention(
      self.d_model,
      self.d_kv,
      self.num_heads,
      self.has_relative_attention_bias,
      self.relative_attention_num_buckets,
      self.relative_attention_max_distance,
      self.layer_norm_epsilon,
      self.attention,
      name='layer_0',
      **kw,
    )(x, kv_mask, position_bias)
    x = T5LayerFF(
      self.d_model, self.d_ff, self.dense_act_fn, self.is_gated_act, self.layer_norm_epsilon, name='layer_1', **kw
    )(x)
    return x, position_bias


class T5Stack(nn.Module):
  """`block_i` (layer_0: self-attention, layer_1: FFN) then `final_layer_norm`; returns every hidden state like
  transformers' output_hidden_states: the embeddings, each block's output, the last one after the final norm."""

  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = 'relu'
  is_gated_act: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None) -> list[Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden_states, position_bias = [x], None
    for i in range(self.num_layers):
      x, position_bias = T5Block(
        self.d_model,
        self.d_kv,
        self.d_ff,
        self.num_heads,
        i == 0,
        self.relative_attention_num_buckets,
        self.relative_attention_max_distance,
        self.layer_norm_epsilon,
        self.dense_act_fn,
        self.is_gated_act,
        self.attention,
        name=f'block_{i}',
        **kw,
      )(x, kv_mask, position_bias)
      hidden_states.append(x)
    hidden_states[-1] = T5LayerNorm(self.layer_norm_epsilon, name='final_layer_norm', **kw)(x)
    return hidden_states


class T5EncoderModel(nn.Module):
  """transformers' `T5EncoderModel`: the `shared` token embedding (no absolute positions) and the encoder stack.

  Fields carry transformers' T5Config names; `dense_act_fn` / `is_gated_act` are what its `feed_forward_proj`
  expands to ('relu' -> relu, not gated; 'gated-gelu' -> gelu_new, gated).
  """

  vocab_size: int
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dense_act_fn: str = 'relu'
  is_gated_act: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, input_ids: Array, attention_mask: Array | None = None, output_hidden_states: bool = False
  ) -> TextEncoderOutput:
    """input_ids (B, L) int, attention_mask (B, L) (1 = token, 0 = padding) -> `TextEncoderOutput` with
    last_hidden_state (B, L, d_model), pooler_output and text_embeds None, and with `output_hidden_states` the
    num_layers + 1 hidden states (embeddings first, the last equal to last_hidden_state)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(1.0), name='shared', **kw)(
      input_ids
    )
    kv_mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden_states = T5Stack(
      self.d_model,
      self.d_kv,
      self.d_ff,
      self.num_layers,
      self.num_heads,
      self.relative_attention_num_buckets,
      self.relative_attention_max_distance,
      self.layer_norm_epsilon,
      self.dense_act_fn,
      self.is_gated_act,
      self.attention,
      name='encoder',
      **kw,
    )(x, kv_mask)
    return TextEncoderOutput(
      last_hidden_state=hidden_states[-1],
      pooler_output=None,
      hidden_states=tuple(hidden_states) if output_hidden_states else None,
    )
