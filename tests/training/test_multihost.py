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

from support import ROOT
from test_parallel import assert_same_params, run_worker

WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(out_dir: str, num_processes: int = 2) -> list[str]:
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
  port = free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, 'multihost', out_dir, str(i), str(num_processes), str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
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
