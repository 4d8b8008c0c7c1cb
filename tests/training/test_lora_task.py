"""LoRA training (config.lora.rank > 0) on the frozen tiny LDM of the session fixture."""

import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import ml_collections
import numpy as np
import pytest

from diffusion import checkpoint, interop
from diffusion import lora as lora_lib
from diffusion import workdir as workdir_lib
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import ConfigError
from diffusion.generation import workdir_lora
from diffusion.pipeline import LatentDiffusionPipeline
from diffusion.training import state as state_lib
from diffusion.training import train_and_evaluate
from diffusion.training.lora_task import LoRATask
from support import LDM, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RANK, ALPHA = 2, 4.0


def lora_config(data_dir: str, base: str, **more):
  more = {'train.eval_every': 0, 'train.sample_every': 0, **more}
  return load_config(
    'ldm_base', LDM, data_dir, base_workdir=base, **{'lora.rank': RANK, 'lora.alpha': ALPHA, 'optim.lr': 1e-2, **more}
  )


def flat(tree):
  return {'/'.join(p): np.asarray(v) for p, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope='module')
def base(tmp_path_factory, ldm_workdir) -> str:
  """A copy of the session's tiny LDM (one test changes it)."""
  path = str(tmp_path_factory.mktemp('base') / 'ldm')
  shutil.copytree(ldm_workdir, path)
  return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir, base) -> str:
  workdir = str(tmp_path_factory.mktemp('lora'))
  oracle = ml_collections.ConfigDict({'type': 'oracle', 'num_samples': 4, 'batch_size': 4})  # At the last step.
  more = {'train.eval_every': 2, 'train.sample_every': 2, 'evals.oracle': oracle}
  train_and_evaluate(lora_config(data_dir, base, **more), workdir)
  return workdir


def test_in_training_evaluators_sample_base_plus_lora(trained):
  """The run's last-step oracle evaluation equals the same evaluator on the workdir's merged pipeline (eval/run.py's
  view), so the evaluators saw base + LoRA, not the raw factors."""
  from diffusion.evaluation import EvalSuite, parse_evals

  logged = [json.loads(line) for line in open(os.path.join(trained, 'metrics.jsonl'))]
  during = [m['eval/oracle_caption_accuracy'] for m in logged if 'eval/oracle_caption_accuracy' in m]
  assert len(during) == 1
  pipeline = LatentDiffusionPipeline.from_workdir(trained)
  after = EvalSuite(parse_evals(pipeline.config), pipeline.config, trained, pipeline).evaluate(None)
  assert after['oracle_caption_accuracy'] == during[0]


def test_checkpoint_holds_only_lora_factors_that_moved(trained, base):
  ckpt = checkpoint.Checkpointer(trained, read_only=True)
  params = flat(ckpt.restore_params(None, 'params'))
  ema = flat(ckpt.restore_params(None, 'ema_params'))
  assert params and all(p.startswith('unet/') and p.rsplit('/', 1)[1] in ('a', 'b') for p in params), list(params)
  assert set(ema) == set(params)
  targets = lora_lib.target_kernels(workdir_lib.load_trained_params(base)[0], lora_lib.DEFAULT_TARGETS)
  assert {p.rsplit('/', 1)[0] for p in params} == {'/'.join(t) for t in targets}
  bs = [v for p, v in params.items() if p.endswith('/b')]
  assert all(b.shape[1] == RANK for b in bs) and max(np.abs(b).max() for b in bs) > 0  # B moved off zero.
  base_sizes = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(workdir_lib.load_trained_params(base)[0]))
  assert sum(v.size for v in params.values()) < base_sizes / 10
  assert not workdir_lib.has_frozen(trained, 'vae')  # The base is not written again.
  record = workdir_lib.load_built_on(trained)
  assert record['base_workdir']['path'] == os.path.abspath(base)


def test_sampling_and_export_use_base_plus_lora(trained, base, tmp_path):
  lora = workdir_lora(trained)
  base_params = workdir_lib.load_trained_params(base)[0]
  merged = LatentDiffusionPipeline.from_workdir(trained).params
  path = next(p for p in lora_lib.modules(lora) if p[-1] == 'to_q')
  a, b = (np.asarray(lora_lib.modules(lora)[path][k]) for k in 'ab')
  kernel = flax.traverse_util.flatten_dict(base_params)[path + ('kernel',)]
  want = kernel + ALPHA / RANK * np.einsum('ri,or->io', a, b)  # W + (alpha / r) (B A)^T, by hand.
  np.testing.assert_allclose(flax.traverse_util.flatten_dict(merged)[path + ('kernel',)], want, rtol=1e-6, atol=1e-7)
  untouched = ('unet', 'conv_in', 'kernel')
  np.testing.assert_array_equal(
    flax.traverse_util.flatten_dict(merged)[untouched], flat(base_params)['unet/conv_in/kernel']
  )
  written = interop.save_lora(str(tmp_path / 'out'), lora)
  loaded = flat(interop.load_lora(written if os.path.isfile(written) else str(tmp_path / 'out')))
  for p, v in flat(lora).items():
    np.testing.assert_allclose(loaded[p], v, rtol=1e-6)


