"""`python -m eval.fid`: pytorch-fid's command line, its numbers, and one-line user errors."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_fid import fid_score
from pytorch_fid import inception as pf_inception

from diffusion.evaluation import fid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_fid(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run(
    [sys.executable, '-m', 'eval.fid', *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
  )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, inception_299, tref):
  """A random-weight .pth, two image folders (pytorch-fid reads them), and a copy of one with broken files."""
  root = tmp_path_factory.mktemp('fid_cli')
  model, _ = inception_299
  weights = str(root / 'random_fid_inception.pth')
  torch.save(model.state_dict(), weights)
  a, b = tref.fid_image_sets(10, size=32)
  folder_a, folder_b = tref.write_pngs(a, str(root / 'a')), tref.write_pngs(b, str(root / 'b'))
  dirty = str(root / 'b_dirty')
  shutil.copytree(folder_b, dirty)
  open(os.path.join(dirty, 'broken.png'), 'wb').write(b'\x89PNG truncated')
  open(os.path.join(dirty, 'readme.txt'), 'w').write('not an image')
  # pytorch-fid's statistics (its folder reading, resize and network); the distance between them is checked
  # against pytorch-fid's own function in test_fid.py (its sqrtm takes a minute at 2048-d on a small CPU).
  with tref.patched_pytorch_fid(model):
    net = pf_inception.InceptionV3([3]).eval()
    stats = [fid_score.compute_statistics_of_path(f, net, 4, 2048, 'cpu', num_workers=0) for f in (folder_a, folder_b)]
  theirs = fid.frechet_distance(*stats[0], *stats[1])
  return dict(root=root, weights=weights, a=folder_a, b=folder_b, dirty=dirty, theirs=theirs, stats_a=stats[0])


def test_save_stats_then_fid_equals_pytorch_fid(setup):
  stats = str(setup['root'] / 'a.npz')
  saved = run_fid('--save-stats', setup['a'], stats, '--weights', setup['weights'], '--batch-size', '4')
  assert saved.returncode == 0, saved.stderr[-3000:]
  with np.load(stats) as f:
    assert sorted(f.files) == ['mu', 'sigma'] and f['sigma'].shape == (2048, 2048)
    assert np.abs(f['mu'] - setup['stats_a'][0]).max() < 1e-4
  result = run_fid(stats, setup['dirty'], '--weights', setup['weights'], '--batch-size', '4')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('FID: '), result.stdout
  ours = float(lines[0].split(': ')[1])
  assert abs(ours - setup['theirs']) <= 1e-3 * setup['theirs'], (ours, setup['theirs'])
  assert setup['theirs'] > 1.0
  assert 'skipped 1 unreadable image file(s)' in result.stderr and 'broken.png' in result.stderr


def test_user_errors(setup, tmp_path):
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, mu=np.zeros(64), sigma=np.zeros((64, 64)))
  assert_user_error(run_fid(bad, bad), 'mu of shape (64,)', '(2048,)')
  assert_user_error(run_fid(str(tmp_path / 'missing'), bad), 'invalid path')
  assert_user_error(run_fid(setup['a']), 'arguments')
  assert_user_error(run_fid('--save-stats', setup['a'], bad), 'existing output file')
  missing = run_fid(setup['a'], setup['b'], env={'TORCH_HOME': str(tmp_path / 'cache')})
  assert_user_error(missing, str(tmp_path / 'cache'), '6726825d', 'pt_inception-2015-12-05-6726825d.pth')
