"""Data-wait time in the training log: a slow input iterator shows up as a large data-wait fraction, a fast one as a
small one; images/s/device and the analytic MFU are on the progress line and in metrics.jsonl."""

import json
import re
import time

import jax
import ml_collections
import pytest

from diffusion import throughput
from diffusion.logging import MetricWriter


def _slow_batches(seconds: float):
  while True:
    time.sleep(seconds)
    yield {'x': 0}


def _run(tmp_path, input_s: float, step_s: float, steps: int = 6) -> dict:
  """A fake loop: `next` on a DataWait-wrapped iterator that takes `input_s`, a 'step' that takes `step_s`."""
  config = ml_collections.ConfigDict({'wandb': {'mode': 'disabled'}})
  writer = MetricWriter(str(tmp_path), config, total_steps=steps, batch_size=4)
  batches = throughput.DataWait(_slow_batches(input_s))
  writer.set_data_wait(batches)
  writer.set_step_flops(2e9, 100.0, 1e9)
  next(batches)  # Waits before start() (compile time, say) are not counted.
  writer.start(0)
  for step in range(1, steps + 1):
    next(batches)
    time.sleep(step_s)
  writer.write_scalars(steps, {'loss': 1.0})
  writer.close()
  return json.loads(open(tmp_path / 'metrics.jsonl').read().splitlines()[-1])


def test_slow_input_makes_the_data_wait_fraction_large(tmp_path, capsys):
  row = _run(tmp_path, input_s=0.03, step_s=0.002)
  assert row['data_wait_frac'] > 0.8
  assert row['data_wait_ms'] == pytest.approx(1e3 * row['data_wait_frac'] * row['step_time_s'], rel=1e-6)
  assert 28 <= row['data_wait_ms'] <= 1e3 * row['step_time_s']
  line = capsys.readouterr().out
  match = re.search(r'data_wait=([\d.]+)ms\((\d+)%\)', line)
  assert match and int(match.group(2)) >= 80, line


def test_fast_input_makes_the_data_wait_fraction_small(tmp_path):
  row = _run(tmp_path, input_s=0.0, step_s=0.03)
  assert row['data_wait_frac'] < 0.1
  assert row['data_wait_ms'] < 3


def test_progress_line_has_images_per_device_and_both_mfus(tmp_path, capsys):
  row = _run(tmp_path, input_s=0.0, step_s=0.01, steps=2)
  assert row['images_per_s_per_device'] == pytest.approx(row['images_per_s'] / jax.device_count())
  assert row['mfu_analytic'] == pytest.approx(row['mfu'] / 2)  # Analytic count 1e9 vs XLA's 2e9 per device.
  assert row['tflops_per_device_analytic'] == pytest.approx(1e9 / row['step_time_s'] / 1e12)
  line = capsys.readouterr().out
  for token in ('steps/s=', 'images/s=', 'images/s/device=', 'MFU=', 'MFU_analytic=', 'data_wait=', 'eta='):
    assert token in line, (token, line)


def test_data_wait_counts_only_the_time_inside_next():
  wait = throughput.DataWait(_slow_batches(0.02))
  next(wait)
  time.sleep(0.05)  # Not inside next: not a wait.
  next(wait)
  seconds = wait.take()
  assert 0.04 <= seconds < 0.07
  assert wait.take() == 0.0
