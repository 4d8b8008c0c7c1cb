"""data.name='parquet': files written here as Hugging Face datasets (an image struct {'bytes', 'path'} and 'text') and
img2dataset (a binary 'jpg' column and 'caption') write them.

Counts of read and skipped rows (a broken image, a null caption, a null image), the same pixels as the folder source,
a seeded order, exact resume, disjoint process shares (by row group, and by row slices when row groups are fewer than
processes), the column and pattern errors, and the missing-pyarrow error.
"""

import glob
import json
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion.data import folder, parquet, pipeline, validation
from diffusion.errors import ConfigError, UserError
from stream_support import (
  assert_same_batches,
  batches,
  caption,
  data_config,
  encoded_image,
  read_all,
  run_two_processes,
  word_tokenizer,
)

NUM_FILES, PER_FILE, ROW_GROUP = 2, 10, 4  # Row groups of 4, 4 and 2 rows per file.


def _hf_rows(indices) -> list[dict]:
  return [{'image': {'bytes': encoded_image(i), 'path': f'{i}.png'}, 'text': caption(i)} for i in indices]


def write_files(directory, rows_of=_hf_rows) -> str:
  """`NUM_FILES` files of `PER_FILE` rows ('item 0', 'item 1', ...); returns their glob."""
  directory.mkdir(parents=True, exist_ok=True)
  for f in range(NUM_FILES):
    rows = rows_of(range(f * PER_FILE, (f + 1) * PER_FILE))
    pq.write_table(pa.Table.from_pylist(rows), directory / f'part-{f:05d}.parquet', row_group_size=ROW_GROUP)
  return str(directory / 'part-*.parquet')


@pytest.fixture(scope='module')
def clean(tmp_path_factory) -> str:
  return write_files(tmp_path_factory.mktemp('parquet'))


def _config(files: str, **overrides) -> ml_collections.ConfigDict:
  section = dict(
    files=files, eval_files='', image_column='image', caption_column='text', shuffle_buffer=4, cycle_length=2
  )
  section.update(overrides.pop('parquet', {}))
  return data_config('parquet', section, **overrides)


@pytest.fixture(scope='module')
def tok():
  return word_tokenizer()


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
  rows = _hf_rows(range(6))
  rows[1]['image'] = {'bytes': b'\xff\xd8 not a jpeg', 'path': None}
  rows[2]['text'] = None
  rows[3]['image'] = None
  (tmp_path / '4.png').write_bytes(encoded_image(4))
  rows[4]['image'] = {'bytes': None, 'path': '4.png'}  # Bytes stored beside the file, as datasets may reference them.
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'bad.parquet', row_group_size=4)
  captions, images, stats = read_all(_config(str(tmp_path / 'bad.parquet')), tok)
  assert sorted(captions) == [caption(i) for i in (0, 4, 5)] and images.shape == (3, 8, 8, 3)
  assert {k: v for k, v in stats.counts.items() if v} == {'undecodable': 1, 'no_caption': 1, 'no_image': 1}
  assert stats.seen == 6 and 'effective size 3 of 6' in stats.summary()


def test_img2dataset_columns_and_the_folder_sources_pixels(tmp_path, tok):
  """A binary 'jpg' column with 'caption' (img2dataset) gives the pixels the folder source gives the same files."""
  root = tmp_path / 'folder'
  root.mkdir()
  for i in range(5):
    (root / f'{i}.jpg').write_bytes(encoded_image(i, 'JPEG'))
  (root / 'metadata.jsonl').write_text(
    ''.join(json.dumps({'file_name': f'{i}.jpg', 'text': caption(i)}) + '\n' for i in range(5))
  )
  rows = [{'key': f'{i:09d}', 'jpg': encoded_image(i, 'JPEG'), 'caption': caption(i)} for i in range(5)]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / '00000.parquet')
  config = _config(str(tmp_path / '00000.parquet'), parquet=dict(image_column='jpg', caption_column='caption'))
  config.random_crop = False
  validation.validate_config(ml_collections.ConfigDict({'data': config, 'model_type': 'vae'}))
  folder_config = data_config('folder', dict(path=str(root), captions_file=''), random_crop=False)
  want_captions, want, _ = read_all(folder_config, tok)
  got_captions, got, _ = read_all(config, tok)
  assert got_captions == want_captions == [caption(i) for i in range(5)]
  np.testing.assert_array_equal(got, want)
  source = pipeline.create_data_source(config, 'train')
  assert len(source) == 5 and source[2]['image'] == folder.FolderDataSource(str(root))[2]['image']
  assert pipeline.record_caption(source[2], config) == caption(2)


