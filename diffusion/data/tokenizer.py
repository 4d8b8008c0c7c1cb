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

PAD, BOS, EOS, UNK = '<pad>', '<bos>', '<eos>', '<unk>'
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # Ids 0, 1, 2, 3 in this order.


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


def build_word_tokenizer(words_or_texts: Iterable[str], max_length: int) -> transformers.PreTrainedTokenizerFast:
  """Word-level tokenizer over every word in `words_or_texts` (words or whole captions).

  Lowercases, splits on whitespace/punctuation, maps unseen words to <unk>, wraps each text as
  <bos> ... <eos> (ids 1 and 2; <pad> is 0) and by default pads/truncates to `max_length`, keeping
  the <eos> (the position a text encoder pools at).
  """
  if max_length < 2:
    raise ValueError(f'max_length must leave room for <bos> and <eos>, got {max_length}')
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for word in _split_words(words_or_texts):
    vocab.setdefault(word, len(vocab))
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
