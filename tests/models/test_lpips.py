"""LPIPS in Flax against the `lpips` package (0.1.4) on shared random weights; the torch-free `.pth` reader; the
weight-file errors that name the config key."""

import jax
import numpy as np
import pytest

from diffusion.errors import ConfigError
from diffusion.interop import lpips as lpips_weights
from diffusion.interop import pth
from diffusion.models import lpips

torch = pytest.importorskip('torch')
lpips_package = pytest.importorskip('lpips')

REL = 1e-4  # Per-image distance, relative; observed ~1e-7.


def _reference(net: str):
  """The package's LPIPS with a random backbone (pnet_rand: offline) and random non-negative heads."""
  torch.manual_seed(0)
  model = lpips_package.LPIPS(net=net, pnet_rand=True, pretrained=False, verbose=False).eval()
  with torch.no_grad():
    for lin in model.lins:
      lin.model[-1].weight.uniform_(0.0, 0.1)
  return model


def _images(size: int, batch: int = 3):
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  x1 = np.clip(x0 + 0.3 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
  return x0, x1


def _parity(net: str, size: int):
  model = _reference(net)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  # The package's own state dict holds the backbone as net.slice<k>.<i>.*; the converter reads both namings.
  params = {'backbone': lpips_weights.convert_backbone(state, net), **lpips_weights.convert_heads(state, net)}
  x0, x1 = _images(size)
  t0 = torch.tensor(x0.transpose(0, 3, 1, 2), requires_grad=True)
  theirs = model(t0, torch.tensor(x1.transpose(0, 3, 1, 2))).flatten()
  theirs.sum().backward()
  apply = jax.jit(lambda p, a, b: lpips.LPIPS(net).apply({'params': p}, a, b))  # One compile for 3 uses.
  distance = lambda a, b: apply(params, a, b)
  ours = np.asarray(distance(x0, x1))
  grad = np.asarray(jax.jit(jax.grad(lambda a: distance(a, x1).sum()))(x0))
  theirs, their_grad = theirs.detach().numpy(), t0.grad.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_less(np.abs(ours - theirs) / theirs, REL)
  assert np.abs(grad - their_grad).max() <= 1e-3 * np.abs(their_grad).max()
  assert np.corrcoef(grad.ravel(), their_grad.ravel())[0, 1] > 0.99999
  # The distance tells images apart: it is 0 for identical inputs and grows with the perturbation.
  assert np.allclose(np.asarray(distance(x0, x0)), 0.0, atol=1e-7)
  assert np.all(np.asarray(distance(x0, np.clip(2 * x1 - x0, -1, 1))) > ours)


def test_vgg_distance_and_input_gradient_equal_the_lpips_package():
  _parity('vgg', 32)


@pytest.mark.slow
def test_alexnet_and_larger_vgg_inputs_equal_the_lpips_package():
  _parity('alex', 64)
  _parity('vgg', 64)


def test_pth_reader_reads_the_packages_legacy_heads_and_both_torch_save_formats(tmp_path):
  heads = lpips_package.__file__.replace('__init__.py', 'weights/v0.1/vgg.pth')
  for path in [heads]:
    ours, theirs = pth.read_pth(path), torch.load(path, map_location='cpu', weights_only=True)
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], v.numpy()) for k, v in theirs.items())
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  for zip_format in (True, False):
    path = str(tmp_path / f'm{zip_format}.pth')
    torch.save(module.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    ours = pth.read_pth(path)
    for key, value in module.state_dict().items():
      assert ours[key].dtype == value.numpy().dtype and np.array_equal(ours[key], value.numpy()), key
  assert set(lpips_weights.convert_heads(pth.read_pth(heads), 'vgg')) == {f'lin{i}' for i in range(5)}


def test_missing_or_mis_shaped_weight_files_are_one_error_naming_the_key(tmp_path):
  with pytest.raises(ConfigError, match=r'^config\.loss\.vgg_weights: weight file .* does not exist'):
    lpips_weights.load_params(str(tmp_path / 'nope.pth'), 'random', backbone_key='loss.vgg_weights')
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ConfigError, match=r'^config\.loss\.lpips_weights: cannot read'):
    lpips_weights.load_params('random', str(junk), head_key='loss.lpips_weights')
  heads = {f'lin{i}.model.1.weight': torch.zeros(1, c, 1, 1) for i, c in enumerate(lpips.CHANNELS['vgg'])}
  heads['lin3.model.1.weight'] = torch.zeros(1, 256, 1, 1)
  torch.save(heads, str(tmp_path / 'heads.pth'))
  with pytest.raises(ConfigError, match=r'^config\.loss\.lpips_weights: lin3\.model\.1\.weight has shape'):
    lpips_weights.load_params('random', str(tmp_path / 'heads.pth'), head_key='loss.lpips_weights')
  backbone = {f'features.{i}.weight': torch.zeros(o, 3, k, k) for i, o, k in lpips.conv_layers('vgg')[:1]}
  torch.save(backbone, str(tmp_path / 'vgg.pth'))
  with pytest.raises(ConfigError, match=r'^config\.loss\.vgg_weights: not a vgg backbone state dict'):
    lpips_weights.load_params(str(tmp_path / 'vgg.pth'), 'random', backbone_key='loss.vgg_weights')


def test_random_params_fit_the_network_and_heads_are_non_negative():
  for net in lpips.NETS:
    params = lpips.random_params(net)
    x = np.zeros((1, 32 if net == 'vgg' else 64, 32 if net == 'vgg' else 64, 3), np.float32)
    expected = jax.eval_shape(lambda: lpips.LPIPS(net).init(jax.random.PRNGKey(0), x, x)['params'])
    assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(lambda a: a.shape, params)
    assert all(np.all(params[f'lin{i}']['kernel'] >= 0) for i in range(5))
