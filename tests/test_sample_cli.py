"""sample.py: the sampler zoo on the command line, editing flags, and one-line user errors (exit code 2)."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from diffusion import samplers
from support import run_cli  # pylint: disable=g-import-not-at-top


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


@pytest.mark.parametrize(
  'args,needles',
  [
    (['--sampler', 'magic'], ['magic', 'ddim', 'flow_euler']),
    (['--num_steps', '0'], ['--num_steps']),
    (['--strength', '1.5', '--init_image', 'IMG'], ['strength', '(0, 1]']),
    (['--strength', '0', '--init_image', 'IMG'], ['strength']),
    (['--mask', 'MASK'], ['--mask', 'init image', '--init_image']),
    (['--strength', '0.5'], ['--strength', 'init image', '--init_image']),
    (['--sampler', 'ddim', '--karras'], ["sampler 'ddim' has no option 'karras'", 'eta']),
    (['--guidance_interval', '0.9,0.1'], ['guidance_interval', '0 <= lo <= hi <= 1']),
    (['--guidance_interval', '0.1'], ['--guidance_interval', '2 comma-separated values']),
    (['--guidance_rescale', '2'], ['guidance_rescale', '[0, 1]']),
    (['--guidance_scale', '1,x'], ['--guidance_scale', 'comma list']),
    (['--num_steps', '10,0'], ['--num_steps', '>= 1']),
    (['--prompts_file', 'PROMPTS'], ['prompts.txt:2', 'integer seed']),
    (['--watermark_method', 'rivaGan'], ['--watermark_method', 'dwtDct|dwtDctSvd']),
  ],
  ids=[
    'unknown-sampler',
    'steps',
    'strength-high',
    'strength-zero',
    'mask-without-image',
    'strength-without-image',
    'karras-ddim',
    'interval',
    'interval-count',
    'rescale',
    'guidance-list',
    'steps-list',
    'prompt-seed',
    'watermark-method',
  ],
)
def test_user_errors_before_loading_anything(tmp_path, args, needles):
  files = {
    'IMG': _png(tmp_path / 'img.png', (32, 32)),
    'MASK': _png(tmp_path / 'mask.png', (32, 32)),
    'SMALL': _png(tmp_path / 'small.png', (16, 16)),
  }
  (tmp_path / 'prompts.txt').write_text('a red circle\t3\na blue square\tthree\n')
  files['PROMPTS'] = str(tmp_path / 'prompts.txt')
  args = [files.get(a, a) for a in args]
  result = run_cli(
    'sample.py', '--workdir', str(tmp_path / 'nope'), '--prompt', 'a red circle', '--out', str(tmp_path / 'out'), *args
  )
  _assert_user_error(result, *needles)


def test_errors_that_need_the_workdir(tmp_path, ldm_workdir):
  """A mask of another size than the init image, a missing --step, more steps than the model was trained with."""
  base = ['--workdir', ldm_workdir, '--prompt', 'a red circle', '--out', str(tmp_path / 'out')]
  image, small = _png(tmp_path / 'img.png', (32, 32)), _png(tmp_path / 'small.png', (16, 16))
  _assert_user_error(run_cli('sample.py', *base, '--init_image', image, '--mask', small), 'mask', 'is 16x16', '32x32')
  steps = sorted(int(d) for d in os.listdir(os.path.join(ldm_workdir, 'checkpoints')) if d.isdigit())
  _assert_user_error(
    run_cli('sample.py', *base, '--step', '987654'),
    f'no checkpoint at step 987654 in {ldm_workdir} (have: {", ".join(map(str, steps))})',
  )
  _assert_user_error(run_cli('sample.py', *base, '--num_steps', '5000'), 'num_steps must be in [1, ')
  _assert_user_error(  # The 32-px samples stay unmarked, but the text must fit the smallest grid that gets a mark.
    run_cli('sample.py', *base, '--watermark', 'x' * 129), 'is 129 bytes but a 256x256 image carries at most 128'
  )
  assert not (tmp_path / 'out').exists()


def test_sampler_of_the_other_family_is_a_user_error(tmp_path, ldm_workdir):
  result = run_cli(
    'sample.py', '--workdir', ldm_workdir, '--prompt', 'a red circle', '--sampler', 'flow_euler', '--out', str(tmp_path)
  )
  _assert_user_error(result, "'flow_euler' is a flow sampler", 'diffusion model', 'dpmpp_2m')


@pytest.mark.slow
def test_inpainting_from_the_command_line(tmp_path, ldm_workdir):
  image = _png(tmp_path / 'img.png', (48, 48), value=200)
  mask = np.zeros((48, 48), np.uint8)
  mask[:, :24] = 255
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  out = tmp_path / 'out'
  result = run_cli(
    'sample.py',
    '--workdir',
    ldm_workdir,
    '--prompt',
    'a red circle',
    '--num_images',
    '2',
    '--sampler',
    'dpmpp_2m',
    '--karras',
    '--num_steps',
    '4',
    '--init_image',
    image,
    '--mask',
    str(tmp_path / 'mask.png'),
    '--guidance_rescale',
    '0.5',
    '--watermark',
    'none',
    '--out',
    str(out),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'watermark' not in result.stderr
  settings = json.load(open(out / 'settings.json'))
  assert settings['watermark'] is None
  assert settings['sampler'] == 'dpmpp_2m' and settings['sampler_options']['karras'] is True
  assert settings['strength'] == 1.0 and settings['mask'].endswith('mask.png')
  for name in ('0000.png', '0001.png', 'grid.png'):
    assert (out / name).exists()


def test_prompts_file_seeds_and_noise_plan(tmp_path):
  from diffusion.errors import UserError
  from diffusion.generation import noise_plan
  from diffusion.prompts import read_prompts_file

  path = tmp_path / 'prompts.txt'
  path.write_text('a red circle\t5\n\n  a blue square \nthree\ttabs\t-2\n')
  prompts, seeds = read_prompts_file(str(path))
  assert prompts == ['a red circle', 'a blue square', 'three\ttabs'] and seeds == [5, None, -2]
  # Without seeds: image i from (seed, i), as before; a seeded prompt's image j from (its seed, j).
  assert noise_plan(2, 2, 7) == [(7, 0), (7, 1), (7, 2), (7, 3)]
  assert noise_plan(3, 2, 7, seeds) == [(5, 0), (5, 1), (7, 2), (7, 3), (-2, 0), (-2, 1)]
  path.write_text('a red circle\t\n')
  with pytest.raises(UserError, match='prompts.txt:1'):
    read_prompts_file(str(path))


def test_labelled_grid_layout():
  from diffusion.generation import setting_name
  from diffusion.images import labelled_grid

  assert [setting_name(3.0, 25), setting_name(7.5, 10)] == ['gs3_steps25', 'gs7.5_steps10']
  images = np.zeros((2, 3, 32, 32, 3), np.uint8)
  images[1, 2] = (200, 30, 90)
  grid = np.asarray(labelled_grid(images, ['a red circle (seed 0, #0)', 'b'], ['gs 1', 'gs 3', 'gs 7']))
  assert grid.shape[1] > 3 * 96 and grid.shape[0] > 2 * 96  # Cells enlarged 3x (32 -> 96 px), plus labels.
  assert (grid == (200, 30, 90)).all(-1).sum() == 96 * 96  # The last cell, enlarged, and nothing else of that colour.
  assert (grid[:12] < 128).any()  # Column labels drawn in the top band.


@pytest.mark.slow
def test_sweep_with_per_prompt_seeds(tmp_path, ldm_workdir):
  from diffusion.generation import sample_to_directory

  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a red circle\t5\na blue square\n')
  out = tmp_path / 'sweep'
  result = run_cli(
    'sample.py',
    '--workdir',
    ldm_workdir,
    '--prompts_file',
    str(prompts),
    '--guidance_scale',
    '1,3',
    '--num_steps',
    '2',
    '--sampler',
    'ddim',
    '--seed',
    '7',
    '--out',
    str(out),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  settings = json.load(open(out / 'settings.json'))
  assert [e['dir'] for e in settings['sweep']] == ['gs1_steps2', 'gs3_steps2']
  assert [e['guidance_scale'] for e in settings['sweep']] == [1.0, 3.0] and settings['prompt_seeds'] == [5, None]
  load = lambda path: np.asarray(Image.open(path))
  for entry in settings['sweep']:
    sub = json.load(open(out / entry['dir'] / 'settings.json'))
    assert sub['guidance_scale'] == entry['guidance_scale'] and sub['num_steps'] == 2
  assert not np.array_equal(load(out / 'gs1_steps2' / '0000.png'), load(out / 'gs3_steps2' / '0000.png'))
  # The seeded prompt's image is the one a separate run with that seed makes.
  sample_to_directory(
    ldm_workdir, ['a red circle'], str(tmp_path / 'seeded'), seed=5, guidance_scale=1.0, num_steps=2, sampler='ddim'
  )
  np.testing.assert_array_equal(load(out / 'gs1_steps2' / '0000.png'), load(tmp_path / 'seeded' / '0000.png'))
  grid = Image.open(out / 'grid.png')
  assert grid.width > 2 * 96 and grid.height > 2 * 96  # Two labelled columns, two rows of enlarged cells.
