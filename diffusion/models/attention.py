"""Scaled dot-product attention with a choice of implementation: XLA einsums, cuDNN flash attention, TPU splash.

`dot_product_attention(q, k, v, mask, dtype, implementation)` takes (B, L, H, D) arrays. Masks come in three
forms: `causal` (static), `kv_mask` (B, Lk) padding (True = a real key), and a general boolean `mask`
broadcastable to (B, H, Lq, Lk); they are combined with "and". Every implementation keeps the semantics of the
'xla' path: softmax in float32 (the kernels accumulate in float32 too), and a query row with no key to attend
attends uniformly (the mean of the values), never NaN.

- 'xla': two einsums with the full attention matrix (any backend, any mask).
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, fused flash attention on NVIDIA GPUs
  (bfloat16 / float16, head dim a multiple of 8 up to 128, or 256 on Hopper and later).
- 'splash': the Pallas splash-attention kernel on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`);
  causal and padding masks become its static mask and segment ids, sequences and the head dim are zero-padded to
  multiples of 128 (exact: padded keys are masked out, padded features are zero). No general `mask`.
- 'auto': 'cudnn' on GPU, 'splash' on TPU, 'xla' otherwise, and 'xla' where the preferred kernel cannot run
  (one log line per reason).

An additive `bias` broadcastable to (B, H, Lq, Lk) (T5's relative position bias) is added to the scaled logits in
float32 before masking; it runs on the 'xla' path only: 'cudnn' and 'splash' (explicit or picked by 'auto') fall back
to 'xla' with one log line. `scale` replaces the default 1/sqrt(head dim) (T5 does not scale: 1.0).

Config validation calls `backend_error` so that asking for a kernel the backend lacks fails before compile.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array
Dtype = Any

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')
KERNEL_BACKENDS = {'cudnn': 'gpu', 'splash': 'tpu'}  # The backend each fused kernel needs.
_PREFERRED = {'gpu': 'cudnn', 'tpu': 'splash'}  # What 'auto' tries first on each backend.
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SPLASH_BLOCK = 128  # Splash tiles: sequences and the head dim are padded to multiples of this.


def backend_error(implementation: str, backend: str | None = None) -> str | None:
  """Why `implementation` can never run on `backend` (default: jax's), or None if it can."""
  backend = backend or jax.default_backend()
  if implementation not in IMPLEMENTATIONS:
    return f'unknown attention implementation {implementation!r}; known: {", ".join(IMPLEMENTATIONS)}'
  needed = KERNEL_BACKENDS.get(implementation)
  if needed is not None and backend != needed:
    return f'{implementation!r} needs a {needed.upper()} backend, this one is {backend!r} (use "auto" or "xla")'
  return None


def _cudnn_max_head_dim() -> int:
  """256 on Hopper (compute capability 9.0) and later, 128 before (cuDNN's flash attention limits)."""
  try:
    capability = tuple(int(x) for x in str(jax.devices()[0].compute_capability).split('.'))
  except (AttributeError, ValueError):
    return 128
  return 256 if capability >= (9, 0) else 128


def kernel_limitation(implementation: str, head_dim: int, dtype: Dtype, general_mask: bool = False) -> str | None:
  """Why the fused `implementation` cannot run attention of this head dim / compute dtype / mask, or None."""
  if implementation == 'cudnn':
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
      return f'cuDNN flash attention needs bfloat16 or float16, the compute dtype is {jnp.dtype(dtype).name}'
    limit = _cudnn_max_head_dim()
    if head_dim % 8 or head_dim > limit:
      return f'cuDNN flash attention needs a head dim that is a multiple of 8 and <= {limit}, got {head_dim}'
  if implementation == 'splash' and general_mask:
    return 'splash attention takes causal and padding masks only, not a general mask'
  return None


@functools.cache
def _log_fallback_once(preferred: str, reason: str) -> None:
  logging.info('attention: %s cannot run here (%s); using xla.', preferred, reason)


def resolve_implementation(
  implementation: str,
  head_dim: int,
  dtype: Dtype,
  general_mask: bool = False,
  backend: str | None = None,
  bias: bool = False,
) -> str:
  """The implementation that runs: an explicit one (an error if it cannot run), or what 'auto' picks; with an
  additive `bias`, 'xla' (a fused kernel that could run falls back, with one log line)."""
  impl = _resolve(implementation, head_dim, dtype, general_mask, backend or jax.default_backend())
  if bias and impl != 'xla':
    _log_fallback_once(impl, 'it takes no additive bias')
    return 'xla'
  return impl


def _resolve(implementation: str, head_dim: int, dtype: Dtype, general_mask: bool, backend: str) -> str:
  if implementation == 'auto':
    preferred = _PREFERRED.get(backend, 'xla')
    reason = kernel_limitation(preferred, head_dim, dtype, general_mask)
    if reason is None:
      return preferred
    _log_fallback_once(preferred, reason)
    return 'xla'
  reason = backend_error(implementation, backend) or kernel_limitation(implementation, head_dim, dtype, general_mask)
  if reason is not None:
    raise ValueError(f'attention implementation {implementation!r}: {reason}')
  return implementation


def combined_mask(mask: Array | None, causal: bool, kv_mask: Array | None, lq: int, lk: int) -> Array | None:
  """The three mask forms as one boolean array broadcastable to (B, H, Lq, Lk), or None without a mask."""
  parts = []
  if causal:
    parts.append(jnp.tril(jnp.ones((lq, lk), bool))[None, None])
  if kv_mask is not None:
    parts.append(kv_mask.astype(bool)[:, None, None, :])
  if mask is not None:
    parts.append(mask.astype(bool).reshape((1,) * (4 - mask.ndim) + mask.shape))
  return functools.reduce(jnp.logical_and, parts) if parts else None


def _xla_attention(
  q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype, bias: Array | None = None, scale: float | None = None
) -> Array:
  """softmax(q k^T * scale + bias) v (scale 1/sqrt(d) by default): both matmuls in `dtype`, the softmax in float32."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  # Heads moved next to the batch axis first, so both matmuls are plain batched matmuls (batch dims leading): with
  # the heads in the middle XLA's CPU backend ran the U-Net forward pass ~2.5x slower (scripts/bench_sample.py).
  q, k, v = (a.astype(dtype).transpose(0, 2, 1, 3) for a in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32).reshape((1,) * (4 - bias.ndim) + bias.shape)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)


def _row_has_key(mask: Array | None, shape: tuple[int, int, int, int]) -> Array | None:
  """(B, Lq, H, 1) boolean: does the query row attend any key (None: every row does)."""
  if mask is None:
    return None
  b, lq, h, _ = shape
  return jnp.broadcast_to(jnp.any(mask, axis=-1), (b, h, lq)).transpose(0, 2, 1)[..., None]


def _uniform_where_empty(out: Array, v: Array, has_key: Array | None) -> Array:
  """Rows without a key take the mean of the values (what the 'xla' path's uniform softmax gives)."""
  if has_key is None:
    return out
  return jnp.where(has_key, out, jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype))


def _cudnn_attention(
  q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype, scale: float | None = None
) -> Array:
  """cuDNN flash attention; rows without a key attend every key inside the kernel, then take the mean of v."""
  q, k, v = (a.astype(dtype) for a in (q, k, v))
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
  b, lq, h, _ = q.shape
  has_key = _row_has_key(mask, q.shape)
  heads = 1 if mask.shape[1] == 1 else h
  mask = jnp.broadcast_to(mask, (b, heads, lq, k.shape[1])) | ~has_key.transpose(0, 2, 1, 3)[:, :heads]
  kp, vp = k, v
  if k.shape[1] % 2:  # cuDNN wants even sequence lengths with a bias in training: one more, masked-out key.
    kp, vp = (jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0))) for a in (k, v))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 1)))
  out = jax.nn.dot_product_attention(q, kp, vp, mask=mask, scale=scale, implementation='cudnn')
  return _uniform_where_empty(out, v, has_key)


