r"""Long-run soak: train with a SIGTERM every few minutes and a restart, then compare with an uninterrupted run.

  python scripts/soak.py --workdir /tmp/soak --minutes 30 --interrupt_every 4

Trains the quickstart VAE (configs/vae_base.py:tiny, the cheapest real run) twice for the same number of steps:
once interrupted by SIGTERM every `--interrupt_every` minutes and restarted with the same command, once straight
through. Reports whether the step count, the logged loss curve and the final params are identical (on CPU they
must be bit-identical). Not part of the default tests: it takes as long as you ask it to.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int, extra: list[str]) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config', 'configs/vae_base.py:tiny', '--workdir', workdir,
          f'--config.train.num_steps={steps}', '--config.train.checkpoint_every=200', '--config.train.sample_every=0',
          '--config.train.eval_every=0', '--config.train.log_every=1', '--config.wandb.mode=disabled', *extra]


def losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        out[row['step']] = row['loss']
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--minutes', type=float, default=30)
  parser.add_argument('--interrupt_every', type=float, default=4, help='minutes between SIGTERMs')
  parser.add_argument('--steps_per_minute', type=int, default=200, help='sizes the run to --minutes')
  parser.add_argument('extra', nargs='*', help='more --config.* overrides for both runs')
  args = parser.parse_args()
  steps = int(args.minutes * args.steps_per_minute)
  interrupted, straight = os.path.join(args.workdir, 'interrupted'), os.path.join(args.workdir, 'straight')
  restarts = 0
  os.makedirs(args.workdir, exist_ok=True)
  while True:
    log = open(os.path.join(args.workdir, 'interrupted.log'), 'a')  # Every step is logged, so curves compare 1:1.
    proc = subprocess.Popen(command(interrupted, steps, args.extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
      proc.wait(timeout=args.interrupt_every * 60)
      break
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      restarts += 1
      print(f'soak: SIGTERM #{restarts} sent, restarting', flush=True)
  with open(os.path.join(args.workdir, 'straight.log'), 'w') as log:
    subprocess.run(command(straight, steps, args.extra), cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)

  sys.path.insert(0, ROOT)
  import jax
  import numpy as np
  from diffusion import checkpoint

  a = checkpoint.Checkpointer(interrupted, read_only=True)
  b = checkpoint.Checkpointer(straight, read_only=True)
  same_step = a.latest_step() == b.latest_step() == steps
  pa, pb = a.restore_params(item='params'), b.restore_params(item='params')
  same_params = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(pa),
                                                                                  jax.tree.leaves(pb)))
  la, lb = losses(interrupted), losses(straight)
  common = sorted(set(la) & set(lb))
  same_curve = bool(common) and all(la[s] == lb[s] for s in common)
  print(json.dumps({'steps': steps, 'restarts': restarts, 'same_final_step': same_step,
                    'same_loss_curve': same_curve, 'logged_points_compared': len(common),
                    'bit_identical_params': same_params}, indent=2))
  sys.exit(0 if same_step and same_params and same_curve else 1)


if __name__ == '__main__':
  main()
