"""data.name='webdataset': tar shards written here as img2dataset writes them ({key}.jpg|png, {key}.txt, {key}.json).

Counts of read and skipped samples (a broken image, a sample without a caption, one without an image, a truncated
shard), the same pixels as the folder source, a seeded order, exact resume, disjoint process shares, shard patterns
and their errors, and a tiny VAE trained (and resumed) from shards through the training loop.
"""

import gzip
import io
import json
import logging
import os
import tarfile

import jax
import ml_collections
import numpy as np
import pytest

from diffusion.data import folder, pipeline, shards, validation, webdataset
from diffusion.errors import ConfigError
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

NUM_SHARDS, PER_SHARD = 4, 5


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _sample(tar: tarfile.TarFile, i: int, image: bytes | None = None, text: bool = True, has_image: bool = True):
  ext = 'jpg' if i % 2 else 'png'
  if has_image:
    _add(tar, f'{i:06d}.{ext}', image if image is not None else encoded_image(i, 'JPEG' if i % 2 else 'PNG'))
  if text:
    _add(tar, f'{i:06d}.txt', caption(i).encode())
  _add(tar, f'{i:06d}.json', json.dumps({'key': f'{i:06d}'}).encode())


def write_shards(directory, num_shards: int = NUM_SHARDS, per_shard: int = PER_SHARD) -> str:
  """`num_shards` clean shards of `per_shard` samples (captions 'item 0', 'item 1', ...); returns their pattern."""
  os.makedirs(directory, exist_ok=True)
  for s in range(num_shards):
    with tarfile.open(os.path.join(directory, f'{s:05d}.tar'), 'w') as tar:
      for i in range(s * per_shard, (s + 1) * per_shard):
        _sample(tar, i)
  return os.path.join(str(directory), '{00000..%05d}.tar' % (num_shards - 1))


@pytest.fixture(scope='module')
def clean(tmp_path_factory) -> str:
  return write_shards(tmp_path_factory.mktemp('wds'))


def _config(urls: str, **overrides) -> ml_collections.ConfigDict:
  section = dict(urls=urls, eval_urls='', shuffle_buffer=4, cycle_length=2)
  return data_config('webdataset', section, **overrides)


@pytest.fixture(scope='module')
def tok():
  return word_tokenizer()


def test_bad_samples_are_skipped_and_counted(tmp_path, tok, caplog):
  with tarfile.open(tmp_path / 'a.tar', 'w') as tar:
    for i in range(20, 26):
      _sample(tar, i, image=b'\x89PNG not an image' if i == 21 else None, text=i != 22, has_image=i != 23)
  data = io.BytesIO()
  with tarfile.open(fileobj=data, mode='w') as tar:
    for i in range(26, 29):
      _sample(tar, i)
  cut = data.getvalue().index(encoded_image(28, 'PNG')[:64]) + 40  # Inside the last sample's image.
  (tmp_path / 'b.tar').write_bytes(data.getvalue()[:cut])
  config = _config(str(tmp_path / '{a,b}.tar'))
  with caplog.at_level(logging.INFO):
    captions, images, stats = read_all(config, tok)  # The two shards interleaved.
  assert sorted(captions) == [caption(i) for i in (20, 24, 25, 26, 27)] and images.shape == (5, 8, 8, 3)
  assert {k: v for k, v in stats.counts.items() if v} == {
    'undecodable': 1,
    'no_caption': 1,
    'no_image': 1,
    'truncated_shard': 1,
  }
  assert stats.seen == 9 and stats.dropped == 4 and 'effective size 5 of 9' in stats.summary()
  assert '1 truncated' in stats.summary() and '1 without a caption' in stats.summary()
  summaries = [r.getMessage() for r in caplog.records if 'effective size' in r.getMessage()]
  assert summaries == [stats.summary()]  # Logged once, after one pass over the shards.


def test_a_shard_cut_inside_a_header_is_truncated(tmp_path, tok):
  data = io.BytesIO()
  with tarfile.open(fileobj=data, mode='w') as tar:
    for i in range(3):
      _sample(tar, i)
  raw = data.getvalue()
  header = raw.index(b'000002.png')  # The last sample's first header: cut 100 bytes into it.
  (tmp_path / 'c.tar').write_bytes(raw[: header + 100])
  captions, _, stats = read_all(_config(str(tmp_path / 'c.tar')), tok)
  assert captions == [caption(0)] and stats.counts['truncated_shard'] == 1  # Sample 1 may lack members: dropped.


