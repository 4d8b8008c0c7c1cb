"""Shared fixtures: a tiny prepared shapes dataset and data configs pointing at it."""

import ml_collections
import pytest

from diffusion.data import shapes, tfds_shapes, tokenizer

NUM_TRAIN, NUM_EVAL = 64, 16


@pytest.fixture(scope='session')
def shapes_data_dir(tmp_path_factory) -> str:
  """A data dir with the 32 px, up-to-two-object shapes dataset prepared (64 train, 16 eval)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds_shapes.prepare_shapes(data_dir, resolution=32, max_objects=2, num_train=NUM_TRAIN, num_eval=NUM_EVAL)
  return data_dir


def make_data_config(**overrides) -> ml_collections.ConfigDict:
  """A data config with the keys the pipeline reads; overrides replace top-level keys."""
  cfg = ml_collections.ConfigDict(
    dict(
      name='shapes',
      data_dir='',
      image_size=32,
      image_key='image',
      caption_key='caption',
      train_split='train',
      eval_split='validation',
      random_crop=False,
      random_flip=False,
      max_text_length=16,
      worker_count=0,
      shapes=dict(max_objects=2, num_train=NUM_TRAIN, num_eval=NUM_EVAL),
      folder=dict(path='', captions_file=''),
    )
  )
  cfg.update(overrides)
  return cfg


@pytest.fixture
def make_config():
  """The `make_data_config` factory, for tests that need a variant."""
  return make_data_config


@pytest.fixture
def shapes_config(shapes_data_dir) -> ml_collections.ConfigDict:
  return make_data_config(data_dir=shapes_data_dir)


@pytest.fixture(scope='session')
def word_tokenizer():
  return tokenizer.build_word_tokenizer(shapes.vocabulary(), 16)
