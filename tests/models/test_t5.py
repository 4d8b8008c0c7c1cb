"""Tests of the T5 encoder (diffusion/models/t5.py) against transformers' T5EncoderModel on random weights saved with
`save_pretrained` and read back by `diffusion.interop.load_text_encoder`, and of a T5 SentencePiece tokenizer built
here and loaded through transformers from the model's directory."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import interop, models
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.interop import naming
from diffusion.models import t5

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# Buckets 8 / max distance 12 with 24 tokens: the logarithmic and the clamped buckets are all used; inner width
# num_heads * d_kv = 24 differs from d_model = 32, as in T5 v1.1 XXL.
TINY = dict(
  vocab_size=61,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_layers=3,
  num_heads=3,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  dropout_rate=0.0,
)
LENGTH = 24


def _rel_to_scale(ours, theirs) -> float:
  theirs = np.asarray(theirs, np.float64)
  return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


def _save_reference(directory, feed_forward_proj: str, seed: int = 0, **overrides):
  """A transformers T5EncoderModel with random weights (layer norms too: they start at one) saved to `directory`."""
  torch.manual_seed(seed)
  config = transformers.T5Config(**{**TINY, **overrides}, feed_forward_proj=feed_forward_proj)
  reference = transformers.T5EncoderModel(config).eval()
  with torch.no_grad():
    for name, parameter in reference.named_parameters():
      if 'layer_norm' in name:
        parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
  reference.save_pretrained(directory)
  return reference


def _ids_and_mask(vocab_size: int, length: int, seed: int = 1):
  """Row 0: all tokens; row 1: the last 9 are padding (id 0, mask 0)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, vocab_size, size=(2, length))
  mask = np.ones((2, length), np.int64)
  mask[1, -9:] = 0
  ids[1, -9:] = 0
  return ids, mask


@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (8, 12), (6, 20), (16, 9)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  relative = np.arange(-300, 301)[None, :]
  expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
    torch.as_tensor(relative), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
  ).numpy()
  ours = t5.relative_position_bucket(relative, True, num_buckets, max_distance)
  np.testing.assert_array_equal(ours, expected)
  assert ours.min() == 0 and ours.max() == num_buckets - 1


