"""Damaged checkpoints: the newest valid one is used with a warning, and the good ones are never touched."""

import os
import shutil

import jax
import numpy as np
import pytest

from diffusion import checkpoint
from diffusion.errors import UserError
from diffusion.training import train_and_evaluate
from support import VAE, load_config


def truncate_state_files(step_dir: str) -> int:
  damaged = 0
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 8:
        with open(path, 'r+b') as f:
          f.truncate(size // 2)
        damaged += 1
  return damaged


def test_truncated_latest_checkpoint_falls_back_and_is_set_aside(tmp_path, vae_workdir, data_dir, capfd):
  workdir = str(tmp_path / 'vae')
  shutil.copytree(vae_workdir, workdir)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [1, 2]
  good = ckpt.restore_params(1, 'params')
  assert truncate_state_files(os.path.join(workdir, 'checkpoints', '2')) > 0

  # Readers (sample.py, eval) fall back without changing the workdir.
  params = checkpoint.Checkpointer(workdir, read_only=True).restore_params(item='params')
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(good)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert 'damaged' in capfd.readouterr().err
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))

  # Training resumes from step 1, moves the damaged step aside, and finishes the run again.
  config = load_config('vae_base', VAE, data_dir, **{'train.eval_every': 0, 'train.sample_every': 0})
  state = train_and_evaluate(config, workdir)
  out = capfd.readouterr()
  assert 'resumed from step 1' in out.out and 'damaged' in out.err
  assert int(state.step) == 2
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'damaged'))
  assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [1, 2]


def test_no_valid_checkpoint_is_a_user_error(tmp_path, vae_workdir):
  workdir = str(tmp_path / 'vae')
  shutil.copytree(vae_workdir, workdir)
  for step in ('1', '2'):
    truncate_state_files(os.path.join(workdir, 'checkpoints', step))
  with pytest.raises(UserError, match='no valid checkpoint'):
    checkpoint.Checkpointer(workdir, read_only=True).restore_params(item='params')


def test_missing_checkpoint_dir_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoints'):
    checkpoint.Checkpointer(str(tmp_path), read_only=True)
