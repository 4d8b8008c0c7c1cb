"""The independent reference for the FID tests: pytorch-fid's InceptionV3 with random, calibrated weights.

No weights can be downloaded here, so the reference network is built offline (torchvision's `inception_v3` with
pytorch-fid's FID blocks swapped in), given random BatchNorm affine parameters, and its BatchNorm statistics are
set to the batch statistics of the test inputs. Without that calibration a random deep network maps every input to
nearly the same features, and a parity test would pass for almost any preprocessing.
"""

import contextlib
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('pytorch_fid')
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from pytorch_fid import inception as pf_inception  # noqa: E402

from diffusion.data import oracle, shapes  # noqa: E402


def build_fid_inception(seed: int) -> torch.nn.Module:
  """pytorch-fid's `fid_inception_v3()` structure with random weights (its recipe, minus the download)."""
  torch.manual_seed(seed)
  model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
  model.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
  model.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
  model.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
  model.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
  model.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
  model.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
  model.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
  model.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
  model.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
  return model.eval()


@contextlib.contextmanager
def patched_pytorch_fid(model: torch.nn.Module):
  """Makes pytorch-fid's `InceptionV3` (and everything built on it) use `model` instead of downloading weights."""
  with mock.patch.object(pf_inception, 'fid_inception_v3', lambda: model):
    yield


def pytorch_fid_net(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
  """pytorch-fid's own wrapper (its resize, normalisation and block structure) around `model`."""
  with patched_pytorch_fid(model):
    return pf_inception.InceptionV3(**kwargs).eval()


def torch_preprocess(images: np.ndarray, resize: bool = True) -> torch.Tensor:
  """What pytorch-fid does to uint8 NHWC images: ToTensor (/255), bilinear resize to 299, 2x - 1."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float().div(255)
  if resize:
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  return 2 * x - 1


@torch.no_grad()
def calibrate(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
  """Sets every BatchNorm's running statistics to its batch statistics on preprocessed inputs `x` (NCHW)."""
  net = pytorch_fid_net(model, output_blocks=[3], resize_input=False, normalize_input=False)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.reset_running_stats()
      module.momentum = None  # Cumulative average: after one batch, exactly its statistics.
  net.train()
  net(x)
  return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def parity_images() -> dict[str, np.ndarray]:
  """Three images per group, exercising the resize: upsampled shapes (32 px), noisy 64 px, downsampled 320x304."""
  rng = np.random.default_rng(0)

  def noisy(x: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(x.astype(np.float32) + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)

  up32, _ = shapes.generate_arrays(3, 32, 2, seed=(5, 1))
  n64, _ = shapes.generate_arrays(3, 64, 1, seed=(5, 2))
  s320, _ = shapes.generate_arrays(3, 320, 2, seed=(5, 3))
  return {'up32': up32, 'noisy64': noisy(n64, 10), 'down320': noisy(s320[:, :304], 10)}


def fid_image_sets(n: int, size: int = 75) -> tuple[np.ndarray, np.ndarray]:
  """Two different distributions: shapes scenes, and other shapes scenes blurred and darkened."""
  a, _ = shapes.generate_arrays(n, size, 2, seed=(11, 1))
  b, _ = shapes.generate_arrays(n, size, 2, seed=(11, 2))
  b = (oracle.blur_images(b, 0.8).astype(np.float32) * 0.85).astype(np.uint8)
  return a, b


def write_pngs(images: np.ndarray, folder: str) -> str:
  from PIL import Image

  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(folder, f'{i:04d}.png'))
  return folder


@pytest.fixture(scope='session')
def tref() -> types.ModuleType:
  """This module's helpers (reference network, calibration, preprocessing, test images) for the tests."""
  return sys.modules[__name__]


@pytest.fixture(scope='session')
def inception_299():
  """(torch model, Flax variables) calibrated on the parity images resized to 299."""
  from diffusion.interop import inception

  model = build_fid_inception(0)
  x = torch.cat([torch_preprocess(v) for v in parity_images().values()])
  calibrate(model, x)
  return model, inception.convert_state_dict(state_dict_numpy(model))


@pytest.fixture(scope='session')
def inception_75():
  """(torch model, Flax variables) calibrated on both FID image sets at 75 px (no resize)."""
  from diffusion.interop import inception

  model = build_fid_inception(1)
  a, b = fid_image_sets(32)
  calibrate(model, torch_preprocess(np.concatenate([a, b]), resize=False))
  return model, inception.convert_state_dict(state_dict_numpy(model))
