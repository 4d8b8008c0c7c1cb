r"""Copies the numbers and the grid `make demo` produced into README.md (between the demo-results markers).

  python scripts/update_readme_results.py --demo_dir workdirs/demo [--wall_time "27 min"]

Nothing is typed in by hand: the table is rendered from `<demo_dir>/caption_accuracy.json` and the VAE/LDM
`metrics.jsonl`, and the grid is `<demo_dir>/samples/grid.png`.
"""

import argparse
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = '<!-- demo-results:start -->', '<!-- demo-results:end -->'


def last_value(metrics_path: str, key: str) -> float | None:
  value = None
  with open(metrics_path) as f:
    for line in f:
      row = json.loads(line)
      value = row.get(key, value)
  return value


def render(demo_dir: str, wall_time: str | None) -> str:
  acc = json.load(open(os.path.join(demo_dir, 'caption_accuracy.json')))
  psnr = last_value(os.path.join(demo_dir, 'vae', 'metrics.jsonl'), 'eval/psnr')
  val_loss = last_value(os.path.join(demo_dir, 'ldm', 'metrics.jsonl'), 'eval/val_loss')
  lines = [
      START,
      f'Measured by `make demo` on a 2-core CPU machine{f" ({wall_time})" if wall_time else ""}:',
      '',
      '| metric | value |',
      '|---|---|',
      f'| caption accuracy, guided (scale {acc["guidance_scale"]:g}) | {acc["guided"]:.3f} |',
      f'| caption accuracy, unguided (scale 1) | {acc["unguided"]:.3f} |',
      f'| caption accuracy, unconditional (empty prompt) | {acc["unconditional"]:.3f} |',
      f'| generated images vs shuffled prompts | {acc["generated_vs_shuffled_prompts"]:.3f} |',
      f'| oracle on held-out real / blurred images | {acc["oracle_real"]:.3f} / {acc["oracle_blurred"]:.3f} |',
      f'| oracle on real images vs shuffled captions | {acc["oracle_shuffled"]:.3f} |',
      f'| VAE held-out PSNR | {psnr:.2f} dB |',
      f'| LDM held-out loss | {val_loss:.4f} |',
      '',
      f'({acc["num_prompts"]} prompts x {acc["num_seeds"]} seeds, {acc["sampler"]} with {acc["num_steps"]} steps.)',
      '',
      '![samples](docs/images/demo_grid.png)',
      '',
      'One row per prompt: a red circle, a green square, a blue triangle, a yellow square, a magenta circle, '
      'a cyan triangle.',
      END,
  ]
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--demo_dir', default=os.path.join(ROOT, 'workdirs', 'demo'))
  parser.add_argument('--wall_time', default=None)
  args = parser.parse_args()
  os.makedirs(os.path.join(ROOT, 'docs', 'images'), exist_ok=True)
  shutil.copyfile(os.path.join(args.demo_dir, 'samples', 'grid.png'), os.path.join(ROOT, 'docs', 'images',
                                                                                   'demo_grid.png'))
  readme_path = os.path.join(ROOT, 'README.md')
  readme = open(readme_path).read()
  block = render(args.demo_dir, args.wall_time)
  if START in readme:
    readme = readme[:readme.index(START)] + block + readme[readme.index(END) + len(END):]
  else:
    readme = readme.replace('DEMO_RESULTS_PLACEHOLDER', block)
  with open(readme_path, 'w') as f:
    f.write(readme)
  print(block)


if __name__ == '__main__':
  main()
