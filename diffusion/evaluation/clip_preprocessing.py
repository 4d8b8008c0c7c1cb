"""CLIP image preprocessing exactly as transformers' CLIPImageProcessor does it, with either of its resize backends.

  pil          transformers' PIL backend (`CLIPImageProcessorPil`; the original CLIP and transformers 4's
               `CLIPImageProcessor`): PIL resize of the shortest side (bicubic by default), center crop (zero
               padding rounded up on the top / left), rescale, normalise.
  torchvision  transformers 5's default `CLIPImageProcessor` (its torchvision backend), which torchmetrics'
               `CLIPScore` gets from `CLIPProcessor.from_pretrained`: torchvision's antialiased resize of uint8
               tensors on the CPU (PyTorch's fixed-point separable kernels, ported from Pillow-SIMD), center crop
               (padding rounded down on the top / left), rescale and normalise fused into (x - 255 mean) / (255 std).
               Reproduced here in NumPy, bit for bit; torch is not needed.

Both resizes use the same filters but different fixed-point precisions (PIL 22 bits, PyTorch the most that fits
int16), so they differ by one grey level in places: enough to move a CLIP score by ~1e-3. Images that need no resize
come out the same from both.
"""

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from diffusion.errors import UserError
from diffusion.interop import files

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_BACKENDS = ('pil', 'torchvision')
BILINEAR, BICUBIC = 2, 3  # PIL.Image resampling ids, as processor configs store them.


def check_resize_backend(name: Any, key: str = 'resize_backend') -> str:
  if name not in RESIZE_BACKENDS:
    raise UserError(f'{key}={name!r} is not a resize backend; known: {", ".join(RESIZE_BACKENDS)}')
  return name


