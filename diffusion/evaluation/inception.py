"""Inception features of uint8 images for FID: the extractor, and random weights calibrated on images.

The network is `diffusion.models.inception.InceptionV3`; pytorch-fid's weight file converts with
`diffusion.interop.inception.load_variables`. Without weights, `random_variables` builds a random network whose
BatchNorm statistics are calibrated on given images, so its features depend on the input; FID from such a network
is only comparable with itself.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import parallel
from diffusion.errors import UserError
from diffusion.models import inception as net
from diffusion.models.inception import BLOCK_BY_DIMS, BLOCKS, INPUT_SIZE, Variables

__all__ = ['BLOCK_BY_DIMS', 'BLOCKS', 'INPUT_SIZE', 'FeatureExtractor', 'random_variables']


def random_variables(seed: int, calibration_images: np.ndarray, resize_to: int | None = INPUT_SIZE) -> dict:
  """Random weights whose BatchNorm statistics are the batch statistics of `calibration_images` (uint8 NHWC).

  Without calibration a random deep network maps every input to nearly the same features; with it, each layer's
  pre-activations are normalised on real inputs, so features (and FID) depend on the images. Kernels are drawn from
  N(0, 2 / fan_in), BatchNorm scales from U(0.5, 1.5), biases from N(0, 0.2^2). Deterministic: every process that
  calls it with the same images gets the same variables.
  """
  x = _preprocess(jnp.asarray(calibration_images), resize_to)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):  # NumPy draws: far faster on CPU than compiling Flax's initialisers for 24M parameters.
    names = [str(getattr(p, 'key', p)) for p in path]
    if names[-1] == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
    if names[-2:] == ['bn', 'scale']:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    if names[-1] == 'bias':
      return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype) if names[-1] == 'mean' else np.ones(leaf.shape, leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, net.abstract_variables())
  params = variables['params']
  _, updated = _calibrate(params, variables['batch_stats'], x)
  return jax.tree.map(np.asarray, {'params': params, 'batch_stats': updated['batch_stats']})


@jax.jit
def _calibrate(params: Variables, batch_stats: Variables, x: jax.Array) -> tuple[Any, Variables]:
  return net.InceptionV3(calibrate=True).apply(
    {'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats']
  )


@functools.partial(jax.jit, static_argnames=('resize_to',))
def _preprocess(images: jax.Array, resize_to: int | None) -> jax.Array:
  return net.preprocess(images, resize_to)


@functools.partial(jax.jit, static_argnames=('block',))
def _network(variables: Variables, x: jax.Array, block: str) -> jax.Array:
  y = net.InceptionV3().apply(variables, x)[block]
  return y if y.ndim == 2 else jnp.mean(y, axis=(1, 2))  # Spatial mean for the early blocks, as pytorch-fid.


class FeatureExtractor:
  """uint8 images (N, H, W, 3) -> float32 features (N, D), data-parallel over this process's devices.

  Process-local (no collective): in multi-process runs each process extracts the features of its own images and
  the statistics are combined once (`diffusion.evaluation.base.sum_across_processes`). Batches are padded to a
  multiple of the device count (padding rows are dropped). Preprocessing compiles once per input image size, the
  network once per batch size.
  """

  def __init__(
    self,
    variables: Variables,
    block: str = 'pool3',
    resize_to: int | None = INPUT_SIZE,
    devices: Iterable[Any] | None = None,
  ):
    if block not in BLOCKS:
      raise UserError(f'unknown Inception block {block!r}; known: {", ".join(BLOCKS)}')
    self.block, self.resize_to = block, resize_to
    devices = list(devices) if devices is not None else jax.local_devices()
    if any(d.process_index != jax.process_index() for d in devices):
      raise ValueError("FeatureExtractor runs on this process's devices only")
    mesh = parallel.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}), devices)
    self.num_local_devices = len(devices)
    self._sharding = parallel.batch_sharding(mesh)
    self.variables = jax.device_put(variables, parallel.replicated(mesh))

  @property
  def dims(self) -> int:
    return net.DIMS_BY_BLOCK[self.block]

  def _put(self, array: np.ndarray) -> tuple[jax.Array, int]:
    n = len(array)
    pad = -n % self.num_local_devices
    if pad:
      array = np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)])
    return jax.device_put(array, self._sharding), n

  def dispatch(self, images: np.ndarray) -> Callable[[], np.ndarray]:
    """Starts the computation and returns a function that waits for the (N, D) features."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
    batch, n = self._put(images)
    out = _network(self.variables, _preprocess(batch, self.resize_to), self.block)
    return lambda: np.asarray(out)[:n]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.dispatch(images)()

  def from_inputs(self, x: np.ndarray) -> np.ndarray:
    """Features of already preprocessed float inputs (N, H, W, 3) in [-1, 1]."""
    batch, n = self._put(np.asarray(x, np.float32))
    return np.asarray(_network(self.variables, batch, self.block))[:n]
