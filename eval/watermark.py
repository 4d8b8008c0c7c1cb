r"""How many images of a folder carry an invisible watermark (the one sample.py writes).

  python -m eval.watermark --images DIR [--watermark ldm-jax] [--watermark_method dwtDct|dwtDctSvd]

Reads every image file directly in DIR (sorted; RGB) and prints `watermark: <k>/<n> images carry <text>`: k images
carry every bit of the text by that method (see `diffusion.watermark`; images under 256x256 pixels never carry one).
Unreadable image files are skipped and counted on stderr.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

from diffusion import cli, watermark
from diffusion.errors import UserError, user_errors_exit

IMAGE_EXTENSIONS = ('bmp', 'jpg', 'jpeg', 'png', 'ppm', 'tif', 'tiff', 'webp')


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  return dict(
    images=f.DEFINE_string('images', None, 'A folder of images.'),
    watermark=f.DEFINE_string('watermark', watermark.DEFAULT_TEXT, 'The text to look for.'),
    watermark_method=f.DEFINE_enum(
      'watermark_method', watermark.DEFAULT_METHOD, list(watermark.METHODS), 'The scheme it was written with.'
    ),
  )


def count_marked(folder: str, text: str, method: str = watermark.DEFAULT_METHOD) -> tuple[int, int, list[str]]:
  """(images carrying `text`, images read, unreadable files) over the image files directly in `folder`."""
  from PIL import Image

  watermark.check(text, method)
  if not os.path.isdir(folder):
    raise UserError(f'--images {folder!r} is not a folder')
  names = sorted(n for n in os.listdir(folder) if '.' in n and n.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS)
  if not names:
    raise UserError(f'no images in {folder!r} (extensions: {", ".join(IMAGE_EXTENSIONS)})')
  carrying, read, unreadable = 0, 0, []
  for name in names:
    try:
      with Image.open(os.path.join(folder, name)) as image:
        rgb = np.asarray(image.convert('RGB'))
    except Exception:  # pylint: disable=broad-except  # Any unreadable file is skipped and counted.
      unreadable.append(name)
      continue
    read += 1
    carrying += watermark.carries(rgb, text, method)
  if not read:
    raise UserError(f'no readable images in {folder!r}: all {len(unreadable)} files failed to decode')
  return carrying, read, unreadable


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None, required=('images',), doc=__doc__)
  v = {name: flag.value for name, flag in defined.items()}
  carrying, read, unreadable = count_marked(v['images'], v['watermark'], v['watermark_method'])
  if unreadable:
    print(f'skipped {len(unreadable)} unreadable image file(s), e.g. {unreadable[0]}', file=sys.stderr, flush=True)
  print(f'watermark: {carrying}/{read} images carry {v["watermark"]}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
