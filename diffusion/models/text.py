"""The CLIP text transformer (transformers' `CLIPTextTransformer`), trained from scratch or loaded.

One module class serves both a randomly initialised text encoder and pretrained CLIP weights: only the
parameters differ. Parameter names mirror transformers' `text_model.*` state dict (embeddings/
token_embedding, encoder/layers_i/self_attn/q_proj, ..., final_layer_norm) plus an optional bias-free
`text_projection` (`CLIPTextModelWithProjection`). Tokenizers are built outside this module.

`TextEncoderOutput` is the output type of the text encoders added since (T5, `diffusion.models.t5`); this module
still returns the plain pair (last_hidden_state, pooled_output), which its callers unpack as two values.
"""

from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from diffusion.models.layers import Array, Dtype, dot_product_attention, get_activation


class TextEncoderOutput(NamedTuple):
  """What a text encoder returns; the first two fields keep `out[0]` / `out[1]` meaning what they mean in transformers.

  last_hidden_state: (B, L, D).
  pooler_output: (B, D), or None for an encoder without one (T5).
  text_embeds: the projected pooled output, where the model has a projection (else None).
  hidden_states: with output_hidden_states, every hidden state (embeddings first), else None.
  """

  last_hidden_state: Array
  pooler_output: Array | None
  text_embeds: Array | None = None
  hidden_states: tuple[Array, ...] | None = None


class CLIPTextEmbeddings(nn.Module):
  """token_embedding + position_embedding (learned absolute positions)."""

  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Embed(
      self.vocab_size, self.hidden_size, embedding_init=nn.initializers.normal(0.02), name='token_embedding', **kw
    )(input_ids)
    positions = nn.Embed(
      self.max_position_embeddings,
      self.hidden_size,
      embedding_init=nn.initializers.normal(0.01),
      name='position_embedding',
      **kw,
    )(jnp.arange(input_ids.shape[1])[None, :])
    return tokens + positions


class CLIPAttention(nn.Module):
  """Multi-head self-attention with q_proj / k_proj / v_proj / out_proj (all with bias)."""

  hidden_size: int
  num_attention_heads: int
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None = None, causal: bool = False) -> Array:
    """`kv_mask` (B, L): True for real tokens (padding is masked out); `causal`: token i sees tokens <= i."""
    head_dim = self.hidden_size // self.num_attention_heads
    dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_attention_heads, head_dim)
    q, k, v = (split(dense(name)(x)) for name in ('q_proj', 'k_proj', 'v_proj'))
    out = dot_product_attention(q, k, v, None, self.dtype, self.attention, causal=causal, kv_mask=kv_mask)
    return dense('out_proj')(out.reshape(x.shape[0], x.shape[1], self.hidden_size))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x)) with mlp = fc2(act(fc1))."""

  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None = None, causal: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, name='layer_norm1', **kw)(x)
    attn = CLIPAttention(self.hidden_size, self.num_attention_heads, self.attention, name='self_attn', **kw)
    x = x + attn(h, kv_mask, causal)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, name='layer_norm2', **kw)(x)
    h = MLP(self.intermediate_size, self.hidden_act, name='mlp', **kw)(h)
    return x + h


class MLP(nn.Module):
  """CLIP's `mlp`: fc1 -> activation -> fc2."""

  intermediate_size: int
  hidden_act: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.intermediate_size, name='fc1', **kw)(x)
    h = get_activation(self.hidden_act)(h)
    return nn.Dense(x.shape[-1], name='fc2', **kw)(h)


class CLIPEncoder(nn.Module):
  """A stack of `layers_i`; returns every hidden state (embeddings first), like output_hidden_states."""

  num_hidden_layers: int
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_mask: Array | None = None, causal: bool = False) -> list[Array]:
    """`kv_mask` (B, L): True for real tokens; `causal`: token i sees tokens <= i (the text tower)."""
    hidden_states = [x]
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(
        self.hidden_size,
        self.intermediate_size,
        self.num_attention_heads,
        self.hidden_act,
        self.layer_norm_eps,
        self.attention,
        self.dtype,
        self.param_dtype,
        name=f'layers_{i}',
      )(x, kv_mask, causal)
      hidden_states.append(x)
    return hidden_states


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextTransformer` (+ `text_projection` when projection_dim is set).

  Causal self-attention, optionally also masking padding (attention_mask (B, L), 1 = token); `attention` names the
  implementation (`diffusion.models.attention`). The pooled
  output is the final hidden state at the first `eos_token_id` of each row; with eos_token_id None or
  negative it is taken at argmax(input_ids), like the original CLIP (whose EOT has the largest id).
  Note: transformers treats eos_token_id == 2 as "legacy" and then also uses argmax; here 2 is a real id.
  """

  vocab_size: int
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int | None = 2
  projection_dim: int | None = None
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, input_ids: Array, attention_mask: Array | None = None, output_hidden_state_index: int | None = None
  ) -> tuple[Array, Array]:
    """input_ids (B, L) int -> (last_hidden_state (B, L, D), pooled_output (B, D or projection_dim)).

    `output_hidden_state_index` picks which of the num_hidden_layers + 1 hidden states (embeddings
    first) becomes `last_hidden_state`, after `final_layer_norm` as diffusers does for clip skip:
    -2 is the penultimate layer (`clip_skip=1`). The pooled output always comes from the last layer.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    length = input_ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f'Sequence length {length} > max_position_embeddings {self.max_position_embeddings}.')
    x = CLIPTextEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, name='embeddings', **kw)(
      input_ids
    )
    kv_mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden_states = CLIPEncoder(
      self.num_hidden_layers,
      self.hidden_size,
      self.intermediate_size,
      self.num_attention_heads,
      self.hidden_act,
      self.layer_norm_eps,
      self.attention,
      name='encoder',
      **kw,
    )(x, kv_mask, causal=True)
    final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, name='final_layer_norm', **kw)
    last = final_layer_norm(hidden_states[-1])
    pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, self.eos_token_id)]
    if self.projection_dim is not None:
      pooled = nn.Dense(self.projection_dim, use_bias=False, name='text_projection', **kw)(pooled)
    if output_hidden_state_index is not None:
      if not -len(hidden_states) <= output_hidden_state_index < len(hidden_states):
        raise ValueError(
          f'output_hidden_state_index {output_hidden_state_index} out of range for {len(hidden_states)} hidden states.'
        )
      index = output_hidden_state_index % len(hidden_states)
      if index != len(hidden_states) - 1:
        last = final_layer_norm(hidden_states[index])
    return last, pooled


def eos_positions(input_ids: Array, eos_token_id: int | None) -> Array:
  """Index of the first `eos_token_id` per row (0 if absent), or argmax(input_ids) if it is None/<0."""
  if eos_token_id is None or eos_token_id < 0:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)
