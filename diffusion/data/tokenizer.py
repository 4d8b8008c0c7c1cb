"""Tokenizers: a word-level tokenizer for small vocabularies, and loading any saved/hub tokenizer.

Every tokenizer is a `transformers.PreTrainedTokenizerFast`, so a word tokenizer built here and a
CLIP BPE tokenizer from the hub are used the same way (`tokenize`) and saved the same way
(`save_pretrained` directory, which `load_tokenizer` reads back).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
import transformers
from tokenizers import models, normalizers, pre_tokenizers, processors

from diffusion.errors import UserError

PAD, BOS, EOS, UNK = '<pad>', '<bos>', '<eos>', '<unk>'
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # Ids 0, 1, 2, 3 in this order.
SPARE_PREFIX = '<spare_'  # Spare slots '<spare_0>', '<spare_1>', ... at the end of a word tokenizer's vocabulary.
NUM_SPARE = 8  # Spare slots a word tokenizer keeps for words a fine-tuning run adds (DreamBooth, LoRA).


def _normalizer() -> normalizers.Normalizer:
  return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  # Splits on whitespace and keeps runs of punctuation as their own words.
  return pre_tokenizers.Whitespace()


def _split_words(texts: Iterable[str]) -> list[str]:
  norm, pre = _normalizer(), _pre_tokenizer()
  words = set()
  for text in texts:
    words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
  return sorted(words)


def build_word_tokenizer(
  words_or_texts: Iterable[str], max_length: int, num_spare: int = NUM_SPARE
) -> transformers.PreTrainedTokenizerFast:
  """Word-level tokenizer over every word in `words_or_texts` (words or whole captions).

  Lowercases, splits on whitespace/punctuation, maps unseen words to <unk>, wraps each text as
  <bos> ... <eos> (ids 1 and 2; <pad> is 0) and by default pads/truncates to `max_length`, keeping
  the <eos> (the position a text encoder pools at). The last `num_spare` ids are spare slots that
  `add_words` later gives to new words, so a model fine-tuned on a new concept keeps its vocabulary size
  (its text encoder's embedding table) while its new word gets a row of its own.
  """
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for word in _split_words(words_or_texts):
    vocab.setdefault(word, len(vocab))
  for i in range(num_spare):
    vocab[f'{SPARE_PREFIX}{i}>'] = len(vocab)
  return _word_tokenizer(vocab, max_length)


def _word_tokenizer(vocab: dict[str, int], max_length: int) -> transformers.PreTrainedTokenizerFast:
  if max_length < 2:
    raise ValueError(f'max_length must leave room for <bos> and <eos>, got {max_length}')
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = _normalizer()
  tok.pre_tokenizer = _pre_tokenizer()
  tok.post_processor = processors.TemplateProcessing(
    single=f'{BOS} $A {EOS}', pair=f'{BOS} $A {EOS} $B {EOS}', special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
  )
  tok.decoder = tokenizers.decoders.WordPiece(prefix='##', cleanup=False)  # Joins with spaces.
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=BOS,
    eos_token=EOS,
    unk_token=UNK,
    pad_token=PAD,
    model_max_length=max_length,
    padding_side='right',
    truncation_side='right',
  )


def word_vocabulary(tokenizer: transformers.PreTrainedTokenizerBase) -> dict[str, int] | None:
  """token -> id of a word-level tokenizer built here, or None for any other tokenizer (e.g. CLIP's BPE)."""
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  if backend is None or not isinstance(backend.model, models.WordLevel):
    return None
  return dict(backend.get_vocab(with_added_tokens=False))


def add_words(
  tokenizer: transformers.PreTrainedTokenizerBase, words: Sequence[str]
) -> transformers.PreTrainedTokenizerFast:
  """The tokenizer with each word of `words` it does not know yet in a spare slot (in order), same ids otherwise.

  Only word-level tokenizers need this (a BPE tokenizer spells any word from its pieces): for one without enough
  spare slots, or for another kind of tokenizer, it is a `UserError` naming the words."""
  vocab = word_vocabulary(tokenizer)
  words = [w for w in _split_words(words) if vocab is None or w not in vocab]
  if not words:
    return tokenizer
  if vocab is None:
    raise UserError(f'new words {words}: only a word-level tokenizer has spare slots (a BPE tokenizer spells any word)')
  spare = sorted((i, tok) for tok, i in vocab.items() if tok.startswith(SPARE_PREFIX))
  if len(words) > len(spare):
    raise UserError(f'new words {words}: the tokenizer has {len(spare)} spare slot(s) left')
  for word, (index, slot) in zip(words, spare):
    del vocab[slot]
    vocab[word] = index
  return _word_tokenizer(vocab, tokenizer.model_max_length)


def unknown_words(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str]) -> list[str]:
  """Words of `texts` a word-level tokenizer would map to <unk> (sorted; always [] for other tokenizers)."""
  vocab = word_vocabulary(tokenizer)
  if vocab is None:
    return []
  return [w for w in _split_words(texts) if w not in vocab]


def check_known_words(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], what: str) -> None:
  """A `UserError` naming the words of `texts` the tokenizer does not know (they would silently become <unk>)."""
  unknown = unknown_words(tokenizer, texts)
  if unknown:
    known = sorted(w for w in word_vocabulary(tokenizer) if not w.startswith('<'))
    raise UserError(f'{what}: unknown word(s) {unknown} would become <unk>; the tokenizer knows {known}')


def save_tokenizer(tokenizer: transformers.PreTrainedTokenizerBase, directory: str | os.PathLike) -> None:
  """Writes the tokenizer in `save_pretrained` format (readable by `load_tokenizer`)."""
  tokenizer.save_pretrained(os.fspath(directory))


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """Loads a tokenizer saved by `save_tokenizer`, any `save_pretrained` directory, or a hub id
  (e.g. 'openai/clip-vit-large-patch14', which needs network access)."""
  return transformers.AutoTokenizer.from_pretrained(os.fspath(path_or_hub_id))


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, captions: Sequence[str], max_length: int) -> np.ndarray:
  """Token ids int32 (len(captions), max_length): specials added, padded and truncated."""
  out = tokenizer(
    list(captions), padding='max_length', truncation=True, max_length=max_length, return_attention_mask=False
  )
  return np.asarray(out['input_ids'], np.int32).reshape(len(captions), max_length)
