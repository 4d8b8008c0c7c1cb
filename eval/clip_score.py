r"""CLIP score of a folder of images paired with a captions file (the library: `diffusion.evaluation.clip_score`).

  python -m eval.clip_score --images DIR --captions FILE --clip_model DIR [--batch_size N]
      [--resize_backend pil|torchvision] [--per_pair OUT.tsv]

Image files of DIR (sorted by name) are paired with the prompts of FILE in order (one per non-blank line, read as
every prompts file is: `diffusion.prompts`). Per pair the score is 100 * cos(image embedding, text embedding); the
printed value is max(mean over pairs, 0), as torchmetrics' `CLIPScore`. Prints progress (images/s) on stderr and
`CLIP score: <value>`. Unreadable image files are skipped and counted, and their captions dropped. `--model` is an
alias of `--clip_model` (the flag eval/run.py has too).

`--resize_backend pil` (default) resizes as transformers' PIL-backend CLIPImageProcessor (the original CLIP,
transformers 4); `torchvision` as transformers 5's default CLIPImageProcessor, which is what torchmetrics' CLIPScore
uses there. The two differ by ~1e-3 on images that need resizing: pick the one of the numbers you compare with.
"""

import os
import sys
import time
from typing import Iterator, Sequence

import numpy as np
from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit
from diffusion.evaluation import clip_preprocessing
from diffusion.evaluation.clip_score import MODEL_DIR_HELP, CLIPScorer, clip_score
from diffusion.prompts import read_prompts_file
from eval import fid


def iter_pairs(
  files: Sequence[str], captions: Sequence[str], batch_size: int, skipped: list[str]
) -> Iterator[tuple[list[np.ndarray], list[str]]]:
  """Batches of (readable images, their captions); unreadable files are appended to `skipped`."""
  images, texts = [], []
  for path, caption in zip(files, captions):
    image = clip_preprocessing.read_rgb(path)
    if image is None:
      skipped.append(path)
      continue
    images.append(image)
    texts.append(caption)
    if len(images) == batch_size:
      yield images, texts
      images, texts = [], []
  if images:
    yield images, texts


def score_folder(
  images_dir: str, captions_file: str, scorer: CLIPScorer, batch_size: int = 50, log=cli.stderr
) -> tuple[float, np.ndarray, list[str]]:
  """(CLIP score, per-pair scores, skipped files) of a folder of images paired with a captions file."""
  files = fid.list_images(images_dir)
  captions, _ = read_prompts_file(captions_file)
  if not files:
    raise UserError(f'no images in {images_dir!r} (extensions: {", ".join(fid.IMAGE_EXTENSIONS)})')
  if len(files) != len(captions):
    raise UserError(
      f'{len(files)} image files in {images_dir!r} but {len(captions)} captions in '
      f'{captions_file!r}: they are paired in order, so the counts must match'
    )
  skipped: list[str] = []
  scores, start, done = [], time.time(), 0
  for images, texts in iter_pairs(files, captions, batch_size, skipped):
    scores.append(scorer.scores(images, texts))
    done += len(images)
    log(f'{done}/{len(files)} images, {done / max(time.time() - start, 1e-9):.1f} images/s')
  if skipped:
    log(f'skipped {len(skipped)} unreadable image file(s) and dropped their captions (e.g. {skipped[0]})')
  if not scores:
    raise UserError(f'no readable images in {images_dir!r}: all {len(skipped)} files failed to decode')
  per_pair = np.concatenate(scores)
  return clip_score(per_pair), per_pair, skipped


def _define_flags() -> dict:
  """The command-line flags (defined by `main`, so importing this module defines none)."""
  f = flags
  defined = dict(
    images=f.DEFINE_string('images', None, 'Folder of images, paired with the captions in name order.'),
    captions=f.DEFINE_string('captions', None, 'Text file, one caption per non-blank line.'),
    clip_model=f.DEFINE_string('clip_model', None, f'The CLIP model: {MODEL_DIR_HELP}.'),
    batch_size=f.DEFINE_integer('batch_size', 50, 'Pairs per batch (global: over all devices).'),
    resize_backend=f.DEFINE_enum(
      'resize_backend',
      'pil',
      list(clip_preprocessing.RESIZE_BACKENDS),
      "Image resizing: transformers' PIL backend (pil, the original CLIP) or its "
      "torchvision backend (torchvision, torchmetrics' CLIPScore on transformers 5).",
    ),
    per_pair=f.DEFINE_string('per_pair', None, 'Optional output file: one `image<TAB>score` line per pair.'),
  )
  f.DEFINE_alias('model', 'clip_model')  # The documented spelling of the first versions.
  f.DEFINE_alias('batch-size', 'batch_size')
  return defined


def _write_per_pair(path: str, images_dir: str, skipped: Sequence[str], per_pair: np.ndarray) -> None:
  dropped = set(skipped)
  readable = [name for name in fid.list_images(images_dir) if name not in dropped]
  with open(path, 'w') as f:
    f.writelines(f'{os.path.basename(name)}\t{value:.6f}\n' for name, value in zip(readable, per_pair))


@user_errors_exit
def main(argv: Sequence[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None)
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(bool(v['images']), '--images is required: a folder of images')
  cli.require(bool(v['captions']), '--captions is required: a text file, one caption per line')
  cli.require(bool(v['clip_model']), f'--clip_model (or --model) is required: {MODEL_DIR_HELP}')
  cli.require(v['batch_size'] >= 1, f'--batch_size must be >= 1, got {v["batch_size"]}')
  cli.require(os.path.isdir(v['images']), f'--images {v["images"]!r} is not a folder')
  cli.require(os.path.isfile(v['captions']), f'--captions {v["captions"]!r} does not exist')
  scorer = CLIPScorer(v['clip_model'], resize_backend=v['resize_backend'])
  score, per_pair, skipped = score_folder(v['images'], v['captions'], scorer, v['batch_size'])
  if v['per_pair']:
    _write_per_pair(v['per_pair'], v['images'], skipped, per_pair)
  print(f'scored {len(per_pair)} pairs (skipped {len(skipped)}, resize backend {scorer.resize_backend})', flush=True)
  print(f'CLIP score: {score}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
