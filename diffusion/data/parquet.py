"""`data.name='parquet'`: images and captions in parquet files, as Hugging Face datasets and img2dataset write them.

The image column holds encoded image bytes: a binary column (img2dataset: `jpg`), or Hugging Face's `Image` feature,
a struct {'bytes': binary, 'path': string} (when `bytes` is null, `path` is read, relative to the parquet file).
The caption column holds a string (or a list of strings, one drawn per example). Read with pyarrow: the `parquet`
extra (`pip install -e '.[parquet]'`).

Keys (`config.data.parquet`): `files` (the training files: a brace pattern, a glob or a list file, see
`diffusion.data.shards`), `eval_files` (the eval split's; '' reads the training files), `image_column` ('image'),
`caption_column` ('text'), `shuffle_buffer`, `cycle_length`. The unit of sharding is a row group: each process reads
every `jax.process_count()`-th row group, or, when there are fewer row groups than processes, its own slice of each
row group. A row with a null image or caption is skipped and counted; undecodable images are skipped and counted
like any other source's. `ParquetDataSource` is the random-access view (by row; it keeps the last row group read).
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
from absl import logging

from diffusion.data import shards, streaming
from diffusion.errors import UserError

SUFFIXES = ('.parquet', '.pq')
KEY = 'data.parquet.files'


def _paths(data_config: ml_collections.ConfigDict, split: str) -> tuple[list[str], str]:
  section = data_config.parquet
  pattern, key = shards.split_pattern(section, split, data_config.train_split, data_config.eval_split, KEY)
  if split != data_config.train_split and key == KEY:
    logging.warning('data.parquet.eval_files is empty: the %r split reads the training files', split)
  return shards.list_shards(pattern, key, SUFFIXES), key


def row_groups(paths: list[str]) -> list[list]:
  """[path, row group, 0, rows] for every row group of `paths`, in order (from the files' footers only)."""
  pq = shards.require_pyarrow()
  groups = []
  for path in paths:
    metadata = pq.ParquetFile(path).metadata
    groups.extend([path, g, 0, metadata.row_group(g).num_rows] for g in range(metadata.num_row_groups))
  return [g for g in groups if g[3] > 0]


def process_units(groups: list[list], process_index: int, process_count: int) -> list[list]:
  """This process's [path, row group, first row, end row] units: every `process_count`-th row group, or with fewer
  row groups than processes, the `process_index`-th of `process_count` equal slices of all rows (cut at row-group
  boundaries into units). Disjoint over processes; their union is every row."""
  total = sum(g[3] for g in groups)
  if total < process_count:
    raise UserError(f'{KEY}: the files hold {total} rows for {process_count} processes: each needs at least one')
  if len(groups) >= process_count:
    return groups[process_index::process_count]
  lo, hi = total * process_index // process_count, total * (process_index + 1) // process_count
  units, start = [], 0
  for path, group, _, rows in groups:
    first, end = max(lo - start, 0), min(hi - start, rows)
    if end > first:
      units.append([path, group, first, end])
    start += rows
  return units


def _image_bytes(value: Any, path: str) -> bytes | None:
  """The encoded image of a cell: binary, or Hugging Face's {'bytes', 'path'} struct."""
  if isinstance(value, dict):
    if value.get('bytes') is not None:
      return value['bytes']
    file_path = value.get('path')
    if file_path:
      file_path = file_path if os.path.isabs(file_path) else os.path.join(os.path.dirname(path), file_path)
      if os.path.isfile(file_path):
        with open(file_path, 'rb') as f:
          return f.read()
    return None
  return value


def _read_columns(unit: list, image_column: str, caption_column: str) -> tuple[list, list]:
  path, group, lo, hi = unit
  table = shards.require_pyarrow().ParquetFile(path).read_row_group(group, columns=[image_column, caption_column])
  table = table.slice(lo, hi - lo)
  return table.column(image_column).to_pylist(), table.column(caption_column).to_pylist()


def _row_record(unit: list, row: int, image: Any, caption: Any, keys: tuple[str, str]) -> dict:
  name = f'{unit[0]}[row group {unit[1]}, row {unit[2] + row}]'
  data = _image_bytes(image, unit[0])
  if data is None:
    return streaming.problem_record('no_image', name)
  if caption is None:
    return streaming.problem_record('no_caption', name)
  return streaming.make_record(*keys, data, caption, name)


def read_unit(
  unit: list, position: int, *, image_column: str, caption_column: str, keys: tuple[str, str]
) -> Iterator[tuple[dict, int]]:
  """(record, next row) for each row of the unit from row `position` on (rows counted from the unit's start)."""
  if position >= unit[3] - unit[2]:
    return
  images, captions = _read_columns(unit, image_column, caption_column)
  for row in range(position, len(images)):
    yield _row_record(unit, row, images[row], captions[row], keys), row + 1


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
  """This process's batches of `split`, streamed from its share of the row groups."""
  paths, _ = _paths(data_config, split)
  units = process_units(row_groups(paths), process_index, process_count)
  options = data_config.parquet
  read = functools.partial(
    read_unit,
    image_column=options.image_column,
    caption_column=options.caption_column,
    keys=(data_config.image_key, data_config.caption_key),
  )
  return streaming.create_stream_pipeline(
    units,
    read,
    data_config,
    name=f'data parquet/{split}',
    tokenizer=tokenizer,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    drop_remainder=drop_remainder,
    shuffle_buffer=options.shuffle_buffer,
    cycle_length=options.cycle_length,
    process_index=process_index,
    num_records=sum(hi - lo for _, _, lo, hi in units),
  )


class ParquetDataSource:
  """Random access by row to a split's files (for the vocabulary, the evaluation reference, the latent-cache writer).

  Records are the stream's; a row with a null image or caption gives an empty image (skipped as undecodable) and an
  empty caption. Reading row i reads its row group (the last one read is kept), so sequential reads are cheap.
  """

  def __init__(self, data_config: ml_collections.ConfigDict, split: str):
    paths, _ = _paths(data_config, split)
    self._units = row_groups(paths)
    self._starts = [0]
    for unit in self._units:
      self._starts.append(self._starts[-1] + unit[3])
    options = data_config.parquet
    self._columns = (options.image_column, options.caption_column)
    self._keys = (data_config.image_key, data_config.caption_key)
    self._cached: tuple[int, tuple[list, list]] | None = None
    self._desc = f'ParquetDataSource(split={split!r}, files={len(paths)}, n={len(self)})'

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(index)
    u = bisect.bisect_right(self._starts, index) - 1
    if self._cached is None or self._cached[0] != u:
      self._cached = (u, _read_columns(self._units[u], *self._columns))
    images, captions = self._cached[1]
    row = index - self._starts[u]
    record = _row_record(self._units[u], row, images[row], captions[row], self._keys)
    if streaming.is_problem(record):
      return streaming.make_record(*self._keys, b'', '', record['file_name'])
    return record

  def __repr__(self) -> str:
    return self._desc
