"""scripts/convert.py: a random-weight SD-like pipeline directory -> workdir -> pipeline directory, and its errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import ldm_base
from diffusion import checkpoint, interop
from diffusion.errors import UserError
from diffusion.training import pipeline_io
from diffusion.workdir import load_workdir_config
from support import run_convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


convert = run_convert


@pytest.fixture(scope='module')
def imported(sd_pipeline_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('imported'))
  result = convert('import', sd_pipeline_dir, '--workdir', workdir)
  assert result.returncode == 0, result.stderr
  assert f'imported {sd_pipeline_dir} into {workdir}' in result.stdout
  return workdir


def test_the_script_runs_as_a_program():
  """The one subprocess: a usage error exits 2 with one line before JAX is even imported."""
  result = subprocess.run(
    [sys.executable, 'scripts/convert.py', 'import'], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    'error: the following arguments are required: source, --workdir (see --help)'
  ]


def test_import_writes_a_complete_workdir(imported, sd_pipeline_dir, clip_tokenizer):
  assert {'config.json', 'tokenizer', 'frozen', 'checkpoints'} <= set(os.listdir(imported))
  config = load_workdir_config(imported, expect='ldm')
  assert config.model.text.type == 'clip' and not config.model.text.trainable
  assert config.model.text.eos_token_id == -1  # transformers' legacy eos 2: pool at argmax, like CLIP.
  assert config.model.vae.scaling_factor == pytest.approx(0.3)
  assert config.data.image_size == 32 and config.model.unet.sample_size == 8
  assert config.data.max_text_length == 77 and config.model.text.vocab_size == 49408
  assert (config.diffusion.schedule, config.diffusion.prediction_type) == ('scaled_linear', 'eps')
  assert config.diffusion.beta_end == pytest.approx(0.012)
  assert tuple(config.model.unet.block_out_channels) == (16, 32)
  from diffusion.data import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.load_tokenizer(os.path.join(imported, 'tokenizer'))
  np.testing.assert_array_equal(
    tokenizer_lib.tokenize(tokenizer, ['a red circle'], 77),
    tokenizer_lib.tokenize(clip_tokenizer, ['a red circle'], 77),
  )

  ckpt = checkpoint.Checkpointer(imported, read_only=True)
  assert ckpt.latest_step() == 0
  ema = ckpt.restore_params(0, 'ema_params')
  _, unet_params = interop.load_unet(sd_pipeline_dir)
  _, text_params = interop.load_text_encoder(sd_pipeline_dir)
  _, vae_params = interop.load_vae(sd_pipeline_dir)
  jax.tree.map(np.testing.assert_array_equal, ema['unet'], unet_params)
  jax.tree.map(np.testing.assert_array_equal, ema['text'], text_params)
  jax.tree.map(
    np.testing.assert_array_equal, checkpoint.load_pytree(os.path.join(imported, 'frozen', 'vae')), vae_params
  )
  assert ckpt.restore_meta(0)['imported_from'] == sd_pipeline_dir


def test_export_gives_back_the_pipeline(imported, sd_pipeline_dir, tmp_path, ref):
  out = str(tmp_path / 'exported')
  result = convert('export', '--workdir', imported, out)
  assert result.returncode == 0, result.stderr
  for component, weights in (('unet', 'diffusion_pytorch_model'), ('vae', 'diffusion_pytorch_model')):
    original = load_file(os.path.join(sd_pipeline_dir, component, f'{weights}.safetensors'))
    exported = load_file(os.path.join(out, component, f'{weights}.safetensors'))
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
      np.testing.assert_array_equal(exported[name], value, err_msg=f'{component}/{name}')
  pipeline = ref.diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  source = ref.diffusers.StableDiffusionPipeline.from_pretrained(sd_pipeline_dir, safety_checker=None)
  ids = source.tokenizer(['a red circle'], padding='max_length', max_length=77, return_tensors='pt').input_ids
  assert (
    pipeline.tokenizer(['a red circle'], padding='max_length', max_length=77, return_tensors='pt').input_ids == ids
  ).all()
  with ref.torch.no_grad():
    got, want = pipeline.text_encoder(ids), source.text_encoder(ids)
  np.testing.assert_array_equal(got.last_hidden_state.numpy(), want.last_hidden_state.numpy())
  np.testing.assert_array_equal(got.pooler_output.numpy(), want.pooler_output.numpy())
  assert pipeline.vae.config.scaling_factor == pytest.approx(0.3)
  assert pipeline.scheduler.config.prediction_type == 'epsilon'
  np.testing.assert_allclose(pipeline.scheduler.alphas_cumprod.numpy(), source.scheduler.alphas_cumprod.numpy())


def test_export_refuses_a_non_empty_directory(imported, tmp_path):
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'file').write_text('x')
  result = convert('export', '--workdir', imported, str(tmp_path / 'taken'))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: export directory '{tmp_path / 'taken'}' is not empty"]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  return lines[0]


def test_user_errors_are_one_line(sd_pipeline_dir, imported, tmp_path):
  assert 'does not exist' in _one_error_line(
    convert('import', str(tmp_path / 'nope'), '--workdir', str(tmp_path / 'w'))
  )
  assert 'already holds a run' in _one_error_line(convert('import', sd_pipeline_dir, '--workdir', imported))
  assert 'unknown command' in _one_error_line(convert('bogus'))
  assert '--workdir' in _one_error_line(convert('import', sd_pipeline_dir))
  assert 'does not exist' in _one_error_line(
    convert('export', '--workdir', str(tmp_path / 'none'), str(tmp_path / 'o'))
  )
  partial = tmp_path / 'partial'
  partial.mkdir()
  for name in ('unet', 'vae', 'text_encoder'):
    os.symlink(os.path.join(sd_pipeline_dir, name), partial / name)
  line = _one_error_line(convert('import', str(partial), '--workdir', str(tmp_path / 'w2')))
  assert 'missing tokenizer/, scheduler/' in line
  assert not os.path.exists(tmp_path / 'w2' / 'config.json')


def test_unsupported_scheduler_is_named(sd_pipeline_dir, tmp_path):
  copy = tmp_path / 'pipe'
  copy.mkdir()
  for name in os.listdir(sd_pipeline_dir):
    if name != 'scheduler':
      os.symlink(os.path.join(sd_pipeline_dir, name), copy / name)
  (copy / 'scheduler').mkdir()
  config = json.load(open(os.path.join(sd_pipeline_dir, 'scheduler', 'scheduler_config.json')))
  (copy / 'scheduler' / 'scheduler_config.json').write_text(json.dumps({**config, 'beta_schedule': 'sigmoid'}))
  with pytest.raises(UserError, match="scheduler_config.json: beta_schedule='sigmoid' is not supported"):
    pipeline_io.import_pipeline(str(copy), str(tmp_path / 'w'), ldm_base.get_config('base'))


@pytest.mark.slow  # Trains the tiny VAE and LDM of tests/conftest.py first.
def test_export_of_a_workdir_trained_here(ldm_workdir, tmp_path, ref):
  """A model trained from scratch here (word tokenizer, text encoder pooling at id 2) loads in diffusers and
  computes what it computes here."""
  out = str(tmp_path / 'exported')
  result = convert('export', '--workdir', ldm_workdir, out)
  assert result.returncode == 0, result.stderr
  assert 'warning: the text encoder pools at token id 2' in result.stderr
  config = load_workdir_config(ldm_workdir, expect='ldm')
  from diffusion import models

  unet = models.create_unet(config.model.unet)
  params = checkpoint.Checkpointer(ldm_workdir, read_only=True).restore_params(None, 'ema_params')['unet']
  size = config.model.unet.sample_size
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, size, size, 4), np.float32)
  ctx = rng.standard_normal((1, 3, config.model.unet.cross_attention_dim), np.float32)
  t = np.array([321.0], np.float32)
  reference = ref.diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, 'unet'))
  with ref.torch.no_grad():
    expected = ref.nhwc(reference(ref.nchw(x), ref.torch.from_numpy(t), ref.torch.from_numpy(ctx)).sample)
  np.testing.assert_allclose(unet.apply({'params': params}, x, t, ctx), expected, atol=1e-4)
  pipeline = ref.diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  assert pipeline.vae.config.scaling_factor == pytest.approx(config.model.vae.scaling_factor)
