"""Precomputed VAE posteriors for stage 2: encode the dataset once with the frozen VAE, then train from the cache.

Layout: `DIR/<split>/latents-<i>-of-<n>.array_record` (one shard per writing process, contiguous index ranges, so
their concatenation is the dataset's own record order), `DIR/<split>/shard-<i>-of-<n>.json` (per-shard counts) and
`DIR/<split>/metadata.json` (what the cache was made from: VAE workdir and a hash of its EMA params, image size,
latent shape, augmentation variants, dataset name/split/size). Each record is a msgpack dict: `valid` (False for an
undecodable image, kept as a placeholder so record indices equal the dataset's), `captions`, `flipped_captions`,
and float32 posterior `mean` / `logvar` of shape (variants, h, w, c): variant 0 the centre-cropped image, variant 1
(when stored) its horizontal flip.

Training from the cache (`config.data.latent_cache = DIR`) reads the records with the same grain sampler as the
image pipeline and replays `pipeline.draw_augmentation` with the same per-example generator, so every example gets
the same caption and flip as on the fly; the task then samples the latent from the stored posterior with the same
per-example key (`ldm_task.sample_posterior`). Random crops cannot be cached (`data.random_crop` must be False).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from flax import serialization

from diffusion.data import pipeline as data_pipeline
from diffusion.errors import ConfigError, UserError

FORMAT = 'ldm-jax-latent-cache'
VERSION = 1
VARIANTS = {'none': ('original',), 'both': ('original', 'flipped')}
_METADATA = 'metadata.json'


def params_hash(params: Any) -> str:
  """sha256 over the params' paths, dtypes, shapes and values (the identity of a frozen VAE)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def split_dir(cache_dir: str, split: str) -> str:
  return os.path.join(cache_dir, split.replace('/', '_'))


def has_split(cache_dir: str, split: str) -> bool:
  return os.path.isfile(os.path.join(split_dir(cache_dir, split), _METADATA))


def _vae_factor(vae_config: ml_collections.ConfigDict) -> int:
  return 2 ** (len(tuple(vae_config.block_out_channels)) - 1)


def _dataset_identity(data: ml_collections.ConfigDict, split: str) -> dict:
  """The data-config fields that decide which images (and captions) a split holds."""
  identity = {'name': data.name, 'split': split, 'image_key': data.image_key, 'caption_key': data.caption_key}
  if data.name == 'shapes':
    identity['shapes'] = dict(data.shapes.to_dict())
  elif data.name == 'folder':
    identity['folder'] = {'path': os.path.abspath(data.folder.path), 'captions_file': data.folder.captions_file}
  return identity


def _architecture(vae_config: ml_collections.ConfigDict) -> dict:
  """The VAE config minus what does not change the encoder's output (scaling factor, dtype)."""
  skip = ('scaling_factor', 'dtype')
  return json.loads(json.dumps({k: v for k, v in vae_config.to_dict().items() if k not in skip}, default=list))


def expected_metadata(config: ml_collections.ConfigDict, split: str) -> dict:
  """The metadata fields a cache must have for `config` (model.vae already the VAE workdir's) to train from it."""
  vae = config.model.vae
  latent = config.data.image_size // _vae_factor(vae)
  return {'format': FORMAT, 'version': VERSION, 'image_size': config.data.image_size,
          'latent_shape': [latent, latent, vae.latent_channels], 'dataset': _dataset_identity(config.data, split),
          'vae_config': _architecture(vae)}


def load_metadata(cache_dir: str, split: str) -> dict:
  """metadata.json of a split, after checking that every shard it lists is there."""
  directory = split_dir(cache_dir, split)
  path = os.path.join(directory, _METADATA)
  if not os.path.isfile(path):
    found = sorted(d for d in os.listdir(cache_dir) if has_split(cache_dir, d)) if os.path.isdir(cache_dir) else []
    raise ConfigError('data.latent_cache', f'{cache_dir!r} holds no latent cache for split {split!r} (no {path}; '
                      f'splits found: {found or "none"}); make one with scripts/precompute_latents.py')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  missing = [s for s in meta.get('shards', []) + meta.get('shard_stats', [])
             if not os.path.isfile(os.path.join(directory, s))]
  if missing:
    raise ConfigError('data.latent_cache', f'latent cache {directory!r} is incomplete: missing {missing[:3]} '
                      '(a writing process has not finished, or failed)')
  return meta