def test_images_equal_the_folder_sources(tmp_path, clean, tok):
  """The same files through an image folder and through shards give the same pixels (centre crop)."""
  root = tmp_path / 'folder'
  root.mkdir()
  rows = []
  for i in range(PER_SHARD):
    name = f'{i}.{"jpg" if i % 2 else "png"}'
    (root / name).write_bytes(encoded_image(i, 'JPEG' if i % 2 else 'PNG'))
    rows.append(json.dumps({'file_name': name, 'text': caption(i)}))
  (root / 'metadata.jsonl').write_text('\n'.join(rows) + '\n')
  folder_config = data_config('folder', dict(path=str(root), captions_file=''), random_crop=False)
  wds_config = _config(clean.replace('{00000..00003}', '00000'), random_crop=False)
  want_captions, want, _ = read_all(folder_config, tok)
  got_captions, got, _ = read_all(wds_config, tok)
  assert got_captions == want_captions == [caption(i) for i in range(PER_SHARD)]
  np.testing.assert_array_equal(got, want)
  source = pipeline.create_data_source(wds_config, 'train')  # The random-access view, for vocabulary and references.
  assert len(source) == PER_SHARD and pipeline.record_caption(source[3], wds_config) == caption(3)
  assert source[3]['image'] == folder.FolderDataSource(str(root))[3]['image']


def test_order_is_seeded_and_each_epoch_is_a_permutation(clean, tok):
  everything = [caption(i) for i in range(NUM_SHARDS * PER_SHARD)]
  config = _config(clean)
  first, _, _ = read_all(config, tok, shuffle=True, seed=0)
  again, _, _ = read_all(config, tok, shuffle=True, seed=0)
  other, _, _ = read_all(config, tok, shuffle=True, seed=1)
  assert first == again and sorted(first) == sorted(other) == sorted(everything)
  assert first != other and first != everything


def test_resume_continues_exactly(clean, tok):
  """k batches, the state through JSON into a fresh pipeline: the next batches are the uninterrupted run's, also
  across the end of an epoch (10 batches of 2)."""
  config = _config(clean)
  straight, _ = batches(config, tok, 14)
  for k in (3, 9):
    _, state = batches(config, tok, k)
    resumed, _ = batches(config, tok, 14 - k, state=state)
    assert_same_batches(resumed, straight[k:])


def test_gzipped_shards_read_and_resume(clean, tmp_path, tok):
  directory = os.path.dirname(clean)
  for s in range(2):
    with open(os.path.join(directory, f'{s:05d}.tar'), 'rb') as f, gzip.open(tmp_path / f'{s}.tar.gz', 'wb') as g:
      g.write(f.read())
  config = _config(str(tmp_path / '{0,1}.tar.gz'))
  assert sorted(read_all(config, tok)[0]) == sorted(caption(i) for i in range(2 * PER_SHARD))
  straight, _ = batches(config, tok, 6)
  _, state = batches(config, tok, 2)
  assert_same_batches(batches(config, tok, 4, state=state)[0], straight[2:])


def test_splits_and_fresh_iterations(clean, tok):
  """The eval split reads eval_urls; each iter() of a loader starts from the top (the loop's evaluations do)."""
  eval_urls = clean.replace('{00000..00003}', '00003')
  config = _config(clean, webdataset=dict(urls=clean, eval_urls=eval_urls, shuffle_buffer=4, cycle_length=2))
  loader = pipeline.create_image_pipeline(
    config, 'validation', tokenizer=tok, batch_size=2, seed=0, num_epochs=1, drop_remainder=False
  )
  first, again = [[tok.batch_decode(b['input_ids'], skip_special_tokens=True) for b in loader] for _ in range(2)]
  assert first == again and sorted(sum(first, [])) == sorted(caption(i) for i in range(15, 20))  # Shard 3 only.
  with pytest.raises(ConfigError, match=r"has the splits 'train' .* and 'validation' .*; got 'test'"):
    pipeline.create_data_source(config, 'test')


def test_process_shares_are_disjoint_and_cover_the_shards(clean, tok):
  config = _config(clean)
  for count in (2, 3):
    shares = [read_all(config, tok, process_index=p, process_count=count)[0] for p in range(count)]
    union = sum(shares, [])
    assert sorted(union) == sorted(caption(i) for i in range(NUM_SHARDS * PER_SHARD)) and len(set(union)) == len(union)
  with pytest.raises(ConfigError, match='4 shards for 5 processes'):
    read_all(config, tok, process_index=0, process_count=5)


