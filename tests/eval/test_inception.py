"""FID InceptionV3 parity with pytorch-fid on shared random weights whose BatchNorm is calibrated on the inputs."""

import copy
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.errors import UserError
from diffusion.evaluation import inception
from diffusion.interop import inception as inception_weights
from diffusion.models import inception as inception_net

TOL = 1e-4  # float32 pool3 max-abs, uint8 images in, resize included.
LAYERS = (
  'Conv2d_1a_3x3',
  'Conv2d_2a_3x3',
  'Conv2d_2b_3x3',
  'Conv2d_3b_1x1',
  'Conv2d_4a_3x3',
  'Mixed_5b',
  'Mixed_5c',
  'Mixed_5d',
  'Mixed_6a',
  'Mixed_6b',
  'Mixed_6c',
  'Mixed_6d',
  'Mixed_6e',
  'Mixed_7a',
  'Mixed_7b',
  'Mixed_7c',
)


def _nchw(images: np.ndarray, dtype=torch.float32) -> torch.Tensor:
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dtype) / 255  # As ToTensor + collate.


@pytest.fixture(scope='module')
def reference(inception_299, tref):
  """pytorch-fid's pool3 features of every parity group, and our extractor on the converted weights."""
  model, variables = inception_299
  net = tref.pytorch_fid_net(model, output_blocks=[3])
  with torch.no_grad():
    ref = {k: net(_nchw(v))[0][:, :, 0, 0].numpy() for k, v in tref.parity_images().items()}
  return ref, inception.FeatureExtractor(variables)


@pytest.mark.parametrize('size', [17, 32, 64, 299, 300, 320, 512])
def test_resize_and_normalisation_match_pytorch_fid(size, tref):
  images = np.random.default_rng(size).integers(0, 256, (2, size, size + 3, 3)).astype(np.uint8)
  ours = np.asarray(inception_net.preprocess(jnp.asarray(images)))
  theirs = tref.torch_preprocess(images).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)  # Same taps; float32 rounding of the sums only.


def test_pool3_features_match_pytorch_fid(reference, tref):
  ref, extractor = reference
  for name, images in tref.parity_images().items():
    ours = extractor(images)
    assert ours.shape == (len(images), 2048)
    assert np.abs(ours - ref[name]).max() <= TOL, name
    # The features depend on the input: images differ by far more than the tolerance.
    pairwise = np.abs(ref[name][:, None] - ref[name][None]).max(-1)[~np.eye(len(images), dtype=bool)]
    assert pairwise.min() > 100 * TOL, (name, pairwise.min())
    assert ref[name].std(0).mean() > 0.02, name


@pytest.mark.parametrize('control', ['no_rescale_to_-1_1', 'align_corners', 'bicubic', 'antialias'])
def test_wrong_preprocessing_fails_the_parity_check(reference, control, tref):
  """Negative controls: with a plausible but wrong preprocessing, the same comparison fails by far."""
  ref, extractor = reference
  name = 'down320' if control == 'antialias' else 'up32'
  x = _nchw(tref.parity_images()[name])
  if control == 'no_rescale_to_-1_1':
    wrong = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  else:
    kwargs = {
      'align_corners': {'mode': 'bilinear', 'align_corners': True},
      'bicubic': {'mode': 'bicubic'},
      'antialias': {'mode': 'bilinear', 'antialias': True},
    }[control]
    wrong = 2 * F.interpolate(x, size=(299, 299), **kwargs) - 1
  ours = extractor.from_inputs(wrong.permute(0, 2, 3, 1).numpy())
  assert np.abs(ours - ref[name]).max() > 100 * TOL
  right = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
  assert np.abs(extractor.from_inputs(right.permute(0, 2, 3, 1).numpy()) - ref[name]).max() <= TOL


def test_every_layer_matches_in_float64(inception_299, tref):
  """Layer by layer (every conv stem layer and Mixed block) and pytorch-fid's four blocks, in float64."""
  model, _ = inception_299
  model64 = copy.deepcopy(model).double()
  images = tref.parity_images()['noisy64'][:1]
  captured = {}
  hooks = [
    getattr(model64, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o.numpy())) for n in LAYERS
  ]
  with torch.no_grad():
    blocks = tref.pytorch_fid_net(model64, output_blocks=[0, 1, 2, 3])(_nchw(images, torch.float64))
  for h in hooks:
    h.remove()
  with jax.enable_x64():
    variables = inception_weights.convert_state_dict(tref.state_dict_numpy(model64), dtype=np.float64)
    x = inception_net.preprocess(jnp.asarray(images), dtype=jnp.float64)
    out, state = inception_net.InceptionV3(dtype=jnp.float64).apply(
      variables,
      x,
      capture_intermediates=lambda mdl, method: method == '__call__' and mdl.name in LAYERS,
      mutable=['intermediates'],
    )
    out = jax.tree.map(np.asarray, out)
    layers = {n: np.asarray(state['intermediates'][n]['__call__'][0]) for n in LAYERS}
  assert out['pool3'].dtype == np.float64
  for name in LAYERS:
    theirs = captured[name].transpose(0, 2, 3, 1)
    assert layers[name].shape == theirs.shape, name
    np.testing.assert_allclose(layers[name], theirs, rtol=0, atol=1e-10 * np.abs(theirs).max(), err_msg=name)
  for i, name in enumerate(inception_net.BLOCKS):
    theirs = blocks[i].numpy().transpose(0, 2, 3, 1)
    theirs = theirs[:, 0, 0] if name == 'pool3' else theirs
    np.testing.assert_allclose(out[name], theirs, rtol=0, atol=1e-10 * np.abs(theirs).max(), err_msg=name)