def _mismatches(meta: dict, expected: dict, prefix: str = '') -> list[str]:
  out = []
  for key, want in expected.items():
    have = meta.get(key)
    if isinstance(want, dict) and isinstance(have, dict):
      out += _mismatches(have, want, f'{prefix}{key}.')
    elif have != want:
      out.append(f'{prefix}{key}: cache has {have!r}, config wants {want!r}')
  return out


def check_cache(config: ml_collections.ConfigDict, split: str, vae_params: Any = None) -> dict:
  """Refuses (ConfigError naming the mismatch) a cache that was not made for this config and frozen VAE."""
  cache_dir = config.data.latent_cache
  meta = load_metadata(cache_dir, split)
  problems = _mismatches(meta, expected_metadata(config, split))
  if config.data.random_flip and 'flipped' not in meta.get('variants', []):
    problems.append(f'variants: cache has {meta.get("variants")}, data.random_flip=True needs the flipped variant '
                    '(precompute with --flips both)')
  if vae_params is not None and meta.get('vae_params_sha256') != params_hash(vae_params):
    problems.append(f'VAE params: the cache was encoded with the VAE of {meta.get("vae_workdir")!r} (params hash '
                    f'{str(meta.get("vae_params_sha256"))[:12]}...), not this run\'s frozen VAE')
  if problems:
    raise ConfigError('data.latent_cache', f'{split_dir(cache_dir, split)!r} does not match the config: '
                      + '; '.join(problems) + ' (rerun scripts/precompute_latents.py)')
  return meta


def check_training_cache(config: ml_collections.ConfigDict, vae_params: Any) -> None:
  """`check_cache` for the training split and, when the cache holds it, the evaluation split."""
  check_cache(config, config.data.train_split, vae_params)
  if config.data.eval_split != config.data.train_split and has_split(config.data.latent_cache,
                                                                      config.data.eval_split):
    check_cache(config, config.data.eval_split, vae_params)


# ---------------------------------------------------------------------------------------------- reading


def _shard_paths(cache_dir: str, split: str, meta: dict) -> list[str]:
  return [os.path.join(split_dir(cache_dir, split), s) for s in meta['shards']]


def open_source(cache_dir: str, split: str) -> tuple[Any, dict]:
  """(random-access source of serialized records in dataset order, metadata)."""
  meta = load_metadata(cache_dir, split)
  source = grain.sources.ArrayRecordDataSource(_shard_paths(cache_dir, split, meta))
  if len(source) != meta['dataset']['num_records']:
    raise UserError(f'latent cache {split_dir(cache_dir, split)!r} holds {len(source)} records, its metadata says '
                    f'{meta["dataset"]["num_records"]}')
  return source, meta


def decode_record(data: bytes) -> dict:
  return serialization.msgpack_restore(data)


def cached_captions(cache_dir: str, split: str, limit: int = 100_000) -> list[str]:
  """The first caption of each valid cached example (to build a vocabulary without the image dataset)."""
  source, _ = open_source(cache_dir, split)
  records = (decode_record(source[i]) for i in range(min(len(source), limit)))
  return [r['captions'][0] for r in records if r['valid']]


class _DecodeCached(grain.transforms.Map):
  def map(self, data: bytes) -> dict:
    return decode_record(data)


class _KeepValid(grain.transforms.Filter):
  """Drops the placeholders of images the precompute could not decode (as `KeepDecoded` drops them)."""

  def filter(self, element: dict) -> bool:
    return bool(element['valid']) and bool(element['captions'])


