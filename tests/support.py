"""Helpers shared by the tests: tiny overrides of the real presets, config loading, running the CLIs.

The configs are the real presets (`configs/*.py:tiny`) shrunk through the same overrides a user would pass on the
command line, so the tests exercise the code path `train.py` runs.
"""

import contextlib
import functools
import importlib.util
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('WANDB_MODE', 'disabled')
# LLVM's -O3 spends minutes on the unrolled threefry loops of a whole network's init (292 s for the tiny VAE's under
# load, 14 s at -O2) and a third more on a train step; -O2 keeps IEEE semantics (no fast math at any level), so the
# tests check the same numbers. tests/conftest.py sets it for the session, and `device_env` passes it on.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=2'


def with_test_xla_flags(flags: str = '') -> str:
  """`flags` (an XLA_FLAGS value) with the tests' compiler flags first, so a flag in `flags` wins."""
  return ' '.join(f for f in (TEST_XLA_FLAGS, flags) if f)


def device_env(count: int | None = None, **more: str) -> dict:
  """The environment for a subprocess on CPU with `count` forced host devices (None: the default one) and the
  tests' XLA flags: `{**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}` would drop those."""
  forced = f'--xla_force_host_platform_device_count={count}' if count else ''
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': with_test_xla_flags(forced), **more}


# A one-level text U-Net (diffusers config fields): compiled gradients stay cheap, and the down, mid and up blocks still
# hold resnets and spatial transformers. Tests that check remat or attention settings start from it.
ONE_LEVEL_UNET = dict(
  sample_size=8,
  in_channels=4,
  out_channels=4,
  block_out_channels=(16,),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D',),
  up_block_types=('CrossAttnUpBlock2D',),
  mid_block_type='UNetMidBlock2DCrossAttn',
  attention_head_dim=2,
  num_attention_heads=None,
  cross_attention_dim=12,
  transformer_layers_per_block=1,
  use_linear_projection=False,
  flip_sin_to_cos=True,
  freq_shift=0,
  norm_num_groups=8,
  norm_eps=1e-5,
  act_fn='silu',
)

COMMON = {
  'train.num_steps': 2,
  'train.batch_size': 8,
  'train.log_every': 1,
  'train.eval_every': 2,
  'train.eval_batches': 1,
  'train.sample_every': 2,
  'train.checkpoint_every': 1,
  'data.shapes.num_train': 64,
  'data.shapes.num_eval': 16,
  'wandb.mode': 'disabled',
  'optim.warmup_steps': 1,
}
VAE = {**COMMON, 'model.vae.block_out_channels': (8, 16, 16)}
LDM = {
  **COMMON,
  'model.unet.block_out_channels': (16, 32),
  'model.unet.attention_head_dim': 2,
  'model.unet.cross_attention_dim': 32,
  'model.text.hidden_size': 32,
  'model.text.intermediate_size': 64,
  'model.text.num_attention_heads': 2,
  'sample.num_steps': 3,
  'sample.prompts': ('a red circle',),
  'sample.num_images_per_prompt': 2,
}


def load_config(name: str, overrides: dict, data_dir: str, **more):
  """configs/<name>.py:tiny with `overrides` applied (dotted keys, as on the command line)."""
  sys.path.insert(0, ROOT)
  from configs import ldm_base, vae_base

  config = {'vae_base': vae_base, 'ldm_base': ldm_base}[name].get_config('tiny')
  if 'evals' in config:
    config.evals = ml_collections.ConfigDict()  # No evaluators unless a test sets them (they generate samples).
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


def load_config_file(path: str, preset: str | None = None):
  """`get_config(preset)` of any config file, loaded by path as config_flags does."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def random_params(module, *args, seed=0, **kwargs):
  """Params with the module's shapes (traced by init) drawn with numpy: XLA's CPU compile of init's
  threefry RNG takes tens of seconds for a whole network, the values here need only be generic."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), leaf.dtype)
    return jnp.asarray((name == 'scale') + 0.1 * rng.normal(size=shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def write_clip_bpe(directory: str, merges: list[str]) -> list[str]:
  """Writes vocab.json + merges.txt of a CLIP byte-level BPE with `merges` into `directory`; returns the vocab.

  The vocabulary is CLIP's: the 256 byte characters, the same with '</w>', one token per merge, then
  <|startoftext|> and <|endoftext|>.
  """
  import json  # pylint: disable=import-outside-toplevel

  bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  chars = [chr(c) for c in cs]
  vocab = chars + [c + '</w>' for c in chars] + [''.join(m.split()) for m in merges]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'vocab.json'), 'w') as f:
    json.dump({token: i for i, token in enumerate(vocab)}, f)
  with open(os.path.join(directory, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  return vocab


@functools.cache
def _convert_script():
  spec = importlib.util.spec_from_file_location('convert_script', os.path.join(ROOT, 'scripts', 'convert.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_convert(*args: str) -> subprocess.CompletedProcess:
  """scripts/convert.py's main in this process (a subprocess would spend most of its time importing JAX)."""
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      _convert_script().main(['convert.py', *args])
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
