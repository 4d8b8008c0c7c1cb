"""Tests of image folders with jsonl/csv captions, including a broken and a missing file."""

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from diffusion.data import folder, pipeline, tokenizer

COLOURS = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255), 'white': (255,) * 3, 'black': (0, 0, 0)}


def _make_folder(root, fmt: str):
  """Five decodable images (varied sizes/modes), one broken file, one row without a file."""
  root.mkdir(parents=True, exist_ok=True)
  rows = []
  for i, (name, rgb) in enumerate(COLOURS.items()):
    size = (20 + 4 * i, 16 + 2 * i)
    image = Image.new('RGB', size, rgb)
    file_name = f'img{i}.png' if i % 2 else f'img{i}.jpg'
    if i == 4:
      image = image.convert('L')  # Greyscale file.
    image.save(root / file_name)
    rows.append({'file_name': file_name, 'text': f'a {name} picture'})
  (root / 'broken.png').write_bytes(b'\x89PNG this is not an image')
  rows.append({'file_name': 'broken.png', 'text': 'a broken picture'})
  rows.append({'file_name': 'missing.png', 'text': 'a missing picture'})
  if fmt == 'jsonl':
    with open(root / 'metadata.jsonl', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  else:
    with open(root / 'metadata.csv', 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=['file_name', 'text'])
      writer.writeheader()
      writer.writerows(rows)
  return root


@pytest.fixture
def tok():
  texts = [f'a {c} picture' for c in COLOURS] + ['a broken picture', 'a missing picture']
  return tokenizer.build_word_tokenizer(texts, 8)


@pytest.mark.parametrize('fmt', ['jsonl', 'csv'])
def test_folder_pipeline_skips_broken_files(tmp_path, fmt, make_config, tok, caplog):
  root = _make_folder(tmp_path / fmt, fmt)
  config = make_config(name='folder', image_size=16, max_text_length=8, folder=dict(path=str(root), captions_file=''))
  source = pipeline.create_data_source(config, 'train')
  assert len(source) == 6 and source.num_missing == 1
  loader = pipeline.create_image_pipeline(
    config, 'train', tokenizer=tok, batch_size=2, seed=0, num_epochs=1, shuffle=False, drop_remainder=False
  )
  with caplog.at_level(logging.WARNING):
    batches = list(loader)
  images = np.concatenate([b['image'] for b in batches])
  captions = sum((tok.batch_decode(b['input_ids'], skip_special_tokens=True) for b in batches), [])
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.float32
  assert captions == [f'a {c} picture' for c in COLOURS]  # The broken one is gone.
  for image, name in zip(images, COLOURS):
    expected = np.asarray(COLOURS[name], np.float32) / 127.5 - 1
    np.testing.assert_allclose(image.mean((0, 1)), expected, atol=0.05)
  skipped = [r for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(skipped) == 1 and 'broken.png' in skipped[0].getMessage()


def test_explicit_captions_file_and_split_folders(tmp_path):
  _make_folder(tmp_path / 'train', 'jsonl')
  _make_folder(tmp_path / 'validation', 'csv')
  (tmp_path / 'validation' / 'img0.jpg').unlink()
  train = folder.FolderDataSource(str(tmp_path), split='train')
  val = folder.FolderDataSource(str(tmp_path), split='validation')
  assert len(train) == 6 and len(val) == 5
  assert all('/validation/' in f for f in val.file_names)
  explicit = folder.FolderDataSource(str(tmp_path / 'train'), 'metadata.jsonl')
  record = explicit[0]
  assert record['caption'] == 'a red picture' and record['image'][:2] == b'\xff\xd8'  # JPEG.
  assert 'FolderDataSource' in repr(explicit)


def test_split_column(tmp_path):
  root = tmp_path / 'f'
  root.mkdir()
  for i in range(4):
    Image.new('RGB', (8, 8)).save(root / f'{i}.png')
  with open(root / 'metadata.csv', 'w') as f:
    f.write('file_name,text,split\n0.png,a,train\n1.png,b,train\n2.png,c,validation\n3.png,d,test\n')
  assert len(folder.FolderDataSource(str(root), split='train')) == 2
  assert folder.FolderDataSource(str(root), split='validation')[0]['caption'] == 'c'


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    folder.FolderDataSource(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError):
    folder.FolderDataSource(str(tmp_path))  # No captions file.
  (tmp_path / 'metadata.jsonl').write_text(json.dumps({'file_name': 'x.png'}) + '\n')
  with pytest.raises(ValueError, match='text'):
    folder.FolderDataSource(str(tmp_path))


def test_loss_weight_column_reaches_the_batches(tmp_path, make_config, tok):
  """A captions file's loss_weight column (DreamBooth's prior images) comes out per example; rows without it weigh 1."""
  root = tmp_path / 'weighted'
  root.mkdir()
  rows = []
  for i, (name, rgb) in enumerate(list(COLOURS.items())[:4]):
    Image.new('RGB', (16, 16), rgb).save(root / f'{i}.png')
    rows.append({'file_name': f'{i}.png', 'text': f'a {name} picture', **({'loss_weight': 0.25 * i} if i else {})})
  with open(root / 'metadata.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  config = make_config(name='folder', image_size=16, max_text_length=8, folder=dict(path=str(root), captions_file=''))
  loader = pipeline.create_image_pipeline(
    config, 'train', tokenizer=tok, batch_size=2, seed=0, num_epochs=1, shuffle=False, drop_remainder=False
  )
  batches = list(loader)
  weights = np.concatenate([b['loss_weight'] for b in batches])
  assert weights.dtype == np.float32 and weights.tolist() == [1.0, 0.25, 0.5, 0.75]
