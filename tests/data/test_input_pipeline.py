"""Tests of the grain input pipeline on the embedded shapes dataset and an in-memory source."""

import itertools

import numpy as np
import pytest

from diffusion.data import oracle, pipeline, shapes, tokenizer


def _batches(loader, n, start_iter=None):
  it = start_iter if start_iter is not None else iter(loader)
  return [next(it) for _ in range(n)]


def _pipeline(config, tok, split='train', **kwargs):
  kwargs.setdefault('batch_size', 8)
  kwargs.setdefault('seed', 0)
  return pipeline.create_image_pipeline(config, split, tokenizer=tok, **kwargs)


def _keys(batch):
  return [im.tobytes() for im in batch['image']]


def test_shapes_batches_have_the_right_format(shapes_config, word_tokenizer):
  batch = next(iter(_pipeline(shapes_config, word_tokenizer)))
  assert set(batch) == {'image', 'input_ids'}
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['input_ids'].shape == (8, 16) and batch['input_ids'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['image'].min() < -0.5 and batch['image'].max() > 0.5
  assert (batch['input_ids'][:, 0] == word_tokenizer.bos_token_id).all()
  assert ((batch['input_ids'] == word_tokenizer.eos_token_id).sum(1) == 1).all()


def test_flipped_images_still_match_their_captions(shapes_config, word_tokenizer):
  # Flipping swaps left/right in captions; the oracle checks every image against its caption.
  shapes_config.random_flip = True
  loader = _pipeline(shapes_config, word_tokenizer, num_epochs=1, batch_size=16)
  images, captions = [], []
  for batch in loader:
    images.extend(np.asarray(batch['image']))
    captions.extend(word_tokenizer.batch_decode(batch['input_ids'], skip_special_tokens=True))
  assert len(images) == 64
  assert any('left' in c or 'right' in c for c in captions)
  assert oracle.caption_accuracy(np.stack(images), captions) == 1.0


def test_same_seed_same_batches_other_seed_other_order(shapes_config, word_tokenizer):
  a = _batches(_pipeline(shapes_config, word_tokenizer, seed=3), 3)
  b = _batches(_pipeline(shapes_config, word_tokenizer, seed=3), 3)
  c = _batches(_pipeline(shapes_config, word_tokenizer, seed=4), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['input_ids'], y['input_ids'])
  assert [_keys(x) for x in a] != [_keys(x) for x in c]


def test_state_restore_continues_exactly(shapes_config, word_tokenizer):
  shapes_config.random_flip = True
  loader = _pipeline(shapes_config, word_tokenizer)
  it = iter(loader)
  _batches(loader, 7, it)  # 8 batches per epoch: the continuation crosses an epoch boundary.
  state = it.get_state()
  expected = _batches(loader, 3, it)
  resumed = iter(_pipeline(shapes_config, word_tokenizer))
  resumed.set_state(state)
  for x, y in zip(expected, _batches(None, 3, resumed)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['input_ids'], y['input_ids'])


def test_shards_are_disjoint_and_cover_the_data(shapes_config, word_tokenizer):
  seen = []
  for index in range(2):
    loader = _pipeline(
      shapes_config, word_tokenizer, num_epochs=1, process_index=index, process_count=2, drop_remainder=False
    )
    seen.append([k for b in loader for k in _keys(b)])
  assert len(seen[0]) == len(seen[1]) == 32
  assert not set(seen[0]) & set(seen[1])
  everything = _pipeline(shapes_config, word_tokenizer, num_epochs=1, shuffle=False)
  assert set(seen[0]) | set(seen[1]) == {k for b in everything for k in _keys(b)}


def test_eval_split_in_order(shapes_config, word_tokenizer):
  kwargs = dict(num_epochs=1, shuffle=False, batch_size=5, drop_remainder=False)
  first = list(_pipeline(shapes_config, word_tokenizer, 'validation', **kwargs))
  second = list(_pipeline(shapes_config, word_tokenizer, 'validation', **kwargs))
  assert [len(b['image']) for b in first] == [5, 5, 5, 1]
  assert [_keys(b) for b in first] == [_keys(b) for b in second]


class _MemorySource:
  """Non-square (some grey) images with nested lists of captions, like many TFDS datasets."""

  def __init__(self, n: int = 6):
    rng = np.random.default_rng(0)
    self._images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n)]
    self._images[1] = self._images[1][..., 0]  # Grey (H, W).

  def __len__(self):
    return len(self._images)

  def __getitem__(self, i):
    return {'img': self._images[i], 'meta': {'captions': [f'red {i}'.encode(), f'blue {i}'.encode()]}}

  def __repr__(self):
    return '_MemorySource'


