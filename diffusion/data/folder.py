"""A folder of images with a captions file, as a grain random-access data source.

Layout (Hugging Face `imagefolder` style):

    path/metadata.jsonl       {"file_name": "0001.png", "text": "a cat"} per line, or
    path/metadata.csv         with columns file_name,text (and optionally split)
    path/0001.png ...         images, file_name relative to the captions file's folder

A split is read from `path/<split>/` when that folder exists, else from rows whose optional
`split` column equals it, else every row is used (with a warning for non-train splits). `text`
may also be a list of captions. An optional `loss_weight` column weighs each example's training loss (DreamBooth's
prior-preservation images; rows without it weigh 1). Records hold the raw file bytes; decoding happens in the input
pipeline, where files that cannot be decoded are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

from absl import logging

from diffusion.errors import UserError

_CAPTION_FILES = ('metadata.jsonl', 'metadata.csv')


class FolderNotFoundError(UserError, FileNotFoundError):
  """A missing image folder or captions file: a user error (one `error: ...` line), still a FileNotFoundError."""


def _read_rows(captions_file: str) -> list[dict]:
  """Rows of a .jsonl or .csv captions file, each with at least file_name and text."""
  if not os.path.isfile(captions_file):
    raise FolderNotFoundError(f'captions file not found: {captions_file!r} (data.folder.captions_file)')
  with open(captions_file, newline='', encoding='utf-8') as f:
    if captions_file.endswith('.jsonl') or captions_file.endswith('.json'):
      rows = []
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise UserError(f'{captions_file} line {number} is not valid JSON ({e})') from None
    elif captions_file.endswith('.csv'):
      rows = list(csv.DictReader(f))
    else:
      raise UserError(f'captions file must be .jsonl or .csv: {captions_file}')
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or 'file_name' not in row or 'text' not in row:
      raise UserError(f"{captions_file} row {i} lacks 'file_name' or 'text': {row}")
  return rows


def _find_captions_file(directory: str, captions_file: str) -> str:
  if captions_file:
    if os.path.isabs(captions_file) or os.path.exists(captions_file):
      return captions_file
    return os.path.join(directory, captions_file)
  for name in _CAPTION_FILES:
    candidate = os.path.join(directory, name)
    if os.path.exists(candidate):
      return candidate
  raise FolderNotFoundError(f'no captions file ({" or ".join(_CAPTION_FILES)}) in {directory}')


class FolderDataSource:
  """Random access to {'image': file bytes, 'caption': text (or list), 'file_name': path}.

  Rows whose image file does not exist are dropped (and counted in `num_missing`) up front.
  """

  def __init__(self, path: str, captions_file: str = '', split: str | None = None, train_split: str = 'train'):
    if not path or not os.path.isdir(path):
      raise FolderNotFoundError(f'image folder not found: {path!r} (data.folder.path)')
    directory = path
    if split and os.path.isdir(os.path.join(path, split)):
      directory = os.path.join(path, split)
    captions_path = _find_captions_file(directory, captions_file)
    rows = _read_rows(captions_path)
    if split and directory == path and any('split' in r for r in rows):
      rows = [r for r in rows if r.get('split') == split]
    elif split and directory == path and split != train_split:
      logging.warning('Folder %s has no %r split: using all of its images.', path, split)
    root = os.path.dirname(os.path.abspath(captions_path))
    self._files: list[str] = []
    self._captions: list = []
    self._weights: list[float] | None = [] if any('loss_weight' in row for row in rows) else None
    self.num_missing = 0
    for row in rows:
      file_path = os.path.join(root, row['file_name'])
      if not os.path.isfile(file_path):
        self.num_missing += 1
        continue
      self._files.append(file_path)
      self._captions.append(row['text'])
      if self._weights is not None:
        self._weights.append(float(row.get('loss_weight', 1.0)))
    if self.num_missing:
      logging.warning('Folder %s: skipped %d rows whose image file is missing.', path, self.num_missing)
    if not self._files:
      raise UserError(f'no images found for split {split!r} in {path} ({captions_path})')
    self._desc = f'FolderDataSource(path={path!r}, split={split!r}, n={len(self._files)})'

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict:
    file_path = self._files[index]
    try:
      with open(file_path, 'rb') as f:
        data = f.read()
    except OSError:
      data = b''  # Unreadable: the decoder skips it like any undecodable file.
    record = {'image': data, 'caption': self._captions[index], 'file_name': file_path}
    if self._weights is not None:
      record['loss_weight'] = self._weights[index]
    return record

  def __repr__(self) -> str:
    return self._desc

  @property
  def file_names(self) -> Sequence[str]:
    return tuple(self._files)
