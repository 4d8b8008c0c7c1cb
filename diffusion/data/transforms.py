"""The per-record and per-batch transforms every image pipeline shares: decode, count what was fixed or dropped,
resize/crop/flip, batch, normalize and tokenize.

Random-access sources (`pipeline`) and streamed shards (`streaming`) run the same transforms, so an image gives the
same pixels whichever source it comes from.
"""

from __future__ import annotations

import io
import re
import threading
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError

# A record that carries this key was found unusable by its source (a streamed shard): the value is the `DataStats`
# kind to count ('no_image', 'no_caption', 'truncated_shard'), and `DecodeRecord` drops it.
PROBLEM_KEY = '__problem__'


# An optional per-example weight of the training loss (a 'loss_weight' column of a folder's captions file).
LOSS_WEIGHT = 'loss_weight'


def _lookup(record: Any, key_path: str) -> Any:
  """record['a']['b'] for 'a/b'; lists of dicts along the way are mapped over."""
  value = record
  for key in key_path.split('/'):
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
      value = [v[key] for v in value]
    elif isinstance(value, dict):
      if key not in value:
        raise KeyError(f'record has no {key_path!r} (available: {sorted(value)})')
      value = value[key]
    else:
      raise KeyError(f'cannot look up {key_path!r} in a {type(value).__name__}')
  return value


def record_caption(record: Any, data_config: ml_collections.ConfigDict) -> str:
  """The (first) caption of a raw source record, e.g. to build a vocabulary."""
  value = _lookup(record, data_config.caption_key)
  if isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) > 0:
    value = value[0]
  return _as_text(value)


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _as_text(value.item())
  return str(value)


class DataStats:
  """What the pipeline fixed or dropped, counted per process (with `worker_count > 0`, per worker).

  `DecodeRecord` and `Finalize` share one instance. After one pass over this host's records it logs one summary
  line (`summary()`): records dropped and why, the effective dataset size, images converted to RGB, captions that
  were empty (kept as unconditional examples, like caption dropout) or truncated. The first occurrence of each
  kind of problem is also logged when it happens.
  """

  KINDS = ('undecodable', 'bad_shape', 'grey', 'grey_alpha', 'rgba', 'empty_caption', 'truncated')
  # Problems only streamed shards have (a sample without an image or caption member, a shard that ends mid-sample),
  # counted when `shards=True`: each drops the sample; the summary names them only when they happened.
  SHARD_KINDS = ('no_image', 'no_caption', 'truncated_shard')

  def __init__(self, name: str = 'data', num_records: int | None = None, shards: bool = False):
    self.name, self.num_records = name, num_records
    self.seen = 0
    self.counts = dict.fromkeys(self.KINDS + (self.SHARD_KINDS if shards else ()), 0)
    self.reported = False
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:  # Picklable for grain worker processes (each then counts its own records).
    return {k: v for k, v in self.__dict__.items() if k != '_lock'}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def add(self, kind: str, n: int = 1, example: str = '') -> None:
    """Counts `n` problems of `kind`; logs the first one (with `example`), later ones only in the summary."""
    with self._lock:
      first = self.counts[kind] == 0
      self.counts[kind] += n
    if first and n:
      logging.warning(
        '%s: %s%s (logged once; the count goes on and is reported after one pass over the data)',
        self.name,
        _MESSAGES.get(kind) or _SHARD_MESSAGES[kind],
        f': {example}' if example else '',
      )

  def record_seen(self) -> None:
    with self._lock:
      self.seen += 1
      done = self.num_records is not None and self.seen == self.num_records and not self.reported
      self.reported = self.reported or done
    if done:
      self._log_summary()

  def report(self) -> None:
    """Logs the summary now, once (streamed sources call it after one pass, since they do not know their size)."""
    with self._lock:
      done, self.reported = not self.reported, True
    if done:
      self._log_summary()

  def _log_summary(self) -> None:
    """A warning when something was dropped or fixed, else info (clean data is not news)."""
    (logging.warning if any(self.counts.values()) else logging.info)('%s', self.summary())
    total = self.num_records if self.num_records is not None else self.seen
    if total and self.dropped == total:
      raise UserError(f'{self.name}: none of the {total} records has a usable image ({self.summary()})')

  @property
  def dropped(self) -> int:
    return self.counts['undecodable'] + self.counts['bad_shape'] + sum(self.counts.get(k, 0) for k in self.SHARD_KINDS)

  def summary(self) -> str:
    """One line: what was dropped (and the effective size), converted and fixed."""
    c = self.counts
    total = self.num_records if self.num_records is not None else self.seen
    shard = ''.join(f', {c[k]} {_SHARD_WORDS[k]}' for k in self.SHARD_KINDS if c.get(k))
    parts = [
      f'{self.name}: read {self.seen} records; dropped {self.dropped} ({c["undecodable"]} that do not '
      f'decode, {c["bad_shape"]} of an unusable shape{shard}) -> effective size {total - self.dropped} of {total}'
    ]
    converted = {k: c[k] for k in ('grey', 'grey_alpha', 'rgba') if c[k]}
    if converted:
      parts.append('converted to RGB: ' + ', '.join(f'{n} {k.replace("_", "+")}' for k, n in converted.items()))
    parts.append(f'{c["empty_caption"]} empty captions kept as unconditional examples')
    parts.append(f'{c["truncated"]} captions truncated so far')
    return '; '.join(parts)


