"""Fréchet Inception Distance, computed like pytorch-fid: feature sums, the distance, stats files, the 'fid' metric.

Statistics are sums (count, sum of features, sum of outer products, in float64) of the images THIS process read or
generated; `FeatureSums.combined()` adds them over all processes once, so P processes with N/P images each give the
1-process mean and covariance (to float rounding). Stats files are pytorch-fid's `.npz` (`mu`, `sigma`), so
published stats work here and ours in pytorch-fid. The distance has pytorch-fid's numerical guard; its
Tr sqrtm(S1 S2) comes from symmetric eigendecompositions (the same value, ~20x faster than scipy's `sqrtm`).

The 'fid' metric scores generated images against the reference split's statistics (computed once, each process
its share of the reference images, and cached in `<workdir>/eval/`). With no Inception weight file the network is
random with BatchNorm calibrated on reference images: the key is then `fid_random_inception`, comparable only
between checkpoints of the same job, never with published FID.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from diffusion.errors import UserError
from diffusion.evaluation import base

IMAGE_EXTENSIONS = ('bmp', 'jpg', 'jpeg', 'pgm', 'png', 'ppm', 'tif', 'tiff', 'webp')  # As pytorch-fid.
NUM_CALIBRATION_IMAGES = 64


# ----------------------------------------------------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass
class FeatureSums:
  """Count, sum and sum of outer products of a stream of feature batches (float64), combinable by addition."""

  dims: int
  count: float = 0.0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dims, np.float64)
      self.outer = np.zeros((self.dims, self.dims), np.float64)

  def update(self, features: np.ndarray) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dims:
      raise ValueError(f'expected features (N, {self.dims}), got {x.shape}')
    self.count += len(x)
    self.total = self.total + x.sum(axis=0)
    self.outer = self.outer + x.T @ x

  def merge(self, other: 'FeatureSums') -> None:
    self.count += other.count
    self.total = self.total + other.total
    self.outer = self.outer + other.outer

  def combined(self) -> 'FeatureSums':
    """The sums over every process (a collective: all processes call it; a copy with one process)."""
    s = base.sum_across_processes({'count': self.count, 'total': self.total, 'outer': self.outer})
    return FeatureSums(self.dims, float(s['count']), s['total'], s['outer'])

  @property
  def mu(self) -> np.ndarray:
    if not self.count:
      raise UserError('FID needs at least 2 images, got 0')
    return self.total / self.count

  @property
  def sigma(self) -> np.ndarray:
    """Unbiased covariance, as `np.cov(features, rowvar=False)`."""
    if self.count < 2:
      raise UserError(f'FID needs at least 2 images, got {int(self.count)}')
    mu = self.total / self.count
    return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6, method: str = 'eigh'
) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, with pytorch-fid's numerical guard.

  `method='sqrtm'` is pytorch-fid's computation (scipy's Schur `sqrtm` of the non-symmetric product; minutes for
  2048-d on a small CPU). `'eigh'` (default) uses Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), two
  symmetric eigendecompositions: the same value (agreeing to ~1e-7 relative on singular 2048-d covariances) about
  20x faster. Either way a non-finite result is retried with `eps` added to both diagonals, and a clearly
  non-positive spectrum (pytorch-fid's "imaginary component") is an error.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise UserError(f'the two statistics have different dimensions: {mu1.shape} and {mu2.shape}')
  if method not in ('eigh', 'sqrtm'):
    raise ValueError(f'unknown method {method!r}: eigh or sqrtm')
  trace_sqrt = _trace_sqrt_sqrtm if method == 'sqrtm' else _trace_sqrt_eigh
  tr_covmean = trace_sqrt(sigma1, sigma2)
  if not np.isfinite(tr_covmean):
    print(f'FID: the product of covariances is singular; adding {eps} to their diagonals', file=sys.stderr)
    offset = np.eye(sigma1.shape[0]) * eps
    tr_covmean = trace_sqrt(sigma1 + offset, sigma2 + offset)
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrt_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """pytorch-fid's Tr sqrtm(S1 S2), including its check of the imaginary part."""
  from scipy import linalg

  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    return float('nan')
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: imaginary component {np.max(np.abs(covmean.imag))}')
    covmean = covmean.real
  return float(np.trace(covmean))


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr (S1 S2)^(1/2) from the spectrum of the symmetric S1^(1/2) S2 S1^(1/2)."""
  try:
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
  except np.linalg.LinAlgError:
    return float('nan')
  if not np.isfinite(eigenvalues).all():
    return float('nan')
  if eigenvalues.min() < -1e-6 * max(1.0, eigenvalues.max()):
    raise ValueError(
      f'FID: covariances are not positive semi-definite (eigenvalue {eigenvalues.min():.3g}); '
      'the square root would have an imaginary component'
    )
  return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes pytorch-fid's stats format (`np.savez_compressed(mu=..., sigma=...)`), atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.tmp.npz')
  np.savez_compressed(tmp, mu=np.asarray(mu), sigma=np.asarray(sigma))
  os.replace(tmp, path)


def load_stats(path: str, dims: int | None = 2048) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a pytorch-fid `.npz`; a missing key or a wrong shape is a `UserError`."""
  try:
    with np.load(path) as f:
      if 'mu' not in f or 'sigma' not in f:
        raise UserError(f'{path} is not an FID stats file: it holds {sorted(f.files)}, expected mu and sigma')
      mu, sigma = np.asarray(f['mu']), np.asarray(f['sigma'])
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read FID stats {path}: {e}') from None
  d = mu.shape[0] if mu.ndim == 1 else None
  if d is None or sigma.shape != (d, d) or (dims is not None and d != dims):
    want = f'({dims},) and ({dims}, {dims})' if dims else '(D,) and (D, D)'
    raise UserError(
      f'FID stats {path} have mu of shape {mu.shape} and sigma of shape {sigma.shape}; expected '
      f'{want} (Inception {"pool3" if dims == 2048 else "block"} features)'
    )
  return mu.astype(np.float64), sigma.astype(np.float64)


