"""Runs the evaluation suite of a workdir on one of several processes; used by test_multiprocess.py.

  python tests/eval/eval_worker.py WORKDIR OUT.npz PROCESS_ID NUM_PROCESSES PORT LOCAL_BATCH

Every process takes part (each generates its share of the samples and of the reference images); process 0 writes
the combined FID statistics, the reference statistics, the scalars and each process's own sample count.
"""

import json
import sys

import numpy as np

NUM_SAMPLES = 6  # With 2 processes and 2 images per batch: process 0 gets samples 0, 1, 4, 5; process 1 gets 2, 3.


def main(workdir: str, out: str, process_id: int, num_processes: int, port: int, local_batch: int) -> None:
  import jax

  if num_processes > 1:
    jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes, process_id=process_id
    )
  from diffusion.evaluation import EvalSuite, base, parse_evaluator
  from diffusion.pipeline import LatentDiffusionPipeline

  pipeline = LatentDiffusionPipeline.from_workdir(workdir)
  config = pipeline.config
  common = dict(num_samples=NUM_SAMPLES, batch_size=local_batch * num_processes, num_reference=NUM_SAMPLES, seed=3)
  specs = [parse_evaluator(name, {'type': name, **common}, config) for name in ('fid', 'oracle')]
  suite = EvalSuite(specs, config, workdir, pipeline)
  scalars = suite.evaluate(None)
  metric = suite.evaluators[0].metric
  mine = metric.sums.count  # This process's samples only.
  counts = base.sum_across_processes(np.eye(num_processes)[process_id] * mine)
  mu, sigma = metric.statistics()
  if process_id == 0:
    ref_mu, ref_sigma = metric.reference
    np.savez(out, mu=mu, sigma=sigma, ref_mu=ref_mu, ref_sigma=ref_sigma, counts=counts, scalars=json.dumps(scalars))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:7]))