_MESSAGES = {
  'undecodable': 'skipping an undecodable image',
  'bad_shape': 'skipping an image whose shape is not (H, W), (H, W, 1|2|3|4)',
  'grey': 'converting a greyscale image to RGB',
  'grey_alpha': 'converting a greyscale+alpha image to RGB (alpha dropped)',
  'rgba': 'converting an RGBA image to RGB (alpha dropped)',
  'empty_caption': 'an example has no (or only empty) captions; it is kept as an unconditional example',
  'truncated': 'a caption longer than data.max_text_length tokens is truncated',
}
_SHARD_MESSAGES = {
  'no_image': 'skipping a sample without an image',
  'no_caption': 'skipping a sample without a caption',
  'truncated_shard': 'a shard ends in the middle of a sample (truncated file); its last sample is skipped',
}
_SHARD_WORDS = {'no_image': 'without an image', 'no_caption': 'without a caption', 'truncated_shard': 'truncated'}
_CHANNEL_KINDS = {1: 'grey', 2: 'grey_alpha', 4: 'rgba'}


def _as_rgb(image: np.ndarray, stats: DataStats | None = None) -> np.ndarray | None:
  """uint8 (H, W, 3) from grey (H, W[, 1]), grey+alpha, RGB or RGBA arrays; None (counted) for any other shape."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise UserError(f'expected uint8 images, got {image.dtype}')
  if image.ndim == 2:
    image = image[..., None]
  channels = image.shape[-1] if image.ndim == 3 else 0
  if channels not in (1, 2, 3, 4) or 0 in image.shape:
    if stats is not None:
      stats.add('bad_shape', example=f'shape {image.shape}')
    return None
  if channels != 3 and stats is not None:
    stats.add(_CHANNEL_KINDS[channels], example=f'shape {image.shape}')
  if channels in (1, 2):
    return np.repeat(image[..., :1], 3, axis=-1)
  return image[..., :3]


class DecodeRecord(grain.transforms.Map):
  """Picks image and caption(s) out of a record; decodes encoded image bytes to RGB.

  Undecodable images and arrays of an unusable shape become None (dropped by `KeepDecoded`); grey, grey+alpha and
  RGBA images are converted to RGB; blank captions are removed, and an example left without any caption gets the
  empty caption (an unconditional example). Everything is counted in `stats` (see `DataStats`).
  """

  def __init__(self, image_key: str, caption_key: str, stats: DataStats | None = None):
    self.image_key, self.caption_key = image_key, caption_key
    self.stats = stats or DataStats()

  @property
  def num_skipped(self) -> int:
    """Records dropped so far (undecodable or unusable shape)."""
    return self.stats.dropped

  def map(self, record: dict) -> dict:
    if PROBLEM_KEY in record:  # The source already knows this sample is unusable.
      self.stats.add(record[PROBLEM_KEY], example=str(record.get('file_name', ''))[:200])
      self.stats.record_seen()
      return {'image': None, 'captions': ['']}
    image = _lookup(record, self.image_key)
    caption = _lookup(record, self.caption_key)
    if isinstance(image, (bytes, np.bytes_)):
      image = self._decode(bytes(image), record)
    elif image is not None:
      image = _as_rgb(image, self.stats)
    if isinstance(caption, np.ndarray) and caption.ndim > 0:
      caption = list(caption)
    captions = [_as_text(c) for c in caption] if isinstance(caption, (list, tuple)) else [_as_text(caption)]
    captions = [c for c in captions if c.strip()]
    if not captions:
      self.stats.add('empty_caption', example=str(record.get('file_name', ''))[:200])
      captions = ['']
    self.stats.record_seen()
    out = {'image': image, 'captions': captions}
    if isinstance(record, dict) and LOSS_WEIGHT in record:  # A per-example loss weight (DreamBooth's prior images).
      out[LOSS_WEIGHT] = float(record[LOSS_WEIGHT])
    return out

  def _decode(self, data: bytes, record: dict) -> np.ndarray | None:
    try:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        rgb = np.asarray(im.convert('RGB'))
    except Exception as e:  # pylint: disable=broad-except  # Any undecodable file is skipped.
      name = record.get('file_name', '?') if isinstance(record, dict) else '?'
      self.stats.add('undecodable', example=f'{name} ({type(e).__name__}: {str(e)[:100]})')
      return None
    kind = {'L': 'grey', 'I': 'grey', 'I;16': 'grey', 'LA': 'grey_alpha', 'RGBA': 'rgba', 'P': None}.get(mode)
    if kind:
      self.stats.add(kind, example=f'mode {mode}')
    return rgb


class KeepDecoded(grain.transforms.Filter):
  """Drops records whose image could not be decoded or has an unusable shape (counted by `DecodeRecord`)."""

  def filter(self, element: dict) -> bool:
    return element['image'] is not None


_LEFT_RIGHT = re.compile(r'\b(left|right)\b', re.IGNORECASE)


def swap_left_right(caption: str) -> str:
  """'a red circle to the left of ...' -> '... to the right of ...' (for flipped images)."""

  def swap(m: re.Match) -> str:
    word = {'left': 'right', 'right': 'left'}[m.group(1).lower()]
    return word.capitalize() if m.group(1)[0].isupper() else word

  return _LEFT_RIGHT.sub(swap, caption)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (antialiased bicubic) so the shorter side is `size`; no-op if it already is."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))


class Augment(grain.transforms.RandomMap):
  """Picks one caption, resizes the shorter side to `image_size`, crops a square, maybe flips.

  Flipping swaps the words left/right in the caption, so spatial captions stay true.
  """

  def __init__(self, image_size: int, random_crop: bool, random_flip: bool):
    self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    captions = element['captions']
    image = resize_shorter_side(element['image'], self.image_size)
    h, w = image.shape[:2]
    s = self.image_size
    choice, top, left, flip = draw_augmentation(rng, len(captions), h, w, s, self.random_crop, self.random_flip)
    caption = captions[choice]
    image = image[top : top + s, left : left + s]
    if flip:
      image = image[:, ::-1]
      caption = swap_left_right(caption)
    out = {'image': image, 'caption': caption}
    if LOSS_WEIGHT in element:
      out[LOSS_WEIGHT] = element[LOSS_WEIGHT]
    return out


def draw_augmentation(
  rng: np.random.Generator, num_captions: int, height: int, width: int, size: int, random_crop: bool, random_flip: bool
) -> tuple[int, int, int, bool]:
  """(caption index, crop top, crop left, flip): `Augment`'s random draws, in its order.

  The latent-cache pipeline replays these draws with the same per-example generator, so an example gets the
  same caption and flip whether its latent is encoded on the fly or read from the cache.
  """
  choice = int(rng.integers(num_captions)) if num_captions > 1 else 0
  if random_crop:
    top, left = int(rng.integers(height - size + 1)), int(rng.integers(width - size + 1))
  else:
    top, left = (height - size) // 2, (width - size) // 2
  return choice, top, left, bool(random_flip and rng.random() < 0.5)


def normalize_images(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (what every model of the framework reads)."""
  return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def stack_batch(elements: list[dict]) -> dict:
  """Batches uint8 images and keeps captions as a list (tokenized once per batch); per-example loss weights, where
  the records carry them, as float32 (B,)."""
  batch = {'image': np.stack([e['image'] for e in elements]), 'caption': [e['caption'] for e in elements]}
  if LOSS_WEIGHT in elements[0]:
    batch[LOSS_WEIGHT] = np.asarray([e[LOSS_WEIGHT] for e in elements], np.float32)
  return batch


