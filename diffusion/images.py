"""Image helpers shared by sampling, logging and evaluation: uint8 conversion, grids, PNG files, image inputs.

Arrays are NHWC; model images are floats in [-1, 1], files and grids are uint8.
"""

from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion.errors import UserError


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images (N, H, W, C) into one (rows*H, cols*W, C) image with a white border."""
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
  return grid


def to_uint8(images: Any) -> np.ndarray:
  """[-1, 1] floats -> uint8, rounding like diffusers' `numpy_to_pil`."""
  images = np.asarray(images, dtype=np.float32)
  return np.round(np.clip((images + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def save_png(image: np.ndarray, path: str, upscale: int = 1) -> None:
  pil = Image.fromarray(image)
  if upscale > 1:
    pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
  pil.save(path)


def _open_rgb(path: str) -> Image.Image:
  try:
    return Image.open(path).convert('RGB')
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read image {path!r}: {e}') from None


def read_image(path: str) -> np.ndarray:
  """An RGB image file as uint8 (H, W, 3) at its own size."""
  return np.asarray(_open_rgb(path), np.uint8)


def load_image(path: str, size: int) -> np.ndarray:
  """An RGB image file as (size, size, 3) floats in [-1, 1] (resized with bicubic filtering if needed)."""
  image = _open_rgb(path)
  if image.size != (size, size):
    image = image.resize((size, size), Image.BICUBIC)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def load_mask(path: str, image_path: str, size: int) -> np.ndarray:
  """A mask file (white = repaint, black = keep) as (size, size, 1) in {0, 1}; it must match the init image's
  size (then both are resized alike)."""
  try:
    mask = Image.open(path).convert('L')
    image_size = Image.open(image_path).size
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read mask {path!r}: {e}') from None
  if mask.size != image_size:
    raise UserError(
      f'the mask {path!r} is {mask.size[0]}x{mask.size[1]} but the init image is '
      f'{image_size[0]}x{image_size[1]}: they must have the same size'
    )
  if mask.size != (size, size):
    mask = mask.resize((size, size), Image.NEAREST)
  return (np.asarray(mask, np.float32) > 127.5).astype(np.float32)[..., None]


def labelled_grid(
  images: np.ndarray, row_labels: Sequence[str], column_labels: Sequence[str], min_cell: int = 96
) -> Image.Image:
  """uint8 images (rows, columns, H, W, 3) as one image with text labels (PIL's default font) on both edges;
  small images are enlarged by an integer factor (nearest neighbour) to at least `min_cell` pixels."""
  from PIL import ImageDraw, ImageFont

  num_rows, num_cols, h, w, _ = images.shape
  scale = max(1, -(-min_cell // max(h, w)))
  ch, cw, pad = h * scale, w * scale, 4
  font = ImageFont.load_default()
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  text_w = lambda t: draw.textbbox((0, 0), t, font=font)[2]
  left = min(320, max(text_w(t) for t in row_labels) + 2 * pad)
  top = max(draw.textbbox((0, 0), t, font=font)[3] for t in column_labels) + 2 * pad
  grid = Image.new('RGB', (left + num_cols * (cw + pad) + pad, top + num_rows * (ch + pad) + pad), 'white')
  draw = ImageDraw.Draw(grid)
  for col, label in enumerate(column_labels):
    draw.text((left + pad + col * (cw + pad), pad), label, fill='black', font=font)
  for row, label in enumerate(row_labels):
    y = top + pad + row * (ch + pad)
    draw.text((pad, y + ch // 2 - 6), label, fill='black', font=font)
    for col in range(num_cols):
      cell = Image.fromarray(images[row, col]).resize((cw, ch), Image.NEAREST)
      grid.paste(cell, (left + pad + col * (cw + pad), y))
  return grid
