"""Sharding: logical-axis rules, FSDP/data-parallel training equal to one device, accumulation, bf16, validation.

Multi-device cases run `tests/parallel_worker.py` in a subprocess with 8 forced CPU devices (the flag must not leak
into this process); the rest checks the rules and the config validation on abstract shapes.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from diffusion import models, parallel
from diffusion.config import validate_config
from diffusion.errors import ConfigError
from support import LDM, ROOT, VAE, device_env, load_config, load_config_file


def run_worker(tmp_path, cases: list[str]) -> tuple[dict, dict]:
  out = str(tmp_path / 'params.npz')
  env = device_env(8)
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'tests', 'parallel_worker.py'), 'meshes', out, ','.join(cases)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out + '.json') as f:
    report = json.load(f)
  arrays = np.load(out)
  params = {}
  for key in arrays.files:
    case, path = key.split(':', 1)
    params.setdefault(case, {})[path] = arrays[key]
  return params, report


def relative_errors(params: dict, reference: dict) -> dict:
  """||a - b|| / ||b|| per parameter."""
  assert params.keys() == reference.keys()
  return {
    k: float(np.linalg.norm(params[k] - reference[k]) / max(np.linalg.norm(reference[k]), 1e-30)) for k in reference
  }


def assert_same_params(params: dict, reference: dict, tol: float = 1e-5) -> None:
  errors = relative_errors(params, reference)
  worst = max(errors, key=errors.get)
  assert errors[worst] <= tol, f'{worst}: relative difference {errors[worst]:.3g} > {tol}'


def test_fsdp_and_accumulation_match_one_device_and_shard_the_bytes(tmp_path):
  """5 steps of the real train step: 8-way FSDP, and 4 accumulated micro-batches on a 2 data x 4 fsdp mesh, reach
  the 1-device params; with 8-way FSDP each device holds ~1/8 of the param and optimizer-state bytes."""
  params, report = run_worker(tmp_path, ['1', '8fsdp', '2data4fsdp_accum4'])
  reference = params['1']
  assert report['1']['losses'][-1] < report['1']['losses'][0]  # It trains, so equal params are not trivial.
  for case in ('8fsdp', '2data4fsdp_accum4'):
    assert_same_params(params[case], reference)
  fsdp = report['8fsdp']
  assert fsdp['devices'] == 8
  assert fsdp['max_device_fraction'] <= 1.05 / 8, fsdp
  assert report['2data4fsdp_accum4']['max_device_fraction'] <= 1.05 / 4


@pytest.mark.slow
def test_data_parallel_meshes_accumulation_and_bf16(tmp_path):
  params, report = run_worker(tmp_path, ['1', '8data', '2data4fsdp', '1_accum4', '8fsdp_bf16'])
  for case in ('8data', '2data4fsdp', '1_accum4'):
    assert_same_params(params[case], params['1'])
  assert report['8data']['max_device_fraction'] == 1.0  # Pure data parallelism replicates.
  bf16 = report['8fsdp_bf16']
  assert all(np.isfinite(bf16['losses'])) and bf16['losses'][-1] < bf16['losses'][0]
  assert bf16['dtypes'] == ['float32']  # Master params and EMA stay float32.
  assert bf16['losses'] != report['1']['losses']  # The compute dtype did change the arithmetic.
  np.testing.assert_allclose(bf16['losses'], report['1']['losses'], rtol=0.05)


def _abstract_params(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))['params']


def test_every_param_of_every_network_has_logical_axes():
  c = load_config('ldm_base', LDM, '')
  c.model.text.vocab_size = 40
  unet = _abstract_params(
    models.create_unet(c.model.unet),
    jax.numpy.zeros((1, 8, 8, 4)),
    jax.numpy.zeros((1,)),
    jax.numpy.zeros((1, 16, c.model.unet.cross_attention_dim)),
  )
  text = _abstract_params(models.create_text_encoder(c.model.text), jax.numpy.zeros((1, 16), jax.numpy.int32))
  vae = _abstract_params(
    models.create_vae(load_config('vae_base', VAE, '').model.vae),
    jax.numpy.zeros((1, 32, 32, 3)),
    sample_posterior=False,
  )
  for tree in (unet, text, vae):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      name = parallel._path_string(path)
      axes = parallel.logical_axes(name, leaf.ndim)
      assert axes is not None, name
  names = {
    parallel.logical_axes(parallel._path_string(p), x.ndim)
    for p, x in jax.tree_util.tree_leaves_with_path((unet, text))
  }
  assert {
    ('embed', 'heads'),
    ('heads', 'embed'),
    ('embed', 'mlp'),
    ('mlp', 'embed'),
    ('vocab', 'embed'),
    (None, None, 'conv_in', 'conv_out'),
    ('norm',),
    ('bias',),
  } <= names


def test_partition_rules_divisibility_size_and_one_use_per_axis():
  mesh = AbstractMesh((2, 4, 2), parallel.MESH_AXES)
  rules = parallel.DEFAULT_RULES
  conv = (None, None, 'conv_in', 'conv_out')
  assert parallel.partition_spec(conv, (3, 3, 16, 32), mesh, rules) == P(None, None, None, 'fsdp')
  # Output channels not divisible by 4: the input channels take 'fsdp'.
  assert parallel.partition_spec(conv, (3, 3, 16, 3), mesh, rules) == P(None, None, 'fsdp', None)
  assert parallel.partition_spec(conv, (3, 3, 6, 3), mesh, rules) == P(None, None, None, None)
  assert parallel.partition_spec(('embed', 'heads'), (32, 64), mesh, rules) == P('fsdp', 'tensor')
  assert parallel.partition_spec(('embed', 'embed'), (32, 64), mesh, rules) == P(None, 'fsdp')
  assert parallel.partition_spec(('embed', 'heads'), (32, 64), mesh, rules, min_size=32 * 64 + 1) == P(None, None)
  multi = (('embed', ('data', 'fsdp')),)
  assert parallel.partition_spec(('embed',), (16,), mesh, multi) == P(('data', 'fsdp'))
  with pytest.raises(ConfigError, match='mesh.rules'):
    parallel.partition_spec(('embed',), (16,), mesh, (('embed', 'model'),))


def test_state_shardings_follow_param_paths():
  """Adam moments and EMA get the sharding of their param; scalars (step, counts, rng) stay replicated."""
  import optax

  from diffusion.training.state import create_train_state

  mesh = AbstractMesh((1, 8, 1), parallel.MESH_AXES)
  params = {
    'unet': {
      'conv_in': {'kernel': np.zeros((3, 3, 4, 64), np.float32), 'bias': np.zeros((64,), np.float32)},
      'conv_norm_out': {'scale': np.zeros((64,), np.float32)},
    }
  }
  state = jax.eval_shape(lambda: create_train_state(params, optax.adamw(1e-3), jax.random.PRNGKey(0)))
  specs = {
    parallel._path_string(p): s.spec
    for p, s in jax.tree_util.tree_leaves_with_path(parallel.tree_shardings(state, mesh, min_size=100))
  }
  kernels = {p: s for p, s in specs.items() if p.endswith('conv_in/kernel')}
  assert len(kernels) == 4 and set(kernels.values()) == {P(None, None, None, 'fsdp')}  # params, mu, nu, EMA.
  assert {s for p, s in specs.items() if p.endswith(('bias', 'scale'))} == {P(None)}  # 64 < min_size.
  assert specs['step'] == specs['rng'] == P() and all(specs[p] == P() for p in specs if p.endswith('count'))
  shardings = parallel.tree_shardings(params, mesh, min_size=100)
  assert parallel.sharded_bytes(params, shardings) == (3 * 3 * 4 * 64 * 4, (3 * 3 * 4 * 64 + 128) * 4)


BAD = [
  ('train.grad_accum_steps', {'train.grad_accum_steps': 0}),
  ('train.batch_size', {'train.grad_accum_steps': 3}),  # 8 examples in 3 micro-batches.
  ('train.batch_size', {'mesh.data': 4, 'train.grad_accum_steps': 4}),
  ('train.compute_dtype', {'train.compute_dtype': 'fp8'}),
  ('model.vae.dtype', {'model.vae.dtype': 'float64'}),
  ('mesh.dcn_data', {'mesh.data': 4, 'mesh.dcn_data': 3}),
  ('mesh.rules', {'mesh.rules': (('embed', 'model'),)}),
  ('mesh.min_shard_size', {'mesh.min_shard_size': -1}),
  ('distributed.initialize', {'distributed.initialize': 'maybe'}),
]


@pytest.mark.parametrize('key,overrides', BAD, ids=[b[0] for b in BAD])
def test_bad_scaling_settings_name_the_key(key, overrides):
  config = load_config('vae_base', VAE, '', **overrides)
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    validate_config(config)


def test_scaling_defaults_validate_in_every_preset():
  for name, preset in (('ldm_base.py', 'base'), ('vae_base.py', 'tiny')):
    config = load_config_file(os.path.join(ROOT, 'configs', name), preset)
    validate_config(config)
    assert config.train.grad_accum_steps == 1 and config.mesh.dcn_data == 1
    assert tuple(parallel.mesh_rules(config.mesh)[0]) == parallel.DEFAULT_RULES


def test_dcn_degrees_must_divide_the_mesh():
  config = load_config('vae_base', VAE, '', **{'mesh.data': 1, 'mesh.dcn_data': 2})
  with pytest.raises(ConfigError, match='mesh.dcn_data'):
    parallel.dcn_shape(config.mesh, (1, 1, 1))
  assert parallel.dcn_shape(config.mesh, (4, 1, 1)) == (2, 1, 1)


def test_initialize_distributed_is_a_no_op_on_one_machine(monkeypatch):
  for var in (
    'JAX_COORDINATOR_ADDRESS',
    'SLURM_JOB_ID',
    'TPU_WORKER_HOSTNAMES',
    'MEGASCALE_COORDINATOR_ADDRESS',
    'OMPI_COMM_WORLD_SIZE',
    'DIFFUSION_DISTRIBUTED',
  ):
    monkeypatch.delenv(var, raising=False)
  config = load_config('vae_base', VAE, '')
  assert parallel.initialize_distributed(config.distributed) is False
  assert parallel.initialize_distributed(None) is False
  config.distributed.coordinator_address = '127.0.0.1:1'
  with pytest.raises(ConfigError, match='distributed.process_id'):
    parallel.initialize_distributed(config.distributed)  # Checked before anything connects.
  monkeypatch.setenv('SLURM_JOB_ID', '1')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'n[1-2]')
  monkeypatch.setenv('SLURM_NTASKS', '2')
  assert parallel._cluster_detected() == 'SLURM'
  monkeypatch.setenv('DIFFUSION_DISTRIBUTED', 'no')
  assert parallel.initialize_distributed(None) is False


@pytest.mark.slow
def test_ldm_on_a_data_fsdp_tensor_mesh_with_accumulation(tmp_path):
  """U-Net + text encoder + frozen VAE on 2 data x 2 fsdp x 2 tensor with 2 micro-batches: the first step's loss
  equals the 1-device loss, it trains, and the params are sharded. (Params after several Adam steps are not compared:
  the gradient of the text encoder's k_proj bias is zero in exact arithmetic, since softmax ignores a shift of every
  key, and Adam normalises its float noise into full-size updates, differently for each summation order.)"""
  _, report = run_worker(tmp_path, ['ldm_1', 'ldm_2data2fsdp2tensor_accum2'])
  one, mesh = report['ldm_1'], report['ldm_2data2fsdp2tensor_accum2']
  np.testing.assert_allclose(mesh['losses'][0], one['losses'][0], rtol=1e-5)
  assert all(np.isfinite(mesh['losses']))
  assert mesh['max_device_fraction'] < 0.5 and mesh['devices'] == 8
