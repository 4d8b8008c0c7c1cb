"""Tests of the word tokenizer: ids, padding/truncation, save/load round trip, decoding."""

import numpy as np
import pytest
import transformers

from diffusion.data import shapes, tokenizer

CAPTIONS = ['a red circle', 'a Blue square to the left of a green triangle.', 'a purple circle']


@pytest.fixture(scope='module')
def tok():
  return tokenizer.build_word_tokenizer(shapes.vocabulary(), max_length=12)


def test_special_ids_and_vocab(tok):
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert len(tok) == len(tokenizer.SPECIAL_TOKENS) + len(shapes.vocabulary())


def test_tokenize_pads_wraps_and_lowercases(tok):
  ids = tokenizer.tokenize(tok, CAPTIONS, max_length=16)
  assert ids.shape == (3, 16) and ids.dtype == np.int32
  words = ['a', 'red', 'circle']
  assert ids[0, :5].tolist() == [1, *tok.convert_tokens_to_ids(words), 2]
  assert (ids[0, 5:] == 0).all()
  # Case-insensitive; punctuation is split off (and unknown here).
  assert ids[1, 2] == tok.convert_tokens_to_ids('blue')
  assert tok.unk_token_id in ids[1].tolist() and tok.unk_token_id in ids[2].tolist()
  assert (ids == tok.eos_token_id).sum(1).tolist() == [1, 1, 1]


def test_truncation_keeps_eos(tok):
  ids = tokenizer.tokenize(tok, ['a red circle ' * 10], max_length=6)
  assert ids.shape == (1, 6)
  assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
  assert tok.pad_token_id not in ids[0].tolist()


def test_build_from_whole_texts():
  tok = tokenizer.build_word_tokenizer(['Hello, world!', 'hello there'], max_length=8)
  ids = tokenizer.tokenize(tok, ['hello world'], 8)[0]
  assert tok.unk_token_id not in ids.tolist()
  assert {'hello', 'world', 'there', ',', '!'} <= set(tok.get_vocab())


def test_save_load_round_trip(tok, tmp_path):
  tokenizer.save_tokenizer(tok, tmp_path / 'tok')
  loaded = tokenizer.load_tokenizer(tmp_path / 'tok')
  np.testing.assert_array_equal(tokenizer.tokenize(loaded, CAPTIONS, 12), tokenizer.tokenize(tok, CAPTIONS, 12))
  assert loaded.eos_token_id == tok.eos_token_id
  assert loaded.get_vocab() == tok.get_vocab()
  ids = tokenizer.tokenize(loaded, CAPTIONS[1:2], 16)[0]
  assert loaded.decode(ids, skip_special_tokens=True) == (
    'a blue square to the left of a green triangle'
  )  # '.' was <unk>, a special token.


def test_decode_gives_words_back(tok):
  for caption in [shapes.scene_for_index(0, i, 2).caption for i in range(10)]:
    ids = tokenizer.tokenize(tok, [caption], 12)[0]
    assert tok.decode(ids, skip_special_tokens=True) == caption


def test_rejects_tiny_max_length():
  with pytest.raises(ValueError):
    tokenizer.build_word_tokenizer(['a'], max_length=1)
