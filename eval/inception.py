"""The FID InceptionV3 in Flax: pytorch-fid's TF-ported network, its preprocessing and its weight file.

The network is the one pytorch-fid (and torch-fidelity, torchmetrics) use for FID: torchvision's InceptionV3 with
1008 classes and the FIDInceptionA/C/E blocks (average pools that exclude padding; max pool in the last block).
Parameter names follow the PyTorch module names (`Mixed_5b/branch1x1/conv/kernel` <->
`Mixed_5b.branch1x1.conv.weight`), so the converter is table-driven.

Preprocessing matches pytorch-fid: uint8 -> [0, 1], bilinear resize to 299x299 (align_corners=False, no
antialiasing), then 2x - 1. Features are the 2048-d pool3 activations (or an earlier block, as pytorch-fid's --dims).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, read from a local path, from the cache where
pytorch-fid keeps it, or (with `download=True`) downloaded there. Without weights, `random_variables` builds a
random network whose BatchNorm statistics are calibrated on given images, so its features depend on the input; FID
from such a network is only comparable with itself.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import parallel
from diffusion.errors import UserError

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_SHA256_PREFIX = '6726825d'
INPUT_SIZE = 299
NUM_CLASSES = 1008
BLOCKS = ('block0', 'block1', 'block2', 'pool3')  # pytorch-fid's output blocks 0..3.
BLOCK_BY_DIMS = {64: 'block0', 192: 'block1', 768: 'block2', 2048: 'pool3'}
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
    x = (jnp.take(x, i0, axis) * jnp.asarray(w0, x.dtype).reshape(shape)
         + jnp.take(x, i1, axis) * jnp.asarray(w1, x.dtype).reshape(shape))
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
    x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides), padding=((ph, ph), (pw, pw)),
                use_bias=False, dtype=self.dtype, param_dtype=self.dtype, precision=self.precision, name='conv')(x)
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

  def conv(self, features: int, kernel: int | tuple[int, int], name: str, strides: int = 1,
           padding: int | tuple[int, int] = 0) -> BasicConv2d:
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
    for i, (features, kernel, padding) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                                     (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))]):
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
    b3 = jnp.concatenate([self.conv(384, (1, 3), 'branch3x3_2a', padding=(0, 1))(b3),
                          self.conv(384, (3, 1), 'branch3x3_2b', padding=(1, 0))(b3)], axis=-1)
    bd = self.conv(384, 3, 'branch3x3dbl_2', padding=1)(self.conv(448, 1, 'branch3x3dbl_1')(x))
    bd = jnp.concatenate([self.conv(384, (1, 3), 'branch3x3dbl_3a', padding=(0, 1))(bd),
                          self.conv(384, (3, 1), 'branch3x3dbl_3b', padding=(1, 0))(bd)], axis=-1)
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
    out['logits'] = nn.Dense(NUM_CLASSES, dtype=self.dtype, param_dtype=self.dtype, precision=self.precision,
                             name='fc')(x)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Weights: conversion from pytorch-fid's state dict, the weight file, random calibrated weights.


@functools.lru_cache(maxsize=None)
def _abstract_variables() -> Variables:
  return jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...], bool]:
  """'Mixed_5b.branch1x1.conv.weight' -> ('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel'), transpose)."""
  *modules, leaf = torch_key.split('.')
  layer = modules[-1] if modules else ''
  table = {('conv', 'weight'): ('params', 'kernel'), ('bn', 'weight'): ('params', 'scale'),
           ('bn', 'bias'): ('params', 'bias'), ('bn', 'running_mean'): ('batch_stats', 'mean'),
           ('bn', 'running_var'): ('batch_stats', 'var'), ('fc', 'weight'): ('params', 'kernel'),
           ('fc', 'bias'): ('params', 'bias')}
  if (layer, leaf) not in table:
    raise KeyError(torch_key)
  collection, name = table[(layer, leaf)]
  return collection, (*modules, name), name == 'kernel'


def convert_state_dict(state_dict: Mapping[str, Any], dtype: Any = np.float32) -> dict:
  """pytorch-fid's InceptionV3 state dict (name -> array) -> Flax variables {'params', 'batch_stats'}.

  Strict: every expected parameter must be present with the expected shape, and no unknown key is accepted
  (`num_batches_tracked` counters are ignored).
  """
  expected = {tuple(str(getattr(k, 'key', k)) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(_abstract_variables())}
  variables: dict = {}
  unknown, seen = [], set()
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    try:
      collection, path, transpose = _flax_path(key)
    except KeyError:
      unknown.append(key)
      continue
    array = np.asarray(value, dtype=dtype)
    if transpose:
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T  # OIHW -> HWIO; (out, in) -> (in, out).
    full = (collection, *path)
    if full not in expected:
      unknown.append(key)
      continue
    if array.shape != expected[full]:
      raise UserError(f'Inception weights: {key} has shape {tuple(np.shape(value))}, which does not fit the FID '
                      f'InceptionV3 (expected {expected[full]} after conversion)')
    node = variables
    for part in full[:-1]:
      node = node.setdefault(part, {})
    node[full[-1]] = array
    seen.add(full)
  missing = ['.'.join(p) for p in expected if p not in seen]
  if unknown or missing:
    raise UserError(f'Inception weights do not match the FID InceptionV3: {len(missing)} missing '
                    f'({", ".join(missing[:3])}{"..." if len(missing) > 3 else ""}), {len(unknown)} unexpected '
                    f'({", ".join(unknown[:3])}{"..." if len(unknown) > 3 else ""})')
  return variables


def default_weights_path() -> str:
  """Where pytorch-fid's download lands (torch hub's cache), so a file users already have is found."""
  torch_home = os.environ.get('TORCH_HOME') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'torch')
  return os.path.join(torch_home, 'hub', 'checkpoints', FID_WEIGHTS_FILE)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _download(path: str) -> None:
  import urllib.request

  os.makedirs(os.path.dirname(path), exist_ok=True)
  print(f'downloading {FID_WEIGHTS_URL} to {path}', file=sys.stderr, flush=True)
  tmp = path + '.partial'
  try:
    urllib.request.urlretrieve(FID_WEIGHTS_URL, tmp)
  except OSError as e:
    raise UserError(f'could not download the Inception weights ({e}); {_where_to_put(path)}') from None
  os.replace(tmp, path)


def _where_to_put(path: str) -> str:
  return (f'download {FID_WEIGHTS_URL} (sha256 starts with {FID_WEIGHTS_SHA256_PREFIX}) and put it at {path}, '
          'or pass the file with --weights')


def resolve_weights_path(path: str | None = None, download: bool = False) -> str:
  """The weight file to use: `path`, else the cached pytorch-fid file (downloaded first if `download`).

  A file named like the official one (`pt_inception-2015-12-05-<hash>.pth`) is checked against its hash.
  """
  if path is None:
    path = default_weights_path()
    if not os.path.isfile(path):
      if not download:
        raise UserError(f'FID Inception weights not found at {path}: {_where_to_put(path)} '
                        '(or allow the download with --download)')
      _download(path)
  elif not os.path.isfile(path):
    raise UserError(f'Inception weight file {path!r} does not exist: {_where_to_put(default_weights_path())}')
  match = re.fullmatch(r'pt_inception-2015-12-05-([0-9a-f]{8,})\.pth', os.path.basename(path))
  if match:
    digest = _sha256(path)
    if not digest.startswith(match.group(1)):
      raise UserError(f'{path} is corrupt or not the expected file: its sha256 is {digest[:16]}..., expected '
                      f'{match.group(1)}...; {_where_to_put(path)}')
  return path


_TORCH_DTYPES = {'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
                 'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
                 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


def _read_pth_without_torch(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict saved by `torch.save` (zip format) into NumPy arrays, without PyTorch."""
  if not zipfile.is_zipfile(path):
    raise UserError(f'{path} is not a PyTorch zip checkpoint')
  with zipfile.ZipFile(path) as archive:
    pickle_name = next((n for n in archive.namelist() if n.endswith('data.pkl')), None)
    if pickle_name is None:
      raise UserError(f'{path} holds no data.pkl: not a torch.save file')
    prefix = pickle_name[:-len('data.pkl')]

    def rebuild(storage, offset, size, stride, *unused):
      itemsize = storage.dtype.itemsize
      return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), tuple(s * itemsize for s in stride)).copy()

    class Unpickler(pickle.Unpickler):

      def find_class(self, module: str, name: str) -> Any:
        if module == 'torch._utils' and name == '_rebuild_tensor_v2':
          return rebuild
        if module == 'torch' and name in _TORCH_DTYPES:
          return name
        if module == 'collections' and name == 'OrderedDict':
          return OrderedDict
        raise UserError(f'{path}: unsupported object {module}.{name} in the checkpoint')

      def persistent_load(self, pid: tuple) -> np.ndarray:
        _, storage_type, key, _, _ = pid
        dtype = _TORCH_DTYPES.get(storage_type)
        if dtype is None:
          raise UserError(f'{path}: unsupported tensor type {storage_type}')
        return np.frombuffer(archive.read(f'{prefix}data/{key}'), dtype=dtype)

    state = Unpickler(io.BytesIO(archive.read(pickle_name))).load()
  return dict(state.get('state_dict', state))


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pth state dict as NumPy arrays: zip-format files are read directly, old-format ones with PyTorch."""
  if zipfile.is_zipfile(path):
    return _read_pth_without_torch(path)
  try:
    import torch
  except ImportError:
    raise UserError(f'{path} is in PyTorch\'s old (non-zip) format; reading it needs PyTorch: pip install torch')
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # Any unreadable file is the user's.
    raise UserError(f'cannot read Inception weights {path}: {str(e).splitlines()[0] if str(e) else e!r}') from None
  state = state.get('state_dict', state)
  return {k: v.detach().cpu().numpy() for k, v in state.items()}


def load_variables(path: str | None = None, download: bool = False) -> dict:
  """Flax variables of the FID InceptionV3 from pytorch-fid's weight file (see `resolve_weights_path`)."""
  return convert_state_dict(load_state_dict(resolve_weights_path(path, download)))


