"""Reconstruction metrics: PSNR and SSIM against torchmetrics' on the same images, LPIPS through `eval.lpips` on two
folders against the model applied directly, and the registry's pair metrics on a VAE workdir (eval/run.py and the
training loop's `config.evals`) against the pipeline's reconstructions scored directly."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion.evaluation import reconstruction
from support import ROOT, device_env

torch = pytest.importorskip('torch')
tm = pytest.importorskip('torchmetrics.functional.image')


def _pairs(size=32, batch=3):
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)
  b = np.clip(a.astype(np.int32) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
  return a, b


def test_psnr_and_ssim_equal_torchmetrics():
  a, b = _pairs()
  ta, tb = (torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64) for x in (a, b))
  psnr = tm.peak_signal_noise_ratio(ta, tb, data_range=255.0, dim=(1, 2, 3), reduction='none').numpy()
  ssim = tm.structural_similarity_index_measure(ta, tb, data_range=255.0, reduction='none').numpy()
  np.testing.assert_allclose(reconstruction.psnr(a, b), psnr, rtol=1e-4)
  np.testing.assert_allclose(reconstruction.ssim(a, b), ssim, rtol=1e-4)
  assert np.all(ssim < 0.99) and np.allclose(reconstruction.ssim(a, a), 1.0)
  from diffusion.evaluation import EvalContext

  context = EvalContext('', None, None, 'pairs')
  psnr_metric, ssim_metric = reconstruction.PSNRMetric(context), reconstruction.SSIMMetric(context)
  for metric in (psnr_metric, ssim_metric):
    metric.update(a[:2], b[:2])
    metric.update(a[2:], b[2:])
  result = {**psnr_metric.result(), **ssim_metric.result()}
  np.testing.assert_allclose([result['psnr'], result['ssim']], [psnr.mean(), ssim.mean()], rtol=1e-4)


def _folders(tmp_path, batch=2):
  from PIL import Image

  a, b = _pairs(size=32, batch=batch)
  for name, images in (('a', a), ('b', b)):
    os.makedirs(tmp_path / name)
    for i, image in enumerate(images):
      Image.fromarray(image).save(tmp_path / name / f'{i:02d}.png')
  return a, b


def test_folder_lpips_pairs_images_by_sorted_name(tmp_path):
  from diffusion.models import lpips
  from eval.lpips import folder_lpips

  a, b = _folders(tmp_path, batch=3)
  params = lpips.random_params('alex')
  unit = lambda u: u.astype(np.float32) / 127.5 - 1.0
  expected = np.asarray(lpips.LPIPS('alex').apply({'params': params}, unit(a), unit(b)))
  value, count = folder_lpips(str(tmp_path / 'a'), str(tmp_path / 'b'), params, 'alex', batch_size=2)
  assert count == 3
  np.testing.assert_allclose(value, expected.mean(), rtol=1e-5)
  swapped = np.asarray(lpips.LPIPS('alex').apply({'params': params}, unit(a), unit(b[::-1])))
  assert abs(swapped.mean() - value) > 1e-6  # The pairing matters.


@pytest.mark.slow
def test_eval_lpips_prints_the_mean_over_pairs_sorted_by_name(tmp_path):
  a, b = _folders(tmp_path)
  command = [sys.executable, '-m', 'eval.lpips', str(tmp_path / 'a'), str(tmp_path / 'b')]
  run = lambda *flags: subprocess.run(
    command + list(flags), cwd=ROOT, env=device_env(1), capture_output=True, text=True, timeout=600
  )
  result = run('--vgg_weights=random', '--lpips_weights=random')
  assert result.returncode == 0, result.stderr
  import jax

  from diffusion.models import lpips

  params = lpips.random_params('vgg')
  unit = lambda u: u.astype(np.float32) / 127.5 - 1.0
  expected = float(np.mean(np.asarray(lpips.LPIPS('vgg').apply({'params': params}, unit(a), unit(b)))))
  (line,) = [l for l in result.stdout.splitlines() if l.startswith('LPIPS: ')]
  np.testing.assert_allclose(float(line.split()[1]), expected, rtol=1e-5)
  assert 'backbone: random' in result.stderr
  missing = run(f'--vgg_weights={tmp_path / "nope.pth"}', '--lpips_weights=random')
  assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'nope.pth' in missing.stderr and jax is not None


def _held_out(config, n):
  from diffusion.evaluation.reference import ReferenceData

  return ReferenceData(config, config.data.eval_split, n).first_images(n)


def test_eval_run_scores_a_vae_workdir_s_reconstructions(vae_workdir, tmp_path):
  import shutil

  from diffusion.pipeline import AutoencoderPipeline
  from eval import run as run_lib

  workdir = str(tmp_path / 'vae')
  shutil.copytree(vae_workdir, workdir, ignore=shutil.ignore_patterns('eval', 'wandb'))
  options = {'vgg_weights': 'random', 'lpips_weights': 'random', 'lpips_net': 'alex'}
  metrics = ['psnr', 'ssim', 'lpips', 'rfid']
  (record,) = run_lib.run(workdir, metrics, 8, step=2, batch_size=4, wandb_mode='disabled', metric_options=options)
  scores = record['metrics']
  assert set(scores) == {'psnr', 'ssim', 'lpips_random_weights', 'rfid_random_inception'}
  pipeline = AutoencoderPipeline.from_workdir(workdir, step=2)
  images = _held_out(pipeline.config, 8)
  recs = pipeline.reconstruct(images, batch_size=4)
  np.testing.assert_allclose(scores['psnr'], reconstruction.psnr(recs, images).mean(), rtol=1e-6)
  np.testing.assert_allclose(scores['ssim'], reconstruction.ssim(recs, images).mean(), rtol=1e-6)
  assert 0.0 < scores['lpips_random_weights'] and scores['rfid_random_inception'] > 0.0
  assert record['evaluators']['lpips']['random_weights'] is True
  assert os.path.isfile(run_lib.eval_path(workdir, 2))


def test_training_runs_reconstruction_evaluators_of_config_evals(vae_workdir):
  import json

  from diffusion.pipeline import AutoencoderPipeline

  with open(os.path.join(vae_workdir, 'metrics.jsonl')) as f:
    final = [r for r in map(json.loads, f) if 'eval/recon/psnr' in r]
  assert len(final) == 1 and final[0]['step'] == 2
  pipeline = AutoencoderPipeline.from_workdir(vae_workdir, step=2)
  images = _held_out(pipeline.config, 4)
  expected = reconstruction.psnr(pipeline.reconstruct(images, batch_size=4), images).mean()
  np.testing.assert_allclose(final[0]['eval/recon/psnr'], expected, rtol=1e-5)


@pytest.mark.parametrize(
  'entry, key, needle',
  [
    ({'type': 'fid'}, 'evals.e.type', 'text-to-image'),
    ({'type': 'psnr', 'guidance_scale': 2.0}, 'evals.e.guidance_scale', 'samples nothing'),
  ],
  ids=['sampling-metric-on-vae', 'sampling-key-on-pair-metric'],
)
def test_bad_reconstruction_evaluators_name_their_key(data_dir, entry, key, needle):
  from diffusion.errors import ConfigError
  from diffusion.evaluation import validate_evals
  from support import VAE, load_config

  config = load_config('vae_base', VAE, data_dir)
  config.evals = {'e': entry}
  with pytest.raises(ConfigError, match=needle) as info:
    validate_evals(config)
  assert info.value.key == key