def _size(value: Any, key: str, source: str) -> tuple[int, int] | int:
  """A processor size entry -> shortest edge (int) or (height, width)."""
  if isinstance(value, int):
    return value
  if isinstance(value, dict):
    if 'shortest_edge' in value and value.get('longest_edge') is None:
      return int(value['shortest_edge'])
    if 'height' in value and 'width' in value:
      return int(value['height']), int(value['width'])
  raise UserError(f'{source}: {key}={value!r} is not supported (expected shortest_edge or height and width)')


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """CLIPImageProcessor's settings; `__call__` maps one RGB uint8 image (H, W, 3) to float32 pixel values (HWC)."""

  size: int | tuple[int, int] = 224  # Shortest edge, or an exact (height, width).
  crop_size: tuple[int, int] = (224, 224)
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: int = BICUBIC
  resize_backend: str = 'pil'

  def __post_init__(self):
    check_resize_backend(self.resize_backend)
    if self.resize_backend == 'torchvision' and self.do_resize and self.resample not in _FILTERS:
      raise UserError(
        f'resample={self.resample!r} is not supported with resize_backend torchvision (supported: '
        f'{BILINEAR} bilinear, {BICUBIC} bicubic)'
      )

  @classmethod
  def from_directory(cls, directory: str, resize_backend: str = 'pil') -> 'ImageProcessing':
    """The settings of `preprocessor_config.json` (or a processor_config.json's image processor), else defaults."""
    config, source = {}, os.path.join(directory, 'preprocessor_config.json')
    if os.path.isfile(source):
      config = files.read_json(source)
    elif os.path.isfile(os.path.join(directory, 'processor_config.json')):
      source = os.path.join(directory, 'processor_config.json')
      config = files.read_json(source).get('image_processor', {})
    fields: dict[str, Any] = {'resize_backend': resize_backend}
    for key in ('do_resize', 'do_center_crop', 'do_rescale', 'rescale_factor', 'do_normalize', 'resample'):
      if config.get(key) is not None:
        fields[key] = config[key]
    for key in ('image_mean', 'image_std'):
      if config.get(key) is not None:
        value = config[key]
        fields[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if config.get('size') is not None:
      fields['size'] = _size(config['size'], 'size', source)
    if config.get('crop_size') is not None:
      crop = _size(config['crop_size'], 'crop_size', source)
      fields['crop_size'] = (crop, crop) if isinstance(crop, int) else crop
    return cls(**fields)

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the resize and crop steps."""
    if self.do_resize:
      height, width = self._resized(height, width)
    return self.crop_size if self.do_center_crop else (height, width)

  def _resized(self, height: int, width: int) -> tuple[int, int]:
    if not isinstance(self.size, int):
      return self.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(self.size * long / short)  # transformers' get_resize_output_image_size.
    return (new_long, self.size) if width <= height else (self.size, new_long)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise UserError(f'expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}')
    torchvision = self.resize_backend == 'torchvision'
    if self.do_resize:
      height, width = self._resized(*image.shape[:2])
      image = (
        torchvision_resize(image, height, width, self.resample)
        if torchvision
        else _pil_resize(image, height, width, self.resample)
      )
    if self.do_center_crop:
      image = center_crop(image, *self.crop_size, round_up_padding=not torchvision)
    return self._torchvision_values(image) if torchvision else self._pil_values(image)

  def _pil_values(self, image: np.ndarray) -> np.ndarray:
    """The PIL backend's rescale (in float64) then normalise (in float32)."""
    x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
    x = x.astype(np.float32)
    if self.do_normalize:
      x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return x

  def _torchvision_values(self, image: np.ndarray) -> np.ndarray:
    """The torchvision backend's float32 arithmetic: with both steps, mean and std scaled by 1 / rescale_factor."""
    x = image.astype(np.float32)
    mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
    if self.do_normalize:
      if self.do_rescale:
        mean, std = mean * np.float32(1.0 / self.rescale_factor), std * np.float32(1.0 / self.rescale_factor)
      return (x - mean) / std
    return x * np.float32(self.rescale_factor) if self.do_rescale else x


def center_crop(image: np.ndarray, crop_height: int, crop_width: int, round_up_padding: bool = True) -> np.ndarray:
  """transformers' center crop: top-left at (size - crop) // 2; an image smaller than the crop is zero-padded,
  centred, with the odd pixel after (`round_up_padding`, PIL backend) or before (torchvision backend)."""
  height, width = image.shape[:2]
  new_height, new_width = max(crop_height, height), max(crop_width, width)
  if (new_height, new_width) != (height, width):
    rounding = math.ceil if round_up_padding else math.floor
    top, left = rounding((new_height - height) / 2), rounding((new_width - width) / 2)
    padded = np.zeros((new_height, new_width, image.shape[2]), image.dtype)
    padded[top : top + height, left : left + width] = image
    image = padded
  top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
  return image[top : top + crop_height, left : left + crop_width]


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  from PIL import Image

  return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


# ----------------------------------------------------------------------------------------------------------------------
# torchvision's antialiased uint8 resize (PyTorch's CPU kernels): separable, horizontal pass first, fixed-point.


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(1.0 - np.abs(x), 0.0)


# PIL resampling id -> (filter support at scale 1, filter).
_FILTERS: dict[int, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {
  BILINEAR: (1.0, _triangle),
  BICUBIC: (2.0, _keys_cubic),
}


def _fixed_point_taps(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(input index (out, taps), int weights (out, taps), precision bits) as PyTorch's
  `_compute_indices_int16_weights_aa`: float64 weights normalised per output, then scaled to the most bits that
  keep the largest weight in int16, rounded half away from zero."""
  half, kernel = _FILTERS[resample]
  scale = in_size / out_size
  support = half * scale if scale >= 1.0 else half
  inverse = 1.0 / scale if scale >= 1.0 else 1.0
  taps = math.ceil(support) * 2 + 1
  center = scale * (np.arange(out_size) + 0.5)
  start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
  count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - start
  j = np.arange(taps)
  weights = np.where(j < count[:, None], kernel((j + start[:, None] - center[:, None] + 0.5) * inverse), 0.0)
  total = np.zeros(out_size)
  for k in range(taps):  # Summed in order, as the C loop does (numpy's pairwise sum may round differently).
    total = total + weights[:, k]
  weights = np.where(total[:, None] != 0, weights / np.where(total == 0, 1.0, total)[:, None], weights)
  largest = weights.max()
  precision = 0
  while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  scaled = weights * (1 << precision)
  fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
  return np.minimum(start[:, None] + j, in_size - 1), fixed, precision


def _resample_axis(image: np.ndarray, axis: int, out_size: int, resample: int) -> np.ndarray:
  """One pass: each output pixel is round(sum of weight * input), clamped to uint8, in integer arithmetic."""
  if image.shape[axis] == out_size:
    return image
  index, weights, precision = _fixed_point_taps(image.shape[axis], out_size, resample)
  x = np.moveaxis(image, axis, 0).astype(np.int64)
  expand = (slice(None),) + (None,) * (x.ndim - 1)
  acc = np.full((out_size, *x.shape[1:]), 1 << (precision - 1), np.int64)
  for k in range(index.shape[1]):
    acc += weights[:, k][expand] * x[index[:, k]]
  return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def torchvision_resize(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
  """A uint8 (H, W, C) image resized as `torchvision.transforms.v2.functional.resize(..., antialias=True)` does on
  the CPU (bilinear: where PyTorch has its native uint8 kernel, i.e. x86 with AVX2 and ARM; bicubic: everywhere)."""
  if resample not in _FILTERS:
    raise UserError(
      f'resample={resample!r} is not supported by the torchvision resize (supported: {BILINEAR} '
      f'bilinear, {BICUBIC} bicubic)'
    )
  return _resample_axis(_resample_axis(np.asarray(image, np.uint8), 1, width, resample), 0, height, resample)


def read_rgb(path: str) -> np.ndarray | None:
  """An image file as RGB uint8 (transparency composited onto white, as transformers does), or None if unreadable."""
  from PIL import Image

  try:
    with Image.open(path) as image:
      if 'A' in image.getbands() or image.info.get('transparency') is not None:
        rgba = image.convert('RGBA')
        image = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
      return np.asarray(image.convert('RGB'))
  except Exception:  # pylint: disable=broad-except  # Any unreadable file is skipped and counted.
    return None