def test_order_is_seeded_and_each_epoch_is_a_permutation(clean, tok):
  everything = sorted(caption(i) for i in range(NUM_FILES * PER_FILE))
  config = _config(clean)
  first, _, _ = read_all(config, tok, shuffle=True, seed=0)
  again, _, _ = read_all(config, tok, shuffle=True, seed=0)
  other, _, _ = read_all(config, tok, shuffle=True, seed=1)
  assert first == again and sorted(first) == sorted(other) == everything and first != other


def test_resume_continues_exactly(clean, tok):
  config = _config(clean)
  straight, _ = batches(config, tok, 14)
  for k in (3, 11):  # 11: past the end of the first epoch (10 batches of 2).
    _, state = batches(config, tok, k)
    resumed, _ = batches(config, tok, 14 - k, state=state)
    assert_same_batches(resumed, straight[k:])


def test_process_shares_by_row_group_and_by_row(clean, tmp_path, tok):
  everything = sorted(caption(i) for i in range(NUM_FILES * PER_FILE))
  for count in (2, 4, 8):  # 6 row groups: whole row groups for 2 and 4 processes, slices of the 20 rows for 8.
    shares = [read_all(_config(clean), tok, process_index=p, process_count=count)[0] for p in range(count)]
    union = sum(shares, [])
    assert sorted(union) == everything and len(set(union)) == len(union), count
  groups = parquet.row_groups(sorted(glob.glob(clean)))
  assert [g[3] for g in groups] == [4, 4, 2, 4, 4, 2]
  path = groups[0][0]
  assert parquet.process_units(groups[:1], 1, 3) == [[path, 0, 1, 2]]  # Rows [1, 2) of 4 for process 1 of 3.
  assert parquet.process_units(groups, 3, 8) == [[path, 1, 3, 4], [path, 2, 0, 2]]  # Rows [7, 10) of 20.
  with pytest.raises(UserError, match='20 rows for 21 processes'):
    parquet.process_units(groups, 0, 21)


def _validate(data) -> None:
  validation.validate_config(ml_collections.ConfigDict({'data': data, 'model_type': 'vae'}))


def test_columns_and_patterns_are_validated(clean, tmp_path):
  _validate(_config(clean))
  with pytest.raises(ConfigError, match=r"config\.data\.parquet\.image_column: 'jpg' is not a column of .*part-00000"):
    _validate(_config(clean, parquet=dict(image_column='jpg')))
  with pytest.raises(ConfigError, match=r"columns: \['image', 'text'\]"):
    _validate(_config(clean, parquet=dict(caption_column='caption')))
  with pytest.raises(ConfigError, match=r'config\.data\.parquet\.image_column: .* of type string, not image bytes'):
    _validate(_config(clean, parquet=dict(image_column='text')))
  with pytest.raises(ConfigError, match=r"^config\.data\.parquet\.files: '.*/none-\*\.parquet' matches no file$"):
    _validate(_config(str(tmp_path / 'none-*.parquet')))
  (tmp_path / 'fake.parquet').write_bytes(b'not parquet')
  with pytest.raises(ConfigError, match=r'config\.data\.parquet\.files: .*fake\.parquet is not a readable parquet'):
    _validate(_config(str(tmp_path / 'fake.parquet')))


def test_missing_pyarrow_is_one_error_naming_the_extra(clean, monkeypatch):
  monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)  # `import pyarrow.parquet` raises ImportError.
  expected = r"^data\.name='parquet' needs pyarrow: pip install -e '\.\[parquet\]'$"
  with pytest.raises(UserError, match=expected):
    _validate(_config(clean))
  with pytest.raises(UserError, match=expected):
    pipeline.create_data_source(_config(clean), 'train')


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_and_resume(clean, tmp_path):
  results = run_two_processes(_config(clean), tmp_path)
  epochs = [r['epoch'] for r in results]
  assert not set(epochs[0]) & set(epochs[1])
  assert sorted(epochs[0] + epochs[1]) == sorted(caption(i) for i in range(NUM_FILES * PER_FILE))
  for r in results:
    assert r['resumed'] == r['expected'] and len(r['expected']) == 3