# ----------------------------------------------------------------------------------------------------------------------
# Images.


def list_images(folder: str) -> list[str]:
  """Image files directly in `folder` (pytorch-fid's extensions, any case), sorted."""
  if not os.path.isdir(folder):
    raise UserError(f'{folder!r} is not a folder of images or an .npz stats file')
  return sorted(
    os.path.join(folder, name)
    for name in os.listdir(folder)
    if name.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS and '.' in name
  )


def _read_rgb(path: str) -> np.ndarray | None:
  from PIL import Image

  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except Exception:  # pylint: disable=broad-except  # Any unreadable file is skipped and counted.
    return None


@dataclasses.dataclass
class ImageCounts:
  read: int = 0
  skipped: int = 0
  skipped_files: list[str] = dataclasses.field(default_factory=list)


def iter_image_batches(
  files: Sequence[str], batch_size: int, counts: ImageCounts | None = None, num_threads: int = 4
) -> Iterator[np.ndarray]:
  """uint8 batches (B, H, W, 3) of the readable files, in order; a batch ends early when the image size changes."""
  counts = counts if counts is not None else ImageCounts()
  batch: list[np.ndarray] = []
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for start in range(0, len(files), 4 * batch_size):
      chunk = files[start : start + 4 * batch_size]
      for path, image in zip(chunk, pool.map(_read_rgb, chunk)):
        if image is None:
          counts.skipped += 1
          counts.skipped_files.append(path)
          continue
        counts.read += 1
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
          yield np.stack(batch)
          batch = []
        batch.append(image)
  if batch:
    yield np.stack(batch)


def accumulate(batches: Iterable[np.ndarray], extractor, batch_size: int | None = None) -> FeatureSums:
  """Streams uint8 image batches through `extractor` into feature sums (of this process's images only).

  Short batches are zero-padded to `batch_size` so each image size compiles once; the next batch is read while
  the current one computes.
  """
  sums = FeatureSums(extractor.dims)
  pending: Callable[[], np.ndarray] | None = None
  for images in batches:
    n = len(images)
    if batch_size and n < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), np.uint8)])
    result = extractor.dispatch(images)
    if pending is not None:
      sums.update(pending())
    pending = (lambda r, k: lambda: r()[:k])(result, n)
  if pending is not None:
    sums.update(pending())
  return sums


def folder_statistics(folder: str, extractor, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray, ImageCounts]:
  """(mu, sigma, counts) of the images in `folder`, each process reading its share; unreadable files are skipped and
  counted (over all processes)."""
  import jax

  files = list_images(folder)
  if not files:
    raise UserError(f'no images in {folder!r} (extensions: {", ".join(IMAGE_EXTENSIONS)})')
  counts = ImageCounts()
  mine = files[jax.process_index() :: jax.process_count()]
  sums = accumulate(iter_image_batches(mine, batch_size, counts), extractor, batch_size).combined()
  read, skipped = (int(v) for v in base.sum_across_processes(np.asarray([counts.read, counts.skipped])))
  counts.read, counts.skipped = read, skipped
  if counts.skipped:
    example = f' (e.g. {counts.skipped_files[0]})' if counts.skipped_files else ''
    print(f'skipped {counts.skipped} unreadable image file(s) in {folder}{example}', file=sys.stderr, flush=True)
  if not counts.read:
    raise UserError(f'no readable images in {folder!r}: all {counts.skipped} files failed to decode')
  return sums.mu, sums.sigma, counts


