"""Entry points: `--help` is the docstring and the flags; user errors are one `error: ...` line on stderr with exit
code 2; sampling is reproducible."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from support import ROOT, run_cli


def assert_user_error(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
  'tool,flag_names',
  [
    ('train.py', ['--config', '--workdir']),
    ('scripts/convert.py', ['--workdir', '--step', '--[no]raw_params']),
    ('scripts/precompute_latents.py', ['--vae_workdir', '--out', '--flips', '--process_index']),
    ('scripts/soak.py', ['--workdir', '--minutes', '--[no]concurrent']),
    ('scripts/convergence_order.py', ['--steps', '--out']),
  ],
)
def test_help_is_the_docstring_and_the_flags(tool, flag_names):
  """`--help` (also after other arguments, even bad ones) prints the tool's docstring, then its flags, and exits 0."""
  result = run_cli(tool, 'bogus', '--help', '--no_such_flag=1')
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(ROOT, tool)) as f:
    first_line = f.read().split('"""', 2)[1].strip().splitlines()[0]
  assert result.stdout.startswith(first_line), result.stdout[:500]
  listed = result.stdout.split('\nFlags:\n', 1)[1]
  for name in flag_names:
    assert f'  {name}: ' in listed, name
  assert '--verbosity' not in listed


@pytest.mark.parametrize(
  'args,needles',
  [
    (['--config.model.unet.chanels=3'], ['model.unet.chanels']),
    (['--config.optim.lr=-0.001'], ['optim.lr']),
    (['--config.optim.lr=abc'], ['optim.lr']),
    (['--config.data.image_size=30'], ['data.image_size']),
    (['--config.sample.sampler=magic'], ['sample.sampler', 'ddim']),
  ],
  ids=['unknown-key', 'negative-lr', 'wrong-type', 'indivisible-image-size', 'unknown-sampler'],
)
def test_train_bad_config_fails_before_compiling(tmp_path, args, needles):
  result = run_cli('train.py', '--config', 'configs/ldm_base.py:tiny', '--workdir', str(tmp_path / 'w'), *args)
  assert_user_error(result, *needles)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_train_missing_flags_and_unknown_preset(tmp_path):
  assert_user_error(run_cli('train.py', '--workdir', str(tmp_path)), '--config')
  assert_user_error(run_cli('train.py', '--config', 'configs/ldm_base.py:tiny'), '--workdir')
  assert_user_error(run_cli('train.py', '--config', 'configs/ldm_base.py:huge', '--workdir', str(tmp_path)), 'preset')


def test_ldm_without_vae_workdir_is_a_user_error(tmp_path):
  result = run_cli(
    'train.py',
    '--config',
    'configs/ldm_base.py:tiny',
    '--workdir',
    str(tmp_path / 'w'),
    f'--config.data.data_dir={tmp_path / "tfds"}',
    '--config.data.shapes.num_train=16',
    '--config.data.shapes.num_eval=8',
  )
  assert_user_error(result, 'vae_workdir')


def test_sample_user_errors(tmp_path, ldm_workdir, vae_workdir):
  assert_user_error(
    run_cli('sample.py', '--workdir', str(tmp_path / 'nope'), '--prompt', 'a', '--out', str(tmp_path)), 'does not exist'
  )
  assert_user_error(run_cli('sample.py', '--workdir', ldm_workdir, '--out', str(tmp_path)), 'no prompt')
  assert_user_error(
    run_cli(
      'sample.py', '--workdir', ldm_workdir, '--prompt', 'a red circle', '--sampler', 'magic', '--out', str(tmp_path)
    ),
    'magic',
    'ddim',
  )
  assert_user_error(
    run_cli('sample.py', '--workdir', vae_workdir, '--prompt', 'a red circle', '--out', str(tmp_path)), "'vae'"
  )
  assert_user_error(
    run_cli('sample.py', '--workdir', ldm_workdir, '--prompt', 'x', '--num_images', '0', '--out', str(tmp_path)),
    '--num_images',
  )


def test_sample_is_bit_identical_across_runs_and_the_same_across_batch_sizes(tmp_path, ldm_workdir):
  from diffusion.generation import sample_to_directory

  args = [
    '--workdir',
    ldm_workdir,
    '--prompt',
    'a red circle',
    '--prompt',
    'a blue square',
    '--num_images',
    '2',
    '--seed',
    '3',
    '--num_steps',
    '3',
    '--sampler',
    'ddpm',
  ]
  result = run_cli('sample.py', *args, '--out', str(tmp_path / 'a'))
  assert result.returncode == 0, result.stderr[-3000:]
  settings = sample_to_directory(
    ldm_workdir,
    ['a red circle', 'a blue square'],
    str(tmp_path / 'b'),
    num_images=2,
    seed=3,
    num_steps=3,
    sampler='ddpm',
    batch_size=3,
  )
  sample_to_directory(
    ldm_workdir,
    ['a red circle', 'a blue square'],
    str(tmp_path / 'b2'),
    num_images=2,
    seed=3,
    num_steps=3,
    sampler='ddpm',
    batch_size=3,
  )
  names = [f'{i:04d}.png' for i in range(4)]
  for name in names + ['grid.png']:
    a = np.asarray(Image.open(tmp_path / 'a' / name)).astype(np.int32)
    b = np.asarray(Image.open(tmp_path / 'b' / name)).astype(np.int32)
    # The same settings give the same bytes; another batch size runs XLA kernels at another shape, whose float
    # rounding may turn the odd uint8 value by one.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'b2' / name)), b, err_msg=name)
    assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 1e-2, name
  saved = json.load(open(tmp_path / 'a' / 'settings.json'))
  for key in ('prompts', 'seed', 'num_steps', 'sampler', 'guidance_scale', 'negative_prompt', 'eta', 'step'):
    assert saved[key] == settings[key], key
  # sample.py marks by default; 32-px samples (and this 140-px grid) are too small: unmarked, one warning, recorded.
  assert saved['watermark'] == {'text': 'ldm-jax', 'method': 'dwtDct', 'too_small': True}
  assert result.stderr.count('warning: 32x32 images are too small for a watermark') == 1
  assert settings['watermark'] is None  # The library marks only when asked (evaluation jobs never are).
  images = [np.asarray(Image.open(tmp_path / 'a' / n)) for n in names]
  assert not np.array_equal(images[0], images[1])  # Different noise per image.
  other_seed = sample_to_directory(
    ldm_workdir, ['a red circle'], str(tmp_path / 'c'), seed=4, num_steps=3, sampler='ddpm'
  )
  assert not np.array_equal(np.asarray(Image.open(tmp_path / 'c' / '0000.png')), images[0])
  assert other_seed['seed'] == 4
