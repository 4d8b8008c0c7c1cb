"""Reconstruction metrics: PSNR and SSIM against torchmetrics' on the same images, LPIPS through `eval.lpips` on two
folders against the model applied directly."""

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
  metrics = reconstruction.ReconstructionMetrics()
  metrics.update(a[:2], b[:2])
  metrics.update(a[2:], b[2:])
  result = metrics.result()
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
