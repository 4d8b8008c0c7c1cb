"""FID parity with pytorch-fid: same image folders, same (random, calibrated) weights, stats files both ways."""

import os

import numpy as np
import pytest
from pytorch_fid import fid_score

from diffusion.evaluation import fid, inception

NUM_IMAGES = 200  # Per set; pool3 is 2048-d, so the covariances are singular, as in most small evaluations.


@pytest.fixture(scope='module')
def image_folders(tmp_path_factory, tref):
  a, b = tref.fid_image_sets(NUM_IMAGES)
  root = tmp_path_factory.mktemp('fid_sets')
  return tref.write_pngs(a, str(root / 'a')), tref.write_pngs(b, str(root / 'b'))


def _pytorch_fid_stats(folder, model, tref, **net_kwargs):
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.png'))
  net = tref.pytorch_fid_net(model, output_blocks=[3], **net_kwargs)
  return fid_score.calculate_activation_statistics(files, net, batch_size=50, dims=2048, device='cpu', num_workers=0)


@pytest.fixture(scope='module')
def both_stats(image_folders, inception_75, tref):
  """((mu, sigma) of each set from our pipeline, and from pytorch-fid's), 75 px images fed at their size."""
  model, variables = inception_75
  extractor = inception.FeatureExtractor(variables, resize_to=None)
  ours = []
  for folder in image_folders:
    mu, sigma, counts = fid.folder_statistics(folder, extractor, 50)
    assert counts.read == NUM_IMAGES and counts.skipped == 0
    ours.append((mu, sigma))
  theirs = [_pytorch_fid_stats(f, model, tref, resize_input=False) for f in image_folders]
  return ours, theirs


def test_fid_equals_pytorch_fid_on_the_same_images_and_weights(both_stats):
  """A few hundred images per set (pytorch-fid's resize_input=False at 75 px, to stay fast; the slow test resizes)."""
  ((mu_a, sig_a), (mu_b, sig_b)), ((tmu_a, tsig_a), (tmu_b, tsig_b)) = both_stats
  assert np.abs(mu_a - tmu_a).max() < 1e-4
  assert np.abs(sig_a - tsig_a).max() < 1e-3 * np.abs(tsig_a).max()
  ours = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
  theirs = fid_score.calculate_frechet_distance(tmu_a, tsig_a, tmu_b, tsig_b)
  assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)
  assert theirs > 1.0


def test_stats_files_are_interchangeable_with_pytorch_fid(both_stats, inception_75, tmp_path, tref):
  (mu, sigma), _ = both_stats[0]
  ours = str(tmp_path / 'ours.npz')
  fid.save_stats(ours, mu, sigma)
  m, s = fid_score.compute_statistics_of_path(ours, None, 50, 2048, 'cpu')
  assert np.array_equal(m, mu) and np.array_equal(s, sigma)
  # pytorch-fid's own --save-stats output (on a few images: it always resizes to 299) loads in ours.
  small = tref.write_pngs(tref.fid_image_sets(4, size=32)[0], str(tmp_path / 'small'))
  theirs = str(tmp_path / 'theirs.npz')
  with tref.patched_pytorch_fid(inception_75[0]):
    fid_score.save_fid_stats([small, theirs], 4, 'cpu', 2048, num_workers=0)
  m, s = fid.load_stats(theirs)
  tm, ts = fid_score.compute_statistics_of_path(theirs, None, 50, 2048, 'cpu')
  assert np.array_equal(m, tm) and np.array_equal(s, ts) and m.shape == (2048,)


@pytest.mark.slow
def test_fid_equals_pytorch_fid_at_299_on_larger_sets(tmp_path, inception_299, tref):
  """pytorch-fid's whole path (folders, resize to 299, its sqrtm) against ours, 500 images per set."""
  model, variables = inception_299
  a, b = tref.fid_image_sets(500, size=64)
  folders = [tref.write_pngs(a, str(tmp_path / 'a')), tref.write_pngs(b, str(tmp_path / 'b'))]
  with tref.patched_pytorch_fid(model):
    theirs = fid_score.calculate_fid_given_paths(folders, 50, 'cpu', 2048, num_workers=0)
  extractor = inception.FeatureExtractor(variables)
  (mu_a, sig_a, _), (mu_b, sig_b, _) = (fid.folder_statistics(f, extractor, 50) for f in folders)
  ours = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
  assert theirs > 1.0 and abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)
