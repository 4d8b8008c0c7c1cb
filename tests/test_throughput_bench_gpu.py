"""scripts/bench_gpu.py: runs on a bare accelerator machine (no ml_collections / grain / wandb / diffusers needed to
import it; without diffusers the PyTorch side is one skipped line), its ours/PyTorch ratios, and its docs table."""

import json
import os
import subprocess
import sys

import pytest

from support import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import bench_gpu  # noqa: E402
import make_docs  # noqa: E402

_BARE = """
import importlib.abc, sys, types
BLOCKED = ('ml_collections', 'grain', 'wandb', 'tensorflow', 'tensorflow_datasets', 'diffusers', 'transformers')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, 'scripts')
import bench_gpu
unet = bench_gpu._unet_class()
args = types.SimpleNamespace(arch=bench_gpu.TINY, latent=16, dtype='float32', torch_compile=False)
print(unet.__name__, bench_gpu.torch_worker(args)['skipped'])
print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))
"""


def test_imports_on_a_bare_machine_and_skips_pytorch_without_diffusers():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-c', _BARE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  first, loaded = out.stdout.strip().splitlines()[-2:]
  assert first.startswith('UNet2DConditionModel diffusers PyTorch side skipped')
  assert loaded == '[]'


def _setting(side: str, attention: str, train_s: float, sample_s: float) -> dict:
  speed = lambda s: {'seconds': s, 'images_per_s': 8 / s, 'mfu_analytic': 0.1, 'peak_memory_gib': 3.0}
  return {'side': side, 'attention': attention, 'train': speed(train_s), 'sample': speed(sample_s)}


def test_rows_carry_the_time_ratio_to_pytorch_and_render():
  args = bench_gpu.argparse.Namespace(batch=8, sample_batch=8, latent=64, sample_steps=50)
  settings = [
    _setting('torch', 'sdpa', 0.2, 4.0),
    _setting('ours', 'xla', 0.3, 2.0),
    {'side': 'ours', 'attention': 'cudnn', 'error': 'timed out after 200 s'},
  ]
  rows = bench_gpu.rows_of(settings, args)
  assert [(r['what'], r['impl']) for r in rows] == [
    ('train_step', 'diffusers PyTorch, sdpa'),
    ('ddim_50_cfg', 'diffusers PyTorch, sdpa'),
    ('train_step', 'ours, attention xla'),
    ('ddim_50_cfg', 'ours, attention xla'),
  ]
  assert 'time_ours_over_torch' not in rows[0]
  assert rows[2]['time_ours_over_torch'] == pytest.approx(1.5) and rows[3]['time_ours_over_torch'] == 0.5
  record = {
    'settings': {'dtype': 'bfloat16'},
    'device_kinds': ['NVIDIA H200'],
    'peak_tflops': 989.0,
    'analytic_forward_tflop_per_image': 0.803,
    'not_measured': {'ours:cudnn': 'timed out after 200 s'},
    'results': rows,
  }
  text = '\n'.join(make_docs.render_bench_gpu(record))
  assert '| train_step (512 px) | ours, attention xla | 8 | 300.0 ms | 26.7 | 10.0% | - | 3.0 GiB | 1.50 |' in text
  assert 'Not measured: ours:cudnn (timed out after 200 s).' in text


def test_the_committed_tiny_record_renders():
  path = os.path.join(ROOT, 'docs', 'results', 'bench_gpu_tiny.json')
  assert os.path.exists(path), 'docs/results/bench_gpu_tiny.json: run python scripts/bench_gpu.py --tiny'
  record = json.load(open(path))
  text = '\n'.join(make_docs.render_bench_gpu(record))
  assert record['results'] and all(r['seconds'] > 0 for r in record['results'])
  assert text.count('| train_step') == len({r['impl'] for r in record['results']})
