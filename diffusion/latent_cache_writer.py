"""Writing a latent cache: encode a dataset split once with a trained VAE's EMA params (scripts/precompute_latents.py).

The layout and the reading side are in `diffusion.data.latent_cache`; training from the cache gives the same
examples, captions and flips as encoding on the fly. With a frozen text encoder (`text_encoder=`, opt-in), each record
also stores the encoder's hidden states of every caption (and flipped caption), computed in float32 and stored in
`text_embedding_dtype`, and the split stores the empty prompt's once: a run with that frozen encoder then skips it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from diffusion import checkpoint, models
from diffusion import workdir as workdir_lib
from diffusion.data import pipeline as data_pipeline
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.data.latent_cache import (
  _METADATA,
  NULL_TEXT_EMBEDDING,
  TEXT_EMBEDDING_DTYPES,
  VARIANTS,
  expected_metadata,
  load_metadata,
  split_dir,
  text_encoder_identity,
  text_params_hashes,
)
from diffusion.errors import ConfigError, UserError
from diffusion.workdir import load_workdir_config


def load_vae(vae_workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(the VAE workdir's model.vae config, its EMA params)."""
  if not os.path.isdir(vae_workdir):
    raise UserError(f'VAE workdir {vae_workdir!r} does not exist')
  vae_config = load_workdir_config(vae_workdir, expect='vae').model.vae
  params, _ = workdir_lib.load_trained_params(vae_workdir, 'ema_params')
  return vae_config, params


@dataclasses.dataclass(frozen=True)
class FrozenTextEncoder:
  """A frozen text encoder whose embeddings a cache stores: its model.text config, params, tokenizer, source."""

  config: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  source: str = ''


def load_text_encoder(workdir: str) -> FrozenTextEncoder:
  """The text encoder of a stage-2 workdir (a scripts/convert.py import, or a run whose text encoder is frozen): its
  latest checkpoint's `params['text']` (what the train step uses), its tokenizer and its model.text config."""
  if not os.path.isdir(workdir):
    raise UserError(f'text workdir {workdir!r} does not exist')
  text_config = load_workdir_config(workdir, expect='ldm').model.text
  params, _ = workdir_lib.load_trained_params(workdir, 'params')
  return FrozenTextEncoder(text_config, params['text'], workdir_lib.load_tokenizer(workdir), os.path.abspath(workdir))


class _TextEmbedder:
  """Captions -> float32 (n, L, D) encoder hidden states, in fixed-size padded calls (one compile)."""

  def __init__(self, text: FrozenTextEncoder, max_length: int, batch_size: int, dtype: str):
    config = text.config.copy_and_resolve_references()
    config.dtype = 'float32'  # Computed in float32 whatever the stored dtype.
    encoder = models.create_text_encoder(config)
    self.apply = jax.jit(lambda params, ids: encoder.apply({'params': params}, ids)[0])
    self.text, self.max_length, self.batch_size, self.dtype = text, max_length, batch_size, dtype

  def __call__(self, captions: list[str]) -> np.ndarray:
    ids = tokenizer_lib.tokenize(self.text.tokenizer, captions, self.max_length)
    out = []
    for start in range(0, len(ids), self.batch_size):
      chunk = ids[start : start + self.batch_size]
      padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk), self.max_length), np.int32)])
      out.append(np.asarray(self.apply(self.text.params, padded), np.float32)[: len(chunk)])
    return np.concatenate(out)

  def stored(self, captions: list[str]) -> np.ndarray:
    return self(captions).astype(self.dtype)


def shard_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """Process i's contiguous slice [lo, hi) of the records (so shard files concatenate to dataset order)."""
  return num_records * process_index // process_count, num_records * (process_index + 1) // process_count


def _load_example(source: Any, decode: data_pipeline.DecodeRecord, index: int, size: int) -> dict:
  """Decoded, resized, centre-cropped uint8 image (None if undecodable) and captions of record `index`."""
  element = decode.map(source[index])
  image = element['image']
  if image is not None:
    image = data_pipeline.resize_shorter_side(image, size)
    h, w = image.shape[:2]
    _, top, left, _ = data_pipeline.draw_augmentation(None, 1, h, w, size, False, False)
    image = image[top : top + size, left : left + size]
  return {'image': image, 'captions': element['captions']}


def _examples(source: Any, data: ml_collections.ConfigDict, lo: int, hi: int) -> Iterator[dict]:
  """Records lo..hi-1 in order, decoded by a few threads (PIL releases the GIL while decoding)."""
  decode = data_pipeline.DecodeRecord(data.image_key, data.caption_key)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    chunk = 256
    for start in range(lo, hi, chunk):
      indices = range(start, min(start + chunk, hi))
      yield from pool.map(lambda i: _load_example(source, decode, i, data.image_size), indices)


