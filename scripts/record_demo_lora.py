r"""The last step of `make demo-lora`: writes docs/results/demo_lora.json from the run's outputs, then the docs.

  python scripts/record_demo_lora.py --demo_dir workdirs/demo --start_time 1764620000 [--end_time ...] \
      [--start_load 1.5]

Reads `<demo_dir>/lora_accuracy.json` (python -m eval.lora_accuracy), `<demo_dir>/lora_phases.txt` (the time of
each phase, written by the Makefile: the base model (trained when missing), the LoRA, the evaluation) and the last
logged loss of `<demo_dir>/lora/metrics.jsonl`; copies the comparison grid to docs/images/demo_lora_grid.png (its
hash recorded). The wall time is end - start (install and base demo included when they ran). Then runs
scripts/make_docs.py and prints the lora_accuracy line again as the last line.
"""

import json
import os

import record_demo

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
    out['grid_sha256'] = record_demo.copy_grid(accuracy['grid'], root, GRID)
  return out


@user_errors_exit
def main() -> None:
  args = record_demo.parse_demo_args(__doc__.splitlines()[0], 'make demo-lora')
  numbers = record_demo.write_demo_record('demo_lora', args, lora_results)
  a = numbers['lora_accuracy']
  print(
    f'lora_accuracy new={a["new"]:.3f} base_new={a["base_new"]:.3f} old={a["old"]:.3f} '
    f'base_old={a["base_old"]:.3f} size_ratio={a["size_ratio"]:.4f}',
    flush=True,
  )


if __name__ == '__main__':
  main()
