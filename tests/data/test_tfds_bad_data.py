"""Bad data through the TFDS path: tiny ArrayRecord datasets prepared in a tmp dir and selected by `data.name`,
as any prepared TFDS dataset is.

Grey, grey+alpha and RGBA images become RGB; undecodable files and arrays of an unusable shape are skipped; blank
captions become unconditional examples; over-long captions are truncated. Each is counted, the first of each kind
is logged, and one summary after a pass over the data states what was dropped and the effective dataset size.
"""

import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from diffusion.data import folder, pipeline, tokenizer
from diffusion.errors import UserError

WORDS = ['rgb', 'grey', 'rgba', 'alpha', 'palette', 'broken', 'garbage', 'long', 'word', 'five', 'flat', 'zero']
MAX_LENGTH = 8


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray(array)
  (image.convert(mode) if mode else image).save(buf, format='PNG')
  return buf.getvalue()


def _encoded_examples() -> list[tuple[str, bytes, str]]:
  """(kind, encoded image, caption); kind is what DataStats should count (None: a clean example)."""
  rng = np.random.default_rng(0)
  rgb = lambda: rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  return [
    (None, _png(rgb()), 'rgb'),
    ('grey', _png(rng.integers(0, 256, (20, 24), dtype=np.uint8)), 'grey'),
    ('rgba', _png(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)), 'rgba'),
    ('grey_alpha', _png(rgb(), 'LA'), 'grey alpha'),
    (None, _png(rgb(), 'P'), 'palette'),
    ('undecodable', _png(rgb())[:80], 'broken'),
    ('undecodable', b'GIF89a not really', 'garbage'),
    ('empty_caption', _png(rgb()), ''),
    ('empty_caption', _png(rgb()), ' \t '),
    ('truncated', _png(rgb()), ' '.join(['long'] + ['word'] * 20)),
  ]


def _array_examples() -> list[tuple[str | None, np.ndarray, str]]:
  rng = np.random.default_rng(1)
  draw = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
  return [
    (None, draw(12, 16, 3), 'rgb'),
    ('grey', draw(12, 16, 1), 'grey'),
    ('grey', draw(12, 16), 'flat'),
    ('grey_alpha', draw(12, 16, 2), 'alpha'),
    ('rgba', draw(12, 16, 4), 'rgba'),
    ('bad_shape', draw(12, 16, 5), 'five'),
    ('bad_shape', draw(12, 0, 3), 'zero'),
  ]


def _builder(name: str, image_feature, examples):
  """A one-split GeneratorBasedBuilder in ArrayRecord format (no registration, no download, no TensorFlow)."""

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Test data.'}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'image': image_feature, 'caption': tfds.features.Text()})
      )

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, (_, image, caption) in enumerate(examples):
        yield i, {'image': image, 'caption': caption}

  Builder.name = name
  return Builder


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp('tfds_bad'))
  encoded = _builder(
    'bad_encoded', tfds.features.Image(shape=(None, None, 3), encoding_format='png'), _encoded_examples()
  )
  arrays = _builder(
    'bad_arrays',
    tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding='zlib'),
    [(k, a if a.ndim == 3 else a[..., None], c) for k, a, c in _array_examples()],
  )
  for builder in (encoded, arrays):
    builder(data_dir=directory, file_format='array_record').download_and_prepare()
  return directory


@pytest.fixture(scope='module')
def tok():
  return tokenizer.build_word_tokenizer([' '.join(WORDS)], MAX_LENGTH)


def _run(make_config, data_dir, name, tok, caplog):
  config = make_config(name=name, data_dir=data_dir, image_size=8, max_text_length=MAX_LENGTH)
  loader = pipeline.create_image_pipeline(
    config, 'train', tokenizer=tok, batch_size=3, seed=0, num_epochs=1, shuffle=False, drop_remainder=False
  )
  with caplog.at_level(logging.WARNING):
    batches = list(loader)
  images = np.concatenate([b['image'] for b in batches])
  captions = sum((tok.batch_decode(b['input_ids'], skip_special_tokens=True) for b in batches), [])
  return loader.data_stats, images, captions, [r.getMessage() for r in caplog.records]


