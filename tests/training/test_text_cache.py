"""Text embeddings in the latent cache (a frozen text encoder never runs in the step) and bf16 frozen params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import checkpoint, latent_cache_writer
from diffusion.config import validate_config
from diffusion.data import inputs, latent_cache
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import ConfigError
from diffusion.training import state as state_lib
from support import LDM, load_config, random_params

SETTINGS = {
  **LDM,
  'data.random_flip': True,
  'data.shapes.max_objects': 2,  # Two-object captions say left / right: their flipped captions differ.
  'model.text.trainable': False,
  'diffusion.caption_dropout': 0.3,
  'train.eval_every': 0,
  'train.sample_every': 0,
}
STEPS = 3


def _config(data_dir, vae_workdir, **more):
  return load_config('ldm_base', SETTINGS, data_dir, vae_workdir=vae_workdir, **more)


def _init_key(config) -> jax.Array:
  return jax.random.split(jax.random.PRNGKey(config.seed))[0]  # The loop's init key.


def _unet_args(config) -> list:
  """The U-Net's init arguments (latents, timesteps, context) at batch 1."""
  side, unet = config.model.unet.sample_size, config.model.unet
  length = config.data.max_text_length
  return [
    jnp.zeros((1, side, side, unet.in_channels)),
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1, length, unet.cross_attention_dim)),
  ]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, data_dir, vae_workdir):
  """(cache dir, the frozen text encoder's params, the loop's fresh params): the training split with both flips and
  the text embeddings of the frozen text encoder a fresh run of the config starts with."""
  from diffusion.training.ldm_task import LDMTask

  config = _config(data_dir, vae_workdir)
  task = LDMTask(config, str(tmp_path_factory.mktemp('plain')))
  # A fresh run's text params (the loop's init key) and random U-Net params (drawn with numpy: no init compile).
  params = {
    'unet': random_params(task.unet, *_unet_args(config)),
    'text': jax.jit(task.init_text_params)(_init_key(config)),
  }
  text = latent_cache_writer.FrozenTextEncoder(task.config.model.text, params['text'], task.tokenizer, 'fresh init')
  out = str(tmp_path_factory.mktemp('latents'))
  latent_cache_writer.precompute(config, vae_workdir, out, batch_size=24, text_encoder=text, log=lambda line: None)
  return out, text, params


def _encoder(text):
  from diffusion import models

  encoder = models.create_text_encoder(text.config)
  return lambda captions: np.asarray(
    encoder.apply({'params': text.params}, tokenizer_lib.tokenize(text.tokenizer, captions, 16))[0]
  )


def test_stored_embeddings_are_the_encoders_for_every_caption_variant(setup):
  cache_dir, text, _ = setup
  encode = _encoder(text)
  source, meta = latent_cache.open_source(cache_dir, 'train')
  records = [latent_cache.decode_record(source[i]) for i in range(len(source))]
  assert meta['text_encoder']['params_sha256'] == checkpoint.params_hash(text.params)
  assert meta['text_encoder']['embedding_shape'] == [16, 32] and meta['text_encoder']['dtype'] == 'float32'
  flipped = [r for r in records if len(r['flipped_text_embeddings'])]
  plain = [r for r in records if not len(r['flipped_text_embeddings'])]
  assert flipped and plain  # Both kinds occur: only captions that say left / right store a flipped embedding.
  assert all(r['flipped_captions'] == r['captions'] for r in plain)
  for r in flipped[:3] + plain[:3]:
    np.testing.assert_allclose(r['text_embeddings'], encode(r['captions']), rtol=1e-5, atol=1e-5)
  for r in flipped[:3]:
    np.testing.assert_allclose(r['flipped_text_embeddings'], encode(r['flipped_captions']), rtol=1e-5, atol=1e-5)
    assert not np.allclose(r['flipped_text_embeddings'], r['text_embeddings'])
  null = latent_cache.load_null_text_embedding(cache_dir, 'train')
  np.testing.assert_allclose(null, encode([''])[0], rtol=1e-5, atol=1e-5)


def _steps(task, params, batches):
  """Losses of STEPS train steps from `params` (the optimizer and step of the loop)."""
  tx = state_lib.create_optimizer(task.config.optim, 100, frozen=task.frozen_param_groups)
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  step = jax.jit(state_lib.make_train_step(task.loss_fn, task.config.optim.ema_decay))
  out = []
  for batch in batches:
    state, metrics = step(state, batch, task.frozen)
    out.append(float(metrics['loss']))
  return out, state, step


def _batches(data_config, tokenizer):
  loader = inputs.create_input_pipeline(data_config, 'train', tokenizer=tokenizer, batch_size=8, seed=5)
  it = iter(loader)
  return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(STEPS)]


