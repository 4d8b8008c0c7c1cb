"""`data.name='webdataset'`: tar shards as img2dataset (and webdataset's `ShardWriter`) write them.

A shard is a plain tar (or .tar.gz) whose members are grouped into samples by key, in order: `{key}.jpg|jpeg|png|webp`
(the image), `{key}.txt` (the caption), `{key}.json` (metadata, kept as text); other members are ignored. The key is
the member path up to the first '.' of its base name, as webdataset defines it. Python's `tarfile` reads them: no
extra package is needed.

Keys (`config.data.webdataset`): `urls` (the training shards: a brace pattern such as `/data/{00000..00127}.tar`, a
glob, or a text file listing shards one per line), `eval_urls` (the eval split's shards; '' reads the training
shards), `shuffle_buffer` (samples in the shuffle window) and `cycle_length` (shards read at once, each by its own
thread). Each process reads every `jax.process_count()`-th shard (`shards.process_share`).

Training streams the shards (`create_stream`, see `diffusion.data.streaming`). A sample without an image or a caption
member, and the last sample of a truncated shard, are skipped and counted; an image that does not decode is skipped
and counted like any other source's. `TarDataSource` is the random-access view the vocabulary, the evaluation
reference and the latent-cache writer read: it indexes every shard's member headers once.
"""

from __future__ import annotations

import functools
import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import grain
import ml_collections
from absl import logging

from diffusion.data import shards, streaming

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_EXTENSION = 'txt'
METADATA_EXTENSION = 'json'
SUFFIXES = ('.tar', '.tar.gz', '.tgz')
KEY = 'data.webdataset.urls'
DONE = -1  # The reading position of a shard read to its end.


def split_key(name: str) -> tuple[str, str]:
  """('dir/000001', 'jpg') for 'dir/000001.jpg'; the extension is everything after the base name's first '.'."""
  directory, base = os.path.split(name)
  stem, _, extension = base.partition('.')
  return os.path.join(directory, stem), extension.lower()


def _open(path: str) -> BinaryIO:
  return gzip.open(path, 'rb') if path.endswith(('.gz', '.tgz')) else open(path, 'rb')


def _sample(key: str, members: dict[str, bytes], path: str, image_key: str, caption_key: str) -> dict:
  """A record from one sample's members, or a problem record when it has no image or no caption."""
  name = f'{path}:{key}'
  image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
  if image is None:
    return streaming.problem_record('no_image', name)
  if CAPTION_EXTENSION not in members:
    return streaming.problem_record('no_caption', name)
  caption = members[CAPTION_EXTENSION].decode('utf-8', errors='replace')
  record = streaming.make_record(image_key, caption_key, image, caption, name)
  if METADATA_EXTENSION in members:
    record['json'] = members[METADATA_EXTENSION].decode('utf-8', errors='replace')
  return record


def read_shard(path: str, position: int, *, image_key: str, caption_key: str) -> Iterator[tuple[dict, int]]:
  """(record, byte offset of the next sample) for each sample of the tar `path` from byte offset `position` (the
  first header of a sample); the last sample's next position is `DONE`. A shard cut short ends with a
  'truncated_shard' problem record in place of its last sample."""
  if position == DONE:
    return
  key, members, truncated, end = None, {}, False, None
  with _open(path) as f:
    try:
      f.seek(position)
      tar = tarfile.open(fileobj=f, mode='r|')
      for info in tar:
        tar.members = []  # Stream mode keeps every header otherwise.
        if not info.isfile():
          continue
        member_key, extension = split_key(info.name)
        if member_key != key:
          if key is not None:
            yield _sample(key, members, path, image_key, caption_key), position + info.offset
          key, members = member_key, {}
        members[extension] = tar.extractfile(info).read()
      end = position + tar.offset
    except (tarfile.ReadError, EOFError, OSError, zlib.error) as e:
      # A resumed read that starts at the end of an archive without end blocks finds an 'empty file': not damage.
      truncated = position == 0 or key is not None or 'empty file' not in str(e)
  truncated = truncated or (end is not None and _ends_mid_header(path, end))
  if key is not None:
    record = streaming.problem_record('truncated_shard', f'{path}:{key}') if truncated else None
    yield record or _sample(key, members, path, image_key, caption_key), DONE
  elif truncated:
    yield streaming.problem_record('truncated_shard', path), DONE