def test_resume_on_a_changed_base_is_refused(trained, base, data_dir):
  steps = sorted(checkpoint.Checkpointer(base, read_only=True).all_steps())
  shutil.rmtree(os.path.join(base, 'checkpoints', str(steps[-1])))  # The base's latest EMA params are now others.
  with pytest.raises(ConfigError, match='base_workdir.*changed since'):
    train_and_evaluate(lora_config(data_dir, base, **{'train.num_steps': 3}), trained)


@pytest.mark.slow
def test_a_run_with_lora_dropout_trains_the_unet_and_text_factors(data_dir, ldm_workdir, tmp_path):
  more = {'lora.dropout': 0.25, 'lora.text_encoder': True}
  train_and_evaluate(lora_config(data_dir, ldm_workdir, **more), str(tmp_path))
  params = flat(checkpoint.Checkpointer(str(tmp_path), read_only=True).restore_params(None, 'params'))
  assert {p.split('/')[0] for p in params} == {'unet', 'text'}
  assert all(np.abs(v).max() > 0 for p, v in params.items() if p.endswith('/b'))  # Every B moved off zero.
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2] and all(np.isfinite(r['loss']) for r in rows if 'loss' in r)


def test_lora_dropout_is_in_the_training_loss_only(data_dir, ldm_workdir, tmp_path):
  """With lora.dropout the training loss runs every adapted U-Net and text module unmerged (a module the interceptor
  missed is an error at trace time), with one dropout key derivation per module; the validation loss (like the
  sample grids) is the merged LoRA's, with no dropout draw. Checked by tracing: compiling the tiny LDM's loss takes
  tens of seconds on CPU."""
  more = {'lora.dropout': 0.5, 'lora.text_encoder': True}
  task = LoRATask(lora_config(data_dir, ldm_workdir, **more), str(tmp_path))
  params = task.init_params(jax.random.PRNGKey(0))
  size = task.config.data.image_size
  batch = {
    'image': np.zeros((4, size, size, 3), np.float32),
    'input_ids': tokenizer_lib.tokenize(task.tokenizer, ['a red circle'] * 4, task.config.data.max_text_length),
  }
  keys = state_lib.per_example_keys(jax.random.PRNGKey(1), jax.numpy.asarray(0), 4)
  loss = str(jax.make_jaxpr(task.loss_fn)(params, task.frozen, batch, keys, jax.numpy.asarray(0)))
  evaluation = str(jax.make_jaxpr(task.eval_step)(params, task.frozen, batch, keys))
  modules = lora_lib.modules(params)
  assert {p[0] for p in modules} == {'unet', 'text'}
  assert loss.count('random_fold_in') >= len(modules)
  assert 'random_fold_in' not in evaluation


@pytest.mark.slow
def test_resume_is_exact(data_dir, ldm_workdir, tmp_path):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train_and_evaluate(lora_config(data_dir, ldm_workdir, **{'train.num_steps': 4}), straight)
  train_and_evaluate(lora_config(data_dir, ldm_workdir, **{'train.num_steps': 2}), resumed)
  train_and_evaluate(lora_config(data_dir, ldm_workdir, **{'train.num_steps': 4}), resumed)
  for item in ('params', 'ema_params'):
    a = flat(checkpoint.Checkpointer(straight, read_only=True).restore_params(None, item))
    b = flat(checkpoint.Checkpointer(resumed, read_only=True).restore_params(None, item))
    assert set(a) == set(b)
    for p in a:
      np.testing.assert_array_equal(a[p], b[p], err_msg=p)


SHARDED = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_lora_task import lora_config
from diffusion.training import train_and_evaluate
config = lora_config({data!r}, {base!r}, **{{'mesh.data': 2, 'mesh.fsdp': 4, 'mesh.min_shard_size': 0}})
train_and_evaluate(config, {workdir!r})
"""


@pytest.mark.slow
def test_sharded_run_matches_one_device(data_dir, ldm_workdir, tmp_path):
  one, sharded = str(tmp_path / 'one'), str(tmp_path / 'sharded')
  train_and_evaluate(lora_config(data_dir, ldm_workdir), one)
  tests = os.path.join(ROOT, 'tests', 'training')
  code = SHARDED.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=data_dir, base=ldm_workdir, workdir=sharded)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'PYTHONPATH': tests}
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sharded over mesh' in proc.stdout and "'fsdp': 4" in proc.stdout, proc.stdout
  a = flat(checkpoint.Checkpointer(one, read_only=True).restore_params(None, 'params'))
  b = flat(checkpoint.Checkpointer(sharded, read_only=True).restore_params(None, 'params'))
  for p in a:
    np.testing.assert_allclose(a[p], b[p], rtol=2e-4, atol=2e-6, err_msg=p)