@pytest.mark.slow  # Two train-step compiles (~75 s on 2 cores); the fast tests check the stored embeddings.
def test_training_from_cached_embeddings_equals_encoding_and_never_runs_the_encoder(
  setup, data_dir, vae_workdir, tmp_path
):
  from diffusion.training.ldm_task import LDMTask

  cache_dir, text, params = setup
  task = LDMTask(_config(data_dir, vae_workdir, **{'data.latent_cache': cache_dir}), str(tmp_path / 'run'))
  assert task.null_context is not None  # The cache was accepted for this run's (fresh) frozen text encoder.
  task.config.model.vae.scaling_factor = 0.7  # Fixed, instead of calibrating from data.
  cached = _batches(task.config.data, task.tokenizer)
  assert set(cached[0]) == {'latent_mean', 'latent_logvar', 'input_ids', 'text_embedding'}
  encoded = [{k: v for k, v in b.items() if k != 'text_embedding'} for b in cached]  # The encoder runs on the ids.
  from_cache, state, step = _steps(task, params, cached)
  on_the_fly, _, _ = _steps(task, params, encoded)
  np.testing.assert_allclose(from_cache, on_the_fly, rtol=1e-6)
  assert len(set(from_cache)) == STEPS
  assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params['text']), jax.tree.leaves(text.params)))
  # The step does not read the text encoder: NaN text params give the same, finite loss.
  nan_text = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params['text'])
  tx = state_lib.create_optimizer(task.config.optim, 100, frozen=task.frozen_param_groups)
  nan_state = state_lib.create_train_state({**params, 'text': nan_text}, tx, jax.random.PRNGKey(1))
  _, metrics = step(nan_state, cached[0], task.frozen)
  assert float(metrics['skipped']) == 0.0 and float(metrics['loss']) == from_cache[0]


def test_a_cache_of_another_text_encoder_or_for_a_trained_one_is_refused(setup, data_dir, vae_workdir):
  cache_dir, text, _ = setup
  _, vae = latent_cache_writer.load_vae(vae_workdir)
  config = _config(data_dir, vae_workdir, **{'data.latent_cache': cache_dir})
  config.model.vae = latent_cache_writer.load_vae(vae_workdir)[0]
  latent_cache.check_training_cache(config, vae, (text.params, text.tokenizer))  # The matching encoder passes,
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), text.params)  # also kept in bf16 (train.frozen_param_dtype).
  latent_cache.check_training_cache(config, vae, (bf16, text.tokenizer))
  other = jax.tree.map(lambda p: p + 1e-3, text.params)
  with pytest.raises(ConfigError, match=r"data\.latent_cache: .*text encoder params: .*'fresh init'"):
    latent_cache.check_training_cache(config, vae, (other, text.tokenizer))
  config.model.text.num_attention_heads = 4
  with pytest.raises(ConfigError, match=r'text_encoder\.config\.num_attention_heads: cache has 2, config wants 4'):
    latent_cache.check_training_cache(config, vae, (text.params, text.tokenizer))
  config.model.text.num_attention_heads = 2
  config.model.text.trainable = True
  with pytest.raises(ConfigError, match=r'model\.text\.trainable=True trains it'):
    latent_cache.check_training_cache(config, vae, None)


def test_frozen_param_dtype_is_validated_and_keeps_the_frozen_trees_in_bf16(data_dir, vae_workdir, tmp_path):
  from diffusion.training.ldm_task import LDMTask

  bad = _config(data_dir, vae_workdir, **{'train.frozen_param_dtype': 'float16'})
  with pytest.raises(ConfigError, match='train.frozen_param_dtype'):
    validate_config(bad)
  config = _config(data_dir, vae_workdir, **{'train.frozen_param_dtype': 'bfloat16'})
  validate_config(config)
  task = LDMTask(config, str(tmp_path / 'bf16'))
  shapes = jax.eval_shape(task.init_params, _init_key(config))
  for tree in (task.frozen['vae'], shapes['text']):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(shapes['unet'])} == {jnp.dtype(jnp.float32)}
  source = task.built_on()['vae_workdir']  # What built_on hashes: the VAE workdir's float32 params.
  assert {x.dtype for x in jax.tree.leaves(source)} == {jnp.dtype(jnp.float32)}
  rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16), source)
  assert checkpoint.params_hash(rounded) == checkpoint.params_hash(task.frozen['vae'])