def random_variables(seed: int, calibration_images: np.ndarray, resize_to: int | None = INPUT_SIZE) -> dict:
  """Random weights whose BatchNorm statistics are the batch statistics of `calibration_images` (uint8 NHWC).

  Without calibration a random deep network maps every input to nearly the same features; with it, each layer's
  pre-activations are normalised on real inputs, so features (and FID) depend on the images. Kernels are drawn from
  N(0, 2 / fan_in), BatchNorm scales from U(0.5, 1.5), biases from N(0, 0.2^2).
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

  variables = jax.tree_util.tree_map_with_path(draw, _abstract_variables())
  params = variables['params']
  _, updated = _calibrate(params, variables['batch_stats'], x)
  return jax.tree.map(np.asarray, {'params': params, 'batch_stats': updated['batch_stats']})


@jax.jit
def _calibrate(params: Variables, batch_stats: Variables, x: jax.Array) -> tuple[Any, Variables]:
  return InceptionV3(calibrate=True).apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])


@functools.partial(jax.jit, static_argnames=('resize_to',))
def _preprocess(images: jax.Array, resize_to: int | None) -> jax.Array:
  return preprocess(images, resize_to)


@functools.partial(jax.jit, static_argnames=('block',))
def _network(variables: Variables, x: jax.Array, block: str) -> jax.Array:
  y = InceptionV3().apply(variables, x)[block]
  return y if y.ndim == 2 else jnp.mean(y, axis=(1, 2))  # Spatial mean for the early blocks, as pytorch-fid.


class FeatureExtractor:
  """uint8 images (N, H, W, 3) -> float32 features (N, D), data-parallel over all devices.

  Batches are padded to a multiple of the device count (padding rows are dropped). Preprocessing compiles once per
  input image size, the network once per batch size. In multi-process runs every process passes its own images.
  """

  def __init__(self, variables: Variables, block: str = 'pool3', resize_to: int | None = INPUT_SIZE,
               devices: Iterable[Any] | None = None):
    if block not in BLOCKS:
      raise UserError(f'unknown Inception block {block!r}; known: {", ".join(BLOCKS)}')
    self.block, self.resize_to = block, resize_to
    mesh_config = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
    self.mesh = parallel.create_mesh(mesh_config, list(devices) if devices is not None else None)
    self.num_local_devices = len([d for d in self.mesh.devices.flat if d.process_index == jax.process_index()])
    self.variables = jax.device_put(variables, parallel.replicated(self.mesh))

  def _features(self, variables: Variables, x: jax.Array) -> jax.Array:
    return _network(variables, x, self.block)

  @property
  def dims(self) -> int:
    return {v: k for k, v in BLOCK_BY_DIMS.items()}[self.block]

  def _to_global(self, array: np.ndarray) -> tuple[jax.Array, int]:
    n = len(array)
    pad = -n % self.num_local_devices
    if pad:
      array = np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)])
    return parallel.make_global_batch({'x': array}, self.mesh)['x'], n

  @staticmethod
  def _local_result(out: jax.Array, n: int) -> Callable[[], np.ndarray]:
    def result() -> np.ndarray:
      if jax.process_count() == 1:
        return np.asarray(out)[:n]
      shards = {s.index[0].start or 0: s.data for s in out.addressable_shards}  # This process's rows.
      return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])[:n]
    return result

  def dispatch(self, images: np.ndarray) -> Callable[[], np.ndarray]:
    """Starts the computation and returns a function that waits for this process's (N, D) features."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
    batch, n = self._to_global(images)
    return self._local_result(self._features(self.variables, _preprocess(batch, self.resize_to)), n)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self.dispatch(images)()

  def from_inputs(self, x: np.ndarray) -> np.ndarray:
    """Features of already preprocessed float inputs (N, H, W, 3) in [-1, 1]."""
    batch, n = self._to_global(np.asarray(x, np.float32))
    return self._local_result(self._features(self.variables, batch), n)()
