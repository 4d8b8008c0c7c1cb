r"""Long-run soak: train with a SIGTERM every few minutes and a restart, then compare with an uninterrupted run.

  python scripts/soak.py --workdir /tmp/soak --minutes 30 --interrupt_every 4
  python scripts/soak.py --workdir /tmp/soak --concurrent -- --config.optim.lr=1e-3   # overrides for both runs

Trains the quickstart VAE (configs/vae_base.py:tiny, the cheapest real run) twice for the same number of steps:
once interrupted by SIGTERM after every `--interrupt_every` minutes of training and restarted with the same
command, once straight through (afterwards, or with `--concurrent` at the same time). Reports whether the step
count, the logged loss curve and the final params (and EMA params) are identical, with the largest absolute
difference where they are not (on CPU they must be bit-identical). The number of steps is fixed up front
(`--minutes` x `--steps_per_minute`), because the learning-rate schedule depends on it; measure your machine's
steps/min first. Each restart re-imports the code from this checkout: run it from a snapshot
(`git archive HEAD | tar -x -C /tmp/code`) if the tree may change meanwhile. Not part of the default tests: it
takes as long as you ask it to.
"""

import json
import os
import signal
import subprocess
import sys
import time

from absl import flags

from diffusion import cli
from diffusion.errors import user_errors_exit

_WORKDIR = flags.DEFINE_string('workdir', None, 'Holds interrupted/ and straight/ (the two runs) and their logs.')
_MINUTES = flags.DEFINE_float('minutes', 30, 'Length of the run, sized by --steps_per_minute.')
_INTERRUPT_EVERY = flags.DEFINE_float('interrupt_every', 4, 'Minutes of training (after start-up) between SIGTERMs.')
_STEPS_PER_MINUTE = flags.DEFINE_integer('steps_per_minute', 200, 'Sizes the run to --minutes.')
_CONCURRENT = flags.DEFINE_bool('concurrent', False, 'Run the uninterrupted run at the same time.')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int, extra: list[str]) -> list[str]:
  """The training command both runs use; every step is logged so the loss curves compare 1:1."""
  return [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--config',
    'configs/vae_base.py:tiny',
    '--workdir',
    workdir,
    f'--config.train.num_steps={steps}',
    '--config.train.checkpoint_every=200',
    '--config.train.sample_every=0',
    '--config.train.eval_every=0',
    '--config.train.log_every=1',
    '--config.wandb.mode=disabled',
    *extra,
  ]