def path_statistics(
  path: str, extractor_fn: Callable[[], object], batch_size: int = 50, dims: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
  """Statistics of a folder of images or an `.npz` file (as pytorch-fid's `compute_statistics_of_path`)."""
  if path.endswith('.npz'):
    if not os.path.isfile(path):
      raise UserError(f'stats file {path!r} does not exist')
    return load_stats(path, dims)
  mu, sigma, _ = folder_statistics(path, extractor_fn(), batch_size)
  return mu, sigma


# ----------------------------------------------------------------------------------------------------------------------
# The metric.


def _random_variables(context: base.EvalContext) -> dict:
  """Random Inception weights calibrated on the first reference images (the same on every process), cached."""
  import flax.serialization

  from diffusion.evaluation import inception

  path = os.path.join(context.cache_dir, f'inception_random_seed{context.seed}_{context.reference_name}.msgpack')
  if base.on_every_process(os.path.isfile(path)):
    with open(path, 'rb') as f:
      return flax.serialization.msgpack_restore(f.read())
  if context.calibration_images is None:
    raise UserError('metric fid: random Inception weights need reference images to calibrate on')
  variables = inception.random_variables(context.seed, context.calibration_images(NUM_CALIBRATION_IMAGES))
  if base.is_lead():
    base.atomic_write(path, flax.serialization.msgpack_serialize(variables))
  return variables


@dataclasses.dataclass
class InceptionChoice:
  """The Inception network a metric uses: pytorch-fid weights from a file, or random weights (labelled)."""

  extractor: Any  # inception.FeatureExtractor
  random: bool
  tag: str  # Identifies the weights in cache file names.
  weights: str  # What they are, for records.


def inception_network(context: base.EvalContext, metric: str = 'fid') -> InceptionChoice:
  """The context's `inception_weights` (pytorch-fid file), else random weights calibrated on its reference images."""
  from diffusion.evaluation import inception
  from diffusion.interop import inception as inception_weights

  weights = context.inception_weights or context.options.get('inception_weights')
  if weights:
    path = inception_weights.resolve_weights_path(weights)
    variables = inception_weights.load_variables(path)
    tag = f'pytorch-fid-{inception_weights.file_sha256(path)[:12]}'
    text = f'pytorch-fid weights {os.path.abspath(path)}'
    return InceptionChoice(inception.FeatureExtractor(variables), False, tag, text)
  try:
    variables = _random_variables(context)
  except UserError as e:
    raise UserError(str(e).replace('metric fid', f'metric {metric}')) from None
  text = (
    f'RANDOM Inception weights (seed {context.seed}, BatchNorm calibrated on up to '
    f'{NUM_CALIBRATION_IMAGES} reference images): comparable only between checkpoints '
    'evaluated with the same reference, not with published FID'
  )
  return InceptionChoice(inception.FeatureExtractor(variables), True, f'random-seed{context.seed}', text)


class FIDMetric:
  """FID of the generated images against the reference split's Inception statistics (computed once, cached)."""

  name = 'fid'
  needs_reference = True  # The suite opens the reference split for it.

  def __init__(self, context: base.EvalContext):
    self.context = context
    os.makedirs(context.cache_dir, exist_ok=True)
    network = inception_network(context)
    self.key = 'fid_random_inception' if network.random else 'fid'
    self.extractor, self.weights = network.extractor, network.weights
    self.stats_path = os.path.join(context.cache_dir, f'fid_reference_{context.reference_name}_{network.tag}.npz')
    self.reference = self._reference_stats()
    self.reset()

  def _reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
    if base.on_every_process(os.path.isfile(self.stats_path)):
      return load_stats(self.stats_path, self.extractor.dims)
    if base.is_lead():
      print(
        f'computing FID reference statistics of {self.context.reference_name} -> {self.stats_path}',
        file=sys.stderr,
        flush=True,
      )
    bs = self.context.batch_size
    sums = accumulate(self.context.reference_images(bs), self.extractor, bs).combined()  # Each its share.
    mu, sigma = sums.mu, sums.sigma
    if base.is_lead():
      save_stats(self.stats_path, mu, sigma)
    return mu, sigma

  def reset(self) -> None:
    self.sums = FeatureSums(self.extractor.dims)

  def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
    del prompts
    self.sums.update(self.extractor(images))

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the generated images of every process (a collective)."""
    sums = self.sums.combined()
    return sums.mu, sums.sigma

  def result(self) -> dict[str, float]:
    return {self.key: frechet_distance(*self.statistics(), *self.reference)}

  def describe(self) -> dict[str, Any]:
    return {
      'metric': self.key,
      'inception_weights': self.weights,
      'random_weights': self.key != 'fid',
      'reference': self.context.reference_name,
      'reference_stats': os.path.relpath(self.stats_path, self.context.workdir),
    }


base.METRICS.add('fid', FIDMetric)
