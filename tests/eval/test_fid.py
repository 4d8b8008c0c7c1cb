"""FID statistics (streaming, sharded), the distance and its guard, stats files and image folders."""

import os
import subprocess
import sys

import numpy as np
import pytest
from pytorch_fid import fid_score

from diffusion.errors import UserError
from diffusion.evaluation import fid
from support import device_env


def test_feature_sums_equal_numpy_in_any_batching_and_split():
  rng = np.random.default_rng(0)
  features = rng.normal(3.0, 0.5, (301, 64)) @ rng.normal(size=(64, 64)) * 0.1 + 2.0  # pool3-like offset and scale.
  one = fid.FeatureSums(64)
  one.update(features)
  chunked = fid.FeatureSums(64)
  for chunk in np.array_split(features, [1, 7, 50, 51, 200]):
    chunked.update(chunk)
  np.testing.assert_allclose(chunked.mu, features.mean(0), rtol=1e-13)
  np.testing.assert_allclose(chunked.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-11)
  left, right = fid.FeatureSums(64), fid.FeatureSums(64)  # Two processes' shares, added.
  left.update(features[:120])
  right.update(features[120:])
  left.merge(right)
  np.testing.assert_allclose(left.sigma, one.sigma, rtol=1e-12, atol=1e-13)
  combined = one.combined()  # One process: the same sums.
  assert combined.count == 301 and np.array_equal(combined.outer, one.outer)
  with pytest.raises(UserError, match='at least 2 images'):
    _ = fid.FeatureSums(4).sigma


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


_SHARDED = r"""
import numpy as np, jax
from diffusion.evaluation import fid, inception
from tests.eval.conftest import fid_image_sets
assert jax.device_count() == 2
a, b = fid_image_sets(8, size=75)
variables = inception.random_variables(0, np.concatenate([a, b]), resize_to=None)
one = inception.FeatureExtractor(variables, resize_to=None, devices=jax.devices()[:1])
two = inception.FeatureExtractor(variables, resize_to=None)
assert two.num_local_devices == 2
# Same per-device batch (2 images) both ways; 3 images on 2 devices are padded, and the padding dropped.
f2 = two(a[:3])
f1 = np.concatenate([one(a[:2]), one(np.concatenate([a[2:3], np.zeros_like(a[:1])]))[:1]])
stats = fid.accumulate([a[:4], a[4:]], two, 4)
reference = fid.FeatureSums(2048)
for i in range(0, 8, 2):
  reference.update(one(a[i:i + 2]))
print('RESULT', f2.shape, float(np.abs(f1 - f2).max()), float(np.abs(stats.sigma - reference.sigma).max()),
      int(stats.count))
"""


def test_features_are_the_same_sharded_over_two_devices():
  env = device_env(2)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
    [sys.executable, '-c', _SHARDED], cwd=root, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-3000:]
  shape, features_diff, sigma_diff, count = result.stdout.split('RESULT ')[1].rsplit(' ', 3)
  assert shape == '(3, 2048)' and int(count) == 8
  assert float(features_diff) < 1e-5 and float(sigma_diff) < 1e-6
