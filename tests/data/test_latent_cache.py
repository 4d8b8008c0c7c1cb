"""Tests of the latent cache: stored posteriors equal the encoder's, training from it equals encoding on the fly."""

import json
import os

import jax
import numpy as np
import pytest

from diffusion import checkpoint, latent_cache_writer
from diffusion.data import inputs, latent_cache
from diffusion.data import pipeline as data_pipeline
from diffusion.errors import ConfigError
from support import LDM, load_config, run_cli

SETTINGS = {
  **LDM,
  'data.random_flip': True,
  'train.eval_every': 0,
  'train.sample_every': 0,
  'train.checkpoint_every': 3,
  'train.num_steps': 3,
  'diffusion.caption_dropout': 0.3,
}


def _config(data_dir, vae_workdir, **more):
  return load_config('ldm_base', SETTINGS, data_dir, vae_workdir=vae_workdir, **more)


def _quiet(line: str) -> None:
  del line


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory, data_dir, vae_workdir) -> str:
  """The training split with both flips, written in two process slices (as two hosts would)."""
  out = str(tmp_path_factory.mktemp('latents'))
  for index in (1, 0):  # Process 0 (the metadata writer) last, like a host that finishes late.
    latent_cache_writer.precompute(
      _config(data_dir, vae_workdir), vae_workdir, out, batch_size=24, process_index=index, process_count=2, log=_quiet
    )
  return out


def test_stored_posteriors_equal_the_encoders_on_the_same_images(cache_dir, data_dir, vae_workdir):
  from diffusion import models

  config = _config(data_dir, vae_workdir)
  vae_config, params = latent_cache_writer.load_vae(vae_workdir)
  source = data_pipeline.create_data_source(config.data, 'train')
  images = data_pipeline.normalize_images(np.stack([np.asarray(source[i]['image']) for i in range(len(source))]))
  vae = models.create_vae(vae_config)
  cached, meta = latent_cache.open_source(cache_dir, 'train')
  records = [latent_cache.decode_record(cached[i]) for i in range(len(cached))]
  assert meta['variants'] == ['original', 'flipped'] and len(records) == len(source) == 64
  assert meta['vae_params_sha256'] == checkpoint.params_hash(params)
  for variant, x in enumerate((images, images[:, :, ::-1])):
    mean, logvar = jax.jit(lambda p, x: vae.apply({'params': p}, x, method='encode'))(params, x)
    stored_mean = np.stack([r['mean'][variant] for r in records])
    stored_logvar = np.stack([r['logvar'][variant] for r in records])
    np.testing.assert_allclose(stored_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stored_logvar, logvar, rtol=1e-5, atol=1e-5)
  assert not np.allclose(records[0]['mean'][0], records[0]['mean'][1])  # The flip is really stored.
  caption = data_pipeline.record_caption(source[0], config.data)
  assert records[0]['captions'] == [caption]
  assert records[0]['flipped_captions'] == [data_pipeline.swap_left_right(caption)]


def _batches(data_config, tokenizer, num_batches=2):
  loader = inputs.create_input_pipeline(data_config, 'train', tokenizer=tokenizer, batch_size=8, seed=5)
  return [next(it) for it in [iter(loader)] for _ in range(num_batches)]


def test_losses_from_the_cache_equal_the_losses_on_the_fly(cache_dir, data_dir, vae_workdir, tmp_path):
  from diffusion.training.ldm_task import LDMTask

  # One task computes both: its loss encodes image batches and samples cached posteriors from cache batches.
  task = LDMTask(_config(data_dir, vae_workdir, **{'data.latent_cache': cache_dir}), str(tmp_path / 'run'))
  task.config.model.vae.scaling_factor = 0.7  # A fixed scale (calibration is checked by the slow end-to-end test).
  cached_batches = _batches(task.config.data, task.tokenizer)
  image_batches = _batches(_config(data_dir, vae_workdir).data, task.tokenizer)
  params = task.init_params(jax.random.PRNGKey(0))
  losses = {}
  loss_fn = jax.jit(task.loss_fn)
  for name, batches in (('fly', image_batches), ('cache', cached_batches)):
    losses[name] = [
      float(loss_fn(params, task.frozen, b, jax.random.split(jax.random.PRNGKey(i), 8), 0)[0])
      for i, b in enumerate(batches)
    ]
  assert set(cached_batches[0]) == {'latent_mean', 'latent_logvar', 'input_ids'}
  for a, b in zip(image_batches, cached_batches):  # Same examples, same caption choices and flips.
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
  cached, _ = latent_cache.open_source(cache_dir, 'train')
  variant_of = {}
  for record in (latent_cache.decode_record(cached[i]) for i in range(len(cached))):
    variant_of.update({record['mean'][v].tobytes(): v for v in (0, 1)})
  used = [variant_of[m.tobytes()] for b in cached_batches for m in b['latent_mean']]
  assert 0 in used and 1 in used  # Both flip decisions occur in these batches.
  np.testing.assert_allclose(losses['cache'], losses['fly'], rtol=1e-5)
  assert losses['fly'][0] != losses['fly'][1]