def _encoder(vae_config: ml_collections.ConfigDict) -> Callable:
  """jit: float images (n, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (n, h, w, c)."""
  vae = models.create_vae(vae_config)
  return jax.jit(lambda params, x: vae.apply({'params': params}, x, method='encode'))


def _encode_batch(encode: Callable, params: Any, images: np.ndarray, flips: bool, batch_size: int) -> tuple:
  """(mean, logvar) as float32 (n, variants, h, w, c); batches are padded to one shape, so one compile."""
  n = len(images)
  x = data_pipeline.normalize_images(images)  # Exactly the training pipeline's float images.
  if flips:
    x = np.concatenate([x, x[:, :, ::-1]])
  padded = batch_size * (2 if flips else 1)
  x = np.concatenate([x, np.zeros((padded - len(x), *x.shape[1:]), x.dtype)]) if len(x) < padded else x
  mean, logvar = (np.asarray(a, np.float32) for a in encode(params, x))
  parts = [slice(0, n), slice(n, 2 * n)] if flips else [slice(0, n)]
  return tuple(np.stack([a[p] for p in parts], axis=1) for a in (mean, logvar))


class _Progress:
  """Prints images/s and the ETA every `every` seconds."""

  def __init__(self, total: int, log: Callable[[str], None], every: float = 10.0):
    self.total, self.log, self.every = total, log, every
    self.start = self.last = time.perf_counter()

  def update(self, done: int, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    self.log(f'encoded {done}/{self.total} images, {rate:.1f} images/s, ETA {eta:.0f} s')


def _text_fields(embed: _TextEmbedder, pending: list[dict], flips: bool) -> list[dict]:
  """Per example: the stored embeddings of its captions and (when some differ under the flip) flipped captions."""
  captions = [c for e in pending if e['image'] is not None for c in e['captions']]
  flipped = {c: data_pipeline.swap_left_right(c) for c in captions}
  changed = sorted({f for c, f in flipped.items() if f != c}) if flips else []
  texts = sorted(set(captions)) + [f for f in changed if f not in set(captions)]
  table = dict(zip(texts, embed.stored(texts))) if texts else {}
  empty = np.zeros((0,), embed.dtype)
  fields = []
  for e in pending:
    if e['image'] is None:
      fields.append({'text_embeddings': empty, 'flipped_text_embeddings': empty})
      continue
    own = np.stack([table[c] for c in e['captions']])
    use_flipped = flips and any(flipped[c] != c for c in e['captions'])
    other = np.stack([table[flipped[c]] for c in e['captions']]) if use_flipped else empty
    fields.append({'text_embeddings': own, 'flipped_text_embeddings': other})
  return fields


def _write_batch(
  writer: Any,
  pending: list[dict],
  encode: Callable,
  params: Any,
  flips: bool,
  batch_size: int,
  embed: _TextEmbedder | None = None,
) -> None:
  valid = [e for e in pending if e['image'] is not None]
  text = _text_fields(embed, pending, flips) if embed is not None else [{} for _ in pending]
  if valid:
    mean, logvar = _encode_batch(encode, params, np.stack([e['image'] for e in valid]), flips, batch_size)
  empty = np.zeros((0,), np.float32)
  j = 0
  for e, text_fields in zip(pending, text):
    record = {
      'valid': e['image'] is not None,
      'captions': list(e['captions']),
      'flipped_captions': [data_pipeline.swap_left_right(c) for c in e['captions']],
      'mean': empty,
      'logvar': empty,
      **text_fields,
    }
    if record['valid']:
      record['mean'], record['logvar'] = mean[j], logvar[j]
      j += 1
    writer.write(serialization.msgpack_serialize(record))


def precompute(
  config: ml_collections.ConfigDict,
  vae_workdir: str,
  out_dir: str,
  *,
  split: str | None = None,
  flips: str = 'auto',
  batch_size: int = 64,
  process_index: int | None = None,
  process_count: int | None = None,
  log: Callable[[str], None] = print,
  text_encoder: FrozenTextEncoder | None = None,
  text_embedding_dtype: str = 'float32',
) -> dict:
  """Encodes this process's slice of `split` with the VAE's EMA params; writes its shard (+ metadata on process 0).

  `flips`: 'both' stores the flipped image's posterior too, 'none' only the image's, 'auto' follows
  config.data.random_flip. `text_encoder` (opt-in; `load_text_encoder(workdir)`): also store its embeddings of every
  caption variant, as `text_embedding_dtype` ('float32' exact, 'float16' / 'bfloat16' half the size: 77 x 768 x 4 =
  231 KiB per caption variant for CLIP ViT-L in float32), and the empty prompt's once. Returns the metadata.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  if flips == 'auto':
    flips = 'both' if config.data.random_flip else 'none'
  if flips not in VARIANTS:
    raise UserError(f'flips must be one of {sorted(VARIANTS)} or auto, got {flips!r}')
  if batch_size < 1:
    raise UserError(f'batch_size must be >= 1, got {batch_size}')
  if text_embedding_dtype not in TEXT_EMBEDDING_DTYPES:
    raise UserError(
      f'text_embedding_dtype must be one of {", ".join(TEXT_EMBEDDING_DTYPES)}, got {text_embedding_dtype!r}'
    )
  split = split or config.data.train_split
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  vae_config, params = load_vae(vae_workdir)
  config.model.vae = vae_config
  if config.data.image_size % models.vae_downsample_factor(vae_config):
    raise ConfigError(
      'data.image_size',
      f'{config.data.image_size} is not divisible by the VAE factor {models.vae_downsample_factor(vae_config)}',
    )
  source = data_pipeline.create_data_source(config.data, split)
  lo, hi = shard_range(len(source), process_index, process_count)
  directory = split_dir(out_dir, split)
  os.makedirs(directory, exist_ok=True)
  name = f'{process_index:05d}-of-{process_count:05d}'
  encode, progress = _encoder(vae_config), _Progress(hi - lo, log)
  embed = None
  if text_encoder is not None:
    embed = _TextEmbedder(text_encoder, config.data.max_text_length, batch_size, text_embedding_dtype)
  writer = array_record_module.ArrayRecordWriter(
    os.path.join(directory, f'latents-{name}.array_record'), 'group_size:1'
  )
  pending, done, skipped = [], 0, 0
  for example in _examples(source, config.data, lo, hi):
    skipped += example['image'] is None
    pending.append(example)
    if len(pending) == batch_size:
      _write_batch(writer, pending, encode, params, flips == 'both', batch_size, embed)
      done, pending = done + len(pending), []
      progress.update(done)
  if pending:
    _write_batch(writer, pending, encode, params, flips == 'both', batch_size, embed)
    done += len(pending)
  writer.close()
  progress.update(done, force=True)
  with open(os.path.join(directory, f'shard-{name}.json'), 'w') as f:
    json.dump({'range': [lo, hi], 'num_skipped': skipped}, f)
  log(f'wrote records {lo}..{hi - 1} of {split!r} to {directory} ({skipped} unreadable images skipped)')
  meta = _metadata(config, split, len(source), vae_workdir, params, flips, process_count)
  if embed is not None:
    meta['text_encoder'] = _text_metadata(config, embed)
  if process_index == 0:
    if embed is not None:
      np.save(os.path.join(directory, NULL_TEXT_EMBEDDING), embed([''])[0])
    with open(os.path.join(directory, _METADATA + '.tmp'), 'w') as f:
      json.dump(meta, f, indent=2)
    os.replace(os.path.join(directory, _METADATA + '.tmp'), os.path.join(directory, _METADATA))
  return meta


def _metadata(
  config: ml_collections.ConfigDict,
  split: str,
  num_records: int,
  vae_workdir: str,
  params: Any,
  flips: str,
  process_count: int,
) -> dict:
  meta = expected_metadata(config, split)
  meta['dataset']['num_records'] = num_records
  names = [f'{i:05d}-of-{process_count:05d}' for i in range(process_count)]
  meta.update(
    {
      'vae_workdir': os.path.abspath(vae_workdir),
      'vae_params_sha256': checkpoint.params_hash(params),
      'vae_scaling_factor': float(config.model.vae.scaling_factor),  # <= 0: calibrated from the cached posteriors.
      'variants': list(VARIANTS[flips]),
      'dtype': 'float32',
      'shards': [f'latents-{n}.array_record' for n in names],
      'shard_stats': [f'shard-{n}.json' for n in names],
    }
  )
  return meta


def _text_metadata(config: ml_collections.ConfigDict, embed: _TextEmbedder) -> dict:
  text = embed.text
  return {
    **text_encoder_identity(text.config, text.tokenizer, config.data.max_text_length),
    'workdir': text.source,
    **text_params_hashes(text.params),
    'dtype': embed.dtype,
    'embedding_shape': [int(config.data.max_text_length), int(text.config.hidden_size)],
    'null_embedding': NULL_TEXT_EMBEDDING,
  }


def num_skipped(cache_dir: str, split: str) -> int:
  """Unreadable images the precompute skipped, over all shards."""
  meta = load_metadata(cache_dir, split)
  total = 0
  for name in meta['shard_stats']:
    with open(os.path.join(split_dir(cache_dir, split), name)) as f:
      total += json.load(f)['num_skipped']
  return total
