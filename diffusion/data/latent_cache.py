"""Reading precomputed VAE posteriors for stage 2 (written by `diffusion.latent_cache_writer`).

Layout: `DIR/<split>/latents-<i>-of-<n>.array_record` (one shard per writing process, contiguous index ranges, so
their concatenation is the dataset's own record order), `DIR/<split>/shard-<i>-of-<n>.json` (per-shard counts) and
`DIR/<split>/metadata.json` (what the cache was made from: VAE workdir and a hash of its EMA params, image size,
latent shape, augmentation variants, dataset name/split/size). Each record is a msgpack dict: `valid` (False for an
undecodable image, kept as a placeholder so record indices equal the dataset's), `captions`, `flipped_captions`,
and float32 posterior `mean` / `logvar` of shape (variants, h, w, c): variant 0 the centre-cropped image, variant 1
(when stored) its horizontal flip.

Text embeddings (optional, `precompute(..., text_encoder=...)`, for a frozen text encoder): each record also holds
`text_embeddings` (captions, L, D), the encoder hidden states the U-Net cross-attends to for each caption, and
`flipped_text_embeddings`, the same for `flipped_captions` (an empty array when no caption changes under the flip or
no flip is stored: the reader then uses `text_embeddings`). `DIR/<split>/null_text_embedding.npy` holds the empty
prompt's (L, D) embedding once (caption dropout), always float32. The metadata's `text_encoder` entry names the
encoder (its workdir, `checkpoint.params_hash` of its params, its architecture, the tokenizer's vocabulary hash, L,
D) and the storage dtype (`float32` by default, exact; `float16` / `bfloat16` halve it). Size per caption variant:
L x D x 4 bytes in float32: 77 x 768 x 4 = 236,544 bytes (231 KiB) for CLIP ViT-L, 115.5 KiB in 16 bits; a sample
with 5 captions whose flipped captions differ stores 10 of them (2.3 MiB in float32). The U-Net consumes only the
hidden states (no attention mask, no pooled output), so nothing else is stored.

Training from the cache (`config.data.latent_cache = DIR`) reads the records with the same grain sampler as the
image pipeline and replays `pipeline.draw_augmentation` with the same per-example generator, so every example gets
the same caption and flip as on the fly; the task then samples the latent from the stored posterior with the same
per-example key (`ldm_task.sample_posterior`). Random crops cannot be cached (`data.random_crop` must be False).
With text embeddings, the batches also carry `text_embedding` (B, L, D) float32: the embedding of the caption (and
flip) that example drew, so a frozen text encoder need not run (`ldm_task`); caption dropout then swaps in the stored
empty-prompt embedding. A cache with text embeddings is refused for a trained text encoder (`model.text.trainable`):
its embeddings would be stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from diffusion import models
from diffusion.checkpoint import params_hash
from diffusion.data import pipeline as data_pipeline
from diffusion.errors import ConfigError, UserError

FORMAT = 'ldm-jax-latent-cache'
VERSION = 1
VARIANTS = {'none': ('original',), 'both': ('original', 'flipped')}
_METADATA = 'metadata.json'
NULL_TEXT_EMBEDDING = 'null_text_embedding.npy'
TEXT_EMBEDDING_DTYPES = ('float32', 'float16', 'bfloat16')
_TEXT_FIELDS = ('type', 'hidden_size', 'num_hidden_layers', 'num_attention_heads', 'hidden_act', 'layer_norm_eps')


def split_dir(cache_dir: str, split: str) -> str:
  return os.path.join(cache_dir, split.replace('/', '_'))


def has_split(cache_dir: str, split: str) -> bool:
  return os.path.isfile(os.path.join(split_dir(cache_dir, split), _METADATA))


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


def tokenizer_hash(tokenizer: Any) -> str:
  """sha256 of the tokenizer's vocabulary (token -> id): which ids the cached embeddings were computed from."""
  vocab = sorted(tokenizer.get_vocab().items())
  return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()


def text_encoder_identity(text_config: ml_collections.ConfigDict, tokenizer: Any, max_text_length: int) -> dict:
  """What decides the text embeddings besides the params: architecture, tokenizer, padded length."""
  # The fields that shape the hidden states (the params hash covers the weights; pooling fields are not used).
  config = {k: text_config.get(k) for k in _TEXT_FIELDS}
  return {'config': config, 'tokenizer_sha256': tokenizer_hash(tokenizer), 'max_text_length': int(max_text_length)}


