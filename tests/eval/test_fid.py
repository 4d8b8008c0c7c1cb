"""FID statistics and distance: parity with pytorch-fid on the same images and (random, calibrated) weights."""

import os

import numpy as np
import pytest
import torch
from pytorch_fid import fid_score

from diffusion.errors import UserError
from eval import fid, inception

NUM_IMAGES = 200  # Per set; pool3 is 2048-d, so the covariances are singular, as in most small evaluations.


def test_running_stats_equal_numpy_in_any_batching():
  rng = np.random.default_rng(0)
  features = rng.normal(3.0, 0.5, (301, 64)) @ rng.normal(size=(64, 64)) + 1e4  # Large offset: cancellation test.
  one = fid.RunningStats(64)
  one.update(features.astype(np.float32).astype(np.float64))
  chunked = fid.RunningStats(64)
  for chunk in np.array_split(features, [1, 7, 50, 51, 200]):
    chunked.update(chunk)
  np.testing.assert_allclose(chunked.mu, features.mean(0), rtol=1e-13)
  np.testing.assert_allclose(chunked.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
  merged = fid.RunningStats(64)
  left, right = fid.RunningStats(64), fid.RunningStats(64)
  left.update(features[:120])
  right.update(features[120:])
  merged.merge(left)
  merged.merge(right)
  np.testing.assert_allclose(merged.sigma, chunked.sigma, rtol=1e-10, atol=1e-10)
  with pytest.raises(UserError, match='at least 2 images'):
    _ = fid.RunningStats(4).sigma


def _random_stats(rng, d, n):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.1
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize('n', [500, 40], ids=['full-rank', 'singular'])
def test_frechet_distance_equals_pytorch_fid(n):
  rng = np.random.default_rng(n)
  (mu1, s1), (mu2, s2) = _random_stats(rng, 128, n), _random_stats(rng, 128, n)
  theirs = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert theirs > 1.0
  assert abs(fid.frechet_distance(mu1, s1, mu2, s2, method='sqrtm') - theirs) <= 1e-12 * theirs
  assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - theirs) <= 1e-7 * theirs
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * theirs
  with pytest.raises(UserError, match='different dimensions'):
    fid.frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


def test_frechet_distance_guard_and_non_psd_inputs(capsys):
  rng = np.random.default_rng(0)
  (mu1, s1), (mu2, s2) = _random_stats(rng, 16, 100), _random_stats(rng, 16, 100)
  with pytest.raises(ValueError, match='not positive semi-definite'):
    fid.frechet_distance(mu1, s1, mu2, s2 - 2 * np.eye(16))
  bad = s1.copy()
  bad[0, 0] = np.inf
  assert not np.isfinite(fid.frechet_distance(mu1, bad, mu2, s2))
  assert 'adding 1e-06 to their diagonals' in capsys.readouterr().err


@pytest.fixture(scope='module')
def image_folders(tmp_path_factory, tref):
  a, b = tref.fid_image_sets(NUM_IMAGES)
  root = tmp_path_factory.mktemp('fid_sets')
  return tref.write_pngs(a, str(root / 'a')), tref.write_pngs(b, str(root / 'b'))


def _pytorch_fid_stats(folder, model, tref, **net_kwargs):
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.png'))
  net = tref.pytorch_fid_net(model, output_blocks=[3], **net_kwargs)
  return fid_score.calculate_activation_statistics(files, net, batch_size=50, dims=2048, device='cpu',
                                                   num_workers=0)


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


def test_wrong_stats_files_are_user_errors(tmp_path):
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, mu=np.zeros(10), sigma=np.zeros((10, 10)))
  with pytest.raises(UserError, match=r'mu of shape \(10,\).*expected \(2048,\) and \(2048, 2048\)'):
    fid.load_stats(bad)
  np.savez(bad, mu=np.zeros(2048), sigma=np.zeros((2048, 3)))
  with pytest.raises(UserError, match=r'sigma of shape \(2048, 3\)'):
    fid.load_stats(bad)
  np.savez(bad, mean=np.zeros(3))
  with pytest.raises(UserError, match='expected mu and sigma'):
    fid.load_stats(bad)
  (tmp_path / 'junk.npz').write_bytes(b'junk')
  with pytest.raises(UserError, match='cannot read'):
    fid.load_stats(str(tmp_path / 'junk.npz'))


def test_unreadable_images_are_skipped_and_counted(tmp_path, tref):
  images, _ = tref.fid_image_sets(5, size=20)
  folder = tref.write_pngs(images, str(tmp_path / 'imgs'))
  (tmp_path / 'imgs' / 'broken.png').write_bytes(b'not a png')
  (tmp_path / 'imgs' / 'notes.txt').write_text('ignored: not an image extension')
  big = np.zeros((24, 30, 3), np.uint8)
  from PIL import Image
  Image.fromarray(big).save(tmp_path / 'imgs' / 'zz_other_size.JPG')
  counts = fid.ImageCounts()
  batches = list(fid.iter_image_batches(fid.list_images(folder), 2, counts))
  assert counts.read == 6 and counts.skipped == 1 and counts.skipped_files[0].endswith('broken.png')
  assert [b.shape for b in batches] == [(2, 20, 20, 3), (2, 20, 20, 3), (1, 20, 20, 3), (1, 24, 30, 3)]
  with pytest.raises(UserError, match='no images in'):
    empty = tmp_path / 'empty'
    empty.mkdir()
    fid.folder_statistics(str(empty), None)