@pytest.mark.parametrize('feed_forward_proj', ['gated-gelu', 'relu'])
def test_parity_with_transformers_t5_encoder(tmp_path, feed_forward_proj):
  """v1.1 / flan (gated-GELU) and original T5 (ReLU): last hidden state and every hidden state, with padding and
  24 tokens (> max_distance 12), fp32, <= 1e-4 of the output's scale."""
  reference = _save_reference(tmp_path, feed_forward_proj)
  ids, mask = _ids_and_mask(TINY['vocab_size'], LENGTH)
  with torch.no_grad():
    expected = reference(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)

  module, params = interop.load_text_encoder(str(tmp_path))
  assert isinstance(module, models.T5EncoderModel)
  assert module.is_gated_act == (feed_forward_proj == 'gated-gelu')
  assert module.dense_act_fn == ('gelu_new' if feed_forward_proj == 'gated-gelu' else 'relu')
  apply = jax.jit(lambda p, i, m: module.apply({'params': p}, i, m, output_hidden_states=True))
  out = apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))

  assert isinstance(out, models.TextEncoderOutput)
  assert out[0] is out.last_hidden_state and out[1] is None and out.pooler_output is None and out.text_embeds is None
  assert out.last_hidden_state.shape == (2, LENGTH, TINY['d_model'])
  assert _rel_to_scale(out.last_hidden_state, expected.last_hidden_state) <= 1e-4
  assert len(out.hidden_states) == len(expected.hidden_states) == TINY['num_layers'] + 1
  for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
    assert _rel_to_scale(ours, theirs) <= 1e-4
  np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
  # Without output_hidden_states: the same last hidden state, no hidden states.
  plain = module.apply({'params': params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  assert plain.hidden_states is None
  assert _rel_to_scale(plain.last_hidden_state, expected.last_hidden_state) <= 1e-4
  # The padding of row 1 is invisible to its real tokens.
  changed = module.apply({'params': params}, jnp.asarray(ids, jnp.int32).at[1, -9:].set(5), jnp.asarray(mask))
  np.testing.assert_allclose(changed.last_hidden_state[1, :-9], plain.last_hidden_state[1, :-9], atol=1e-5)


def test_param_names_map_to_transformers_names(tmp_path):
  """The Flax tree converts mechanically to exactly the state dict transformers writes."""
  reference = _save_reference(tmp_path, 'gated-gelu')
  module, params = interop.load_text_encoder(str(tmp_path))
  paths = {'/'.join(k) for k in flax.traverse_util.flatten_dict(params)}
  assert 'encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding' in paths
  assert not any(p.startswith('encoder/block_1/layer_0/SelfAttention/relative_attention_bias') for p in paths)
  assert 'encoder/block_2/layer_1/DenseReluDense/wi_1/kernel' in paths and 'shared/embedding' in paths
  assert set(naming.flax_to_torch(params, naming.T5_ENCODER)) == set(reference.state_dict()) - {
    'encoder.embed_tokens.weight'  # The tied copy of shared.weight.
  }
  table = params['encoder']['block_0']['layer_0']['SelfAttention']['relative_attention_bias']['embedding']
  assert table.shape == (TINY['relative_attention_num_buckets'], TINY['num_heads'])
  assert params['encoder']['block_0']['layer_0']['SelfAttention']['q']['kernel'].shape == (32, 24)
  assert models.count_params(params) == sum(p.numel() for p in reference.parameters())


def test_transformers4_tied_copy_and_full_t5_model_load(tmp_path):
  """Files holding `encoder.embed_tokens.weight` (transformers 4) or a decoder and lm_head (a full T5 model) load
  the same encoder; a file whose weights do not fit its config names the problem."""
  reference = _save_reference(tmp_path / 'encoder', 'relu')
  _, params = interop.load_text_encoder(str(tmp_path / 'encoder'))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  state['decoder.block.0.layer.0.SelfAttention.q.weight'] = np.zeros((24, 32), np.float32)
  state['lm_head.weight'] = np.zeros((61, 32), np.float32)
  _, again = interop.load_text_encoder(str(tmp_path / 'encoder'), state=state)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  del state['encoder.final_layer_norm.weight']
  with pytest.raises(UserError, match='final_layer_norm'):
    interop.load_text_encoder(str(tmp_path / 'encoder'), state=state)


def test_bfloat16_compute_runs_and_stays_close(tmp_path):
  _save_reference(tmp_path, 'gated-gelu')
  ids, mask = _ids_and_mask(TINY['vocab_size'], LENGTH)
  module, params = interop.load_text_encoder(str(tmp_path))
  module16, params16 = interop.load_text_encoder(str(tmp_path), dtype='bfloat16')
  full = module.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
  half = module16.apply({'params': params16}, jnp.asarray(ids), jnp.asarray(mask)).last_hidden_state
  assert half.dtype == jnp.bfloat16
  assert _rel_to_scale(half.astype(jnp.float32), full) <= 5e-2


CAPTIONS = [
  'a red circle on a blue square',
  'the quick brown fox jumps over the lazy dog',
  'two green triangles and one yellow star',
  'photos of cats, dogs and birds',
  'a painting of a small house by the sea',
  'large purple hexagon beside a tiny orange dot',
]


def test_sentencepiece_tokenizer_loads_through_transformers_from_the_model_directory(tmp_path):
  """A T5-style SentencePiece model (pad 0, eos 1, unk 2) trained here, beside a T5 encoder's weights: the directory
  gives the tokenizer (transformers' T5 tokenizer) whose ids are SentencePiece's plus eos, and those ids run the
  encoder loaded from the same directory. (transformers 5's `T5Tokenizer(vocab_file=...)` ignores the keyword and
  maps every word to the same few ids: a T5 tokenizer is built with `from_pretrained(directory)`.)"""
  spm = pytest.importorskip('sentencepiece')
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CAPTIONS * 3),
    model_prefix=str(tmp_path / 'spiece'),
    vocab_size=50,
    model_type='unigram',
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    minloglevel=2,
  )
  (tmp_path / 'spiece.vocab').unlink()
  processor = spm.SentencePieceProcessor(model_file=str(tmp_path / 'spiece.model'))
  tokenizer_vocab = 50 + 100  # T5's tokenizer adds 100 sentinel tokens <extra_id_i>.
  _save_reference(tmp_path, 'gated-gelu', vocab_size=tokenizer_vocab)

  tokenizer = tokenizer_lib.load_tokenizer(tmp_path)
  assert isinstance(tokenizer, transformers.T5Tokenizer) and len(tokenizer) == tokenizer_vocab
  texts = ['a red fox by the sea', 'unknown zebra words!', CAPTIONS[1]]
  expected = [processor.encode(text) + [1] for text in texts]
  assert tokenizer(texts)['input_ids'] == expected
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))(texts)['input_ids'] == expected
  assert any(2 in row for row in expected)  # An unknown piece (unk) is part of the check.
  # Saved and reloaded (tokenizer.json): the same ids.
  tokenizer_lib.save_tokenizer(tokenizer, tmp_path / 'saved')
  assert tokenizer_lib.load_tokenizer(tmp_path / 'saved')(texts)['input_ids'] == expected

  ids = tokenizer_lib.tokenize(tokenizer, texts, 40)
  assert ids.shape == (3, 40) and ids[0, len(expected[0])] == 0  # Padded with pad id 0.
  module, params = interop.load_text_encoder(str(tmp_path))
  out = module.apply({'params': params}, jnp.asarray(ids), jnp.asarray(ids != 0))
  assert out.last_hidden_state.shape == (3, 40, TINY['d_model'])
  assert bool(jnp.all(jnp.isfinite(out.last_hidden_state)))


def test_config_errors_name_the_file(tmp_path):
  _save_reference(tmp_path, 'relu')
  config = (tmp_path / 'config.json').read_text()
  (tmp_path / 'config.json').write_text(config.replace('"relu"', '"gated-swishy"'))
  with pytest.raises(UserError, match='config.json'):
    interop.load_text_encoder(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize('feed_forward_proj', ['gated-gelu', 'relu'])
def test_parity_default_buckets_long_sequence(tmp_path, feed_forward_proj):
  """transformers' default buckets (32, max distance 128) with 160 tokens, 4 blocks, 8 heads of 16."""
  overrides = dict(
    d_model=128,
    d_kv=16,
    d_ff=256,
    num_layers=4,
    num_heads=8,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    vocab_size=200,
  )
  reference = _save_reference(tmp_path, feed_forward_proj, seed=3, **overrides)
  ids, mask = _ids_and_mask(200, 160, seed=4)
  with torch.no_grad():
    expected = reference(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
  module, params = interop.load_text_encoder(str(tmp_path))
  out = jax.jit(lambda p: module.apply({'params': p}, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True))(
    params
  )
  for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
    assert _rel_to_scale(ours, theirs) <= 1e-4
