"""make demo-lora's record: scripts/record_demo_lora.py writes docs/results/demo_lora.json and docs/lora.md's block."""

import json
import os
import shutil

import numpy as np
from PIL import Image

from support import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_lora_record_fills_the_lora_doc_block(tmp_path):
  root, demo = tmp_path / 'root', tmp_path / 'demo'
  for relpath in ('README.md', 'docs/BENCHMARKS.md', 'docs/vae.md', 'docs/lora.md'):
    os.makedirs(root / os.path.dirname(relpath), exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, relpath), root / relpath)
  shutil.copytree(os.path.join(ROOT, 'docs', 'results'), root / 'docs' / 'results')
  shutil.copytree(os.path.join(ROOT, 'docs', 'images'), root / 'docs' / 'images')
  (demo / 'lora' / 'eval').mkdir(parents=True)
  grid = demo / 'lora' / 'eval' / 'lora_grid.png'
  Image.fromarray(np.full((8, 16, 3), 120, np.uint8)).save(grid)
  accuracy = {
    'concept': 'cross', 'num_seeds': 32, 'num_new_prompts': 6, 'num_old_prompts': 18, 'new': 0.9062,
    'base_new': 0.0, 'old': 0.9705, 'base_old': 0.9844, 'sampler': 'ddim', 'num_steps': 25, 'guidance_scale': 3.0,
    'lora_bytes': 40960, 'base_bytes': 4 * 2**20, 'size_ratio': 40960 / 4 / 2**20, 'grid': str(grid),
  }  # fmt: skip
  (demo / 'lora_accuracy.json').write_text(json.dumps(accuracy))
  (demo / 'lora' / 'metrics.jsonl').write_text('{"step": 600, "loss": 0.05}\n')
  (demo / 'lora_phases.txt').write_text('1000 start\n1030 base\n1330 lora\n1450 lora_accuracy\n')
  args = ['--demo_dir', str(demo), '--start_time', '1000', '--end_time', '1460', '--root', str(root)]
  out = run_cli('scripts/record_demo_lora.py', *args, timeout=120)
  assert out.returncode == 0, out.stderr
  last = 'lora_accuracy new=0.906 base_new=0.000 old=0.971 base_old=0.984 size_ratio=0.0098'
  assert out.stdout.strip().splitlines()[-1] == last
  record = json.loads((root / 'docs' / 'results' / 'demo_lora.json').read_text())
  assert record['command'] == 'make demo-lora' and record['results']['phase_seconds'] == {
    'base': 30, 'lora': 300, 'lora_accuracy': 120
  }  # fmt: skip
  doc = (root / 'docs' / 'lora.md').read_text()
  block = doc.split('<!-- results:demo_lora -->')[1].split('<!-- /results:demo_lora -->')[0]
  for text in ('7.7 min', '| 0.906 | 0.000 |', '| 0.971 | 0.984 |', 'size_ratio 0.0098', 'lora 5.0', 'demo_lora.json'):
    assert text in block, (text, block)
  assert (root / 'docs' / 'images' / 'demo_lora_grid.png').read_bytes() == grid.read_bytes()
  assert run_cli('scripts/make_docs.py', '--check', '--root', str(root)).returncode == 0
  Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(root / 'docs' / 'images' / 'demo_lora_grid.png')
  out = run_cli('scripts/make_docs.py', '--check', '--root', str(root))
  assert out.returncode == 1 and 'demo_lora_grid.png' in out.stderr
