"""The reference split of an evaluation: its images (preprocessed as in training, without random crops or flips),
its captions (the default prompts), and each process's share of it."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import ml_collections
import numpy as np

from diffusion.errors import UserError


def process_batches(num: int, local_batch: int) -> list[np.ndarray]:
  """This process's batches of the indices 0..num-1: global batch k covers [k G, (k + 1) G) with G = local_batch x
  processes, and process p takes its p-th slice. The shares are disjoint, their union is every index, and each
  batch holds the same indices as batch k * P + p of a 1-process run with `local_batch`, so per-image results do not
  depend on the process count."""
  import jax

  count, index = jax.process_count(), jax.process_index()
  batches = []
  for lo in range(0, num, local_batch * count):
    mine = np.arange(lo + index * local_batch, min(lo + (index + 1) * local_batch, num))
    if len(mine):
      batches.append(mine)
  return batches


@dataclasses.dataclass
class ReferenceData:
  """The first `limit` records of a split of `config.data`."""

  config: ml_collections.ConfigDict
  split: str
  limit: int

  def __post_init__(self):
    from diffusion.data import pipeline as data_pipeline

    data = self.config.data
    try:
      self._source = data_pipeline.create_data_source(data, self.split)
    except (ValueError, FileNotFoundError) as e:
      raise UserError(f'cannot read the reference split {self.split!r}: {e}') from None
    self.size = min(self.limit, len(self._source))
    self._decode = data_pipeline.DecodeRecord(data.image_key, data.caption_key)
    self._resize = data_pipeline.Augment(data.image_size, random_crop=False, random_flip=False)
    self._caption = lambda record: data_pipeline.record_caption(record, data)

  @property
  def name(self) -> str:
    """Identifies the reference data in cache file names, e.g. 'shapes-train-1000'."""
    return f'{self.config.data.name}-{self.split}-{self.size}'

  def captions(self) -> list[str]:
    return [self._caption(self._source[i]) for i in range(self.size)]

  def _image(self, i: int) -> np.ndarray | None:
    element = self._decode.map(self._source[i])
    if element['image'] is None:  # Undecodable records are skipped.
      return None
    return self._resize.random_map(element, np.random.default_rng(0))['image']

  def first_images(self, n: int) -> np.ndarray:
    """The first `n` decodable images (the same on every process), e.g. to calibrate a random network."""
    images = []
    for i in range(self.size):
      if len(images) == n:
        break
      image = self._image(i)
      if image is not None:
        images.append(image)
    if not images:
      raise UserError(f'the reference split {self.split!r} has no readable images')
    return np.stack(images)

  def batches(self, local_batch: int) -> Iterator[np.ndarray]:
    """uint8 batches of this process's share of the images (`process_batches`)."""
    for indices in process_batches(self.size, local_batch):
      images = [image for image in (self._image(int(i)) for i in indices) if image is not None]
      if images:
        yield np.stack(images)