def text_params_hashes(params: Any) -> dict:
  """`checkpoint.params_hash` of the text params in float32 and in bfloat16: a run keeping its frozen text encoder in
  `train.frozen_param_dtype='bfloat16'` holds the bf16 rounding of the params the embeddings were computed with."""
  cast = lambda dtype: jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
  return {'params_sha256': params_hash(cast(np.float32)), 'bfloat16_params_sha256': params_hash(cast(jnp.bfloat16))}


def expected_metadata(config: ml_collections.ConfigDict, split: str) -> dict:
  """The metadata fields a cache must have for `config` (model.vae already the VAE workdir's) to train from it."""
  vae = config.model.vae
  latent = config.data.image_size // models.vae_downsample_factor(vae)
  return {
    'format': FORMAT,
    'version': VERSION,
    'image_size': config.data.image_size,
    'latent_shape': [latent, latent, vae.latent_channels],
    'dataset': _dataset_identity(config.data, split),
    'vae_config': _architecture(vae),
  }


def load_metadata(cache_dir: str, split: str) -> dict:
  """metadata.json of a split, after checking that every shard it lists is there."""
  directory = split_dir(cache_dir, split)
  path = os.path.join(directory, _METADATA)
  if not os.path.isfile(path):
    found = sorted(d for d in os.listdir(cache_dir) if has_split(cache_dir, d)) if os.path.isdir(cache_dir) else []
    raise ConfigError(
      'data.latent_cache',
      f'{cache_dir!r} holds no latent cache for split {split!r} (no {path}; '
      f'splits found: {found or "none"}); make one with scripts/precompute_latents.py',
    )
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON: {e}') from None
  missing = [
    s for s in meta.get('shards', []) + meta.get('shard_stats', []) if not os.path.isfile(os.path.join(directory, s))
  ]
  if missing:
    raise ConfigError(
      'data.latent_cache',
      f'latent cache {directory!r} is incomplete: missing {missing[:3]} '
      '(a writing process has not finished, or failed)',
    )
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


