"""The docs' numbers come from the committed records: scripts/make_docs.py reproduces the docs, and the demo's
record step (scripts/record_demo.py) turns a demo directory into a record and a README block."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from support import ROOT, run_cli

DOCS = (
  'README.md',
  os.path.join('docs', 'BENCHMARKS.md'),
  os.path.join('docs', 'vae.md'),
  os.path.join('docs', 'lora.md'),
)


def test_committed_docs_equal_what_the_records_give():
  out = run_cli('scripts/make_docs.py', '--check', timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def doc_root(tmp_path):
  """A copy of the docs and records, so the scripts can rewrite them."""
  for relpath in DOCS:
    os.makedirs(tmp_path / os.path.dirname(relpath), exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, relpath), tmp_path / relpath)
  results = os.path.join(ROOT, 'docs', 'results')
  if os.path.isdir(results):
    shutil.copytree(results, tmp_path / 'docs' / 'results')
  (tmp_path / 'docs' / 'results').mkdir(exist_ok=True)
  images = os.path.join(ROOT, 'docs', 'images')  # The demo record names its grid image there.
  if os.path.isdir(images):
    shutil.copytree(images, tmp_path / 'docs' / 'images')
  return tmp_path


def _fake_demo(directory):
  accuracy = {
    'num_prompts': 18,
    'num_seeds': 8,
    'guidance_scale': 3.0,
    'sampler': 'ddim',
    'num_steps': 25,
    'guided': 0.8403,
    'unguided': 0.7222,
    'unconditional': 0.0764,
    'generated_vs_shuffled_prompts': 0.0139,
    'oracle_real': 1.0,
    'oracle_blurred': 1.0,
    'oracle_shuffled': 0.0833,
    'seconds': 12.0,
  }
  (directory / 'vae').mkdir(parents=True)
  (directory / 'ldm').mkdir()
  (directory / 'samples').mkdir()
  (directory / 'caption_accuracy.json').write_text(json.dumps(accuracy))
  (directory / 'vae' / 'metrics.jsonl').write_text(
    '{"step": 10, "eval/psnr": 20.5}\n{"step": 20, "loss": 0.1}\n{"step": 20, "eval/psnr": 31.25}\n'
  )
  (directory / 'ldm' / 'metrics.jsonl').write_text('{"step": 30, "eval/val_loss": 0.02551}\n')
  (directory / 'samples' / 'settings.json').write_text(json.dumps({'prompts': ['a red circle', 'a blue square']}))
  Image.fromarray(np.full((8, 16, 3), 200, np.uint8)).save(directory / 'samples' / 'grid.png')
  (directory / 'phases.txt').write_text('1000 start\n1090 install\n1390 vae\n2830 ldm\n')


def test_demo_record_fills_the_readme_block(doc_root, tmp_path_factory):
  demo = tmp_path_factory.mktemp('demo')
  _fake_demo(demo)
  out = run_cli(
    'scripts/record_demo.py',
    '--demo_dir',
    str(demo),
    '--start_time',
    '1000',
    '--end_time',
    '2830',
    '--start_load',
    '1.5',
    '--root',
    str(doc_root),
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == 'caption_accuracy guided=0.840 unguided=0.722 unconditional=0.076'
  record = json.loads((doc_root / 'docs' / 'results' / 'demo.json').read_text())
  assert record['command'] == 'make demo' and record['load_average']['start'] == 1.5
  assert record['results']['wall_time_s'] == 1830 and record['results']['vae_psnr'] == 31.25
  assert record['results']['phase_seconds'] == {'install': 90, 'vae': 300, 'ldm': 1440}
  assert len(record['git']['commit']) == 40 and 'jax' in record['packages']
  assert record['machine']['device_count'] >= 1 and record['machine']['cpu_count'] >= 1
  readme = (doc_root / 'README.md').read_text()
  block = readme.split('<!-- demo-results:start -->')[1].split('<!-- demo-results:end -->')[0]
  for text in (
    '30.5 min',
    '| 0.840 |',
    '| 0.722 |',
    '| 0.076 |',
    '31.25 dB',
    '0.0255',
    'docs/results/demo.json',
    'a red circle, a blue square',
    '![samples](docs/images/demo_grid.png)',
    'Minutes per phase: install 1.5, vae 5.0, ldm 24.0.',
  ):
    assert text in block, (text, block)
  assert (doc_root / 'docs' / 'images' / 'demo_grid.png').read_bytes() == (demo / 'samples' / 'grid.png').read_bytes()
  assert run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root)).returncode == 0
  # A grid that is not the recorded one, or a hand-edited number, fails the check.
  Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(doc_root / 'docs' / 'images' / 'demo_grid.png')
  out = run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root))
  assert out.returncode == 1 and 'demo_grid.png' in out.stderr


def test_a_hand_edited_number_fails_the_check_and_regeneration_restores_it(doc_root):
  record = {
    'name': 'bench_fid',
    'created_utc': '2026-01-01T00:00:00Z',
    'command': 'python scripts/bench_fid.py',
    'git': {'commit': 'a' * 40, 'dirty': False},
    'packages': {'jax': '0.10.2', 'torch': '2.14.1'},
    'machine': {'device_kind': 'cpu', 'device_count': 1, 'jax_backend': 'cpu', 'cpu_count': 2},
    'load_average': {'start': 2.0, 'end': 3.0},
    'settings': {'batch_size': 25, 'batches': 3, 'image_size': 64},
    'torch_device': 'cpu',
    'torch_threads': 2,
    'results': {'pytorch_fid_images_per_s': 1.74, 'ours_images_per_s': 1.53, 'time_ratio_ours_over_pytorch_fid': 1.137},
  }
  (doc_root / 'docs' / 'results' / 'bench_fid.json').write_text(json.dumps(record))
  assert run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root)).returncode == 1
  assert run_cli('scripts/make_docs.py', '--root', str(doc_root)).returncode == 0
  text = (doc_root / 'docs' / 'BENCHMARKS.md').read_text()
  assert '| 1.74 images/s | 1.53 images/s | 1.14 |' in text and 'load average 2.0 at the start and 3.0' in text
  (doc_root / 'docs' / 'BENCHMARKS.md').write_text(text.replace('1.53 images/s', '1.93 images/s'))
  out = run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root))
  assert out.returncode == 1 and 'BENCHMARKS.md' in out.stderr


def test_the_vae_loss_ablation_block_shows_every_variant_and_which_weights_scored_them(doc_root):
  rows = [
    {
      'variant': v,
      'steps': 40,
      'psnr': p,
      'ssim': q,
      'lpips_random_weights': l,
      'rfid_random_inception': f,
    }
    for v, p, q, l, f in (
      ('l1_kl', 24.125, 0.8512, 0.2113, 31.7),
      ('l1_kl_lpips', 23.5, 0.8401, 0.1502, 22.4),
      ('l1_kl_lpips_gan', 23.25, 0.8333, 0.1555, 20.1),
    )
  ]
  weights = {
    'lpips': 'LPIPS-alex (backbone: random, heads: random)',
    'inception': 'random, BatchNorm calibrated on up to 64 held-out images',
  }
  record = {
    'name': 'vae_loss_ablation',
    'created_utc': '2026-01-01T00:00:00Z',
    'command': 'python scripts/ablate_vae_losses.py --steps 40',
    'git': {'commit': 'b' * 40, 'dirty': False},
    'packages': {'jax': '0.10.2'},
    'machine': {'device_kind': 'cpu', 'device_count': 1, 'jax_backend': 'cpu', 'cpu_count': 2},
    'load_average': {'start': 1.0, 'end': 2.0},
    'settings': {},
    'results': {
      'rows': rows,
      'weights': weights,
      'num_eval': 64,
      'lpips_net': 'alex',
      'disc': {'num_layers': 3, 'channels': 16, 'disc_start': 20},
    },
  }
  (doc_root / 'docs' / 'results' / 'vae_loss_ablation.json').write_text(json.dumps(record))
  assert run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root)).returncode == 1
  assert run_cli('scripts/make_docs.py', '--root', str(doc_root)).returncode == 0
  text = (doc_root / 'docs' / 'vae.md').read_text()
  block = text.split('<!-- results:vae_loss_ablation -->')[1].split('<!-- /results:vae_loss_ablation -->')[0]
  for line in (
    '| variant | PSNR (dB) | SSIM | LPIPS-alex (random weights) | rFID (random Inception) | steps |',
    '| L1 + KL (`l1_kl`) | 24.12 | 0.851 | 0.211 | 31.7 | 40 |',
    '| + LPIPS (`l1_kl_lpips`) | 23.50 | 0.840 | 0.15 | 22.4 | 40 |',
    '| + LPIPS + PatchGAN (`l1_kl_lpips_gan`) | 23.25 | 0.833 | 0.155 | 20.1 | 40 |',
    'LPIPS-alex (backbone: random, heads: random) (RANDOM: not the trained LPIPS network)',
    'random, BatchNorm calibrated on up to 64 held-out images (RANDOM: not the trained pytorch-fid network)',
    'metrics of 64 held-out images',
    'The PatchGAN: 3 layers, 16 base channels, from step 20.',
    '[`docs/results/vae_loss_ablation.json`](results/vae_loss_ablation.json)',
  ):
    assert line in block, (line, block)
  assert run_cli('scripts/make_docs.py', '--check', '--root', str(doc_root)).returncode == 0
