"""A workdir imported from a random-weight SD-like pipeline: sample.py runs end to end on it, and training
resumes it as a fine-tuning run (from step 0, the pretrained weights as params and EMA)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import ldm_base
from diffusion import checkpoint
from diffusion.training import pipeline_io
from diffusion.workdir import load_workdir_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def workdir(sd_pipeline_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('imported'))
  pipeline_io.import_pipeline(sd_pipeline_dir, workdir, ldm_base.get_config('base'))
  return workdir


def test_sample_py_runs_on_an_imported_workdir(workdir, tmp_path):
  out = str(tmp_path / 'samples')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
    [
      sys.executable,
      'sample.py',
      '--workdir',
      workdir,
      '--prompt',
      'a red circle',
      '--prompt',
      'a photo of a dog',
      '--num_images',
      '2',
      '--num_steps',
      '2',
      '--out',
      out,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert {f'{i:04d}.png' for i in range(4)} | {'grid.png', 'settings.json'} <= set(os.listdir(out))
  images = [np.asarray(Image.open(os.path.join(out, f'{i:04d}.png'))) for i in range(4)]
  assert all(image.shape == (32, 32, 3) for image in images)
  assert images[0].std() > 0 and not np.array_equal(images[0], images[1])


@pytest.mark.slow  # One compiled train step of U-Net + CLIP + VAE encoder: about a minute on 2 cores.
def test_training_resumes_an_imported_workdir(workdir, tmp_path):
  from diffusion.training import train_and_evaluate

  config = load_workdir_config(workdir, expect='ldm')
  overrides = {
    'data.name': 'shapes',
    'data.caption_key': 'caption',
    'data.data_dir': str(tmp_path / 'tfds'),
    'data.shapes.num_train': 16,
    'data.shapes.num_eval': 8,
    'data.shapes.max_objects': 1,
    'train.num_steps': 1,
    'train.batch_size': 2,
    'train.log_every': 1,
    'train.eval_every': 0,
    'train.sample_every': 0,
    'train.checkpoint_every': 1,
    'optim.warmup_steps': 0,
    'optim.lr_schedule': 'constant',
    'wandb.mode': 'disabled',
  }
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  before = checkpoint.Checkpointer(workdir, read_only=True).restore_params(0, 'params')
  state = train_and_evaluate(config, workdir)  # The import has no data position: the data starts from the top.
  assert int(state.step) == 1  # Resumed from the imported step 0, not a fresh initialisation.
  after = checkpoint.Checkpointer(workdir, read_only=True).restore_params(1, 'params')
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), after['unet'], before['unet'])
  )
  assert all(changed)  # Every U-Net tensor took the fine-tuning step.
  for a, b in zip(jax.tree.leaves(after['text']), jax.tree.leaves(before['text'])):  # The frozen text encoder did not.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
