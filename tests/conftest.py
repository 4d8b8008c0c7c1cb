"""Fixtures shared across the suite: tiny configs for both stages and trained workdirs (2 steps each).

The configs are the real presets (`configs/*.py:tiny`) shrunk through the same overrides a user would pass on the
command line, so the tests exercise the code path `train.py` runs.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('WANDB_MODE', 'disabled')

COMMON = {
    'train.num_steps': 2, 'train.batch_size': 8, 'train.log_every': 1, 'train.eval_every': 2, 'train.eval_batches': 1,
    'train.sample_every': 2, 'train.checkpoint_every': 1, 'data.shapes.num_train': 64, 'data.shapes.num_eval': 16,
    'wandb.mode': 'disabled', 'optim.warmup_steps': 1,
}
VAE = {**COMMON, 'model.vae.block_out_channels': (8, 16, 16)}
LDM = {**COMMON, 'model.unet.block_out_channels': (16, 32), 'model.unet.attention_head_dim': 2,
       'model.unet.cross_attention_dim': 32, 'model.text.hidden_size': 32, 'model.text.intermediate_size': 64,
       'model.text.num_attention_heads': 2, 'sample.num_steps': 3, 'sample.prompts': ('a red circle',),
       'sample.num_images_per_prompt': 2}


def load_config(name: str, overrides: dict, data_dir: str, **more):
  """configs/<name>.py:tiny with `overrides` applied (dotted keys, as on the command line)."""
  sys.path.insert(0, ROOT)
  from configs import ldm_base, vae_base

  config = {'vae_base': vae_base, 'ldm_base': ldm_base}[name].get_config('tiny')
  for key, value in {**overrides, 'data.data_dir': data_dir, **more}.items():
    *path, leaf = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def cli_overrides(overrides: dict) -> list[str]:
  """The same overrides as `--config.a.b=value` flags."""
  flags = []
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(repr(v) for v in value) + (',)' if len(value) == 1 else ')')
    flags.append(f'--config.{key}={value}')
  return flags


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, 'WANDB_MODE': 'disabled', 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def vae_workdir(tmp_path_factory, data_dir) -> str:
  from diffusion.training import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp('vae'))
  train_and_evaluate(load_config('vae_base', VAE, data_dir), workdir)
  return workdir


@pytest.fixture(scope='session')
def ldm_workdir(tmp_path_factory, data_dir, vae_workdir) -> str:
  from diffusion.training import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp('ldm'))
  train_and_evaluate(load_config('ldm_base', LDM, data_dir, vae_workdir=vae_workdir), workdir)
  return workdir
