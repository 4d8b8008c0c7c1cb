"""The PatchGAN discriminator of taming-transformers (`NLayerDiscriminator`, pix2pix's), as latent diffusion's
autoencoders train against it.

conv4x4/s2 + LeakyReLU(0.2), then `num_layers` - 1 blocks of conv4x4/s2 (no bias) + BatchNorm + LeakyReLU with
channels x min(2^n, 8), one such block at stride 1, and a conv4x4/s1 to one logit per patch. NHWC; parameter names
follow the PyTorch `nn.Sequential` (`main_0/kernel` <-> `main.0.weight`, `main_3/scale` <-> `main.3.weight`).

Normalisation: BatchNorm in training mode, as taming uses it while training: each call normalises with the
statistics of the batch it is given (real and fake batches are separate calls, as in taming). Under data / FSDP
sharding the batch axis is one global array, so the statistics are global (XLA reduces across devices: the
1-device numbers); under gradient accumulation they are each micro-batch's. No running averages are kept: taming
only uses them for validation logging, and the framework never evaluates the discriminator outside training. The
discriminator draws no randomness, so the per-example-randomness contract is untouched (BatchNorm does couple the
examples of a batch, which is its nature).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_BN_EPS = 1e-5  # torch.nn.BatchNorm2d's.


def layer_specs(num_layers: int, channels: int) -> list[tuple[int, int, int, bool]]:
  """(torch Sequential index, out channels, stride, batch norm) of each conv, in order."""
  specs, index, mult = [(0, channels, 2, False)], 2, 1
  for n in range(1, num_layers + 1):
    mult = min(2**n, 8)
    specs.append((index, channels * mult, 2 if n < num_layers else 1, True))
    index += 3
  specs.append((index, 1, 1, False))
  return specs


def output_size(image_size: int, num_layers: int) -> int:
  """Side of the logit map for a square input of `image_size` (kernel 4, padding 1)."""
  size = image_size
  for _, _, stride, _ in layer_specs(num_layers, 1):
    size = (size + 2 - 4) // stride + 1
  return size


class BatchNorm(nn.Module):
  """BatchNorm2d in training mode: the batch's mean and biased variance over (N, H, W), learned scale and bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (c,))  # taming: N(1, 0.02).
    bias = self.param('bias', nn.initializers.zeros, (c,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    out = (x32 - mean) * jax.lax.rsqrt(var + _BN_EPS) * scale + bias
    return out.astype(x.dtype)


class NLayerDiscriminator(nn.Module):
  """(B, H, W, C) images in [-1, 1] -> (B, H', W', 1) patch logits."""

  num_layers: int = 3
  channels: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    specs = layer_specs(self.num_layers, self.channels)
    for i, (index, out, stride, norm) in enumerate(specs):
      last = i == len(specs) - 1
      conv = nn.Conv(
        out,
        (4, 4),
        (stride, stride),
        ((1, 1), (1, 1)),
        use_bias=not norm,
        dtype=self.dtype,
        kernel_init=nn.initializers.normal(0.02),  # taming's weights_init.
        name=f'main_{index}',
      )
      x = conv(x)
      if norm:
        x = BatchNorm(name=f'main_{index + 1}')(x)
      if not last:
        x = nn.leaky_relu(x, 0.2)
    return x.astype(jnp.float32)
