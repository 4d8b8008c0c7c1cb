r"""The last step of `make demo`: writes docs/results/demo.json from the demo run's outputs, then the README block.

  python scripts/record_demo.py --demo_dir workdirs/demo --start_time 1764620000 [--end_time 1764621800] \
      [--start_load 1.5]

Reads `<demo_dir>/caption_accuracy.json`, the last `eval/psnr` of `<demo_dir>/vae/metrics.jsonl` and the last
`eval/val_loss` of `<demo_dir>/ldm/metrics.jsonl`; copies `<demo_dir>/samples/grid.png` (and its prompts, from
`samples/settings.json`) to docs/images/demo_grid.png; the wall time is end - start (Unix seconds, taken by the
Makefile target; end defaults to now), and `<demo_dir>/phases.txt` (written by the Makefile) gives each phase's
time. Then runs scripts/make_docs.py, so the README shows what the record holds, and prints the caption-accuracy
line again as the last line.
"""

import argparse
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import make_docs  # scripts/ is on sys.path when this runs as `python scripts/record_demo.py`.

from diffusion import results
from diffusion.errors import UserError, user_errors_exit


def last_value(metrics_path: str, key: str) -> float | None:
  """The last logged value of `key` in a metrics.jsonl (None if never logged or no file)."""
  if not os.path.exists(metrics_path):
    return None
  value = None
  with open(metrics_path) as f:
    for line in f:
      if line.strip():
        value = json.loads(line).get(key, value)
  return value


def grid_prompts(samples_dir: str) -> list[str]:
  """The prompts of the sample grid's rows, from sample.py's settings.json (empty if it has none)."""
  path = os.path.join(samples_dir, 'settings.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    settings = json.load(f)
  prompts = settings.get('prompts') or settings.get('prompt') or []
  return list(prompts)


def phase_seconds(demo_dir: str, name: str = 'phases.txt') -> dict[str, float]:
  """Seconds of each demo phase, from the "<unix time> <phase>" lines the Makefile appends to `name` when each
  phase ends (the first line is the start); empty without the file."""
  path = os.path.join(demo_dir, name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    marks = [(float(t), name) for t, name in (line.split(maxsplit=1) for line in f if line.strip())]
  return {name.strip(): t - prev for (prev, _), (t, name) in zip(marks, marks[1:])}


def demo_results(demo_dir: str, root: str, wall_time_s: float) -> dict:
  """The numbers of one demo run, with the grid copied into the docs and its hash recorded."""
  accuracy_path = os.path.join(demo_dir, 'caption_accuracy.json')
  if not os.path.exists(accuracy_path):
    raise UserError(f'{accuracy_path} does not exist: run the demo (make demo) first')
  with open(accuracy_path) as f:
    accuracy = json.load(f)
  out = {
    'caption_accuracy': accuracy,
    'wall_time_s': wall_time_s,
    'phase_seconds': phase_seconds(demo_dir),
    'vae_psnr': last_value(os.path.join(demo_dir, 'vae', 'metrics.jsonl'), 'eval/psnr'),
    'ldm_val_loss': last_value(os.path.join(demo_dir, 'ldm', 'metrics.jsonl'), 'eval/val_loss'),
  }
  grid = os.path.join(demo_dir, 'samples', 'grid.png')
  if os.path.exists(grid):
    out['grid_sha256'] = copy_grid(grid, root, make_docs.DEMO_GRID)
    out['grid_prompts'] = grid_prompts(os.path.dirname(grid))
  return out


def copy_grid(source: str, root: str, relpath: str) -> str:
  """Copies a demo's grid image to `root/relpath` (docs/images) and returns its sha256, which the record keeps."""
  target = os.path.join(root, relpath)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copyfile(source, target)
  with open(target, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def parse_demo_args(description: str, command: str) -> argparse.Namespace:
  """The flags every demo's record step takes (the Makefile passes the times and the load)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--demo_dir', default=os.path.join('workdirs', 'demo'))
  parser.add_argument('--start_time', type=float, required=True, help='Unix time the demo started')
  parser.add_argument('--end_time', type=float, default=None, help='Unix time the demo ended (default: now)')
  parser.add_argument('--start_load', default='', help='1-minute load average when the demo started')
  parser.add_argument('--command', default=command, help='the command the record names')
  parser.add_argument('--root', default=make_docs.ROOT, help='repository root whose docs are updated')
  return parser.parse_args()


def write_demo_record(name: str, args: argparse.Namespace, numbers_of: Callable[[str, str, float], dict]) -> dict:
  """Writes docs/results/<name>.json from `numbers_of(demo_dir, root, wall_time_s)` and regenerates the docs."""
  end = time.time() if args.end_time is None else args.end_time
  if end < args.start_time:
    raise UserError(f'--end_time {end} is before --start_time {args.start_time}')
  git = results.git_state()  # Before the grid is copied into docs/images: the tree the demo ran from.
  numbers = numbers_of(args.demo_dir, args.root, end - args.start_time)
  results.write_record(
    name,
    numbers,
    path=os.path.join(args.root, 'docs', 'results', f'{name}.json'),
    command=args.command,
    settings={'demo_dir': args.demo_dir},
    load_at_start=float(args.start_load) if args.start_load else None,
    git=git,
  )
  if make_docs.main(['--root', args.root]) != 0:
    raise UserError('the docs could not be regenerated from the records')
  return numbers


@user_errors_exit
def main() -> None:
  numbers = write_demo_record('demo', parse_demo_args(__doc__.splitlines()[0], 'make demo'), demo_results)
  acc = numbers['caption_accuracy']
  print(
    f'caption_accuracy guided={acc["guided"]:.3f} unguided={acc["unguided"]:.3f} '
    f'unconditional={acc["unconditional"]:.3f}',
    flush=True,
  )


if __name__ == '__main__':
  main()
