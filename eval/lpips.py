r"""LPIPS between two image folders, paired by sorted file name, computed like the `lpips` package (v0.1).

  python -m eval.lpips DIR_A DIR_B --vgg_weights VGG16.pth --lpips_weights HEADS.pth [--net vgg|alex]

`--vgg_weights`: torchvision's backbone state dict (`vgg16-397923af.pth`, or `alexnet-owt-7be5be79.pth` with
`--net alex`; default: torch hub's cache); `--lpips_weights`: the package's linear heads (`weights/v0.1/<net>.pth`;
default: the installed package's file). `random` for either is the labelled choice of random weights. Both files are
read without PyTorch. Prints `LPIPS: <mean>` over the pairs (images of a pair must have the same size).
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  return dict(
    vgg_weights=f.DEFINE_string('vgg_weights', '', "Backbone state dict (torchvision); 'random': random weights."),
    lpips_weights=f.DEFINE_string('lpips_weights', '', "The lpips package's linear heads; 'random': random weights."),
    net=f.DEFINE_enum('net', 'vgg', ['vgg', 'alex'], "LPIPS backbone, as the package's --net."),
    batch_size=f.DEFINE_integer('batch_size', 16, 'Image pairs per batch.'),
  )


def folder_lpips(dir_a: str, dir_b: str, params: dict, net: str = 'vgg', batch_size: int = 16) -> tuple[float, int]:
  """(mean LPIPS, number of pairs) over the images of two folders paired by sorted file name."""
  import jax

  from diffusion.evaluation import fid
  from diffusion.models import lpips

  files_a, files_b = fid.list_images(dir_a), fid.list_images(dir_b)
  if len(files_a) != len(files_b) or not files_a:
    raise UserError(f'{dir_a} has {len(files_a)} images and {dir_b} has {len(files_b)}: need the same number, >= 1')
  distance = jax.jit(lambda p, a, b: lpips.LPIPS(net).apply({'params': p}, a, b))
  total = 0.0
  for start in range(0, len(files_a), batch_size):
    pairs = [
      (_read(a), _read(b)) for a, b in zip(files_a[start : start + batch_size], files_b[start : start + batch_size])
    ]
    for (a, pa), (b, pb) in pairs:
      if a.shape != b.shape:
        raise UserError(f'{pa} is {a.shape[1]}x{a.shape[0]} but {pb} is {b.shape[1]}x{b.shape[0]}: pairs must match')
    for a, b in _same_size_runs([(a, b) for (a, _), (b, _) in pairs]):
      total += float(np.sum(np.asarray(distance(params, _to_unit(a), _to_unit(b)))))
  return total / len(files_a), len(files_a)


def _to_unit(images: np.ndarray) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def _read(path: str) -> tuple[np.ndarray, str]:
  from diffusion.evaluation import fid

  image = fid._read_rgb(path)  # pylint: disable=protected-access
  if image is None:
    raise UserError(f'cannot read image {path}')
  return image, path


def _same_size_runs(pairs: list) -> list[tuple[np.ndarray, np.ndarray]]:
  """Consecutive pairs of one image size, stacked into (B, H, W, 3) batches."""
  runs: list = []
  for a, b in pairs:
    if runs and runs[-1][0][0].shape == a.shape:
      runs[-1][0].append(a)
      runs[-1][1].append(b)
    else:
      runs.append(([a], [b]))
  return [(np.stack(a), np.stack(b)) for a, b in runs]


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  dir_a, dir_b = cli.parse_flags(argv, config_flag=None, positional=('DIR_A', 'DIR_B'))
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(v['batch_size'] >= 1, f'--batch_size must be >= 1, got {v["batch_size"]}')
  from diffusion.interop import lpips as lpips_weights

  try:
    params = lpips_weights.load_params(v['vgg_weights'], v['lpips_weights'], v['net'])
  except UserError as e:
    raise UserError(f'{e} (--vgg_weights / --lpips_weights)') from None
  print(lpips_weights.describe(v['vgg_weights'], v['lpips_weights'], v['net']), file=sys.stderr, flush=True)
  value, _ = folder_lpips(dir_a, dir_b, params, v['net'], v['batch_size'])
  print(f'LPIPS: {value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
