r"""CLIP score of image-caption pairs with a transformers CLIPModel directory, computed in JAX like torchmetrics.

  python -m eval.clip_score --images DIR --captions FILE --model DIR [--batch_size N]

Image files of DIR (sorted by name) are paired with the non-blank lines of FILE in order. Per pair the score is
100 * cos(image embedding, text embedding); the reported value is max(mean over pairs, 0), as torchmetrics'
`CLIPScore` (it clamps after averaging). Prints progress (images/s) and `CLIP score: <value>`. Unreadable image files
are skipped and counted, and their captions dropped.

The model directory is what `CLIPModel.save_pretrained` plus the tokenizer's `save_pretrained` write: config.json,
model.safetensors (or pytorch_model.bin), the tokenizer files and, optionally, preprocessor_config.json (else the
CLIP defaults). The vision tower is `eval.clip_vision`; the text tower and `text_projection` come from
`diffusion.interop.load_text_encoder`.

Preprocessing is transformers' PIL-backend `CLIPImageProcessorPil` (as the original CLIP and transformers 4's
`CLIPImageProcessor`): PIL bicubic resize of the shortest side, center crop, rescale, normalise. transformers 5's
default `CLIPImageProcessor` (torchvision backend, which torchmetrics gets from `CLIPProcessor.from_pretrained`)
resizes uint8 tensors with torchvision's antialiased bicubic instead, which differs from PIL by about one grey level
in places. Captions are padded to the text model's length and truncated (with the end token kept); torchmetrics
pads to the longest caption and cuts tokens past 77 (end token included), so only over-long captions differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

import numpy as np

from diffusion.errors import UserError, user_errors_exit
from eval import metrics as metrics_lib

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_DIR_HELP = ('a transformers CLIPModel directory (config.json, model.safetensors or pytorch_model.bin, the '
                  'tokenizer files, optionally preprocessor_config.json), e.g. from CLIPModel.save_pretrained and '
                  'CLIPTokenizer.save_pretrained')


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing (host, PIL/numpy, step by step as transformers' PIL backend).


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
  """CLIPImageProcessor's settings; `__call__` maps one RGB uint8 image (H, W, 3) to float32 pixel values."""

  size: int | tuple[int, int] = 224  # Shortest edge, or an exact (height, width).
  crop_size: tuple[int, int] = (224, 224)
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: int = 3  # PIL.Image.BICUBIC.

  @classmethod
  def from_directory(cls, directory: str) -> 'ImageProcessing':
    """The settings of `preprocessor_config.json` (or a processor_config.json's image processor), else defaults."""
    from diffusion.interop import files

    config, source = {}, os.path.join(directory, 'preprocessor_config.json')
    if os.path.isfile(source):
      config = files.read_json(source)
    elif os.path.isfile(os.path.join(directory, 'processor_config.json')):
      source = os.path.join(directory, 'processor_config.json')
      config = files.read_json(source).get('image_processor', {})
    fields = {}
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
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise UserError(f'expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}')
    if self.do_resize:
      height, width = self._resized(*image.shape[:2])
      image = np.asarray(Image.fromarray(image).resize((width, height), resample=self.resample))
    if self.do_center_crop:
      image = _center_crop(image, *self.crop_size)
    x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
    x = x.astype(np.float32)
    if self.do_normalize:
      x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    return x


