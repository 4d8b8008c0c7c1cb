"""Streamed input pipelines (grain `IterDataset`) over shards that are read front to back: webdataset tar files,
parquet row groups.

    this process's units (disjoint share) -> shuffled unit order per epoch (seed) -> repeat
      -> interleave `cycle_length` units (one reader thread each: read, decode, resize shorter side)
      -> shuffle buffer (seeded window shuffle) -> drop unusable samples -> crop/flip -> batch -> tokenize

A unit is a JSON-able descriptor (a tar path, a parquet row-group slice) and `read(unit, position)` yields
`(record, next_position)` from `position` on, so a unit's reading position is one number. The iterator's
`get_state()` is a JSON-able dict of every stage's position (grain's interleave, window shuffle, random map, batch
states plus the units'), and `set_state()` on a fresh pipeline of the same config continues with exactly the batches
an uninterrupted run sees: the training loop saves it in the checkpoint as it does the random-access loader's.

The order is a function of (seed, process count, `cycle_length`, `shuffle_buffer`), not of timing: each unit's
reader thread only prefetches, the interleave takes units round-robin.
"""

from __future__ import annotations

import atexit
import functools
import gc
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from diffusion.data import transforms
from diffusion.errors import UserError

Reader = Callable[[Any, int], Iterator[tuple[dict, int]]]


class _UnitIterator(grain.DatasetIterator):
  """The decoded records of one unit; its state is the reader's position."""

  def __init__(self, read: Reader, unit: Any, transform: Callable[[dict], dict], on_done: Callable[[], None]):
    super().__init__()
    self._read, self._unit, self._transform, self._on_done = read, unit, transform, on_done
    self._position, self._records, self._done = 0, None, False

  def __next__(self) -> dict:
    if self._records is None:
      self._records = self._read(self._unit, self._position)
    try:
      record, self._position = next(self._records)
    except StopIteration:
      if not self._done:
        self._done = True
        self._on_done()
      raise
    return self._transform(record)

  def get_state(self) -> dict:
    return {'position': int(self._position)}

  def set_state(self, state: dict) -> None:
    self._position, self._records = int(state['position']), None


class _UnitDataset(grain.IterDataset):
  """One unit as an `IterDataset` (what grain's interleave takes)."""

  def __init__(self, unit: Any, *, read: Reader, transform: Callable[[dict], dict], on_done: Callable[[], None]):
    super().__init__()
    self._unit, self._read, self._transform, self._on_done = unit, read, transform, on_done

  def __iter__(self) -> _UnitIterator:
    return _UnitIterator(self._read, self._unit, self._transform, self._on_done)

  def __str__(self) -> str:
    return f'_UnitDataset({self._unit!r})'


class _DecodeResize:
  """Decodes a record (counting problems in `DecodeRecord`'s stats) and resizes its shorter side to `size`, in the
  unit's reader thread: PIL releases the GIL while it decodes and resizes, so `cycle_length` units decode in
  parallel, and the shuffle buffer holds resized images rather than full-size ones."""

  def __init__(self, decode: transforms.DecodeRecord, size: int):
    self.decode, self.size = decode, size

  def __call__(self, record: dict) -> dict:
    element = self.decode.map(record)
    if element['image'] is not None:
      element['image'] = transforms.resize_shorter_side(element['image'], self.size)
    return element


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


class _ClosedAtExit(grain.IterDataset):
  """Its parent, whose iterators are closed at interpreter exit: their reader threads otherwise outlive the modules
  they use, and grain reports errors while Python shuts down."""

  def __iter__(self) -> grain.DatasetIterator:
    iterator = self._parent.__iter__()
    _LIVE_ITERATORS.add(iterator)
    return iterator

  def __str__(self) -> str:
    return '_ClosedAtExit'


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    try:
      iterator.close()
    except Exception:  # pylint: disable=broad-except  # Best effort at exit.
      pass
  gc.collect()  # Unreferenced iterators (cycles) are finalized now, while the modules they use still exist.


class _PassCounter:
  """Calls `stats.report()` once every unit of this process has been read to its end once (one pass)."""

  def __init__(self, num_units: int, stats: transforms.DataStats):
    self.num_units, self.stats, self.done = num_units, stats, 0
    self._lock = threading.Lock()

  def __call__(self) -> None:
    with self._lock:
      self.done += 1
      report = self.done == self.num_units
    if report:
      self.stats.report()


def create_stream_pipeline(
  units: list,
  read: Reader,
  data_config: ml_collections.ConfigDict,
  *,
  name: str,
  tokenizer: Any,
  batch_size: int,
  seed: int,
  shuffle: bool,
  num_epochs: int | None,
  drop_remainder: bool,
  shuffle_buffer: int,
  cycle_length: int,
  process_index: int = 0,
  num_records: int | None = None,
) -> grain.IterDataset:
  """This process's batches from its `units` (already its disjoint share), as `pipeline.create_image_pipeline`
  documents them. `num_epochs=None` repeats forever; `iter()` starts from the top each time; the result's
  `data_stats` holds this process's counts (`num_records`, when known, makes it log its summary after one pass)."""
  if not units:
    raise UserError(f'{name}: this process has no shard to read')
  stats = transforms.DataStats(name, num_records=num_records, shards=True)
  decode = _DecodeResize(
    transforms.DecodeRecord(data_config.image_key, data_config.caption_key, stats), data_config.image_size
  )
  on_done = _PassCounter(len(units), stats) if num_records is None else (lambda: None)
  ds = grain.MapDataset.source(units)
  if shuffle:
    ds = ds.shuffle(seed=_seed(seed, 0))  # A new unit order every epoch (grain reseeds per epoch).
  ds = ds.repeat(num_epochs).map(functools.partial(_UnitDataset, read=read, transform=decode, on_done=on_done))
  ds = grain.experimental.InterleaveIterDataset(
    ds, cycle_length=max(1, min(cycle_length, len(units))), iter_buffer_size=2
  )
  if shuffle and shuffle_buffer > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_buffer, seed=_seed(seed, 1))
  ds = ds.filter(transforms.KeepDecoded())
  augment = transforms.Augment(data_config.image_size, data_config.random_crop, data_config.random_flip)
  ds = ds.random_map(augment, seed=_seed(seed, 2, process_index))  # Processes draw different crops and flips.
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=transforms.stack_batch)
  ds = _ClosedAtExit(ds.map(transforms.Finalize(tokenizer, data_config.max_text_length, stats)))
  ds.data_stats = stats
  return ds


def make_record(image_key: str, caption_key: str, image: bytes, caption: str, file_name: str) -> dict:
  """A source record holding `image` and `caption` under the config's `data.image_key` / `data.caption_key` paths
  ('captions/text' -> {'captions': {'text': ...}}), so the random-access consumers (the vocabulary, the evaluation
  reference, the latent-cache writer) read streamed sources with the same keys as any other."""
  record: dict = {'file_name': file_name}
  for key_path, value in ((image_key, image), (caption_key, caption)):
    node, *path = record, *key_path.split('/')
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return record


def problem_record(kind: str, file_name: str) -> dict:
  """A record its source found unusable: `DecodeRecord` counts `kind` and drops it."""
  return {transforms.PROBLEM_KEY: kind, 'file_name': file_name}


def is_problem(record: dict) -> bool:
  return transforms.PROBLEM_KEY in record


def _seed(*values: int) -> int:
  """A 32-bit seed from (config seed, stage, ...): each stage's draws independent of the others'."""
  return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(1)[0])
