"""Throughput / MFU reporting: device-kind matching, the arithmetic, XLA's FLOP count, and the training log."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from diffusion import throughput
from diffusion.logging import MetricWriter
from support import ROOT, device_env


@pytest.mark.parametrize(
  'kind, name',
  [
    ('TPU v4', 'TPU v4'),
    ('TPU v5 lite', 'TPU v5e'),
    ('TPU v5e', 'TPU v5e'),
    ('TPU v5', 'TPU v5p'),
    ('TPU v5p', 'TPU v5p'),
    ('TPU v6 lite', 'TPU v6e'),
    ('TPU v6e', 'TPU v6e'),
    ('NVIDIA A100-SXM4-80GB', 'A100'),
    ('NVIDIA A100-PCIE-40GB', 'A100'),
    ('NVIDIA H100 80GB HBM3', 'H100 SXM'),
    ('NVIDIA H100 PCIe', 'H100 PCIe'),
    ('NVIDIA H100 NVL', 'H100 NVL'),
    ('NVIDIA H200', 'H200'),
  ],
)
def test_device_kinds_match_their_peak(kind, name):
  assert throughput.device_peak(kind).name == name


def test_unknown_devices_and_dtypes():
  assert throughput.device_peak('cpu') is None
  assert throughput.peak_tflops('cpu', 'bfloat16') is None
  assert throughput.peak_tflops('TPU v4', 'float32') is None  # No published float32 matmul rate.
  assert throughput.peak_tflops('NVIDIA H100 80GB HBM3', jnp.bfloat16) == 989.0
  assert throughput.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 495.0
  with pytest.raises(ValueError, match='int8'):
    throughput.peak_tflops('TPU v4', 'int8')


def _training_config(model_type: str, model_dtype: str, compute_dtype: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      'model_type': model_type,
      'train': {'compute_dtype': compute_dtype},
      'model': {'unet': {'dtype': model_dtype}, 'vae': {'dtype': 'float32'}},
    }
  )


@pytest.mark.parametrize(
  'model_dtype, compute_dtype, peak',
  [
    ('float32', 'bfloat16', 989.0),  # The step computes in bf16: the bf16 peak, not the TF32 one.
    ('float32', '', 495.0),
    ('bfloat16', '', 989.0),
    ('bfloat16', 'float32', 495.0),
  ],
)
def test_mfu_peak_follows_the_step_compute_dtype(model_dtype, compute_dtype, peak):
  config = _training_config('ldm', model_dtype, compute_dtype)
  assert throughput.config_peak_tflops(config, 'NVIDIA H100 80GB HBM3') == peak
  expected = compute_dtype or model_dtype
  assert throughput.compute_dtype(config.model.unet, config.train) == expected


def test_the_built_model_and_the_peak_share_one_dtype_rule():
  from diffusion.training.state import with_compute_dtype

  for model_dtype, compute_dtype in [('float32', 'bfloat16'), ('float32', ''), ('bfloat16', 'float32')]:
    config = _training_config('vae', 'float32', compute_dtype)
    config.model.vae.dtype = model_dtype
    built = with_compute_dtype(config.model.vae, config.train).dtype
    assert built == throughput.compute_dtype(config.model.vae, config.train) == (compute_dtype or model_dtype)
  # A VAE run's peak follows the VAE's dtype, not the U-Net's.
  assert throughput.config_peak_tflops(_training_config('vae', 'bfloat16', ''), 'NVIDIA H100 PCIe') == 378.0


def test_throughput_arithmetic():
  out = throughput.throughput(0.5, global_batch=64, num_devices=8, flops_per_device=2e14, peak_tflops_per_device=800)
  assert out['step_time_s'] == 0.5
  assert out['images_per_s'] == pytest.approx(128.0)
  assert out['images_per_s_per_device'] == pytest.approx(16.0)
  assert out['tflops_per_device'] == pytest.approx(400.0)
  assert out['tflops'] == pytest.approx(3200.0)
  assert out['mfu'] == pytest.approx(0.5)
  bare = throughput.throughput(0.25, global_batch=4, num_devices=1, flops_per_device=1e12)
  assert 'mfu' not in bare and bare['tflops'] == pytest.approx(4.0)
  assert set(throughput.throughput(1.0, 1, 1)) == {'step_time_s', 'images_per_s', 'images_per_s_per_device'}
  with pytest.raises(ValueError, match='step_time_s'):
    throughput.throughput(0.0, 1, 1)


def test_flops_of_a_matmul_and_of_old_style_cost_lists():
  m, k, n = 32, 48, 16
  f = jax.jit(lambda a, b: a @ b)
  flops = throughput.jit_flops(f, jnp.ones((m, k)), jnp.ones((k, n)))
  assert flops == 2 * m * k * n

  class Compiled:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost

  assert throughput.compiled_flops(Compiled([{'flops': 7.0}])) == 7.0
  assert throughput.compiled_flops(Compiled({'flops': 0.0})) is None
  assert throughput.compiled_flops(Compiled(None)) is None


def test_compiled_flops_are_per_device_on_a_mesh():
  code = (
    'import jax, jax.numpy as jnp\n'
    'from jax.sharding import NamedSharding, PartitionSpec as P\n'
    'from diffusion import throughput\n'
    'mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))\n'
    'x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("data")))\n'
    'w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P()))\n'
    'print(throughput.jit_flops(jax.jit(lambda x, w: x @ w), x, w))\n'
  )
  env = device_env(8)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert float(out.stdout.split()[-1]) == 2 * 64 * 32 * 16 / 8


def test_writer_logs_tflops_and_mfu(tmp_path, capsys):
  config = ml_collections.ConfigDict({'wandb': {'mode': 'disabled'}})
  writer = MetricWriter(str(tmp_path), config, total_steps=4, batch_size=6)
  writer.set_step_flops(3e12, 50.0)
  writer.start(0)
  time.sleep(0.05)
  writer.write_scalars(2, {'loss': 1.0})
  writer.close()
  row = json.loads(open(tmp_path / 'metrics.jsonl').read())
  assert row['step_time_s'] > 0 and row['images_per_s'] == pytest.approx(6 / row['step_time_s'])
  assert row['tflops'] == pytest.approx(3.0 / row['step_time_s'] * jax.device_count())
  assert row['mfu'] == pytest.approx(row['tflops_per_device'] / 50.0)
  line = capsys.readouterr().out
  assert 'TFLOP/s=' in line and 'MFU=' in line


def test_training_run_logs_throughput(ldm_workdir):
  rows = [json.loads(line) for line in open(os.path.join(ldm_workdir, 'metrics.jsonl'))]
  progress = [r for r in rows if 'loss' in r]
  assert progress
  for row in progress:
    for key in ('images_per_s', 'images_per_s_per_device', 'step_time_s', 'tflops', 'tflops_analytic'):
      assert row[key] > 0, (key, row)
    assert 0 <= row['data_wait_frac'] <= 1 and row['data_wait_ms'] >= 0
    assert row['tflops_analytic'] < row['tflops']  # XLA's count adds the frozen VAE encoder and elementwise ops.
    assert row['images_per_s'] == pytest.approx(row['images_per_s_per_device'] * jax.device_count())
    assert ('mfu' in row) == (throughput.peak_tflops(jax.devices()[0].device_kind, 'float32') is not None)