class Finalize(grain.transforms.Map):
  """Batch: uint8 images -> float32 in [-1, 1]; captions -> int32 token ids (B, max_length).

  Other arrays (the latent cache's posterior mean / logvar) pass through unchanged.
  """

  def __init__(self, tokenizer, max_length: int, stats: DataStats | None = None):
    self.tokenizer, self.max_length = tokenizer, max_length
    self.stats = stats or DataStats()

  @property
  def num_truncated(self) -> int:
    return self.stats.counts['truncated']

  def map(self, element: dict) -> dict:
    out = {k: v for k, v in element.items() if k != 'caption'}
    if 'image' in out:
      out['image'] = normalize_images(out['image'])
    if self.tokenizer is None:  # Image-only consumers (the VAE stage).
      return out
    self._count_truncated(element['caption'])
    out['input_ids'] = tokenizer_lib.tokenize(self.tokenizer, element['caption'], self.max_length)
    return out

  def _count_truncated(self, captions: list[str]) -> None:
    """Counts captions longer than max_text_length (they are truncated); warns once, then counts silently."""
    maybe_long = [c for c in captions if len(c.split()) + 2 > self.max_length // 2]
    if not maybe_long:
      return
    lengths = [len(ids) for ids in self.tokenizer(maybe_long, truncation=False)['input_ids']]
    long = [c for c, n in zip(maybe_long, lengths) if n > self.max_length]
    if long:
      self.stats.add('truncated', len(long), example=f'data.max_text_length={self.max_length}: {long[0][:200]!r}')