class CachedAugment(grain.transforms.RandomMap):
  """`Augment` on a cached example: the same draws pick the caption and whether to use the flipped posterior."""

  def __init__(self, image_size: int, random_flip: bool):
    self.image_size, self.random_flip = image_size, random_flip

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    s = self.image_size
    choice, _, _, flip = data_pipeline.draw_augmentation(rng, len(element['captions']), s, s, s, False,
                                                         self.random_flip)
    captions = element['flipped_captions'] if flip else element['captions']
    return {'latent_mean': element['mean'][int(flip)], 'latent_logvar': element['logvar'][int(flip)],
            'caption': captions[choice]}


def _stack(elements: list[dict]) -> dict:
  return {'latent_mean': np.stack([e['latent_mean'] for e in elements]).astype(np.float32),
          'latent_logvar': np.stack([e['latent_logvar'] for e in elements]).astype(np.float32),
          'caption': [e['caption'] for e in elements]}


def create_cached_pipeline(data_config: ml_collections.ConfigDict, split: str, *, tokenizer, batch_size: int,
                           seed: int, shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                           process_count: int = 1, drop_remainder: bool = True) -> grain.DataLoader:
  """This host's batches: dict(latent_mean, latent_logvar: float32 (B, h, w, c), input_ids: int32 (B, L)).

  Same sampler, sharding and augmentation draws as `pipeline.create_input_pipeline` on the image dataset.
  """
  if data_config.random_crop:
    raise ConfigError('data.random_crop', 'random crops cannot be read from a latent cache (data.latent_cache); '
                      'set data.random_crop=False or train on images')
  source, meta = open_source(data_config.latent_cache, split)
  if data_config.random_flip and 'flipped' not in meta['variants']:
    raise ConfigError('data.latent_cache', f'split {split!r} has no flipped latents but data.random_flip=True '
                      '(precompute with --flips both)')
  sampler = data_pipeline.make_sampler(len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                       process_index=process_index, process_count=process_count,
                                       drop_remainder=drop_remainder)
  operations = [
      _DecodeCached(),
      _KeepValid(),
      CachedAugment(data_config.image_size, data_config.random_flip),
      grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder, batch_fn=_stack),
      data_pipeline.Finalize(tokenizer, data_config.max_text_length),
  ]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=data_config.worker_count, read_options=data_pipeline._READ_OPTIONS)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------- writing


