"""Multi-host training on one machine: 2 processes x 4 CPU devices (gloo collectives) train like 1 process x 8.

Each process joins with `jax.distributed.initialize(coordinator_address='127.0.0.1:<port>', ...)` through
`parallel.initialize_distributed(config.distributed)`, feeds its rows of the global batch and takes part in the
collective Orbax save; the checkpoint must then restore in a single process.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from support import ROOT, device_env
from test_parallel import assert_same_params, run_worker

WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(out_dir: str, num_processes: int = 2) -> list[str]:
  env = device_env(4)
  port = free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, 'multihost', out_dir, str(i), str(num_processes), str(port)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-3000:]
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return outputs


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  from diffusion import checkpoint

  out_dir = str(tmp_path / 'multihost')
  outputs = run_processes(out_dir)
  assert all('"losses"' in out for out in outputs)
  reference, _ = run_worker(tmp_path, ['2data4fsdp'])  # The same mesh shape, 1 process x 8 devices.
  restored = checkpoint.Checkpointer(out_dir, read_only=True).restore_params(item='params')
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}
  assert_same_params(flat, reference['2data4fsdp'])


@pytest.mark.slow
def test_train_py_on_two_processes_logs_once_and_checkpoints(tmp_path, data_dir):
  """The whole loop on 2 processes x 4 devices: eval, sample grid (gathered to process 0), metrics written once,
  collective checkpoints that restore in one process."""
  import json

  from diffusion import checkpoint
  from diffusion.data import pipeline as data_pipeline
  from support import VAE, cli_overrides, load_config

  overrides = {
    **VAE,
    'train.num_steps': 3,
    'train.batch_size': 16,
    'train.eval_every': 3,
    'train.sample_every': 3,
    'train.checkpoint_every': 2,
    'mesh.fsdp': 4,
    'mesh.min_shard_size': 0,
    'data.data_dir': data_dir,
    'wandb.mode': 'disabled',
    'distributed.coordinator_address': f'127.0.0.1:{free_port()}',
    'distributed.num_processes': 2,
  }
  config = load_config('vae_base', overrides, data_dir)
  for split in ('train', 'validation'):  # Prepared once here: the processes must not race to prepare it.
    data_pipeline.create_data_source(config.data, split)
  workdir = str(tmp_path / 'run')
  env = device_env(4, WANDB_MODE='disabled')
  command = [
    sys.executable,
    'train.py',
    '--config',
    'configs/vae_base.py:tiny',
    '--workdir',
    workdir,
    *cli_overrides(overrides),
  ]
  procs = [
    subprocess.Popen(
      command + [f'--config.distributed.process_id={i}'],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    results = [proc.communicate(timeout=900) + (proc.returncode,) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for out, err, code in results:
    assert code == 0, err[-3000:]
  assert 'process 1/2 started' in results[1][1]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3]  # Written by process 0 only.
  assert any('eval/psnr' in r for r in rows)
  assert os.listdir(os.path.join(workdir, 'samples')) == ['samples_0000003.png']
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.all_steps() == [2, 3]
  params = ckpt.restore_params(item='params')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