def test_brace_patterns_globs_and_list_files(tmp_path, clean):
  assert shards.expand_braces('a{00..02}b') == ['a00b', 'a01b', 'a02b']
  assert shards.expand_braces('{x,y}{1..2}') == ['x1', 'x2', 'y1', 'y2']
  assert shards.expand_braces('{p{1,2},q}.tar') == ['p1.tar', 'p2.tar', 'q.tar']
  assert shards.expand_braces('{9..11}-{}') == ['9-{}', '10-{}', '11-{}']
  directory = os.path.dirname(clean)
  listed = shards.list_shards(clean, 'k', webdataset.SUFFIXES)
  assert [os.path.basename(p) for p in listed] == [f'{s:05d}.tar' for s in range(NUM_SHARDS)]
  assert shards.list_shards(os.path.join(directory, '*.tar'), 'k', webdataset.SUFFIXES) == listed
  list_file = tmp_path / 'shards.txt'
  list_file.write_text(''.join(f'{p}\n' for p in listed[2:]) + '# a comment\n\n' + listed[0] + '\n')
  assert shards.list_shards(str(list_file), 'k', webdataset.SUFFIXES) == listed[2:] + listed[:1]


def _validate(data) -> None:
  validation.validate_config(ml_collections.ConfigDict({'data': data, 'model_type': 'vae'}))


def test_bad_patterns_fail_validation(tmp_path, clean):
  _validate(_config(clean))
  with pytest.raises(ConfigError, match=r"^config\.data\.webdataset\.urls: '.*/nothing-\*\.tar' matches no file$"):
    _validate(_config(str(tmp_path / 'nothing-*.tar')))
  with pytest.raises(ConfigError, match=r"urls: .* names files that do not exist \(1 of 5, e\.g\. '.*00004\.tar'\)"):
    _validate(_config(clean.replace('00003', '00004')))
  with pytest.raises(ConfigError, match=r'config\.data\.webdataset\.eval_urls: .* matches no file'):
    _validate(_config(clean, webdataset=dict(urls=clean, eval_urls=str(tmp_path / 'x{0..3}.tar'))))
  with pytest.raises(ConfigError, match=r'config\.data\.webdataset\.urls: is empty'):
    _validate(_config(''))
  with pytest.raises(ConfigError, match=r'config\.data\.worker_count: worker processes are not implemented'):
    _validate(_config(clean, worker_count=2))
  with pytest.raises(ConfigError, match=r'config\.data\.webdataset\.cycle_length: must be >= 1'):
    _validate(_config(clean, webdataset=dict(urls=clean, eval_urls='', shuffle_buffer=4, cycle_length=0)))


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_and_resume(clean, tmp_path):
  results = run_two_processes(_config(clean), tmp_path)
  epochs = [r['epoch'] for r in results]
  assert not set(epochs[0]) & set(epochs[1])
  assert sorted(epochs[0] + epochs[1]) == sorted(caption(i) for i in range(NUM_SHARDS * PER_SHARD))
  for r in results:
    assert r['resumed'] == r['expected'] and len(r['expected']) == 3


@pytest.mark.slow
def test_train_vae_from_shards_and_resume(tmp_path):
  """The tiny VAE trains from tar shards through `train_and_evaluate`; 2 steps then 3 equal 3 in one go (the data
  position is restored from the checkpoint)."""
  from diffusion.training import train_and_evaluate
  from support import VAE, load_config

  urls = write_shards(tmp_path / 'shards', num_shards=2, per_shard=6)
  make = lambda steps: load_config(
    'vae_base',
    {
      **VAE,
      'model.vae.block_out_channels': (8,),
      'train.batch_size': 4,
      'train.sample_every': 0,
      'train.eval_every': 0,
    },
    '',
    **{'train.num_steps': steps, 'data.name': 'webdataset', 'data.webdataset.urls': urls, 'data.image_size': 8},
  )
  straight = train_and_evaluate(make(3), str(tmp_path / 'straight'))
  train_and_evaluate(make(2), str(tmp_path / 'resumed'))
  resumed = train_and_evaluate(make(3), str(tmp_path / 'resumed'))
  assert int(resumed.step) == 3
  for a, b in zip(
    jax.tree.leaves((straight.params, straight.opt_state)), jax.tree.leaves((resumed.params, resumed.opt_state))
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