def _center_crop(image: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
  """transformers' `center_crop`: top-left at (size - crop) // 2, zero padding (centred, ceil) if too small."""
  height, width = image.shape[:2]
  top, left = (height - crop_height) // 2, (width - crop_width) // 2
  if top >= 0 and left >= 0:
    return image[top:top + crop_height, left:left + crop_width]
  new_height, new_width = max(crop_height, height), max(crop_width, width)
  top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
  padded = np.zeros((new_height, new_width, image.shape[2]), image.dtype)
  padded[top_pad:top_pad + height, left_pad:left_pad + width] = image
  top, left = top + top_pad, left + left_pad
  return padded[max(0, top):min(new_height, top + crop_height), max(0, left):min(new_width, left + crop_width)]


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


# ----------------------------------------------------------------------------------------------------------------------
# The model.


class CLIPScorer:
  """Both CLIP towers of a model directory, its tokenizer and image processing; data-parallel over all devices."""

  def __init__(self, model_dir: str, devices: Sequence[Any] | None = None):
    import jax
    import ml_collections
    import transformers

    from diffusion import parallel
    from diffusion.interop import load_text_encoder
    from eval import clip_vision

    if not model_dir or not os.path.isdir(model_dir):
      raise UserError(f'CLIP model directory {model_dir!r} does not exist: expected {MODEL_DIR_HELP}')
    if not os.path.isfile(os.path.join(model_dir, 'config.json')):
      raise UserError(f'{model_dir!r} has no config.json: expected {MODEL_DIR_HELP}')
    self.model_dir = os.path.abspath(model_dir)
    self.vision, vision_params = clip_vision.load_vision_encoder(model_dir)
    self.text, text_params = load_text_encoder(model_dir)
    if self.text.projection_dim is None or self.vision.projection_dim is None:
      raise UserError(f'{model_dir}: a CLIP score needs both projections (text_projection, visual_projection): '
                      'save the full CLIPModel')
    self.processing = ImageProcessing.from_directory(model_dir)
    if self.processing.output_size(1000, 1000) != (self.vision.image_size,) * 2:
      raise UserError(f'{model_dir}: the image processor makes {self.processing.output_size(1000, 1000)} images but '
                      f'the vision model takes {self.vision.image_size}x{self.vision.image_size}')
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
      raise UserError(f'cannot load the tokenizer of {model_dir}: {e}') from None
    if self.tokenizer.pad_token_id is None:
      raise UserError(f'the tokenizer of {model_dir} has no pad token')
    self.max_length = int(self.text.max_position_embeddings)
    self.mesh = parallel.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}),
                                     list(devices) if devices is not None else None)
    self._parallel = parallel
    self.num_devices = self.mesh.devices.size
    self.params = jax.device_put({'vision': vision_params, 'text': text_params}, parallel.replicated(self.mesh))
    self._image_fn = jax.jit(lambda p, x: self.vision.apply({'params': p['vision']}, x))
    self._text_fn = jax.jit(lambda p, ids, mask: self.text.apply({'params': p['text']}, ids, mask)[1])

  def pixel_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB images (any sizes) -> (N, S, S, 3) float32 pixel values (NHWC)."""
    return np.stack([self.processing(image) for image in images])

  def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), (N, max_length) int32: padded to the model's length, truncated."""
    out = self.tokenizer(list(captions), padding='max_length', max_length=self.max_length, truncation=True,
                         return_tensors='np')
    return out['input_ids'].astype(np.int32), out['attention_mask'].astype(np.int32)

  def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
    n = len(arrays[0])
    pad = -n % self.num_devices
    if pad:
      arrays = tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays)
    batch = self._parallel.make_global_batch({str(i): a for i, a in enumerate(arrays)}, self.mesh)
    return np.asarray(fn(self.params, *(batch[str(i)] for i in range(len(arrays)))), np.float32)[:n]

  def image_embeddings_from_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
    return self._run(self._image_fn, np.asarray(pixel_values, np.float32))

  def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """Projected (not normalised) image embeddings (N, D), as transformers' `get_image_features`."""
    return self.image_embeddings_from_pixels(self.pixel_values(images))

  def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
    """Projected (not normalised) text embeddings (N, D), as transformers' `get_text_features`."""
    return self._run(self._text_fn, *self.tokenize(captions))

  def scores(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
    """100 * cos(image, caption) per pair (float64)."""
    if len(images) != len(captions):
      raise UserError(f'{len(images)} images but {len(captions)} captions')
    return pair_scores(self.image_embeddings(images), self.text_embeddings(captions))


def pair_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """100 * cosine similarity of each row pair, in float64."""
  a = np.asarray(image_embeddings, np.float64)
  b = np.asarray(text_embeddings, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


def clip_score(per_pair: Sequence[float]) -> float:
  """torchmetrics' CLIPScore: max(mean of the per-pair scores, 0)."""
  if not len(per_pair):
    raise UserError('no image-caption pairs to score')
  return max(float(np.mean(per_pair)), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# The evaluation job's metric.


@metrics_lib.register_metric('clip')
class CLIPScoreMetric:
  """CLIP score of generated images against their prompts (model directory from `options['clip_model']`)."""

  name = 'clip'

  def __init__(self, context: metrics_lib.EvalContext):
    model_dir = context.options.get('clip_model')
    if not model_dir:
      raise UserError(f'metric clip needs a CLIP model directory: pass --clip_model DIR ({MODEL_DIR_HELP}); no '
                      'weights are downloaded')
    self.scorer = CLIPScorer(model_dir)
    self.reset()

  def reset(self) -> None:
    self._scores: list[np.ndarray] = []

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    self._scores.append(self.scorer.scores(list(images), prompts))

  def result(self) -> dict[str, float]:
    return {'clip_score': clip_score(np.concatenate(self._scores))}

  def describe(self) -> dict[str, Any]:
    return {'metric': 'clip_score', 'clip_model': self.scorer.model_dir,
            'definition': 'max(mean over pairs of 100 * cos(image, prompt), 0), as torchmetrics CLIPScore'}


# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def read_captions(path: str) -> list[str]:
  try:
    with open(path, encoding='utf-8') as f:
      return [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read --captions {path!r}: {e}') from None


def iter_pairs(files: Sequence[str], captions: Sequence[str], batch_size: int,
               skipped: list[str]) -> Iterator[tuple[list[np.ndarray], list[str]]]:
  """Batches of (readable images, their captions); unreadable files are appended to `skipped`."""
  images, texts = [], []
  for path, caption in zip(files, captions):
    image = read_rgb(path)
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


def score_folder(images_dir: str, captions_file: str, scorer: CLIPScorer, batch_size: int = 50,
                 log=print) -> tuple[float, np.ndarray, list[str]]:
  """(CLIP score, per-pair scores, skipped files) of a folder of images paired with a caption file."""
  from eval import fid

  files = fid.list_images(images_dir)
  captions = read_captions(captions_file)
  if not files:
    raise UserError(f'no images in {images_dir!r} (extensions: {", ".join(fid.IMAGE_EXTENSIONS)})')
  if len(files) != len(captions):
    raise UserError(f'{len(files)} image files in {images_dir!r} but {len(captions)} captions in '
                    f'{captions_file!r}: they are paired in order, so the counts must match')
  skipped: list[str] = []
  scores, start, done = [], time.time(), 0
  for images, texts in iter_pairs(files, captions, batch_size, skipped):
    scores.append(scorer.scores(images, texts))
    done += len(images)
    rate = done / max(time.time() - start, 1e-9)
    log(f'{done}/{len(files)} images, {rate:.1f} images/s')
  if skipped:
    log(f'skipped {len(skipped)} unreadable image file(s) and dropped their captions (e.g. {skipped[0]})')
  if not scores:
    raise UserError(f'no readable images in {images_dir!r}: all {len(skipped)} files failed to decode')
  per_pair = np.concatenate(scores)
  return clip_score(per_pair), per_pair, skipped


class _Parser(argparse.ArgumentParser):

  def error(self, message: str):
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='python -m eval.clip_score', description='CLIP score of images paired with captions.')
  parser.add_argument('--images', required=True, help='folder of images, paired with the captions in name order')
  parser.add_argument('--captions', required=True, help='text file, one caption per (non-blank) line')
  parser.add_argument('--model', required=True, help=MODEL_DIR_HELP)
  parser.add_argument('--batch_size', '--batch-size', type=int, default=50, help='pairs per batch (all devices)')
  parser.add_argument('--per_pair', default=None, help='optional output file: one score per line, with its image')
  return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  if args.batch_size < 1:
    raise UserError(f'--batch_size must be >= 1, got {args.batch_size}')
  if not os.path.isdir(args.images):
    raise UserError(f'--images {args.images!r} is not a folder')
  if not os.path.isfile(args.captions):
    raise UserError(f'--captions {args.captions!r} does not exist')
  scorer = CLIPScorer(args.model)
  log = lambda message: print(message, file=sys.stderr, flush=True)
  score, per_pair, skipped = score_folder(args.images, args.captions, scorer, args.batch_size, log)
  if args.per_pair:
    from eval import fid

    dropped = set(skipped)
    readable = [f for f in fid.list_images(args.images) if f not in dropped]
    with open(args.per_pair, 'w') as f:
      f.writelines(f'{os.path.basename(name)}\t{value:.6f}\n' for name, value in zip(readable, per_pair))
  print(f'scored {len(per_pair)} pairs (skipped {len(skipped)})', flush=True)
  print(f'CLIP score: {score}', flush=True)


if __name__ == '__main__':
  main()