def _pad_axis(x: Array, axis: int, multiple: int, value: Any = 0) -> Array:
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _splash_block(length: int) -> int:
  """The largest of 512 / 256 / 128 that divides `length` (a multiple of 128)."""
  return next(b for b in (512, 256, _SPLASH_BLOCK) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(causal: bool, pq: int, pk: int, heads: int, interpret: bool) -> Any:
  """The splash kernel for padded lengths (pq, pk) (built once per shape: its mask processing runs on the host)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  static = splash.CausalMask((pq, pk)) if causal else splash.FullMask((pq, pk))
  bq, bkv = _splash_block(pq), _splash_block(pk)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq, block_kv_dq=bkv)
  with jax.ensure_compile_time_eval():  # Concrete mask tables, so a kernel built inside one trace serves them all.
    return splash.make_splash_mha_single_device(
      splash.MultiHeadMask([static] * heads), block_sizes=blocks, interpret=interpret
    )


def splash_attention(
  q: Array,
  k: Array,
  v: Array,
  causal: bool,
  kv_mask: Array | None,
  dtype: Dtype,
  interpret: bool = False,
  scale: float | None = None,
) -> Array:
  """The 'splash' path: TPU splash attention over (B, L, H, D), vmapped over the batch (`interpret` runs the
  Pallas kernel in interpret mode, which works on CPU). Causal -> the kernel's static causal mask; padding ->
  segment ids: real keys 1, padding keys 0, padded keys -1; a query row with a real key to attend gets 1, a row
  without one gets 0 (it attends the padding keys, finite, and then takes the mean of the values)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  b, lq, h, d = q.shape
  lk = k.shape[1]
  q = q.astype(jnp.float32) * (d**-0.5 if scale is None else scale)  # Splash does not scale the logits.
  qs, ks, vs = (_pad_axis(_pad_axis(a.astype(dtype), 1, _SPLASH_BLOCK), 3, _SPLASH_BLOCK) for a in (q, k, v))
  pq, pk = qs.shape[1], ks.shape[1]
  real = jnp.ones((b, lk), bool) if kv_mask is None else kv_mask.astype(bool)
  if causal:
    has_key = jnp.cumsum(real, axis=1) > 0 if lq == lk else jnp.ones((b, lq), bool)
  else:
    has_key = jnp.broadcast_to(jnp.any(real, axis=1, keepdims=True), (b, lq))
  kv_seg = _pad_axis(real.astype(jnp.int32), 1, _SPLASH_BLOCK, -1)
  q_seg = _pad_axis(has_key.astype(jnp.int32), 1, _SPLASH_BLOCK, -1)
  if pk == lk and pq != lq:  # Padded queries need a key of their own segment: give them segment 1's.
    q_seg = q_seg.at[:, lq:].set(1)
  kernel = _splash_kernel(causal, qs.shape[1], ks.shape[1], h, interpret)
  heads_first = lambda a: a.transpose(0, 2, 1, 3)
  out = jax.vmap(kernel)(heads_first(qs), heads_first(ks), heads_first(vs), splash.SegmentIds(q=q_seg, kv=kv_seg))
  out = heads_first(out)[:, :lq, :, :d].astype(dtype)
  return _uniform_where_empty(out, v.astype(dtype), has_key[:, :, None, None] if kv_mask is not None else None)


def dot_product_attention(
  query: Array,
  key: Array,
  value: Array,
  mask: Array | None = None,
  dtype: Dtype = jnp.float32,
  implementation: str = 'xla',
  *,
  causal: bool = False,
  kv_mask: Array | None = None,
  bias: Array | None = None,
  scale: float | None = None,
) -> Array:
  """softmax(q k^T / sqrt(d) + bias) v with the softmax in float32.

  Args:
    query: (B, Lq, H, D).
    key: (B, Lk, H, D).
    value: (B, Lk, H, D).
    mask: optional boolean array broadcastable to (B, H, Lq, Lk); True means "attend". A query row that
      is fully masked attends uniformly (like an additive -10000 bias would), never NaN.
    dtype: the compute dtype of the two matmuls.
    implementation: 'xla', 'cudnn', 'splash' or 'auto' (module docstring); an explicit kernel that cannot run
      these shapes / dtype / backend is a ValueError.
    causal: query i attends keys j <= i only.
    kv_mask: optional (B, Lk) boolean padding mask; True means a real key.
    bias: optional float array broadcastable to (B, H, Lq, Lk), added to the scaled logits (in float32) before
      the masks; it runs on the 'xla' path (a fused kernel falls back to it with one log line).
    scale: the logits' scale; None is 1/sqrt(D).

  Returns:
    (B, Lq, H, D) in `dtype`.
  """
  impl = resolve_implementation(
    implementation, query.shape[-1], dtype, general_mask=mask is not None, bias=bias is not None
  )
  if impl == 'splash':
    return splash_attention(query, key, value, causal, kv_mask, dtype, scale=scale)
  full = combined_mask(mask, causal, kv_mask, query.shape[1], key.shape[1])
  if impl == 'cudnn':
    return _cudnn_attention(query, key, value, full, dtype, scale)
  return _xla_attention(query, key, value, full, dtype, bias, scale)


__all__ = [
  'IMPLEMENTATIONS',
  'KERNEL_BACKENDS',
  'backend_error',
  'combined_mask',
  'dot_product_attention',
  'kernel_limitation',
  'resolve_implementation',
  'splash_attention',
]
