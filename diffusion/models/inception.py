"""The FID InceptionV3 in Flax: pytorch-fid's TF-ported network and its preprocessing.

The network is the one pytorch-fid (and torch-fidelity, torchmetrics) use for FID: torchvision's InceptionV3 with
1008 classes and the FIDInceptionA/C/E blocks (average pools that exclude padding; max pool in the last block).
Parameter names follow the PyTorch module names (`Mixed_5b/branch1x1/conv/kernel` <->
`Mixed_5b.branch1x1.conv.weight`), so the weight converter (`diffusion.interop.inception`) is table-driven.

Preprocessing matches pytorch-fid: uint8 -> [0, 1], bilinear resize to 299x299 (align_corners=False, no
antialiasing), then 2x - 1. Features are the 2048-d pool3 activations (or an earlier block, as pytorch-fid's --dims).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
BLOCKS = ('block0', 'block1', 'block2', 'pool3')  # pytorch-fid's output blocks 0..3.
BLOCK_BY_DIMS = {64: 'block0', 192: 'block1', 768: 'block2', 2048: 'pool3'}
DIMS_BY_BLOCK = {block: dims for dims, block in BLOCK_BY_DIMS.items()}
_BN_EPS = 1e-3

Variables = Mapping[str, Any]

# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing.


def _bilinear_taps(in_size: int, out_size: int, dtype: Any = np.float32) -> tuple[np.ndarray, ...]:
  """Source indices and weights of PyTorch's bilinear interpolation (align_corners=False, no antialias).

  PyTorch computes the source position in the input's precision; in float32 with one rounding of
  scale * (i + 0.5) - 0.5 (a fused multiply-add), which this reproduces bit for bit.
  """
  dtype = np.dtype(dtype)
  scale = np.float64(in_size / out_size if dtype == np.float64 else np.float32(in_size / out_size))
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5, 0).astype(dtype)
  i0 = np.floor(src).astype(np.int32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0).astype(dtype)
  return i0, i1, (1 - w1).astype(dtype), w1


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C), like `F.interpolate(mode='bilinear', align_corners=False)`."""
  for axis in (2, 1):  # Width first, then height: the order PyTorch's kernel combines the taps in.
    if x.shape[axis] == size:
      continue
    i0, i1, w0, w1 = _bilinear_taps(x.shape[axis], size, x.dtype)
    shape = [1] * x.ndim
    shape[axis] = size
    x = jnp.take(x, i0, axis) * jnp.asarray(w0, x.dtype).reshape(shape) + jnp.take(x, i1, axis) * jnp.asarray(
      w1, x.dtype
    ).reshape(shape)
  return x