def _expected_counts(examples) -> dict:
  counts = dict.fromkeys(pipeline.DataStats.KINDS, 0)
  for kind, _, _ in examples:
    if kind:
      counts[kind] += 1
  return counts


def test_encoded_images_converted_skipped_counted_and_reported(make_config, data_dir, tok, caplog):
  examples = _encoded_examples()
  stats, images, captions, messages = _run(make_config, data_dir, 'bad_encoded', tok, caplog)
  expected = _expected_counts(examples)
  assert stats.counts == expected
  dropped = expected['undecodable']
  assert images.shape == (len(examples) - dropped, 8, 8, 3) and images.dtype == np.float32
  assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
  # Grey and grey+alpha images are grey in all three channels; the others are not.
  by_caption = dict(zip(captions, images))
  for caption in ('grey', 'grey alpha'):
    image = by_caption[caption]
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]), caption
  assert not np.array_equal(by_caption['rgba'][..., 0], by_caption['rgba'][..., 1])
  assert sorted(captions).count('') == expected['empty_caption']  # Kept, as unconditional examples.
  assert 'broken' not in captions and 'garbage' not in captions
  assert any(c.startswith('long word') for c in captions)
  summary = [m for m in messages if 'effective size' in m]
  total = len(examples)
  assert (
    len(summary) == 1
    and f'dropped {dropped} ' in summary[0]
    and f'effective size {total - dropped} of {total}' in summary[0]
  ), messages
  for kind, message in pipeline._MESSAGES.items():  # pylint: disable=protected-access
    assert sum(message in m for m in messages) == (1 if expected[kind] else 0), (kind, messages)


def test_arrays_with_any_channel_count_become_rgb_or_are_dropped(make_config, data_dir, tok, caplog):
  examples = _array_examples()
  stats, images, captions, messages = _run(make_config, data_dir, 'bad_arrays', tok, caplog)
  expected = _expected_counts(examples)
  assert stats.counts == expected
  kept = [c for k, _, c in examples if k != 'bad_shape']
  assert sorted(captions) == sorted(kept) and images.shape == (len(kept), 8, 8, 3)
  for caption in ('grey', 'flat', 'alpha'):
    image = dict(zip(captions, images))[caption]
    assert np.array_equal(image[..., 0], image[..., 2]), caption
  summary = [m for m in messages if 'effective size' in m]
  assert len(summary) == 1 and f'effective size {len(kept)} of {len(examples)}' in summary[0]


def test_a_dataset_without_any_usable_image_is_a_user_error():
  decode = pipeline.DecodeRecord('image', 'caption', pipeline.DataStats('data x/train', num_records=2))
  decode.map({'image': b'not an image', 'caption': 'a'})
  with pytest.raises(UserError, match='none of the 2 records'):
    decode.map({'image': np.zeros((4, 4, 7), np.uint8), 'caption': 'b'})


def test_unknown_dataset_name_is_a_user_error(make_config, tmp_path):
  with pytest.raises(UserError, match='no_such_dataset_xyz'):
    pipeline.create_data_source(make_config(name='no_such_dataset_xyz', data_dir=str(tmp_path)), 'train')


def test_folder_source_problems_are_user_errors(tmp_path):
  """A wrong data.folder.path or a broken captions file is one clear error, not a traceback."""
  with pytest.raises(UserError, match='data.folder.path'):
    folder.FolderDataSource(str(tmp_path / 'nope'))
  (tmp_path / 'metadata.jsonl').write_text('{"file_name": "a.png", "text": "a"}\n{not json\n')
  with pytest.raises(UserError, match='line 2 is not valid JSON'):
    folder.FolderDataSource(str(tmp_path))
  with pytest.raises(UserError, match='captions file not found'):
    folder.FolderDataSource(str(tmp_path), captions_file=str(tmp_path / 'missing.csv'))
