"""Tests of the word tokenizer: ids, padding/truncation, save/load round trip, decoding."""

import numpy as np
import pytest
import transformers

from diffusion.data import shapes, tokenizer
from diffusion.errors import UserError

CAPTIONS = ['a red circle', 'a Blue square to the left of a green triangle.', 'a purple circle']


@pytest.fixture(scope='module')
def tok():
  return tokenizer.build_word_tokenizer(shapes.vocabulary(), max_length=12)


def test_special_ids_and_vocab(tok):
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert len(tok) == len(tokenizer.SPECIAL_TOKENS) + len(shapes.vocabulary()) + tokenizer.NUM_SPARE


def test_add_words_takes_spare_slots_and_keeps_every_other_id(tok, tmp_path):
  vocab = tokenizer.word_vocabulary(tok)
  new = tokenizer.add_words(tok, ['cross', 'red', 'Star'])  # 'red' is known; words are lowercased.
  new_vocab = tokenizer.word_vocabulary(new)
  assert len(new) == len(tok) and new_vocab['cross'] == vocab['<spare_0>'] and new_vocab['star'] == vocab['<spare_1>']
  assert all(new_vocab[w] == i for w, i in vocab.items() if w not in ('<spare_0>', '<spare_1>'))
  ids = tokenizer.tokenize(new, ['a red cross'], 8)[0]
  assert ids[:5].tolist() == [1, vocab['a'], vocab['red'], vocab['<spare_0>'], 2]
  tokenizer.save_tokenizer(new, tmp_path)  # The slots survive a save / load round trip.
  assert tokenizer.tokenize(tokenizer.load_tokenizer(tmp_path), ['a red cross'], 8).tolist() == [ids.tolist()]
  assert tokenizer.add_words(tok, ['red']) is tok
  with pytest.raises(UserError, match='spare slot'):
    tokenizer.add_words(tok, [f'w{i}' for i in range(tokenizer.NUM_SPARE + 1)])


def test_unknown_words_are_named_never_silent(tok):
  assert tokenizer.unknown_words(tok, CAPTIONS) == ['.', 'purple']
  tokenizer.check_known_words(tok, ['a red circle'], 'prompt')
  with pytest.raises(UserError, match=r"prompt: unknown word\(s\) \['purple'\] would become <unk>"):
    tokenizer.check_known_words(tok, ['a purple circle'], 'prompt')


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