def test_converter_is_strict_and_maps_every_tensor(inception_299, reference, tref):
  model, _ = inception_299
  state = tref.state_dict_numpy(model)
  with pytest.raises(UserError, match='1 missing.*Mixed_6b.branch1x1.bn'):
    inception_weights.convert_state_dict({k: v for k, v in state.items() if k != 'Mixed_6b.branch1x1.bn.running_var'})
  with pytest.raises(UserError, match='1 unexpected.*AuxLogits'):
    inception_weights.convert_state_dict({**state, 'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)})
  with pytest.raises(UserError, match='Conv2d_1a_3x3.conv.weight has shape'):
    inception_weights.convert_state_dict({**state, 'Conv2d_1a_3x3.conv.weight': np.zeros((32, 3, 5, 5), np.float32)})
  # Swapping one BatchNorm's scale and bias changes the features: the mapping of each tensor matters.
  ref, extractor = reference
  swapped = dict(state)
  key = 'Mixed_7b.branch_pool.bn.'
  swapped[key + 'weight'], swapped[key + 'bias'] = state[key + 'bias'], state[key + 'weight']
  other = inception.FeatureExtractor(inception_weights.convert_state_dict(swapped))
  assert np.abs(other(tref.parity_images()['up32']) - ref['up32']).max() > 100 * TOL


def test_pth_reader_without_torch_equals_torch_load(inception_299, tmp_path):
  model, _ = inception_299
  path = str(tmp_path / 'weights.pth')
  torch.save(model.state_dict(), path)
  ours = inception_weights._read_pth_without_torch(path)
  theirs = torch.load(path, map_location='cpu', weights_only=True)
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.numpy().dtype and np.array_equal(ours[key], value.numpy()), key
  with pytest.raises(UserError, match='not a PyTorch zip'):
    inception_weights._read_pth_without_torch(str(_write(tmp_path / 'junk.pth', b'junk')))


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


def test_missing_or_corrupt_weight_file_says_where_and_which_hash(tmp_path, monkeypatch):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
  expected = str(tmp_path / 'torch' / 'hub' / 'checkpoints' / inception_weights.FID_WEIGHTS_FILE)
  assert inception_weights.default_weights_path() == expected
  with pytest.raises(UserError) as error:
    inception_weights.resolve_weights_path()
  for needle in (expected, inception_weights.FID_WEIGHTS_URL, 'sha256 starts with 6726825d', '--inception_weights'):
    assert needle in str(error.value)
  with pytest.raises(UserError, match='does not exist'):
    inception_weights.resolve_weights_path(str(tmp_path / 'nope.pth'))
  corrupt = _write(tmp_path / inception_weights.FID_WEIGHTS_FILE, b'not the weights')
  with pytest.raises(UserError, match='corrupt or not the expected file.*expected 6726825d'):
    inception_weights.resolve_weights_path(str(corrupt))
  prefix = hashlib.sha256(b'x').hexdigest()[:8]
  good = _write(tmp_path / f'pt_inception-2015-12-05-{prefix}.pth', b'x')
  assert inception_weights.resolve_weights_path(str(good)) == str(good)


def test_load_variables_from_a_weight_file(inception_299, tmp_path):
  model, variables = inception_299
  path = str(tmp_path / 'random_fid_inception.pth')
  torch.save(model.state_dict(), path)
  loaded = inception_weights.load_variables(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)))


def test_random_calibrated_weights_give_input_dependent_features(tref):
  images = np.concatenate(tref.fid_image_sets(4, size=75))
  variables = inception.random_variables(0, images, resize_to=None)
  again = inception.random_variables(0, images, resize_to=None)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)))
  features = inception.FeatureExtractor(variables, resize_to=None)(images)
  assert features.std(0).mean() > 0.1
  # Calibrated: the first layer's stored statistics are its batch statistics on these images.
  x = inception_net.preprocess(jnp.asarray(images), None)
  conv = jax.lax.conv_general_dilated(
    x,
    variables['params']['Conv2d_1a_3x3']['conv']['kernel'],
    (2, 2),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  stats = variables['batch_stats']['Conv2d_1a_3x3']['bn']
  np.testing.assert_allclose(stats['mean'], conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['var'], conv.var((0, 1, 2)), rtol=1e-3)
  other = inception.FeatureExtractor(inception.random_variables(1, images, resize_to=None), resize_to=None)(images)
  assert np.abs(other - features).max() > 0.1
