"""LPIPS (Zhang et al. 2018) in Flax, computed exactly as the `lpips` package (v0.1) computes it.

d(x0, x1) = sum over layers l of mean over (h, w) of w_l . (f0_l - f1_l)^2, where f_l are the channel-unit-normalised
activations of a frozen backbone (VGG16 relu1_2 ... relu5_3, or AlexNet relu1 ... relu5) on inputs passed through the
package's ScalingLayer, and w_l are its learned non-negative 1x1 linear heads (no bias). Inputs are NHWC in [-1, 1].

It is both a training loss (the VAE's perceptual term) and a metric (`eval.lpips`, the VAE evaluators), so it lives
with the networks. Parameter names follow torchvision's (`features_0/kernel` <-> `features.0.weight`) and the
package's heads (`lin0/kernel` <-> `lin0.model.1.weight`), so `diffusion.interop.lpips` converts them by table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETS = ('vgg', 'alex')
# The package's ScalingLayer: (x - shift) / scale, per RGB channel.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_EPS = 1e-10  # lpips.normalize_tensor's epsilon, added to the norm.

# torchvision `features` indices: ('conv', index, out channels, kernel, stride, padding) | ('pool', size, stride);
# 'tap' marks where the package reads a layer (after that ReLU).
_VGG16 = (
  ('conv', 0, 64, 3, 1, 1),
  ('conv', 2, 64, 3, 1, 1),
  ('tap',),
  ('pool', 2, 2),
  ('conv', 5, 128, 3, 1, 1),
  ('conv', 7, 128, 3, 1, 1),
  ('tap',),
  ('pool', 2, 2),
  ('conv', 10, 256, 3, 1, 1),
  ('conv', 12, 256, 3, 1, 1),
  ('conv', 14, 256, 3, 1, 1),
  ('tap',),
  ('pool', 2, 2),
  ('conv', 17, 512, 3, 1, 1),
  ('conv', 19, 512, 3, 1, 1),
  ('conv', 21, 512, 3, 1, 1),
  ('tap',),
  ('pool', 2, 2),
  ('conv', 24, 512, 3, 1, 1),
  ('conv', 26, 512, 3, 1, 1),
  ('conv', 28, 512, 3, 1, 1),
  ('tap',),
)
_ALEXNET = (
  ('conv', 0, 64, 11, 4, 2),
  ('tap',),
  ('pool', 3, 2),
  ('conv', 3, 192, 5, 1, 2),
  ('tap',),
  ('pool', 3, 2),
  ('conv', 6, 384, 3, 1, 1),
  ('tap',),
  ('conv', 8, 256, 3, 1, 1),
  ('tap',),
  ('conv', 10, 256, 3, 1, 1),
  ('tap',),
)
LAYERS = {'vgg': _VGG16, 'alex': _ALEXNET}
CHANNELS = {'vgg': (64, 128, 256, 512, 512), 'alex': (64, 192, 384, 256, 256)}


def conv_layers(net: str) -> list[tuple[int, int, int]]:
  """(torchvision feature index, out channels, kernel size) of each conv of the backbone `net`."""
  return [(layer[1], layer[2], layer[3]) for layer in LAYERS[net] if layer[0] == 'conv']


def _unit_normalize(f: jax.Array) -> jax.Array:
  """f / (||f||_channels + 1e-10), as `lpips.normalize_tensor`, with a finite gradient where f is all zeros."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + _EPS)


class Backbone(nn.Module):
  """The frozen feature network: a list of the tapped (post-ReLU) activations."""

  net: str = 'vgg'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for kind, *spec in LAYERS[self.net]:
      if kind == 'conv':
        index, features, k, stride, pad = spec
        pads = ((pad, pad), (pad, pad))
        x = nn.relu(nn.Conv(features, (k, k), (stride, stride), pads, dtype=self.dtype, name=f'features_{index}')(x))
      elif kind == 'pool':
        size, stride = spec
        x = nn.max_pool(x, (size, size), (stride, stride), 'VALID')
      else:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """Per-example LPIPS distance (B,) between two NHWC batches in [-1, 1]."""

  net: str = 'vgg'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    both = (jnp.concatenate([x0, x1]).astype(jnp.float32) - shift) / scale  # One backbone pass for both inputs.
    taps = Backbone(self.net, self.dtype, name='backbone')(both.astype(self.dtype))
    total = jnp.zeros((x0.shape[0],), jnp.float32)
    for i, f in enumerate(taps):
      f = _unit_normalize(f.astype(jnp.float32))
      diff = jnp.square(f[: x0.shape[0]] - f[x0.shape[0] :])
      head = nn.Conv(1, (1, 1), use_bias=False, name=f'lin{i}')(diff)
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def random_params(net: str = 'vgg', seed: int = 0) -> dict:
  """Random LPIPS params ('random' weights, labelled runs only), drawn with NumPy (a jitted init of VGG16 takes
  tens of seconds on CPU): torchvision's init of the backbone (Kaiming-normal, fan-out, zero bias) and uniform
  non-negative heads summing to 1 per layer, so the distance stays a non-negative weighted feature distance."""
  rng = np.random.default_rng(seed)
  backbone, channels = {}, 3
  for index, out, k in conv_layers(net):
    std = np.sqrt(2.0 / (out * k * k))
    kernel = (rng.standard_normal((k, k, channels, out), np.float32) * std).astype(np.float32)
    backbone[f'features_{index}'] = {'kernel': kernel, 'bias': np.zeros((out,), np.float32)}
    channels = out
  params = {'backbone': backbone}
  for i, c in enumerate(CHANNELS[net]):
    w = rng.uniform(size=(1, 1, c, 1)).astype(np.float32)
    params[f'lin{i}'] = {'kernel': w / w.sum()}
  return params
