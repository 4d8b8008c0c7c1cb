"""The training loop end to end on the embedded data: both stages, checkpoints, resume, metrics, the NaN guard."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion import checkpoint
from diffusion.training import train_and_evaluate
from diffusion.workdir import load_built_on, load_workdir_config
from support import LDM, ROOT, VAE, cli_overrides, load_config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_vae_stage_writes_checkpoints_metrics_and_samples(vae_workdir):
  assert checkpoint.Checkpointer(vae_workdir, read_only=True).all_steps() == [1, 2]
  rows = read_metrics(vae_workdir)
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in rows if 'loss' in r)
  assert any('eval/psnr' in r for r in rows)
  assert os.path.exists(os.path.join(vae_workdir, 'samples', 'samples_0000002.png'))
  meta = checkpoint.Checkpointer(vae_workdir, read_only=True).restore_meta()
  assert meta['model_type'] == 'vae' and meta['step'] == 2 and 'jax' in meta['packages'] and meta['git_commit']


def test_ldm_stage_is_self_contained(ldm_workdir, vae_workdir):
  config = load_workdir_config(ldm_workdir, expect='ldm')
  assert config.model.vae.scaling_factor > 0  # Computed from data at the start of the run.
  assert config.model.text.vocab_size > 4
  assert tuple(config.model.vae.block_out_channels) == VAE['model.vae.block_out_channels']
  for sub in ('tokenizer', 'frozen/vae', 'checkpoints', 'samples/samples_0000002.png'):
    assert os.path.exists(os.path.join(ldm_workdir, sub)), sub
  frozen = checkpoint.load_pytree(os.path.join(ldm_workdir, 'frozen', 'vae'))
  vae_ema = checkpoint.Checkpointer(vae_workdir, read_only=True).restore_params(item='ema_params')
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(vae_ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  records = read_metrics(ldm_workdir)
  assert any('eval/val_loss' in r for r in records)
  final = [r for r in records if 'eval/oracle_caption_accuracy' in r]  # config.evals, run by the loop at the end.
  assert [r['step'] for r in final] == [config.train.num_steps]
  assert 0.0 <= final[0]['eval/oracle_caption_accuracy'] <= 1.0 and 'eval/oracle_shuffled_prompts' in final[0]
  built_on = load_built_on(ldm_workdir)  # What the run is built on: the VAE workdir and the hash of its params.
  assert built_on == {'vae_workdir': {'path': vae_workdir, 'params_sha256': checkpoint.params_hash(vae_ema)}}


def test_resume_equals_uninterrupted_run(tmp_path, data_dir, vae_workdir, ldm_workdir):
  """The session's 2-step run, stopped after step 1 and continued: step 2 is bit-identical to the uninterrupted
  run's (params, EMA, optimizer state, data order); rerunning the finished run does nothing."""
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(ldm_workdir, resumed, ignore=shutil.ignore_patterns('eval', 'wandb'))
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '2'))  # As if killed after saving step 1.
  assert checkpoint.Checkpointer(resumed, read_only=True).all_steps() == [1]
  # The session run's config; sampling and evals do not touch the train state, so they are left out here.
  config = load_config(
    'ldm_base', LDM, data_dir, vae_workdir=vae_workdir, **{'train.sample_every': 0, 'train.eval_every': 0}
  )
  final_resumed = train_and_evaluate(config, resumed)
  assert int(final_resumed.step) == 2
  straight = checkpoint.Checkpointer(ldm_workdir, read_only=True)
  for item in ('params', 'ema_params', 'opt_state'):
    a, b = jax.tree.leaves(straight.restore_params(2, item)), jax.tree.leaves(getattr(final_resumed, item))
    assert len(a) == len(b) > 0, item
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
  step1 = jax.tree.leaves(straight.restore_params(1, 'params'))
  assert any(
    not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(step1, jax.tree.leaves(final_resumed.params))
  )
  assert train_and_evaluate(config, resumed) is None  # Finished: says so, does nothing.


