"""Grain input pipelines: data source -> decode -> resize/crop/flip -> tokenize -> batch.

One pipeline for every dataset. `data_config.name` picks the source: 'shapes' (the embedded dataset, prepared into
`data_dir` on first use), 'folder' (images + captions file), 'webdataset' (tar shards) and 'parquet' (parquet files)
(both streamed, see `diffusion.data.streaming`), or any other name, read as a TFDS dataset prepared in ArrayRecord
format with `tfds.data_source`.

Determinism: the example order comes from `IndexSampler(seed)`; random crop, flip and the choice
among several captions use the per-example generator grain derives from (seed, example index).
The loader's iterator has `get_state()` / `set_state()`, so a restored run continues with
exactly the batches it would have seen. Each host reads only its own shard
(`ShardOptions(process_index, process_count)`). The streamed sources shard by file (or row group), shuffle the
shard order and a buffer of samples, and checkpoint their position the same way.

The transforms themselves (decode, count, augment, batch, tokenize) live in `diffusion.data.transforms`; their
names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import tensorflow_datasets as tfds

from diffusion.data import folder as folder_lib
from diffusion.data import parquet as parquet_lib
from diffusion.data import tfds_shapes
from diffusion.data import webdataset as webdataset_lib
from diffusion.data.transforms import (  # noqa: F401  (re-exported: the pipeline's public names)
  _MESSAGES,
  Augment,
  DataStats,
  DecodeRecord,
  Finalize,
  KeepDecoded,
  draw_augmentation,
  normalize_images,
  record_caption,
  resize_shorter_side,
  swap_left_right,
)
from diffusion.data.transforms import stack_batch as _stack
from diffusion.errors import UserError
from diffusion.registry import Registry

SourceFactory = Callable[[ml_collections.ConfigDict, str], Any]
SOURCES: Registry[SourceFactory] = Registry('data source')
# Reader threads per process: enough to overlap file reads and image decoding, few enough that
# small in-memory records do not lose to GIL contention (grain's default is 16).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=128)


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
  """Decorator: makes `factory(data_config, split) -> data source` available as data.name."""
  return SOURCES.register(name)


def known_sources() -> list[str]:
  """Registered source names (any other name is looked up as a TFDS dataset)."""
  return SOURCES.names()


@register_source('shapes')
def _shapes_source(data_config: ml_collections.ConfigDict, split: str):
  opts = data_config.shapes
  builder = tfds_shapes.prepare_shapes(
    data_config.data_dir or None,
    resolution=data_config.image_size,
    max_objects=opts.max_objects,
    num_train=opts.num_train,
    num_eval=opts.num_eval,
  )
  return builder.as_data_source(split)


@register_source('folder')
def _folder_source(data_config: ml_collections.ConfigDict, split: str):
  return folder_lib.FolderDataSource(
    data_config.folder.path, data_config.folder.captions_file, split=split, train_split=data_config.train_split
  )


@register_source('webdataset')
def _webdataset_source(data_config: ml_collections.ConfigDict, split: str):
  return webdataset_lib.TarDataSource(data_config, split)


@register_source('parquet')
def _parquet_source(data_config: ml_collections.ConfigDict, split: str):
  return parquet_lib.ParquetDataSource(data_config, split)


# Sources read front to back (streamed): `create_image_pipeline` builds their batches with
# `factory(data_config, split, **its keyword arguments)`; `create_data_source` gives their random-access view.
STREAMS: Registry[Callable[..., Any]] = Registry('streamed data source')
STREAMS.add('webdataset', webdataset_lib.create_stream)
STREAMS.add('parquet', parquet_lib.create_stream)


def _tfds_source(data_config: ml_collections.ConfigDict, split: str):
  """A prepared TFDS dataset; an `Image` feature is read as its encoded bytes, so that `DecodeRecord` decodes it
  (to RGB whatever its channels) and skips and counts files that do not decode instead of failing the run."""
  kwargs = dict(split=split, data_dir=data_config.data_dir or None, download=False)
  try:
    source = tfds.data_source(data_config.name, **kwargs)
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError, AssertionError) as e:
    raise UserError(
      f'unknown data.name {data_config.name!r}: not one of {known_sources()} and not a TFDS '
      f'dataset prepared in ArrayRecord format under data_dir={data_config.data_dir!r} '
      f'({str(e).splitlines()[0] if str(e) else type(e).__name__})'
    ) from e
  decoders = _skip_image_decoding(getattr(source, 'dataset_info', None), data_config.image_key)
  return tfds.data_source(data_config.name, decoders=decoders, **kwargs) if decoders else source


def _skip_image_decoding(info: Any, image_key: str) -> dict | None:
  """{'a': {'b': SkipDecoding()}} for image_key 'a/b' when that feature is a TFDS `Image`, else None."""
  feature = getattr(info, 'features', None)
  for key in image_key.split('/'):
    try:
      feature = feature[key]
    except (KeyError, TypeError):
      return None
  if not isinstance(feature, tfds.features.Image):
    return None
  decoders: Any = tfds.decode.SkipDecoding()
  for key in reversed(image_key.split('/')):
    decoders = {key: decoders}
  return decoders


def create_data_source(data_config: ml_collections.ConfigDict, split: str):
  """The grain random-access source (records are dicts holding an image and a caption)."""
  factory = SOURCES.get(data_config.name) if data_config.name in SOURCES else _tfds_source
  return factory(data_config, split)


def create_image_pipeline(
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
) -> grain.DataLoader | grain.IterDataset:
  """This host's batches: dict(image=float32 (B, H, W, 3) in [-1, 1], input_ids=int32 (B, L)).

  `batch_size` is per host. `num_epochs=None` repeats forever. Iterate with `iter(loader)`; the
  iterator's `get_state()` / `set_state()` save and restore the position.

  The images of the dataset itself; `diffusion.data.inputs.create_input_pipeline` reads a latent cache instead where the
  config names one. The streamed sources (`STREAMS`: webdataset, parquet) give a grain `IterDataset` with the same
  batches, iterator protocol and `data_stats`.
  """
  if data_config.name in STREAMS:
    return STREAMS.get(data_config.name)(
      data_config,
      split,
      tokenizer=tokenizer,
      batch_size=batch_size,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      process_index=process_index,
      process_count=process_count,
      drop_remainder=drop_remainder,
    )
  source = create_data_source(data_config, split)
  sampler = make_sampler(
    len(source),
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
    drop_remainder=drop_remainder,
  )
  stats = DataStats(
    f'data {data_config.name}/{split}',
    num_records=_shard_size(len(source), process_index, process_count, drop_remainder),
  )
  operations = [
    DecodeRecord(data_config.image_key, data_config.caption_key, stats),
    KeepDecoded(),
    Augment(data_config.image_size, data_config.random_crop, data_config.random_flip),
    grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder, batch_fn=_stack),
    Finalize(tokenizer, data_config.max_text_length, stats),
  ]
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=operations,
    worker_count=data_config.worker_count,
    read_options=_READ_OPTIONS,
  )
  loader.data_stats = stats  # Live counts with worker_count=0; each worker process counts its own otherwise.
  return loader


def _shard_size(num_records: int, process_index: int, process_count: int, drop_remainder: bool) -> int:
  """Records in this host's shard (grain's `ShardOptions` split)."""
  if drop_remainder:
    return num_records // process_count
  return len(range(process_index, num_records, process_count))


def make_sampler(
  num_records: int,
  *,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  process_index: int,
  process_count: int,
  drop_remainder: bool,
) -> grain.samplers.IndexSampler:
  """This host's example order; grain derives each example's augmentation generator from (seed, position)."""
  shard = grain.sharding.ShardOptions(
    shard_index=process_index, shard_count=process_count, drop_remainder=drop_remainder
  )
  return grain.samplers.IndexSampler(
    num_records=num_records, shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
  )