def losses(workdir: str) -> dict[int, float]:
  """step -> loss from metrics.jsonl (a step logged twice, e.g. redone after a kill, keeps its last value)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row:
        out[row['step']] = row['loss']
  return out


def _last_step(workdir: str) -> int:
  path = os.path.join(workdir, 'metrics.jsonl')
  return max(losses(workdir), default=0) if os.path.exists(path) else 0


def _wait_for_progress(proc: subprocess.Popen, workdir: str, since: int, poll: float = 2.0) -> None:
  """Returns once the run logs a step past `since` (or exits): start-up, restore and compilation take minutes on a
  loaded machine, and a SIGTERM timer started before training resumes would stop every restart before its first
  step."""
  while proc.poll() is None and _last_step(workdir) <= since:
    time.sleep(poll)


def run_interrupted(workdir: str, steps: int, every_min: float, extra: list[str]) -> int:
  """Runs training, sending SIGTERM after every `every_min` minutes of training (counted from the first new step
  after each start) and restarting, until it finishes; returns the number of SIGTERMs."""
  restarts, start = 0, time.time()
  while True:
    with open(os.path.join(os.path.dirname(workdir), 'interrupted.log'), 'a') as log:
      proc = subprocess.Popen(command(workdir, steps, extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      _wait_for_progress(proc, workdir, _last_step(workdir))
      try:
        rc = proc.wait(timeout=every_min * 60)
        if rc != 0:
          raise SystemExit(f'soak: interrupted run exited with {rc}; see interrupted.log')
        return restarts
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
        restarts += 1
        print(
          f'soak: SIGTERM #{restarts} at {(time.time() - start) / 60:.1f} min (exit {rc}, last logged step '
          f'{_last_step(workdir)}/{steps}), restarting',
          flush=True,
        )


def compare(interrupted: str, straight: str, steps: int) -> dict:
  """Step count, loss curve and final params of the two runs: equal, and the largest difference."""
  import jax  # Here, not at the top: the runs themselves are subprocesses and this one needs no JAX until now.
  import numpy as np

  from diffusion import checkpoint

  a = checkpoint.Checkpointer(interrupted, read_only=True)
  b = checkpoint.Checkpointer(straight, read_only=True)
  out = {'final_step_interrupted': a.latest_step(), 'final_step_straight': b.latest_step()}
  out['same_final_step'] = a.latest_step() == b.latest_step() == steps
  for item in ('params', 'ema_params'):
    la = jax.tree.leaves(a.restore_params(item=item))
    lb = jax.tree.leaves(b.restore_params(item=item))
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb)]
    out[f'bit_identical_{item}'] = len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )
    out[f'max_abs_diff_{item}'] = max(diffs, default=0.0)
  ca, cb = losses(interrupted), losses(straight)
  common = sorted(set(ca) & set(cb))
  out['logged_points_compared'] = len(common)
  out['same_loss_curve'] = bool(common) and len(common) == steps and all(ca[s] == cb[s] for s in common)
  out['max_abs_diff_loss'] = max((abs(ca[s] - cb[s]) for s in common), default=0.0)
  return out


@user_errors_exit
def main(argv: list[str]) -> None:
  extra = cli.parse_flags(argv, config_flag=None, positional=('OVERRIDE...',), required=('workdir',), doc=__doc__)
  cli.require(_MINUTES.value > 0 and _INTERRUPT_EVERY.value > 0, '--minutes and --interrupt_every must be > 0')
  cli.require(_STEPS_PER_MINUTE.value >= 1, f'--steps_per_minute must be >= 1, got {_STEPS_PER_MINUTE.value}')
  steps = int(_MINUTES.value * _STEPS_PER_MINUTE.value)
  workdir = os.path.abspath(_WORKDIR.value)
  interrupted, straight = os.path.join(workdir, 'interrupted'), os.path.join(workdir, 'straight')
  os.makedirs(workdir, exist_ok=True)
  print(f'soak: {steps} steps, SIGTERM every {_INTERRUPT_EVERY.value} min, code from {ROOT}', flush=True)
  start = time.time()
  with open(os.path.join(workdir, 'straight.log'), 'w') as log:
    straight_run = None
    if _CONCURRENT.value:  # Wall time max(a, b) instead of a + b; on CPU the results do not depend on the load.
      straight_run = subprocess.Popen(command(straight, steps, extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    restarts = run_interrupted(interrupted, steps, _INTERRUPT_EVERY.value, extra)
    t_interrupted = time.time() - start
    print(f'soak: interrupted run done after {restarts} SIGTERMs in {t_interrupted / 60:.1f} min', flush=True)
    if straight_run is None:
      straight_run = subprocess.Popen(command(straight, steps, extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if straight_run.wait() != 0:
      raise SystemExit('soak: the uninterrupted run failed; see straight.log')
  result = {
    'steps': steps,
    'sigterms': restarts,
    'minutes_interrupted_run': round(t_interrupted / 60, 1),
    'minutes_total': round((time.time() - start) / 60, 1),
    **compare(interrupted, straight, steps),
  }
  print(json.dumps(result, indent=2), flush=True)
  ok = result['same_final_step'] and result['same_loss_curve'] and result['bit_identical_params']
  sys.exit(0 if ok and result['bit_identical_ema_params'] else 1)


if __name__ == '__main__':
  main(sys.argv)
