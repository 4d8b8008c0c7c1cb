r"""The last step of `make demo-lora`: writes docs/results/demo_lora.json from the run's outputs, then the docs.

  python scripts/record_demo_lora.py --demo_dir workdirs/demo --start_time 1764620000 [--end_time ...] \
      [--start_load 1.5]

Reads `<demo_dir>/lora_accuracy.json` (python -m eval.lora_accuracy), `<demo_dir>/lora_phases.txt` (the time of each
phase, written by the Makefile: the base model (trained when missing), the LoRA, the evaluation) and the last logged loss of
`<demo_dir>/lora/metrics.jsonl`; copies the comparison grid to docs/images/demo_lora_grid.png (its hash recorded).
The wall time is end - start (install and base demo included when they ran). Then runs scripts/make_docs.py and
prints the lora_accuracy line again as the last line.
"""

import argparse
import hashlib
import json
import os
import shutil
import time

import make_docs  # scripts/ is on sys.path when this runs as `python scripts/record_demo_lora.py`.
import record_demo

from diffusion import results
from diffusion.errors import UserError, user_errors_exit

GRID = os.path.join('docs', 'images', 'demo_lora_grid.png')


def lora_results(demo_dir: str, root: str, wall_time_s: float) -> dict:
  path = os.path.join(demo_dir, 'lora_accuracy.json')
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist: run make demo-lora first')
  with open(path) as f:
    accuracy = json.load(f)
  out = {
    'lora_accuracy': accuracy,
    'wall_time_s': wall_time_s,
    'phase_seconds': record_demo.phase_seconds(demo_dir, 'lora_phases.txt'),
    'final_loss': record_demo.last_value(os.path.join(demo_dir, 'lora', 'metrics.jsonl'), 'loss'),
  }
  if accuracy.get('grid') and os.path.exists(accuracy['grid']):
    target = os.path.join(root, GRID)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(accuracy['grid'], target)
    with open(target, 'rb') as f:
      out['grid_sha256'] = hashlib.sha256(f.read()).hexdigest()
  return out


@user_errors_exit
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--demo_dir', default=os.path.join('workdirs', 'demo'))
  parser.add_argument('--start_time', type=float, required=True, help='Unix time make demo-lora started')
  parser.add_argument('--end_time', type=float, default=None, help='Unix time it ended (default: now)')
  parser.add_argument('--start_load', default='', help='1-minute load average at the start')
  parser.add_argument('--root', default=make_docs.ROOT, help='repository root whose docs are updated')
  args = parser.parse_args()
  end = time.time() if args.end_time is None else args.end_time
  git = results.git_state()  # Before the grid is copied into docs/images: the tree the demo ran from.
  numbers = lora_results(args.demo_dir, args.root, end - args.start_time)
  results.write_record(
    'demo_lora',
    numbers,
    path=os.path.join(args.root, 'docs', 'results', 'demo_lora.json'),
    command='make demo-lora',
    settings={'demo_dir': args.demo_dir},
    load_at_start=float(args.start_load) if args.start_load else None,
    git=git,
  )
  if make_docs.main(['--root', args.root]) != 0:
    raise UserError('the docs could not be regenerated from the records')
  a = numbers['lora_accuracy']
  print(
    f'lora_accuracy new={a["new"]:.3f} base_new={a["base_new"]:.3f} old={a["old"]:.3f} '
    f'base_old={a["base_old"]:.3f} size_ratio={a["size_ratio"]:.4f}',
    flush=True,
  )


if __name__ == '__main__':
  main()