@pytest.mark.slow
def test_bf16_frozen_params_train_within_bf16_tolerance(setup, data_dir, vae_workdir, tmp_path):
  from diffusion.training.ldm_task import LDMTask

  _, _, params = setup
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(data_dir, vae_workdir, **{'train.frozen_param_dtype': dtype})
    task = LDMTask(config, str(tmp_path / dtype))
    task.config.model.vae.scaling_factor = 0.7
    start = jax.tree.map(lambda p, s: p.astype(s.dtype), params, jax.eval_shape(task.init_params, _init_key(config)))
    runs[dtype] = (task, *_steps(task, start, _batches(task.config.data, task.tokenizer)))
  task, losses, state, _ = runs['bfloat16']
  for tree in (task.frozen['vae'], state.params['text'], state.ema_params['text']):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params['unet'])} == {jnp.dtype(jnp.float32)}
  reference = runs['float32'][1]
  assert np.all(np.isfinite(losses)) and losses != reference  # The bf16 weights really are used, and differ.
  np.testing.assert_allclose(losses, reference, rtol=3e-2)


@pytest.mark.slow
def test_the_loop_trains_from_cached_embeddings_as_from_the_encoder(setup, data_dir, vae_workdir, tmp_path):
  """train_and_evaluate, 3 steps with calibration: the cache with embeddings gives the metrics of the same latents
  with the text encoder running; with bf16 frozen params the run trains and checkpoints."""
  import json

  from diffusion.training import train_and_evaluate

  cache_dir, _, _ = setup
  latents_only = str(tmp_path / 'latents_only')
  latent_cache_writer.precompute(_config(data_dir, vae_workdir), vae_workdir, latents_only, log=lambda line: None)
  runs = {}
  for name, more in (
    ('text', {'data.latent_cache': cache_dir}),
    ('encoder', {'data.latent_cache': latents_only}),
    ('bf16', {'data.latent_cache': cache_dir, 'train.frozen_param_dtype': 'bfloat16'}),
  ):
    train_and_evaluate(_config(data_dir, vae_workdir, **{'train.num_steps': STEPS, **more}), str(tmp_path / name))
    lines = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
    runs[name] = np.array([(l['step'], l['loss'], l['grad_norm']) for l in lines if 'loss' in l])
  from diffusion import workdir as workdir_lib

  trained = workdir_lib.load_trained_params(str(tmp_path / 'text'), 'params')[0]['text']
  assert checkpoint.params_hash(trained) == checkpoint.params_hash(
    setup[1].params
  )  # The loop's fresh init is the same.
  assert list(runs['text'][:, 0]) == [1, 2, 3]
  np.testing.assert_allclose(runs['text'], runs['encoder'], rtol=1e-5)
  np.testing.assert_allclose(runs['bf16'][:, 1], runs['text'][:, 1], rtol=3e-2)


def test_each_caption_variant_is_embedded_once_stored_in_its_dtype_and_read_with_its_draw():
  from flax import serialization

  from diffusion.data import pipeline as data_pipeline

  class Embedder:  # A caption's "embedding" is its length, so a test can tell which caption a row belongs to.
    dtype, calls = 'bfloat16', []

    def stored(self, texts):
      self.calls.append(list(texts))
      return np.stack([np.full((2, 3), len(t)) for t in texts]).astype(self.dtype)

  two = 'a red circle to the left of a blue square'
  pending = [{'image': 1, 'captions': [two, 'a red circle']}, {'image': 1, 'captions': ['a red circle']}]
  pending.append({'image': None, 'captions': ['unreadable']})
  fields = latent_cache_writer._text_fields(Embedder(), pending, flips=True)
  flipped = data_pipeline.swap_left_right(two)
  assert sorted(Embedder.calls[0]) == sorted({two, 'a red circle', flipped})  # One call, each text once.
  assert fields[0]['text_embeddings'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(fields[0]['text_embeddings'][:, 0, 0], [len(two), 12])
  np.testing.assert_array_equal(fields[0]['flipped_text_embeddings'][:, 0, 0], [len(flipped), 12])
  assert fields[1]['flipped_text_embeddings'].size == 0 and fields[2]['text_embeddings'].size == 0
  record = {'captions': pending[0]['captions'], 'flipped_captions': [flipped, 'a red circle'], **fields[0]}
  record = serialization.msgpack_restore(serialization.msgpack_serialize(record))
  record.update(mean=np.zeros((2, 1, 1, 1)), logvar=np.zeros((2, 1, 1, 1)))
  augment, seen = latent_cache.CachedAugment(8, random_flip=True), set()
  for seed in range(16):
    out = augment.random_map(record, np.random.default_rng(seed))
    choice, _, _, flip = data_pipeline.draw_augmentation(np.random.default_rng(seed), 2, 8, 8, 8, False, True)
    assert float(out['text_embedding'][0, 0]) == len(out['caption'])  # The drawn caption's own embedding.
    seen.add((choice, flip))
  assert len(seen) == 4
  assert latent_cache._stack([out, out])['text_embedding'].dtype == np.float32
