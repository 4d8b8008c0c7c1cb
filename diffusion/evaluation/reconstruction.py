"""Reconstruction metrics of an autoencoder: PSNR, SSIM, LPIPS and rFID over (image, reconstruction) pairs.

The metrics 'psnr', 'ssim', 'lpips' and 'rfid' of the registry are pair metrics (`pairs = True`): the suite
reconstructs the evaluator's split (default: data.eval_split) with the pipeline's `reconstruct` and calls
`update(reconstructions, originals)`; in training (`config.evals` of a VAE run) and in `eval/run.py --workdir VAE_W
--metrics psnr,ssim,lpips,rfid`.

PSNR and SSIM are computed per image as torchmetrics does (`peak_signal_noise_ratio(..., dim=(1, 2, 3))`,
`structural_similarity_index_measure` with its defaults: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, reflect
padding, the mean over every pixel) in float64, on uint8 images with data range 255, and averaged over images. LPIPS
is `diffusion.models.lpips` on the pairs in [-1, 1]; rFID is the FID (`diffusion.evaluation.fid`) between the
held-out images and their reconstructions. Each keeps this process's sums and combines them once over processes
(`sum_across_processes`), like the other evaluators. LPIPS weights: the evaluator's `vgg_weights` / `lpips_weights` /
`lpips_net`, else the config's `loss.*` keys of the same names (`'random'`: labelled random weights, key
`lpips_random_weights`); rFID's Inception as FID's (`rfid_random_inception` without weights).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from diffusion.evaluation import base, fid

SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
  """Per-image PSNR in dB of (B, H, W, C) batches (torchmetrics with dim=(1, 2, 3))."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mse = np.mean(np.square(a - b), axis=(1, 2, 3))
  return 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-20))


def _gaussian(sigma: float) -> np.ndarray:
  size = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics' Gaussian window: 11 for sigma 1.5.
  dist = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
  g = np.exp(-np.square(dist / sigma) / 2)
  return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' correlation of (B, H, W, C) with the window g along H and W."""
  k = len(g)
  x = np.einsum('bhwck,k->bhwc', np.lib.stride_tricks.sliding_window_view(x, k, axis=1), g)
  return np.einsum('bhwck,k->bhwc', np.lib.stride_tricks.sliding_window_view(x, k, axis=2), g)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Per-image SSIM of (B, H, W, C) batches, as torchmetrics' `structural_similarity_index_measure` (preds=a)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  g = _gaussian(sigma)
  pad = (len(g) - 1) // 2
  if min(a.shape[1:3]) <= 2 * pad:
    raise ValueError(f'SSIM needs images larger than {2 * pad} px, got {a.shape[1:3]}')
  reflect = lambda x: np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  a, b = reflect(a), reflect(b)
  mu_a, mu_b, aa, bb, ab = (_filter(t, g) for t in (a, b, a * a, b * b, a * b))
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  var_a, var_b = np.maximum(aa - mu_a**2, 0.0), np.maximum(bb - mu_b**2, 0.0)
  cov = ab - mu_a * mu_b
  full = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return full.reshape(len(full), -1).mean(axis=1)  # torchmetrics 1.9 averages every pixel (no border crop).


class _PerImageMean:
  """The mean over pairs of a per-image score `score(reconstructions, originals)`."""

  name = ''
  pairs = True  # Scores (reconstruction, original) pairs: the suite reconstructs the evaluator's split.
  needs_reference = True

  def __init__(self, context: base.EvalContext):
    self.context = context
    self.reset()

  def score(self, reconstructions: np.ndarray, originals: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def reset(self) -> None:
    self.sums = np.zeros(2)  # Pairs, sum of scores.

  def update(self, reconstructions: np.ndarray, originals: Sequence[Any]) -> None:
    self.sums += (len(reconstructions), float(np.sum(self.score(reconstructions, np.asarray(originals)))))

  def result(self) -> dict[str, float]:
    count, total = base.sum_across_processes(self.sums)
    return {self.key: float(total / max(count, 1.0))}

  @property
  def key(self) -> str:
    return self.name

  def describe(self) -> dict[str, Any]:
    return {'metric': self.key, 'pairs': f'held-out images of {self.context.reference_name} and their reconstructions'}


class PSNRMetric(_PerImageMean):
  name = 'psnr'

  def score(self, reconstructions: np.ndarray, originals: np.ndarray) -> np.ndarray:
    return psnr(reconstructions, originals)


class SSIMMetric(_PerImageMean):
  name = 'ssim'

  def score(self, reconstructions: np.ndarray, originals: np.ndarray) -> np.ndarray:
    return ssim(reconstructions, originals)


class LPIPSMetric(_PerImageMean):
  """LPIPS(original, reconstruction) with the evaluator's weights, else the training config's `loss.*` ones."""

  name = 'lpips'

  def __init__(self, context: base.EvalContext):
    import jax

    from diffusion.interop import lpips as lpips_io
    from diffusion.models import lpips

    loss = context.config.get('loss') or {}
    pick = lambda key, default: context.options.get(key) or loss.get(key) or default
    net, vgg, heads = pick('lpips_net', 'vgg'), pick('vgg_weights', ''), pick('lpips_weights', '')
    key = lambda name: f'evals.{name}' if context.options.get(name) else f'loss.{name}'
    params = lpips_io.load_params(vgg, heads, net, backbone_key=key('vgg_weights'), head_key=key('lpips_weights'))
    apply = jax.jit(lambda p, a, b: lpips.LPIPS(net).apply({'params': p}, a, b))
    unit = lambda u: np.asarray(u, np.float32) / 127.5 - 1.0
    self.fn = lambda a, b: np.asarray(apply(params, unit(a), unit(b)))
    self.random = lpips_io.RANDOM in (vgg, heads)
    self.weights = lpips_io.describe(vgg, heads, net)
    super().__init__(context)

  @property
  def key(self) -> str:
    return 'lpips_random_weights' if self.random else 'lpips'

  def score(self, reconstructions: np.ndarray, originals: np.ndarray) -> np.ndarray:
    return self.fn(originals, reconstructions)

  def describe(self) -> dict[str, Any]:
    return {**super().describe(), 'lpips_weights': self.weights, 'random_weights': self.random}


class RFIDMetric:
  """FID between the held-out images and their reconstructions (both sides' Inception sums kept, per checkpoint)."""

  name = 'rfid'
  pairs = True
  needs_reference = True

  def __init__(self, context: base.EvalContext):
    os.makedirs(context.cache_dir, exist_ok=True)
    self.context = context
    self.network = fid.inception_network(context, 'rfid')
    self.key = 'rfid_random_inception' if self.network.random else 'rfid'
    self.reset()

  def reset(self) -> None:
    dims = self.network.extractor.dims
    self.real, self.fake = fid.FeatureSums(dims), fid.FeatureSums(dims)

  def update(self, reconstructions: np.ndarray, originals: Sequence[Any]) -> None:
    self.real.update(self.network.extractor(np.asarray(originals)))
    self.fake.update(self.network.extractor(reconstructions))

  def result(self) -> dict[str, float]:
    real, fake = self.real.combined(), self.fake.combined()
    return {self.key: float(fid.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma))}

  def describe(self) -> dict[str, Any]:
    return {
      'metric': self.key,
      'inception_weights': self.network.weights,
      'random_weights': self.network.random,
      'pairs': f'held-out images of {self.context.reference_name} and their reconstructions',
    }


for _metric in (PSNRMetric, SSIMMetric, LPIPSMetric, RFIDMetric):
  base.METRICS.add(_metric.name, _metric)
