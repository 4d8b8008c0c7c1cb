"""The evaluation job on a trained (tiny) workdir: per-checkpoint JSON, restart without redoing, --watch, CLI."""

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from eval import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = dict(num_reference=8, batch_size=4, wandb_mode='disabled')


@pytest.fixture
def workdir(ldm_workdir, tmp_path):
  """A private copy of the session's 2-step workdir (checkpoints at steps 1 and 2)."""
  path = str(tmp_path / 'ldm')
  shutil.copytree(ldm_workdir, path, ignore=shutil.ignore_patterns('eval', 'wandb'))
  assert run_lib.checkpoint_steps(path) == [1, 2]
  return path


def _read(workdir, step):
  with open(run_lib.eval_path(workdir, step)) as f:
    return json.load(f)


def test_evaluates_each_checkpoint_once_and_resumes(workdir):
  first = run_lib.run(workdir, ['fid', 'oracle'], 4, step=1, **FAST)
  assert [r['step'] for r in first] == [1]
  record = _read(workdir, 1)
  metrics = record['metrics']
  assert set(metrics) == {'fid_random_inception', 'oracle_caption_accuracy', 'oracle_shuffled_prompts'}
  assert metrics['fid_random_inception'] > 0 and 0 <= metrics['oracle_caption_accuracy'] <= 1
  info = record['metrics_info']['fid']
  assert info['random_weights'] and 'RANDOM Inception weights' in info['inception_weights']
  evaluators = record['evaluators']
  assert evaluators['fid']['num_samples'] == 4 and info['reference'] == 'shapes-train-8'
  assert (
    evaluators['oracle']['sampling']['num_steps'] == 3
    and evaluators['oracle']['prompts'] == 'captions of shapes-train-8'
  )
  stats = os.path.join(workdir, info['reference_stats'])
  stats_mtime, first_mtime = os.path.getmtime(stats), os.path.getmtime(run_lib.eval_path(workdir, 1))
  # A restarted job (as after a kill during step 2) evaluates only what is missing, with the cached reference.
  again = run_lib.run(workdir, ['fid', 'oracle'], 4, **FAST)
  assert [r['step'] for r in again] == [2]
  assert os.path.getmtime(run_lib.eval_path(workdir, 1)) == first_mtime
  assert os.path.getmtime(stats) == stats_mtime
  assert again[0]['metrics']['fid_random_inception'] != metrics['fid_random_inception']
  assert run_lib.run(workdir, ['fid', 'oracle'], 4, **FAST) == []


@pytest.mark.slow
def test_fixed_seeds_give_the_same_numbers(workdir):
  evaluator = run_lib.Evaluator(workdir, ['fid', 'oracle'], 8, num_reference=16, batch_size=4)
  first, second = evaluator.evaluate(2), evaluator.evaluate(2)
  assert first['metrics'] == second['metrics']
  fresh = run_lib.Evaluator(workdir, ['fid', 'oracle'], 8, num_reference=16, batch_size=8).evaluate(2)
  # Other batch shapes round differently in float32 (a few uint8 pixels, then Inception features): not bit-equal.
  assert fresh['metrics'] == pytest.approx(first['metrics'], rel=1e-3)


def test_watch_follows_new_checkpoints_until_the_final_step(workdir, tmp_path):
  held = str(tmp_path / 'held_back')
  shutil.move(os.path.join(workdir, 'checkpoints', '2'), held)
  results, errors = [], []

  def watch():
    try:
      results.extend(run_lib.run(workdir, ['oracle'], 4, watch=True, poll_seconds=0.2, idle_timeout=120, **FAST))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=watch)
  thread.start()
  deadline = time.time() + 240
  while not os.path.exists(run_lib.eval_path(workdir, 1)) and time.time() < deadline and thread.is_alive():
    time.sleep(0.2)
  assert os.path.exists(run_lib.eval_path(workdir, 1)) and thread.is_alive(), errors
  os.rename(held, os.path.join(workdir, 'checkpoints', '2'))  # The training run saves its final checkpoint.
  thread.join(timeout=240)
  assert not thread.is_alive() and not errors, errors
  assert [r['step'] for r in results] == [1, 2]


def _cli(*args, module=False):
  command = [sys.executable, '-m', 'eval.run'] if module else [sys.executable, 'eval/run.py']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'WANDB_MODE': 'offline'}
  env.pop('WANDB_DISABLED', None)
  return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_command_line_writes_json_and_logs_wandb_offline(workdir):
  result = _cli(
    '--workdir',
    workdir,
    '--metrics',
    'oracle',
    '--num_samples',
    '4',
    '--batch_size',
    '4',
    '--step',
    '2',
    '--wandb_mode',
    'offline',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 2: oracle_caption_accuracy=' in result.stdout
  assert _read(workdir, 2)['metrics']['oracle_shuffled_prompts'] >= 0
  assert glob.glob(os.path.join(workdir, 'eval', 'wandb', 'offline-run-*')), os.listdir(os.path.join(workdir, 'eval'))


@pytest.mark.parametrize(
  'args,needle',
  [
    (['--metrics', 'oracle,nope'], 'unknown metric(s) nope'),
    (['--step', '99'], 'no checkpoint at step 99'),
    (['--num_samples', '1'], '--num_samples'),
  ],
  ids=['unknown-metric', 'missing-step', 'too-few-samples'],
)
def test_user_errors(workdir, args, needle):
  result = _cli('--workdir', workdir, '--wandb_mode', 'disabled', *args, module=True)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and needle in lines[0] and 'Traceback' not in result.stderr, result.stderr[-3000:]


def test_metric_registry_holds_every_metric():
  from diffusion.errors import UserError
  from diffusion.evaluation import METRICS

  assert {'fid', 'oracle', 'clip'} <= set(METRICS.names())
  with pytest.raises(UserError, match="unknown metric 'nope'"):
    METRICS.get('nope')