def test_nan_batch_is_skipped_and_stops_after_max_bad_steps(tmp_path, data_dir, vae_workdir, monkeypatch):
  from diffusion.training import loop

  original = loop._global_batches

  def poisoned(iterator, mesh):
    for batch in original(iterator, mesh):
      yield {**batch, 'image': batch['image'] * np.nan}

  monkeypatch.setattr(loop, '_global_batches', poisoned)
  config = load_config(
    'vae_base',
    VAE,
    data_dir,
    **{'train.num_steps': 5, 'train.max_bad_steps': 2, 'train.eval_every': 0, 'train.sample_every': 0},
  )
  workdir = str(tmp_path / 'nan')
  with pytest.raises(FloatingPointError, match='max_bad_steps'):
    train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  for step in ckpt.all_steps():  # Whatever was saved holds finite params.
    params = checkpoint.Checkpointer(workdir, read_only=True).restore_params(step, 'params')
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert read_metrics(workdir)[0]['skipped'] == 1.0


def _kill_when(proc, workdir, ready) -> None:
  """SIGKILLs `proc` as soon as `ready(checkpoint_dir_entries)` holds."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    entries = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    if ready(entries):
      break
    time.sleep(0.01)
  assert proc.poll() is None, 'training ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def test_sigkill_at_several_points_then_resume_is_bit_identical(tmp_path, data_dir, vae_workdir):
  """Killed during an async save and again later, rerun each time: final params equal an uninterrupted run's."""
  steps = 24  # Room for the second kill (after checkpoint 12) to land before the end.
  overrides = {
    **VAE,
    'train.num_steps': steps,
    'train.checkpoint_every': 3,
    'train.eval_every': 0,
    'train.sample_every': 0,
    'train.log_every': 10,
    'data.data_dir': data_dir,
  }
  env = {**os.environ, 'WANDB_MODE': 'disabled'}

  def command(workdir):
    return [
      sys.executable,
      'train.py',
      '--config',
      'configs/vae_base.py:tiny',
      '--workdir',
      workdir,
      *cli_overrides(overrides),
    ]

  killed, straight = str(tmp_path / 'killed'), str(tmp_path / 'straight')
  # 1) While the first checkpoint is still being written (its temporary directory exists).
  proc = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _kill_when(proc, killed, lambda entries: any('tmp' in e for e in entries) or '3' in entries)
  # 2) Resumed, then killed between checkpoints, after a few more saves.
  proc = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _kill_when(proc, killed, lambda entries: any(e.isdigit() and int(e) >= 12 for e in entries))
  killed_at = checkpoint.Checkpointer(killed, read_only=True).latest_step()
  assert killed_at is not None and 12 <= killed_at < steps
  # 3) Rerun the same command to the end, and an uninterrupted run for comparison.
  result = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'resumed from step' in result.stdout
  result = subprocess.run(command(straight), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  a = checkpoint.Checkpointer(killed, read_only=True)
  b = checkpoint.Checkpointer(straight, read_only=True)
  assert a.latest_step() == b.latest_step() == steps
  for item in ('params', 'ema_params'):
    for x, y in zip(jax.tree.leaves(a.restore_params(item=item)), jax.tree.leaves(b.restore_params(item=item))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_stops_then_resumes(tmp_path, data_dir, vae_workdir):
  workdir = str(tmp_path / 'term')
  overrides = {
    **VAE,
    'train.num_steps': 1000,
    'train.checkpoint_every': 500,
    'train.eval_every': 0,
    'train.sample_every': 0,
    'train.log_every': 1,
    'data.data_dir': data_dir,
  }
  command = [
    sys.executable,
    'train.py',
    '--config',
    'configs/vae_base.py:tiny',
    '--workdir',
    workdir,
    *cli_overrides(overrides),
  ]
  env = {**os.environ, 'WANDB_MODE': 'disabled', 'PYTHONUNBUFFERED': '1'}
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:  # Wait until training is under way.
    if line.startswith('step 3/'):
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  assert 'preempted (SIGTERM): saved a checkpoint at step' in out
  saved = checkpoint.Checkpointer(workdir, read_only=True).latest_step()
  assert 3 <= saved < 500
