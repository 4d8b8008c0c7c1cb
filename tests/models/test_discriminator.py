"""The PatchGAN discriminator against taming-transformers' NLayerDiscriminator, written here in torch (train mode,
shared random weights), and its logit-map size."""

import jax
import numpy as np
import pytest

from diffusion.models import discriminator

torch = pytest.importorskip('torch')
nn = torch.nn


class NLayerDiscriminator(nn.Module):
  """taming/modules/discriminator/model.py (BatchNorm, no ActNorm), as latent diffusion's autoencoders use it."""

  def __init__(self, input_nc=3, ndf=64, n_layers=3):
    super().__init__()
    sequence = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    nf_mult = 1
    for n in range(1, n_layers):
      nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
      sequence += [
        nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(ndf * nf_mult),
        nn.LeakyReLU(0.2, True),
      ]
    nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
    sequence += [
      nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=4, stride=1, padding=1, bias=False),
      nn.BatchNorm2d(ndf * nf_mult),
      nn.LeakyReLU(0.2, True),
    ]
    sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=4, stride=1, padding=1)]
    self.main = nn.Sequential(*sequence)

  def forward(self, x):
    return self.main(x)


def _to_flax(model) -> dict:
  params = {}
  for name, value in model.state_dict().items():
    if 'running' in name or 'num_batches' in name:
      continue
    _, index, leaf = name.split('.')
    value = value.numpy()
    is_bn = isinstance(model.main[int(index)], nn.BatchNorm2d)
    key = {'weight': 'scale' if is_bn else 'kernel', 'bias': 'bias'}[leaf]
    params.setdefault(f'main_{index}', {})[key] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  return params


@pytest.mark.parametrize('num_layers,channels,size', [(3, 16, 32), pytest.param(2, 8, 24, marks=pytest.mark.slow)])
def test_forward_equals_taming_nlayer_discriminator_in_train_mode(num_layers, channels, size):
  torch.manual_seed(0)
  model = NLayerDiscriminator(3, channels, num_layers).train()
  with torch.no_grad():  # taming's weights_init, plus non-trivial BatchNorm affine params.
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        m.weight.normal_(0.0, 0.02)
      if isinstance(m, nn.BatchNorm2d):
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0.0, 0.2)
  x = np.random.default_rng(0).uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
  theirs = model(torch.tensor(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  flax_disc = discriminator.NLayerDiscriminator(num_layers, channels)
  params = _to_flax(model)
  expected = jax.eval_shape(lambda: flax_disc.init(jax.random.PRNGKey(0), x)['params'])
  assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(np.shape, params)
  ours = np.asarray(flax_disc.apply({'params': params}, x))
  side = discriminator.output_size(size, num_layers)
  assert ours.shape == theirs.shape == (4, side, side, 1)
  assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
  # Train-mode BatchNorm: a logit depends on the other examples of the batch (their statistics).
  alone = np.asarray(flax_disc.apply({'params': params}, x[:2]))
  assert np.abs(alone - ours[:2]).max() > 1e-3


def test_output_size_is_the_patch_grid():
  assert discriminator.output_size(256, 3) == 30  # pix2pix's 70x70-receptive-field PatchGAN on 256 px.
  assert discriminator.output_size(32, 3) == 2
  assert discriminator.output_size(16, 3) < 1