def preprocess(images: jax.Array, resize_to: int | None = INPUT_SIZE, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 (B, H, W, 3) -> the network's input: [0, 1], bilinear resize, then scaled to [-1, 1]."""
  x = images.astype(dtype) / jnp.asarray(255, dtype)
  if resize_to is not None:
    x = resize_bilinear(x, resize_to)
  return 2 * x - 1


# ----------------------------------------------------------------------------------------------------------------------
# The network.


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  calibrate: bool = False
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=(self.strides, self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.dtype,
      precision=self.precision,
      name='conv',
    )(x)
    return nn.relu(BatchNorm(self.calibrate, self.dtype, name='bn')(x))


class BatchNorm(nn.Module):
  """Inference BatchNorm computed as PyTorch does (x * alpha + beta); `calibrate` stores the batch statistics.

  Variables have Flax's BatchNorm names: params {scale, bias}, batch_stats {mean, var}.
  """

  calibrate: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.dtype)
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), self.dtype))
    var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), self.dtype))
    if self.calibrate:
      m, v = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
      if not self.is_initializing():
        mean.value, var.value = m, v
    else:
      m, v = mean.value, var.value
    alpha = scale / jnp.sqrt(v + _BN_EPS)
    return x * alpha + (bias - m * alpha)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool that ignores the zero padding (TensorFlow's, kept by the FID blocks)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class _Block(nn.Module):
  calibrate: bool = False
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  def conv(
    self, features: int, kernel: int | tuple[int, int], name: str, strides: int = 1, padding: int | tuple[int, int] = 0
  ) -> BasicConv2d:
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv2d(features, kernel, strides, padding, self.calibrate, self.dtype, self.precision, name=name)


class InceptionA(_Block):
  """FIDInceptionA (Mixed_5b..5d)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv(64, 1, 'branch1x1')(x)
    b5 = self.conv(64, 5, 'branch5x5_2', padding=2)(self.conv(48, 1, 'branch5x5_1')(x))
    b3 = self.conv(64, 1, 'branch3x3dbl_1')(x)
    b3 = self.conv(96, 3, 'branch3x3dbl_3', padding=1)(self.conv(96, 3, 'branch3x3dbl_2', padding=1)(b3))
    bp = self.conv(self.pool_features, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (grid reduction 35 -> 17)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv(384, 3, 'branch3x3', strides=2)(x)
    bd = self.conv(96, 3, 'branch3x3dbl_2', padding=1)(self.conv(64, 1, 'branch3x3dbl_1')(x))
    bd = self.conv(96, 3, 'branch3x3dbl_3', strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv(192, 1, 'branch1x1')(x)
    b7 = self.conv(c7, 1, 'branch7x7_1')(x)
    b7 = self.conv(c7, (1, 7), 'branch7x7_2', padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), 'branch7x7_3', padding=(3, 0))(b7)
    bd = self.conv(c7, 1, 'branch7x7dbl_1')(x)
    for i, (features, kernel, padding) in enumerate(
      [(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)), (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))]
    ):
      bd = self.conv(features, kernel, f'branch7x7dbl_{i + 2}', padding=padding)(bd)
    bp = self.conv(192, 1, 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (grid reduction 17 -> 8)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv(320, 3, 'branch3x3_2', strides=2)(self.conv(192, 1, 'branch3x3_1')(x))
    b7 = self.conv(192, 1, 'branch7x7x3_1')(x)
    b7 = self.conv(192, (1, 7), 'branch7x7x3_2', padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), 'branch7x7x3_3', padding=(3, 0))(b7)
    b7 = self.conv(192, 3, 'branch7x7x3_4', strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """FIDInceptionE_1 (Mixed_7b, average pool) and FIDInceptionE_2 (Mixed_7c, max pool)."""

  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv(320, 1, 'branch1x1')(x)
    b3 = self.conv(384, 1, 'branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        self.conv(384, (1, 3), 'branch3x3_2a', padding=(0, 1))(b3),
        self.conv(384, (3, 1), 'branch3x3_2b', padding=(1, 0))(b3),
      ],
      axis=-1,
    )
    bd = self.conv(384, 3, 'branch3x3dbl_2', padding=1)(self.conv(448, 1, 'branch3x3dbl_1')(x))
    bd = jnp.concatenate(
      [
        self.conv(384, (1, 3), 'branch3x3dbl_3a', padding=(0, 1))(bd),
        self.conv(384, (3, 1), 'branch3x3dbl_3b', padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = self.conv(192, 1, 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3 on preprocessed NHWC input in [-1, 1].

  Returns pytorch-fid's four output blocks ('block0' 64 ch after the first max pool, 'block1' 192 ch after the
  second, 'block2' 768 ch before the aux classifier, 'pool3' the 2048-d average pool) and the 1008 'logits'.
  `calibrate=True` normalises with batch statistics and (with `mutable=['batch_stats']`) stores them.
  """

  calibrate: bool = False
  dtype: Any = jnp.float32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    kw = dict(calibrate=self.calibrate, dtype=self.dtype, precision=self.precision)
    conv = functools.partial(BasicConv2d, **kw)
    out = {}
    x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x.astype(self.dtype))
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    out['block0'] = x = _max_pool_3x3_s2(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    out['block1'] = x = _max_pool_3x3_s2(x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features=pool_features, name=name, **kw)(x)
    x = InceptionB(name='Mixed_6a', **kw)(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
    out['block2'] = x
    x = InceptionD(name='Mixed_7a', **kw)(x)
    x = InceptionE(pool='avg', name='Mixed_7b', **kw)(x)
    x = InceptionE(pool='max', name='Mixed_7c', **kw)(x)
    out['pool3'] = x = jnp.mean(x, axis=(1, 2))
    out['logits'] = nn.Dense(
      NUM_CLASSES, dtype=self.dtype, param_dtype=self.dtype, precision=self.precision, name='fc'
    )(x)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Weights: conversion from pytorch-fid's state dict, the weight file, random calibrated weights.


@functools.lru_cache(maxsize=None)
def abstract_variables() -> Variables:
  """Shapes and dtypes of the network's variables {'params', 'batch_stats'} (nothing is computed)."""
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
