"""sample.py: the sampler zoo on the command line, editing flags, and one-line user errors (exit code 2)."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from support import run_cli  # pylint: disable=g-import-not-at-top

from diffusion import samplers


def _assert_user_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]


def _png(path, size, value=128):
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
  return str(path)


def test_help_lists_the_samplers():
  result = run_cli('sample.py', '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  for name in samplers.available_samplers():
    assert name in result.stdout, name
  for flag in ('--init_image', '--mask', '--strength', '--karras', '--guidance_rescale', '--guidance_interval'):
    assert flag in result.stdout, flag


@pytest.mark.parametrize('args,needles', [
    (['--sampler', 'magic'], ['magic', 'ddim', 'flow_euler']),
    (['--num_steps', '0'], ['--num_steps']),
    (['--strength', '1.5', '--init_image', 'IMG'], ['--strength', '(0, 1]']),
    (['--strength', '0', '--init_image', 'IMG'], ['--strength']),
    (['--mask', 'MASK'], ['--init_image']),
    (['--init_image', 'IMG', '--mask', 'SMALL'], ['--mask is 16x16', '32x32']),
    (['--sampler', 'ddim', '--karras'], ['--karras', 'ddim']),
    (['--guidance_interval', '0.9,0.1'], ['--guidance_interval']),
], ids=['unknown-sampler', 'steps', 'strength-high', 'strength-zero', 'mask-without-image', 'mask-size',
        'karras-ddim', 'interval'])
def test_user_errors_before_loading_anything(tmp_path, args, needles):
  files = {'IMG': _png(tmp_path / 'img.png', (32, 32)), 'MASK': _png(tmp_path / 'mask.png', (32, 32)),
           'SMALL': _png(tmp_path / 'small.png', (16, 16))}
  args = [files.get(a, a) for a in args]
  result = run_cli('sample.py', '--workdir', str(tmp_path / 'nope'), '--prompt', 'a red circle', '--out',
                   str(tmp_path / 'out'), *args)
  _assert_user_error(result, *needles)


def test_sampler_of_the_other_family_is_a_user_error(tmp_path, ldm_workdir):
  result = run_cli('sample.py', '--workdir', ldm_workdir, '--prompt', 'a red circle', '--sampler', 'flow_euler',
                   '--out', str(tmp_path))
  _assert_user_error(result, "'flow_euler' is a flow sampler", 'diffusion model', 'dpmpp_2m')


@pytest.mark.slow
def test_inpainting_from_the_command_line(tmp_path, ldm_workdir):
  image = _png(tmp_path / 'img.png', (48, 48), value=200)
  mask = np.zeros((48, 48), np.uint8)
  mask[:, :24] = 255
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  out = tmp_path / 'out'
  result = run_cli('sample.py', '--workdir', ldm_workdir, '--prompt', 'a red circle', '--num_images', '2',
                   '--sampler', 'dpmpp_2m', '--karras', '--num_steps', '4', '--init_image', image, '--mask',
                   str(tmp_path / 'mask.png'), '--guidance_rescale', '0.5', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  settings = json.load(open(out / 'settings.json'))
  assert settings['sampler'] == 'dpmpp_2m' and settings['sampler_options']['karras'] is True
  assert settings['strength'] == 1.0 and settings['mask'].endswith('mask.png')
  for name in ('0000.png', '0001.png', 'grid.png'):
    assert (out / name).exists()