def _ends_mid_header(path: str, end: int) -> bool:
  """Whether the bytes after the last member are a partial (non-zero, short) header: a file cut inside a header,
  which `tarfile` takes for the end of the archive."""
  try:
    with _open(path) as f:
      f.seek(end)
      rest = f.read(tarfile.BLOCKSIZE)
  except (EOFError, OSError, zlib.error):
    return True
  return 0 < len(rest) < tarfile.BLOCKSIZE and any(rest)


def _shard_paths(data_config: ml_collections.ConfigDict, split: str) -> tuple[list[str], str]:
  """The shards of `split` and the config key that names them."""
  section = data_config.webdataset
  pattern, key = shards.split_pattern(section, split, data_config.train_split, data_config.eval_split, KEY)
  if split != data_config.train_split and key == KEY:
    logging.warning('data.webdataset.eval_urls is empty: the %r split reads the training shards', split)
  return shards.list_shards(pattern, key, SUFFIXES), key


def create_stream(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  tokenizer: Any,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """This process's batches of `split`, streamed from its share of the shards."""
  paths, key = _shard_paths(data_config, split)
  mine = shards.process_share(paths, process_index, process_count, key)
  read = functools.partial(read_shard, image_key=data_config.image_key, caption_key=data_config.caption_key)
  options = data_config.webdataset
  return streaming.create_stream_pipeline(
    mine,
    read,
    data_config,
    name=f'data webdataset/{split}',
    tokenizer=tokenizer,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    drop_remainder=drop_remainder,
    shuffle_buffer=options.shuffle_buffer,
    cycle_length=options.cycle_length,
    process_index=process_index,
  )


class TarDataSource:
  """Random access to the complete samples of a split's shards (indexed from their member headers, once).

  Records are those the stream yields (image bytes and caption under `data.image_key` / `data.caption_key`,
  `file_name` = 'shard:key'). Samples without an image or caption are left out and counted in `num_incomplete`.
  """

  def __init__(self, data_config: ml_collections.ConfigDict, split: str):
    self._keys = (data_config.image_key, data_config.caption_key)
    paths, _ = _shard_paths(data_config, split)
    self._index: list[tuple[str, str, tuple[int, int], tuple[int, int]]] = []
    self.num_incomplete = 0
    for path in paths:
      self._index_shard(path)
    if self.num_incomplete:
      logging.warning('webdataset %s: left out %d samples without an image or caption', split, self.num_incomplete)
    self._desc = f'TarDataSource(split={split!r}, shards={len(paths)}, n={len(self._index)})'

  def _index_shard(self, path: str) -> None:
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    try:
      with tarfile.open(path, 'r:*') as tar:
        for info in tar:
          if info.isfile():
            key, extension = split_key(info.name)
            groups.setdefault(key, {})[extension] = (info.offset_data, info.size)
    except (tarfile.ReadError, EOFError, OSError) as e:
      logging.warning('webdataset shard %s is damaged (%s): indexed the samples before the damage', path, e)
    for key, members in groups.items():
      image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
      if image is None or CAPTION_EXTENSION not in members:
        self.num_incomplete += 1
        continue
      self._index.append((path, key, image, members[CAPTION_EXTENSION]))

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, index: int) -> dict:
    path, key, image, caption = self._index[index]
    with _open(path) as f:
      data, text = [_read_at(f, *where) for where in (image, caption)]
    return streaming.make_record(*self._keys, data, text.decode('utf-8', errors='replace'), f'{path}:{key}')

  def __repr__(self) -> str:
    return self._desc


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
  f.seek(offset)
  return f.read(size)