@pytest.fixture
def memory_config(make_config, monkeypatch):
  monkeypatch.setitem(pipeline.SOURCES._entries, 'memory', lambda cfg, split: _MemorySource())
  return make_config(name='memory', image_key='img', caption_key='meta/captions', random_crop=True, random_flip=True)


def test_caption_lists_crop_and_flip_are_seeded(memory_config):
  tok = tokenizer.build_word_tokenizer(['red blue'] + [str(i) for i in range(6)], 16)
  kwargs = dict(batch_size=6, num_epochs=None, shuffle=False)
  a = _batches(_pipeline(memory_config, tok, seed=1, **kwargs), 4)
  b = _batches(_pipeline(memory_config, tok, seed=1, **kwargs), 4)
  c = _batches(_pipeline(memory_config, tok, seed=2, **kwargs), 4)
  assert a[0]['image'].shape == (6, 32, 32, 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['input_ids'], y['input_ids'])
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  words = [tok.batch_decode(x['input_ids'], skip_special_tokens=True) for x in a]
  for epoch in words:
    assert [w.split()[1] for w in epoch] == [str(i) for i in range(6)]  # Order kept.
  assert {w.split()[0] for w in itertools.chain(*words)} == {'red', 'blue'}


def test_center_crop_without_augmentation(memory_config, word_tokenizer):
  memory_config.random_crop = memory_config.random_flip = False
  batch = next(iter(_pipeline(memory_config, word_tokenizer, batch_size=2, shuffle=False)))
  image = _MemorySource()[0]['img']
  resized = pipeline.resize_shorter_side(image, 32)
  assert resized.shape == (32, 45, 3)
  expected = resized[:, 6:38].astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(batch['image'][0], expected, atol=1e-6)
  assert np.allclose(batch['image'][1][..., 0], batch['image'][1][..., 2])  # Grey -> RGB.


def test_swap_left_right():
  assert pipeline.swap_left_right('a red circle to the left of a blue square') == (
    'a red circle to the right of a blue square'
  )
  assert pipeline.swap_left_right('Right, left; bright') == 'Left, right; bright'


def test_registry_rejects_duplicates_and_unknown_names(make_config):
  with pytest.raises(ValueError, match='already registered'):
    pipeline.register_source('shapes')(lambda cfg, split: None)
  assert {'shapes', 'folder'} <= set(pipeline.known_sources())
  with pytest.raises(ValueError, match='shapes'):
    pipeline.create_data_source(make_config(name='no_such_dataset_xyz'), 'train')


def test_vocabulary_tokenizer_knows_every_caption(shapes_config, word_tokenizer):
  source = pipeline.create_data_source(shapes_config, 'train')
  captions = [source[i]['caption'] for i in range(len(source))]
  captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
  ids = tokenizer.tokenize(word_tokenizer, captions, 16)
  assert word_tokenizer.unk_token_id not in ids
  assert set(' '.join(captions).split()) <= set(shapes.vocabulary())


def test_over_long_captions_are_truncated_with_one_warning(word_tokenizer, caplog):
  from diffusion.data.pipeline import Finalize

  finalize = Finalize(word_tokenizer, 6)
  long = 'a red circle to the left of a blue square'
  batch = {'image': np.zeros((2, 4, 4, 3), np.uint8), 'caption': [long, 'a red circle']}
  with caplog.at_level('WARNING'):
    out = finalize.map(batch)
    finalize.map(batch)
  assert out['input_ids'].shape == (2, 6)
  assert finalize.num_truncated == 2
  assert sum('truncated' in r.message for r in caplog.records) == 1
