"""CLIP score of image-caption pairs with a transformers CLIPModel directory, in JAX, as torchmetrics' `CLIPScore`.

Per pair the score is 100 * cos(image embedding, text embedding); the reported value is max(mean over pairs, 0)
(torchmetrics clamps after averaging). The model directory is what `CLIPModel.save_pretrained` plus the tokenizer's
`save_pretrained` write: config.json, model.safetensors (or pytorch_model.bin), the tokenizer files and, optionally,
preprocessor_config.json (else the CLIP defaults). Both towers come from `diffusion.interop.clip.load_clip`.

Images are preprocessed as transformers' CLIPImageProcessor with either resize backend
(`diffusion.evaluation.clip_preprocessing`): `pil` (the original CLIP, transformers 4) or `torchvision` (what
torchmetrics' CLIPScore gets on transformers 5). Captions are padded to the text model's length and truncated (end
token kept); torchmetrics pads to the longest caption and cuts tokens past 77 (end token included), so only
over-long captions differ.

The evaluation job's metric `clip` (options `clip_model`, `resize_backend`) keeps the sum and count of the per-pair
scores of this process's images and combines them over processes once, in `result()`.
"""

import functools
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import transformers

from diffusion import parallel
from diffusion.errors import UserError
from diffusion.evaluation.base import METRICS, EvalContext, sum_across_processes
from diffusion.evaluation.clip_preprocessing import ImageProcessing, check_resize_backend
from diffusion.interop.clip import load_clip

MODEL_DIR_HELP = (
  'a transformers CLIPModel directory (config.json, model.safetensors or pytorch_model.bin, the '
  'tokenizer files, optionally preprocessor_config.json), e.g. from CLIPModel.save_pretrained and '
  'CLIPTokenizer.save_pretrained'
)
DEFINITION = 'max(mean over pairs of 100 * cos(image, caption), 0), as torchmetrics CLIPScore'


def check_model_dir(model_dir: str | None) -> str:
  """The absolute path of a CLIP model directory, or a UserError saying what one holds (nothing is downloaded)."""
  if not model_dir or not os.path.isdir(model_dir):
    raise UserError(f'CLIP model directory {model_dir!r} does not exist: expected {MODEL_DIR_HELP}')
  if not os.path.isfile(os.path.join(model_dir, 'config.json')):
    raise UserError(f'{model_dir!r} has no config.json: expected {MODEL_DIR_HELP}')
  return os.path.abspath(model_dir)


class CLIPScorer:
  """Both CLIP towers of a model directory, its tokenizer and image processing; data-parallel over this process's
  devices (each process scores its own pairs)."""

  def __init__(self, model_dir: str, devices: Sequence[Any] | None = None, resize_backend: str = 'pil'):
    self.model_dir = check_model_dir(model_dir)
    towers = load_clip(self.model_dir)
    self.vision, self.text = towers.vision, towers.text
    self.processing = ImageProcessing.from_directory(self.model_dir, check_resize_backend(resize_backend))
    size = self.processing.output_size(1000, 1000)
    if size != (self.vision.image_size,) * 2:
      raise UserError(
        f'{model_dir}: the image processor makes {size} images but the vision model takes '
        f'{self.vision.image_size}x{self.vision.image_size}'
      )
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
    except (OSError, ValueError, TypeError) as e:
      raise UserError(f'cannot load the tokenizer of {model_dir}: {e}') from None
    if self.tokenizer.pad_token_id is None:
      raise UserError(f'the tokenizer of {model_dir} has no pad token')
    self.max_length = int(self.text.max_position_embeddings)
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = parallel.create_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}), devices)
    self.num_devices = self.mesh.devices.size
    self.params = jax.device_put(
      {'vision': towers.vision_params, 'text': towers.text_params}, parallel.replicated(self.mesh)
    )
    self._image_fn = functools.partial(_image_features, self.vision)
    self._text_fn = functools.partial(_text_features, self.text)

  @property
  def resize_backend(self) -> str:
    return self.processing.resize_backend

  def pixel_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB images (any sizes) -> (N, S, S, 3) float32 pixel values (NHWC)."""
    return np.stack([self.processing(image) for image in images])

  def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), (N, max_length) int32: padded to the model's length, truncated."""
    out = self.tokenizer(
      list(captions), padding='max_length', max_length=self.max_length, truncation=True, return_tensors='np'
    )
    return out['input_ids'].astype(np.int32), out['attention_mask'].astype(np.int32)

  def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
    n = len(arrays[0])
    pad = -n % self.num_devices
    if pad:
      arrays = tuple(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays)
    batch = jax.device_put(arrays, parallel.batch_sharding(self.mesh))  # This process's devices only.
    return np.asarray(fn(self.params, *batch), np.float32)[:n]

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


@functools.partial(jax.jit, static_argnums=0)
def _image_features(module: Any, params: Any, pixel_values: jax.Array) -> jax.Array:
  """Compiled once per vision module (modules are static: equal towers share the executable)."""
  return module.apply({'params': params['vision']}, pixel_values)


@functools.partial(jax.jit, static_argnums=0)
def _text_features(module: Any, params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  return module.apply({'params': params['text']}, input_ids, attention_mask)[1]


def pair_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """100 * cosine similarity of each row pair, in float64."""
  a = np.asarray(image_embeddings, np.float64)
  b = np.asarray(text_embeddings, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return 100.0 * np.sum(a * b, axis=-1)


def score_from_sums(total: float, count: float) -> float:
  """torchmetrics' CLIPScore from the sum and count of per-pair scores: max(total / count, 0)."""
  if not count:
    raise UserError('no image-caption pairs to score')
  return max(float(total) / float(count), 0.0)


def clip_score(per_pair: Sequence[float]) -> float:
  """torchmetrics' CLIPScore of per-pair scores: max(their mean, 0)."""
  return score_from_sums(np.sum(np.asarray(per_pair, np.float64)), len(per_pair))


@METRICS.register('clip')
class CLIPScoreMetric:
  """CLIP score of generated images against their prompts (options: `clip_model` DIR, `resize_backend`)."""

  name = 'clip'

  def __init__(self, context: EvalContext):
    model_dir = context.options.get('clip_model')
    if not model_dir:
      raise UserError(
        f'metric clip needs a CLIP model directory: pass --clip_model DIR ({MODEL_DIR_HELP}); no weights are downloaded'
      )
    backend = check_resize_backend(context.options.get('resize_backend') or 'pil', 'metric clip: resize_backend')
    self.scorer = CLIPScorer(model_dir, resize_backend=backend)
    self.reset()

  def reset(self) -> None:
    self._total, self._count = 0.0, 0

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    """Adds this process's pairs to the running sums."""
    scores = self.scorer.scores(list(images), prompts)
    self._total += float(np.sum(scores))
    self._count += len(scores)

  def result(self) -> dict[str, float]:
    """The score of every process's pairs (a collective: all processes call it)."""
    sums = sum_across_processes({'total': self._total, 'count': self._count})
    return {'clip_score': score_from_sums(sums['total'], sums['count'])}

  def describe(self) -> dict[str, Any]:
    return {
      'metric': 'clip_score',
      'clip_model': self.scorer.model_dir,
      'resize_backend': self.scorer.resize_backend,
      'definition': DEFINITION,
    }
