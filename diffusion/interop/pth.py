"""PyTorch `.pth` state dicts read into NumPy arrays without PyTorch: both of `torch.save`'s formats.

The zip format (torch >= 1.6: `data.pkl` plus one file per storage) and the legacy format (torch < 1.6: a magic
number, protocol and system-info pickles, the state-dict pickle, the list of storage keys, then each storage as an
int64 element count and its raw bytes). pytorch-fid's Inception weights are zip files; the `lpips` package's
linear heads and torchvision's older VGG16 file are legacy pickles. One reader serves every weight loader.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO

import numpy as np

from diffusion.errors import UserError

_TORCH_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'BFloat16Storage': None,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
  """One storage: its dtype and (once read) its elements."""

  def __init__(self, dtype: Any, data: np.ndarray | None = None):
    self.dtype, self.data = np.dtype(dtype), data


class _Tensor:
  """A tensor whose storage may not be read yet (legacy files store the data after the pickle)."""

  def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def array(self) -> np.ndarray:
    data, itemsize = self.storage.data, self.storage.dtype.itemsize
    if not self.size:
      return np.array(data[self.offset])
    strides = tuple(s * itemsize for s in self.stride)
    return np.lib.stride_tricks.as_strided(data[self.offset :], self.size, strides).copy()


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _Tensor:
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *unused) -> _Tensor:
  return tensor


def _unpickler(path: str, stream: BinaryIO, persistent_load) -> pickle.Unpickler:
  class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
      if module == 'torch._utils' and name == '_rebuild_tensor_v2':
        return _rebuild_tensor
      if module == 'torch._utils' and name == '_rebuild_parameter':
        return _rebuild_parameter
      if module == 'torch' and name in _TORCH_DTYPES:
        return name
      if module == 'collections' and name == 'OrderedDict':
        return OrderedDict
      raise UserError(f'{path}: unsupported object {module}.{name} in the checkpoint')

    def persistent_load(self, pid: tuple) -> Any:
      return persistent_load(pid)

  return Unpickler(stream)


def _dtype(path: str, storage_type: Any) -> Any:
  dtype = _TORCH_DTYPES.get(storage_type)
  if dtype is None:
    raise UserError(f'{path}: unsupported tensor type {storage_type}')
  return dtype


def _arrays(path: str, state: Any) -> dict[str, np.ndarray]:
  state = state.get('state_dict', state) if isinstance(state, dict) else state
  if not isinstance(state, dict):
    raise UserError(f'{path} holds a {type(state).__name__}, not a state dict')
  return {k: v.array() for k, v in state.items() if isinstance(v, _Tensor)}


def read_zip_pth(path: str) -> dict[str, np.ndarray]:
  """A state dict saved by `torch.save` in the zip format, as NumPy arrays."""
  if not zipfile.is_zipfile(path):
    raise UserError(f'{path} is not a PyTorch zip checkpoint')
  with zipfile.ZipFile(path) as archive:
    pickle_name = next((n for n in archive.namelist() if n.endswith('data.pkl')), None)
    if pickle_name is None:
      raise UserError(f'{path} holds no data.pkl: not a torch.save file')
    prefix = pickle_name[: -len('data.pkl')]

    def load(pid: tuple) -> _Storage:
      _, storage_type, key, _, _ = pid
      dtype = _dtype(path, storage_type)
      return _Storage(dtype, np.frombuffer(archive.read(f'{prefix}data/{key}'), dtype=dtype))

    state = _unpickler(path, io.BytesIO(archive.read(pickle_name)), load).load()
    return _arrays(path, state)


def read_legacy_pth(path: str) -> dict[str, np.ndarray]:
  """A state dict saved by `torch.save` in the legacy (pre-1.6, non-zip) format, as NumPy arrays."""
  storages: dict[str, _Storage] = {}

  def load(pid: tuple) -> Any:
    kind, storage_type, key, _, numel, view = pid[0], *pid[1:]
    if kind != 'storage' or view is not None:
      raise UserError(f'{path}: unsupported persistent object {kind!r} (a storage view or a module)')
    del numel  # Each storage's element count is read again before its data.
    return storages.setdefault(str(key), _Storage(_dtype(path, storage_type)))

  try:
    with open(path, 'rb') as f:
      if pickle.load(f) != _LEGACY_MAGIC:
        raise UserError(f'{path} is not a PyTorch checkpoint (wrong magic number)')
      pickle.load(f), pickle.load(f)  # Protocol version and system info.
      state = _unpickler(path, f, load).load()
      for key in pickle.load(f):
        storage = storages[str(key)]
        count = int(np.frombuffer(f.read(8), '<i8')[0])
        raw = f.read(count * storage.dtype.itemsize)
        if len(raw) != count * storage.dtype.itemsize:
          raise UserError(f'{path} is truncated (storage {key})')
        storage.data = np.frombuffer(raw, storage.dtype.newbyteorder('<'))
  except (OSError, pickle.UnpicklingError, EOFError, KeyError, IndexError, ValueError) as e:
    raise UserError(f'cannot read {path}: {type(e).__name__}: {e}') from None
  return _arrays(path, state)


def read_pth(path: str) -> dict[str, np.ndarray]:
  """A `.pth` state dict (either `torch.save` format; a top-level 'state_dict' entry is unwrapped) as NumPy
  arrays; a missing or unreadable file is a `UserError`."""
  try:
    is_zip = zipfile.is_zipfile(path)
  except OSError as e:
    raise UserError(f'cannot read {path}: {e}') from None
  return read_zip_pth(path) if is_zip else read_legacy_pth(path)