def _text_problems(config: ml_collections.ConfigDict, meta: dict, text: tuple | None) -> list[str]:
  """Mismatches of a cache's text embeddings with this run's text encoder; `text`: (frozen params, tokenizer)."""
  stored = meta.get('text_encoder')
  if not stored:
    return []
  if config.model.text.trainable:
    return [
      'text_encoder: the cache holds embeddings of a frozen text encoder, but model.text.trainable=True trains it '
      '(the embeddings would be stale); precompute without --text_embeddings or freeze the text encoder'
    ]
  if text is None:
    return []
  params, tokenizer = text
  bf16 = {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
  digest_key = 'bfloat16_params_sha256' if bf16 else 'params_sha256'
  problems = [
    f'text_encoder.{p}'
    for p in _mismatches(stored, text_encoder_identity(config.model.text, tokenizer, config.data.max_text_length))
  ]
  if stored.get(digest_key) != params_hash(params):
    problems.append(
      f'text encoder params: the embeddings were computed with the text encoder of {stored.get("workdir")!r} '
      f"(params hash {str(stored.get(digest_key))[:12]}...), not this run's frozen text encoder"
    )
  return problems


def check_cache(
  config: ml_collections.ConfigDict, split: str, vae_params: Any = None, text: tuple | None = None
) -> dict:
  """Refuses (ConfigError naming the mismatch) a cache that was not made for this config and frozen VAE (and, when
  it holds text embeddings, this run's frozen text encoder: `text` = (its params, the tokenizer))."""
  cache_dir = config.data.latent_cache
  meta = load_metadata(cache_dir, split)
  problems = _mismatches(meta, expected_metadata(config, split))
  if config.data.random_flip and 'flipped' not in meta.get('variants', []):
    problems.append(
      f'variants: cache has {meta.get("variants")}, data.random_flip=True needs the flipped variant '
      '(precompute with --flips both)'
    )
  if vae_params is not None and meta.get('vae_params_sha256') != params_hash(vae_params):
    problems.append(
      f'VAE params: the cache was encoded with the VAE of {meta.get("vae_workdir")!r} (params hash '
      f"{str(meta.get('vae_params_sha256'))[:12]}...), not this run's frozen VAE"
    )
  problems += _text_problems(config, meta, text)
  if problems:
    raise ConfigError(
      'data.latent_cache',
      f'{split_dir(cache_dir, split)!r} does not match the config: '
      + '; '.join(problems)
      + ' (rerun scripts/precompute_latents.py)',
    )
  return meta


def check_training_cache(config: ml_collections.ConfigDict, vae_params: Any, text: tuple | None = None) -> None:
  """`check_cache` for the training split and, when the cache holds it, the evaluation split."""
  check_cache(config, config.data.train_split, vae_params, text)
  if config.data.eval_split != config.data.train_split and has_split(config.data.latent_cache, config.data.eval_split):
    check_cache(config, config.data.eval_split, vae_params, text)


def has_text_embeddings(cache_dir: str, split: str) -> bool:
  """Whether the split's cache holds text embeddings (cheap: reads the metadata only)."""
  return has_split(cache_dir, split) and bool(load_metadata(cache_dir, split).get('text_encoder'))


def load_null_text_embedding(cache_dir: str, split: str) -> np.ndarray:
  """The empty prompt's (L, D) float32 embedding stored with the split (what caption dropout trains on)."""
  return np.load(os.path.join(split_dir(cache_dir, split), NULL_TEXT_EMBEDDING)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- reading


def _shard_paths(cache_dir: str, split: str, meta: dict) -> list[str]:
  return [os.path.join(split_dir(cache_dir, split), s) for s in meta['shards']]


def open_source(cache_dir: str, split: str) -> tuple[Any, dict]:
  """(random-access source of serialized records in dataset order, metadata)."""
  meta = load_metadata(cache_dir, split)
  source = grain.sources.ArrayRecordDataSource(_shard_paths(cache_dir, split, meta))
  if len(source) != meta['dataset']['num_records']:
    raise UserError(
      f'latent cache {split_dir(cache_dir, split)!r} holds {len(source)} records, its metadata says '
      f'{meta["dataset"]["num_records"]}'
    )
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
    choice, _, _, flip = data_pipeline.draw_augmentation(
      rng, len(element['captions']), s, s, s, False, self.random_flip
    )
    captions = element['flipped_captions'] if flip else element['captions']
    out = {
      'latent_mean': element['mean'][int(flip)],
      'latent_logvar': element['logvar'][int(flip)],
      'caption': captions[choice],
    }
    if 'text_embeddings' in element:  # The same choice picks the caption's stored embedding.
      flipped = element['flipped_text_embeddings']
      out['text_embedding'] = (flipped if flip and len(flipped) else element['text_embeddings'])[choice]
    return out


def _stack(elements: list[dict]) -> dict:
  out = {
    'latent_mean': np.stack([e['latent_mean'] for e in elements]).astype(np.float32),
    'latent_logvar': np.stack([e['latent_logvar'] for e in elements]).astype(np.float32),
    'caption': [e['caption'] for e in elements],
  }
  if 'text_embedding' in elements[0]:
    out['text_embedding'] = np.stack([e['text_embedding'] for e in elements]).astype(np.float32)
  return out


def create_cached_pipeline(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  tokenizer,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  drop_remainder: bool = True,
) -> grain.DataLoader:
  """This host's batches: dict(latent_mean, latent_logvar: float32 (B, h, w, c), input_ids: int32 (B, L)), plus
  text_embedding: float32 (B, L, D) when the cache holds text embeddings.

  Same sampler, sharding and augmentation draws as `pipeline.create_image_pipeline` on the image dataset.
  """
  if data_config.random_crop:
    raise ConfigError(
      'data.random_crop',
      'random crops cannot be read from a latent cache (data.latent_cache); '
      'set data.random_crop=False or train on images',
    )
  source, meta = open_source(data_config.latent_cache, split)
  if data_config.random_flip and 'flipped' not in meta['variants']:
    raise ConfigError(
      'data.latent_cache',
      f'split {split!r} has no flipped latents but data.random_flip=True (precompute with --flips both)',
    )
  sampler = data_pipeline.make_sampler(
    len(source),
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
    drop_remainder=drop_remainder,
  )
  operations = [
    _DecodeCached(),
    _KeepValid(),
    CachedAugment(data_config.image_size, data_config.random_flip),
    grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder, batch_fn=_stack),
    data_pipeline.Finalize(tokenizer, data_config.max_text_length),
  ]
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=operations,
    worker_count=data_config.worker_count,
    read_options=data_pipeline._READ_OPTIONS,
  )  # pylint: disable=protected-access
