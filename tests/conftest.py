"""Session fixtures: a tiny prepared dataset dir and trained workdirs of both stages (2 steps each)."""

import os
import tempfile

import jax
import ml_collections
import pytest

from support import LDM, VAE, load_config, with_test_xla_flags

os.environ.setdefault('WANDB_MODE', 'disabled')
# Read when the first computation creates the CPU client (not yet: nothing above runs one); the CLIs and workers the
# tests start inherit it.
os.environ['XLA_FLAGS'] = with_test_xla_flags(os.environ.get('XLA_FLAGS', ''))
# One persistent XLA compilation cache for the session, shared with the CLIs the tests start (they inherit the
# variable): the suite compiles the same tiny models many times (fixtures, resumed runs, CLI subprocesses), and a
# cache hit loads the executable the first compile produced, so results are unchanged.
jax.config.update(
  'jax_compilation_cache_dir', os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax-cache-'))
)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def vae_workdir(tmp_path_factory, data_dir) -> str:
  from diffusion.training import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp('vae'))
  psnr = ml_collections.ConfigDict({'type': 'psnr', 'num_samples': 4, 'batch_size': 4})  # At the last step.
  train_and_evaluate(load_config('vae_base', VAE, data_dir, **{'evals.recon': psnr}), workdir)
  return workdir


@pytest.fixture(scope='session')
def ldm_workdir(tmp_path_factory, data_dir, vae_workdir) -> str:
  from diffusion.training import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp('ldm'))
  oracle = ml_collections.ConfigDict({'type': 'oracle', 'num_samples': 4, 'batch_size': 4})  # At the last step.
  train_and_evaluate(
    load_config('ldm_base', LDM, data_dir, vae_workdir=vae_workdir, **{'evals.oracle': oracle}), workdir
  )
  return workdir
