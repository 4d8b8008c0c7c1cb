"""Evaluation on 2 processes (jax.distributed on 127.0.0.1): each generates its share, the numbers are 1 process's.

Each process generates its own samples (disjoint image indices) and reads its share of the reference images; the
FID statistics (sums) and the oracle counts are combined once. With the same per-process batch, every image and its
Inception features are those of the 1-process run, so mu, sigma and the final numbers agree to float64 rounding.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from support import device_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, 'tests', 'eval', 'eval_worker.py')
LOCAL_BATCH = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run(workdir: str, out: str, num_processes: int) -> dict:
  """Runs the worker on `num_processes` processes (1 CPU device each) on its own copy of the workdir."""
  env = device_env(None, WANDB_MODE='disabled')  # One device each: no forced device count.
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, workdir, out, str(i), str(num_processes), str(port), str(LOCAL_BATCH)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=900)
      assert proc.returncode == 0, err[-3000:]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  with np.load(out) as f:
    return {k: (json.loads(str(f[k])) if k == 'scalars' else np.asarray(f[k])) for k in f.files}


@pytest.fixture
def workdirs(ldm_workdir, tmp_path):
  """Two private copies of the session's workdir, so each run computes (and caches) its own reference data."""
  copies = []
  for name in ('one', 'two'):
    path = str(tmp_path / name)
    shutil.copytree(ldm_workdir, path, ignore=shutil.ignore_patterns('eval', 'wandb'))
    copies.append(path)
  return copies


@pytest.mark.slow
def test_two_processes_evaluate_like_one(workdirs, tmp_path):
  one = _run(workdirs[0], str(tmp_path / 'one.npz'), 1)
  two = _run(workdirs[1], str(tmp_path / 'two.npz'), 2)
  assert list(one['counts']) == [6] and list(two['counts']) == [4, 2]  # Each process generated its share only.
  for key in ('ref_mu', 'ref_sigma', 'mu', 'sigma'):
    np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-6 * max(1.0, np.abs(one[key]).max()))
  assert set(one['scalars']) == {'fid_random_inception', 'oracle_caption_accuracy', 'oracle_shuffled_prompts'}
  for key, value in one['scalars'].items():
    assert two['scalars'][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
  assert one['scalars']['fid_random_inception'] > 0