def test_cache_of_another_vae_dataset_or_flip_setting_is_refused(cache_dir, data_dir, vae_workdir, tmp_path):
  _, params = latent_cache_writer.load_vae(vae_workdir)
  config = _config(data_dir, vae_workdir, **{'data.latent_cache': cache_dir})
  config.model.vae = latent_cache_writer.load_vae(vae_workdir)[0]
  latent_cache.check_training_cache(config, params)  # The matching cache passes.
  other = jax.tree.map(lambda p: p + 1e-3, params)
  with pytest.raises(ConfigError, match='VAE params'):
    latent_cache.check_cache(config, 'train', other)
  config.data.shapes.num_train = 65
  with pytest.raises(ConfigError, match=r'dataset\.shapes\.num_train: cache has 64, config wants 65'):
    latent_cache.check_cache(config, 'train', params)
  config.data.shapes.num_train = 64
  no_flips = str(tmp_path / 'no_flips')
  latent_cache_writer.precompute(
    _config(data_dir, vae_workdir), vae_workdir, no_flips, split='validation', flips='none', log=_quiet
  )
  config.data.latent_cache = no_flips
  with pytest.raises(ConfigError, match='data.random_flip=True needs the flipped variant'):
    latent_cache.check_cache(config, 'validation', params)
  with pytest.raises(ConfigError, match="no latent cache for split 'train'.*splits found: \\['validation'\\]"):
    latent_cache.check_cache(config, 'train', params)


def test_training_refuses_a_mismatched_cache_before_compiling(cache_dir, data_dir, vae_workdir, tmp_path):
  from diffusion.training import train_and_evaluate

  meta_path = os.path.join(cache_dir, 'train', 'metadata.json')
  meta = json.load(open(meta_path))
  bad = tmp_path / 'bad' / 'train'
  bad.mkdir(parents=True)
  for name in meta['shards'] + meta['shard_stats']:
    os.symlink(os.path.join(cache_dir, 'train', name), bad / name)
  meta['image_size'] = 64
  (bad / 'metadata.json').write_text(json.dumps(meta))
  config = _config(data_dir, vae_workdir, **{'data.latent_cache': str(tmp_path / 'bad')})
  with pytest.raises(ConfigError, match='image_size: cache has 64, config wants 32'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  config = _config(data_dir, vae_workdir, **{'data.latent_cache': str(tmp_path / 'bad'), 'data.random_crop': True})
  with pytest.raises(ConfigError, match='data.random_crop'):
    train_and_evaluate(config, str(tmp_path / 'run'))


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  missing = run_cli(
    'scripts/precompute_latents.py', '--vae_workdir', str(tmp_path / 'nope'), '--out', str(tmp_path / 'out')
  )
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines() == [f"error: --vae_workdir '{tmp_path / 'nope'}' does not exist"]
  no_out = run_cli('scripts/precompute_latents.py', '--vae_workdir', str(tmp_path))
  assert no_out.returncode == 2 and no_out.stderr.startswith('error: --out is required')
  not_vae = run_cli('scripts/precompute_latents.py', '--vae_workdir', str(tmp_path), '--out', str(tmp_path / 'o'))
  assert not_vae.returncode == 2 and 'is not a training workdir' in not_vae.stderr
  no_text = run_cli('scripts/precompute_latents.py', '--vae_workdir', str(tmp_path), '--out', 'o', '--text_embeddings')
  assert no_text.returncode == 2
  assert no_text.stderr.strip().splitlines() == [
    'error: --text_embeddings needs --text_workdir (the frozen text encoder)'
  ]
  assert 'Traceback' not in not_vae.stderr


@pytest.mark.slow
def test_training_from_the_cache_gives_the_same_metrics_end_to_end(cache_dir, data_dir, vae_workdir, tmp_path):
  """Three train steps both ways, with calibration of the latent scale, flips, caption dropout and evaluation."""
  from diffusion.training import train_and_evaluate

  runs = {}
  for name, more in (('fly', {}), ('cache', {'data.latent_cache': cache_dir})):
    config = _config(data_dir, vae_workdir, **{'train.eval_every': 3, **more})
    train_and_evaluate(config, str(tmp_path / name))
    lines = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
    runs[name] = (
      [(l['step'], l['loss'], l['grad_norm']) for l in lines if 'loss' in l],
      [l['eval/val_loss'] for l in lines if 'eval/val_loss' in l],
      json.load(open(tmp_path / name / 'config.json'))['model']['vae']['scaling_factor'],
    )
  fly, cache = runs['fly'], runs['cache']
  assert [s for s, _, _ in cache[0]] == [1, 2, 3]
  np.testing.assert_allclose(np.array(cache[0]), np.array(fly[0]), rtol=1e-5)
  np.testing.assert_allclose(cache[1], fly[1], rtol=1e-5)  # Eval reads images: the cache holds no eval split.
  np.testing.assert_allclose(cache[2], fly[2], rtol=1e-5)