def load_vae(vae_workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(the VAE workdir's model.vae config, its EMA params)."""
  from diffusion import checkpoint  # pylint: disable=import-outside-toplevel  # Orbax only where needed.
  from diffusion.pipeline import load_workdir_config  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(vae_workdir):
    raise UserError(f'VAE workdir {vae_workdir!r} does not exist')
  vae_config = load_workdir_config(vae_workdir, expect='vae').model.vae
  params = checkpoint.Checkpointer(os.path.abspath(vae_workdir), read_only=True).restore_params(item='ema_params')
  return vae_config, params


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
    image = image[top:top + size, left:left + size]
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
  from diffusion import models  # pylint: disable=import-outside-toplevel

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


def _write_batch(writer: Any, pending: list[dict], encode: Callable, params: Any, flips: bool,
                 batch_size: int) -> None:
  valid = [e for e in pending if e['image'] is not None]
  if valid:
    mean, logvar = _encode_batch(encode, params, np.stack([e['image'] for e in valid]), flips, batch_size)
  empty = np.zeros((0,), np.float32)
  j = 0
  for e in pending:
    record = {'valid': e['image'] is not None, 'captions': list(e['captions']),
              'flipped_captions': [data_pipeline.swap_left_right(c) for c in e['captions']],
              'mean': empty, 'logvar': empty}
    if record['valid']:
      record['mean'], record['logvar'] = mean[j], logvar[j]
      j += 1
    writer.write(serialization.msgpack_serialize(record))


def precompute(config: ml_collections.ConfigDict, vae_workdir: str, out_dir: str, *, split: str | None = None,
               flips: str = 'auto', batch_size: int = 64, process_index: int | None = None,
               process_count: int | None = None, log: Callable[[str], None] = print) -> dict:
  """Encodes this process's slice of `split` with the VAE's EMA params; writes its shard (+ metadata on process 0).

  `flips`: 'both' stores the flipped image's posterior too, 'none' only the image's, 'auto' follows
  config.data.random_flip. Returns the metadata.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  if flips == 'auto':
    flips = 'both' if config.data.random_flip else 'none'
  if flips not in VARIANTS:
    raise UserError(f'flips must be one of {sorted(VARIANTS)} or auto, got {flips!r}')
  if batch_size < 1:
    raise UserError(f'batch_size must be >= 1, got {batch_size}')
  split = split or config.data.train_split
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  vae_config, params = load_vae(vae_workdir)
  config.model.vae = vae_config
  if config.data.image_size % _vae_factor(vae_config):
    raise ConfigError('data.image_size', f'{config.data.image_size} is not divisible by the VAE factor '
                      f'{_vae_factor(vae_config)}')
  source = data_pipeline.create_data_source(config.data, split)
  lo, hi = shard_range(len(source), process_index, process_count)
  directory = split_dir(out_dir, split)
  os.makedirs(directory, exist_ok=True)
  name = f'{process_index:05d}-of-{process_count:05d}'
  encode, progress = _encoder(vae_config), _Progress(hi - lo, log)
  writer = array_record_module.ArrayRecordWriter(os.path.join(directory, f'latents-{name}.array_record'),
                                                 'group_size:1')
  pending, done, skipped = [], 0, 0
  for example in _examples(source, config.data, lo, hi):
    skipped += example['image'] is None
    pending.append(example)
    if len(pending) == batch_size:
      _write_batch(writer, pending, encode, params, flips == 'both', batch_size)
      done, pending = done + len(pending), []
      progress.update(done)
  if pending:
    _write_batch(writer, pending, encode, params, flips == 'both', batch_size)
    done += len(pending)
  writer.close()
  progress.update(done, force=True)
  with open(os.path.join(directory, f'shard-{name}.json'), 'w') as f:
    json.dump({'range': [lo, hi], 'num_skipped': skipped}, f)
  log(f'wrote records {lo}..{hi - 1} of {split!r} to {directory} ({skipped} unreadable images skipped)')
  meta = _metadata(config, split, len(source), vae_workdir, params, flips, process_count)
  if process_index == 0:
    with open(os.path.join(directory, _METADATA + '.tmp'), 'w') as f:
      json.dump(meta, f, indent=2)
    os.replace(os.path.join(directory, _METADATA + '.tmp'), os.path.join(directory, _METADATA))
  return meta


def _metadata(config: ml_collections.ConfigDict, split: str, num_records: int, vae_workdir: str, params: Any,
              flips: str, process_count: int) -> dict:
  meta = expected_metadata(config, split)
  meta['dataset']['num_records'] = num_records
  names = [f'{i:05d}-of-{process_count:05d}' for i in range(process_count)]
  meta.update({
      'vae_workdir': os.path.abspath(vae_workdir), 'vae_params_sha256': params_hash(params),
      'vae_scaling_factor': float(config.model.vae.scaling_factor),  # <= 0: calibrated from the cached posteriors.
      'variants': list(VARIANTS[flips]), 'dtype': 'float32',
      'shards': [f'latents-{n}.array_record' for n in names], 'shard_stats': [f'shard-{n}.json' for n in names],
  })
  return meta


def num_skipped(cache_dir: str, split: str) -> int:
  """Unreadable images the precompute skipped, over all shards."""
  meta = load_metadata(cache_dir, split)
  total = 0
  for name in meta['shard_stats']:
    with open(os.path.join(split_dir(cache_dir, split), name)) as f:
      total += json.load(f)['num_skipped']
  return total
