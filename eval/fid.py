r"""Fréchet Inception Distance between two image folders or `.npz` statistics, computed like pytorch-fid.

  python -m eval.fid PATH1 PATH2 [--inception_weights FILE] [--batch_size N] [--dims 2048]
  python -m eval.fid IMAGES OUT.npz --save_stats [--inception_weights FILE]

Each PATH is a folder of images or an `.npz` of statistics in pytorch-fid's format (`mu`, `sigma`), so published
stats files work here and ours work in pytorch-fid. Prints `FID: <value>`. The statistics, the distance and the
Inception network live in `diffusion.evaluation.fid` / `.inception`; on several processes each reads its share of a
folder. Unreadable image files are skipped and counted. `--fid_method sqrtm` runs pytorch-fid's own square root.
The old spellings `--weights`, `--batch-size`, `--fid-method` and `--save-stats` keep working.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit
from diffusion.evaluation.fid import IMAGE_EXTENSIONS, list_images  # noqa: F401  # Used by eval/clip_score.py.


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  defined = dict(
    inception_weights=f.DEFINE_string(
      'inception_weights',
      None,
      'pytorch-fid weight file '
      '(pt_inception-2015-12-05-*.pth); default: the torch hub cache, where '
      'pytorch-fid keeps it.',
    ),
    batch_size=f.DEFINE_integer('batch_size', 50, 'Images per Inception batch on each process.'),
    dims=f.DEFINE_enum(
      'dims',
      '2048',
      ['64', '192', '768', '2048'],
      'Inception features: 2048 = pool3 (standard); smaller = earlier blocks.',
    ),
    download=f.DEFINE_bool('download', False, 'Download the weights into the cache if missing.'),
    fid_method=f.DEFINE_enum(
      'fid_method',
      'eigh',
      ['eigh', 'sqrtm'],
      "Tr sqrt(S1 S2) by symmetric eigendecompositions (fast) or scipy's sqrtm (pytorch-fid's).",
    ),
    save_stats=f.DEFINE_bool('save_stats', False, 'Write the stats of PATH1 (images) to PATH2 (.npz).'),
  )
  for old, name in (
    ('weights', 'inception_weights'),
    ('batch-size', 'batch_size'),
    ('fid-method', 'fid_method'),
    ('save-stats', 'save_stats'),
  ):
    cli.alias(old, name)
  return defined


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  path1, path2 = cli.parse_flags(argv, config_flag=None, positional=('PATH1', 'PATH2'))
  v = {name: flag.value for name, flag in defined.items()}
  dims = int(v['dims'])
  cli.require(v['batch_size'] >= 1, f'--batch_size must be >= 1, got {v["batch_size"]}')
  for p in [path1] if v['save_stats'] else [path1, path2]:
    cli.require(os.path.exists(p), f'invalid path: {p}')
  cli.require(not (v['save_stats'] and os.path.exists(path2)), f'existing output file: {path2}')
  import jax

  from diffusion import parallel
  from diffusion.evaluation import fid

  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.
  extractor = None

  def get_extractor():
    nonlocal extractor
    if extractor is None:
      from diffusion.evaluation import inception
      from diffusion.interop import inception as inception_weights

      weights = inception_weights.resolve_weights_path(v['inception_weights'], v['download'])
      extractor = inception.FeatureExtractor(inception_weights.load_variables(weights), inception.BLOCK_BY_DIMS[dims])
      print(f'Inception weights: {weights}', file=sys.stderr, flush=True)
    return extractor

  start = time.time()
  if v['save_stats']:
    mu, sigma, counts = fid.folder_statistics(path1, get_extractor(), v['batch_size'])
    if jax.process_index() == 0:
      fid.save_stats(path2, mu, sigma)
    print(f'wrote stats of {counts.read} images to {path2} ({time.time() - start:.1f}s)', file=sys.stderr)
    return
  stats1 = fid.path_statistics(path1, get_extractor, v['batch_size'], dims)
  stats2 = fid.path_statistics(path2, get_extractor, v['batch_size'], dims)
  try:
    value = fid.frechet_distance(*stats1, *stats2, method=v['fid_method'])
  except ValueError as e:  # Not positive semi-definite: the statistics are not covariances of features.
    raise UserError(str(e)) from None
  print(f'FID: {value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
