"""Reconstruction metrics of an autoencoder: PSNR, SSIM, LPIPS and rFID over (image, reconstruction) pairs.

PSNR and SSIM are computed per image as torchmetrics does (`peak_signal_noise_ratio(..., dim=(1, 2, 3))`,
`structural_similarity_index_measure` with its defaults: Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, reflect
padding, the mean over every pixel) in float64, on uint8 images with data range 255, and averaged over images. LPIPS
is `diffusion.models.lpips` on the pairs in [-1, 1]; rFID is the FID (`diffusion.evaluation.fid`) between the
held-out images and their reconstructions. `ReconstructionMetrics` keeps this process's sums and combines them once
over processes (`sum_across_processes`), like the other evaluators.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from diffusion.evaluation import fid
from diffusion.evaluation.base import sum_across_processes

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


class ReconstructionMetrics:
  """Sums of PSNR, SSIM and LPIPS over (image, reconstruction) uint8 pairs and, with an Inception `extractor`, the
  FID feature sums of both sides; `result()` (a collective) -> {'psnr', 'ssim', 'lpips', 'rfid'} as available."""

  def __init__(self, lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, extractor: Any = None):
    self.lpips_fn, self.extractor = lpips_fn, extractor
    self.reset()

  def reset(self) -> None:
    self.sums = {'count': 0.0, 'psnr': 0.0, 'ssim': 0.0, 'lpips': 0.0}
    dims = self.extractor.dims if self.extractor is not None else 1
    self.real, self.fake = fid.FeatureSums(dims), fid.FeatureSums(dims)

  def update(self, images: np.ndarray, reconstructions: np.ndarray) -> None:
    """`images`, `reconstructions`: uint8 (B, H, W, 3) of this process."""
    self.sums['count'] += len(images)
    self.sums['psnr'] += float(np.sum(psnr(reconstructions, images)))
    self.sums['ssim'] += float(np.sum(ssim(reconstructions, images)))
    if self.lpips_fn is not None:
      to_unit = lambda u: np.asarray(u, np.float32) / 127.5 - 1.0
      self.sums['lpips'] += float(np.sum(self.lpips_fn(to_unit(images), to_unit(reconstructions))))
    if self.extractor is not None:
      self.real.update(self.extractor(images))
      self.fake.update(self.extractor(reconstructions))

  def result(self) -> dict[str, float]:
    sums = sum_across_processes(self.sums)
    n = max(float(sums['count']), 1.0)
    out = {'psnr': float(sums['psnr']) / n, 'ssim': float(sums['ssim']) / n}
    if self.lpips_fn is not None:
      out['lpips'] = float(sums['lpips']) / n
    if self.extractor is not None:
      real, fake = self.real.combined(), self.fake.combined()
      out['rfid'] = float(fid.frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma))
    return out


def reconstruction_pairs(workdir: str, step: int | None = None, batch_size: int = 32, item: str = 'ema_params'):
  """Yields (uint8 held-out images, uint8 reconstructions from the posterior mean) of a VAE workdir's checkpoint, for
  this process's share of the config's eval split."""
  import jax

  from diffusion import models
  from diffusion import workdir as workdir_lib
  from diffusion.data import inputs
  from diffusion.images import to_uint8

  config = workdir_lib.load_workdir_config(workdir, expect='vae')
  params, _ = workdir_lib.load_trained_params(workdir, item, step)
  vae = models.create_vae(config.model.vae)
  encode_decode = lambda p, x: vae.apply(
    {'params': p}, vae.apply({'params': p}, x, method='encode')[0], method='decode'
  )
  reconstruct = jax.jit(encode_decode)
  loader = inputs.create_input_pipeline(
    config.data,
    config.data.eval_split,
    tokenizer=None,
    batch_size=batch_size,
    seed=0,
    shuffle=False,
    num_epochs=1,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  for batch in loader:
    x = np.asarray(batch['image'])
    yield to_uint8(x), to_uint8(np.asarray(reconstruct(params, x)))


def evaluate_vae_workdir(
  workdir: str,
  step: int | None = None,
  *,
  metrics: tuple[str, ...] = ('psnr', 'ssim', 'lpips', 'rfid'),
  batch_size: int = 32,
  vgg_weights: str = '',
  lpips_weights: str = '',
  inception_weights: str | None = None,
) -> dict[str, float]:
  """PSNR, SSIM, LPIPS and rFID of a VAE workdir's held-out reconstructions (a collective). LPIPS weights as
  `diffusion.interop.lpips.load_params` takes them; no `inception_weights`: a random Inception calibrated on the
  first batch of this process's held-out images (labelled use only; one process: with several, each would calibrate
  its own network, so pass weights)."""
  import jax

  from diffusion.evaluation import inception
  from diffusion.interop import inception as inception_io
  from diffusion.interop import lpips as lpips_io
  from diffusion.models import lpips

  pairs = list(reconstruction_pairs(workdir, step, batch_size))
  lpips_fn = extractor = None
  if 'lpips' in metrics:
    params = lpips_io.load_params(vgg_weights, lpips_weights)
    apply = jax.jit(lambda p, a, b: lpips.LPIPS('vgg').apply({'params': p}, a, b))
    lpips_fn = lambda a, b: np.asarray(apply(params, a, b))
  if 'rfid' in metrics:
    if inception_weights:
      variables = inception_io.load_variables(inception_weights)
    else:
      variables = inception.random_variables(0, pairs[0][0])
    extractor = inception.FeatureExtractor(variables)
  result = ReconstructionMetrics(lpips_fn, extractor)
  for images, recs in pairs:
    result.update(images, recs)
  return {k: v for k, v in result.result().items() if k in metrics}
