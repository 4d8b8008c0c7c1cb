"""Invisible watermarks for provenance: the `invisible-watermark` package's DWT-DCT schemes, in numpy and PyWavelets.

  marked = watermark.encode(images, 'ldm-jax', 'dwtDct')      # uint8 RGB (H, W, 3) or (N, H, W, 3)
  watermark.carries(marked[0], 'ldm-jax', 'dwtDct')           # True
  watermark.decode(marked[0], 7, 'dwtDct')                    # b'ldm-jax' (7 bytes; decode_bits for raw bits)

Both methods follow `invisible-watermark` 0.2.0 (what Stable Diffusion's reference scripts use) step for step, so its
`WatermarkDecoder('bytes', 8 * len(text))` reads our marks and ours reads its marks; on the same input our marked image
is within one grey level of the package's (in practice identical). The image goes to OpenCV's 8-bit YUV (BT.601,
fixed-point, exactly as `cv2.cvtColor(bgr, COLOR_BGR2YUV)`); the U plane, cropped to a multiple of 4, gets a one-level
Haar DWT; its approximation band is cut into 4x4 blocks, block k carrying bit k mod len(bits) (bits of the UTF-8 text,
most significant first), and the result is written back as uint8 (truncated) and converted back to RGB:

  - `dwtDct`: the block's largest-magnitude coefficient after the first is set to (|v| // 36 + 0.25 + 0.5 bit) * 36
    with v's sign; read back as bit = (|v| mod 36 > 18).
  - `dwtDctSvd`: the largest singular value s of the block's orthonormal 2-D DCT is set to
    (s // 36 + 0.25 + 0.5 bit) * 36; read back as bit = (s mod 36 > 18).

The decoder takes the majority over the blocks of each bit (a tie reads 1). As in the package, the inverse DWT takes
the horizontal and vertical detail bands in swapped order (so the U plane's details come back transposed), and
images with height x width < 256 x 256 are not marked (`markable`): `encode` returns them unchanged. An image
carries at most (H // 8) * (W // 8) bits; a longer text is a `UserError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffusion.errors import UserError

METHODS = ('dwtDct', 'dwtDctSvd')
DEFAULT_TEXT = 'ldm-jax'
DEFAULT_METHOD = 'dwtDct'
MIN_SIDE = 256
MIN_PIXELS = MIN_SIDE * MIN_SIDE  # The package's rule: smaller images (height x width) are not marked.
_SCALE = 36.0  # The package's scale of the U plane (channel 1) for both methods; Y and V are left alone.
_BLOCK = 4

# OpenCV's 8-bit YUV <-> BGR conversion (modules/imgproc/src/color_yuv.simd.hpp): coefficients * 2^14, rounded shifts.
_SHIFT = 14
_R2Y, _G2Y, _B2Y, _R2V, _B2U = 4899, 9617, 1868, 14369, 8061
_V2R, _V2G, _U2G, _U2B = 18678, -9519, -6472, 33292


def _descale(x: np.ndarray) -> np.ndarray:
  return (x + (1 << (_SHIFT - 1))) >> _SHIFT


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
  """uint8 RGB (..., 3) -> uint8 YUV (..., 3), bit for bit `cv2.cvtColor(rgb[..., ::-1], cv2.COLOR_BGR2YUV)`."""
  r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
  y = _descale(r * _R2Y + g * _G2Y + b * _B2Y)
  u = _descale((b - y) * _B2U + (128 << _SHIFT))
  v = _descale((r - y) * _R2V + (128 << _SHIFT))
  return np.clip(np.stack([y, u, v], -1), 0, 255).astype(np.uint8)


def yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
  """uint8 YUV (..., 3) -> uint8 RGB, bit for bit `cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[..., ::-1]`."""
  y, u, v = (yuv[..., i].astype(np.int32) for i in range(3))
  u, v = u - 128, v - 128
  r = y + _descale(v * _V2R)
  g = y + _descale(u * _U2G + v * _V2G)
  b = y + _descale(u * _U2B)
  return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def markable(height: int, width: int) -> bool:
  """Whether an image of this size gets a mark (the package's rule: height x width >= 256 x 256)."""
  return height * width >= MIN_PIXELS


def capacity(height: int, width: int) -> int:
  """The most bits an image of this size carries: one per 4x4 block of the DWT band, (H // 8) * (W // 8)."""
  return (height // 8) * (width // 8)


def text_bits(text: str) -> np.ndarray:
  """The bits a text is written as: its UTF-8 bytes, most significant bit first (the package's 'bytes' type)."""
  return np.unpackbits(np.frombuffer(text.encode('utf-8'), np.uint8))


def check(text: str, method: str, height: int | None = None, width: int | None = None) -> None:
  """A `UserError` for an unknown method, an empty text or (given a markable size) a text longer than it carries."""
  if method not in METHODS:
    raise UserError(f'unknown watermark method {method!r} (known: {", ".join(METHODS)})')
  if not text:
    raise UserError("the watermark text is empty (give a text, or 'none' for no watermark)")
  if height is None or width is None or not markable(height, width):
    return
  bits, room = 8 * len(text.encode('utf-8')), capacity(height, width)
  if bits > room:
    raise UserError(
      f'the watermark text {text!r} is {bits // 8} bytes but a {width}x{height} image carries at most {room // 8} '
      f'bytes ({room} bits): give a shorter text'
    )


def _channel_blocks(frame: np.ndarray) -> np.ndarray:
  """The 4x4 blocks of a DWT band (R, C) as (R // 4 * C // 4, 4, 4) in the package's order (row-major)."""
  rows, cols = frame.shape[0] // _BLOCK, frame.shape[1] // _BLOCK
  blocks = frame[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK).transpose(0, 2, 1, 3)
  return blocks.reshape(rows * cols, _BLOCK, _BLOCK)


def _put_blocks(frame: np.ndarray, blocks: np.ndarray) -> None:
  rows, cols = frame.shape[0] // _BLOCK, frame.shape[1] // _BLOCK
  grid = blocks.reshape(rows, cols, _BLOCK, _BLOCK).transpose(0, 2, 1, 3).reshape(rows * _BLOCK, cols * _BLOCK)
  frame[: rows * _BLOCK, : cols * _BLOCK] = grid


def _dct2(blocks: np.ndarray, inverse: bool = False) -> np.ndarray:
  import scipy.fft

  transform = scipy.fft.idctn if inverse else scipy.fft.dctn
  return transform(blocks, type=2, norm='ortho', axes=(-2, -1))


def _quantize(value: np.ndarray, bits: np.ndarray) -> np.ndarray:
  """The package's embedding rule, in its order of operations: (value // 36 + 0.25 + 0.5 bit) * 36."""
  return (value // _SCALE + 0.25 + 0.5 * bits) * _SCALE


def _largest_after_first(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(flat blocks, index of each block's largest-magnitude coefficient after the first)."""
  flat = blocks.reshape(len(blocks), _BLOCK * _BLOCK)
  return flat, np.argmax(np.abs(flat[:, 1:]), axis=1) + 1


def _embed(blocks: np.ndarray, bits: np.ndarray, method: str) -> np.ndarray:
  if method == 'dwtDct':
    flat, pos = _largest_after_first(blocks)
    rows = np.arange(len(flat))
    value = flat[rows, pos]
    flat = flat.copy()
    flat[rows, pos] = np.where(value >= 0.0, 1.0, -1.0) * _quantize(np.abs(value), bits)
    return flat.reshape(blocks.shape)
  u, s, vt = np.linalg.svd(_dct2(blocks))
  s[:, 0] = _quantize(s[:, 0], bits)
  return _dct2(np.matmul(u, np.matmul(s[..., None] * np.eye(_BLOCK), vt)), inverse=True)


def _read_scores(blocks: np.ndarray, method: str) -> np.ndarray:
  if method == 'dwtDct':
    flat, pos = _largest_after_first(blocks)
    value = np.abs(flat[np.arange(len(flat)), pos])
  else:
    value = np.linalg.svd(_dct2(blocks), compute_uv=False)[:, 0]
  return (value % _SCALE > 0.5 * _SCALE).astype(np.float64)


def _u_band(yuv: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  import pywt

  rows, cols = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
  return pywt.dwt2(yuv[:rows, :cols, 1], 'haar')


def _encode_one(image: np.ndarray, bits: np.ndarray, method: str) -> np.ndarray:
  import pywt

  yuv = rgb_to_yuv(image)
  approx, (horizontal, vertical, diagonal) = _u_band(yuv)
  blocks = _channel_blocks(approx)
  _put_blocks(approx, _embed(blocks, bits[np.arange(len(blocks)) % len(bits)], method))
  rows, cols = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
  plane = pywt.idwt2((approx, (vertical, horizontal, diagonal)), 'haar')  # The package's order (h and v swapped).
  # numpy's float -> uint8 write truncates (the package's); the U plane stays far inside [0, 255] after marking.
  yuv[:rows, :cols, 1] = np.clip(plane, 0, 255)
  return yuv_to_rgb(yuv)


def _as_image_batch(images: Any) -> tuple[np.ndarray, bool]:
  images = np.asarray(images)
  single = images.ndim == 3
  batch = images[None] if single else images
  if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
    raise UserError(f'watermarks take uint8 RGB images (H, W, 3) or (N, H, W, 3), got {images.dtype} {images.shape}')
  return batch, single


def encode(images: Any, text: str, method: str = DEFAULT_METHOD) -> np.ndarray:
  """uint8 RGB images (H, W, 3) or (N, H, W, 3) with `text` marked in by `method`; images smaller than the
  package's minimum (`markable`) come back unchanged. A text longer than the images carry is a `UserError`."""
  batch, single = _as_image_batch(images)
  height, width = batch.shape[1:3]
  check(text, method, height, width)
  if not markable(height, width):
    return np.array(images, np.uint8)
  bits = text_bits(text).astype(np.float64)
  out = np.stack([_encode_one(image, bits, method) for image in batch])
  return out[0] if single else out


def decode_bits(image: Any, num_bits: int, method: str = DEFAULT_METHOD) -> np.ndarray:
  """The `num_bits` bits (bool) an RGB uint8 image (H, W, 3) carries by `method`: each bit the majority of its
  blocks, as the package's `WatermarkDecoder` reads them."""
  batch, _ = _as_image_batch(image)
  if len(batch) != 1:
    raise UserError(f'decode takes one image (H, W, 3), got {np.shape(image)}')
  check('-', method)
  height, width = batch.shape[1:3]
  if not 1 <= num_bits <= capacity(height, width):
    raise UserError(f'a {width}x{height} image carries 1 to {capacity(height, width)} bits, not {num_bits}')
  approx, _ = _u_band(rgb_to_yuv(batch[0]))
  scores = _read_scores(_channel_blocks(approx), method)
  which = np.arange(len(scores)) % num_bits
  average = np.bincount(which, scores, num_bits) / np.bincount(which, minlength=num_bits)
  return average * 255 > 127


def decode(image: Any, num_bytes: int, method: str = DEFAULT_METHOD) -> bytes:
  """The `num_bytes` bytes an image carries (see `decode_bits`)."""
  return np.packbits(decode_bits(image, 8 * num_bytes, method)).tobytes()


def carries(image: Any, text: str, method: str = DEFAULT_METHOD) -> bool:
  """Whether an RGB uint8 image (H, W, 3) carries `text` by `method`: every bit read back as written. Images too
  small to be marked (or to hold the text) never carry it."""
  check(text, method)
  height, width = np.shape(image)[:2]
  bits = text_bits(text)
  if not markable(height, width) or len(bits) > capacity(height, width):
    return False
  return bool(np.array_equal(decode_bits(image, len(bits), method), bits.astype(bool)))
