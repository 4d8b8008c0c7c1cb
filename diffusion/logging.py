"""Metric writers: a progress line on the console, `metrics.jsonl` in the workdir, and W&B.

Only process 0 writes. W&B runs offline by default (`config.wandb.mode`), writing under `<workdir>/wandb`, so runs on
machines without network are synced later with `wandb sync`.
"""

import json
import os
import secrets
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from diffusion.images import save_png


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricWriter:
  """Writes scalars to the console, `<workdir>/metrics.jsonl` and W&B; images to W&B and `<workdir>/samples`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, total_steps: int, batch_size: int):
    self.workdir = workdir
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.is_lead = jax.process_index() == 0
    self._wandb = None
    self._last_time, self._last_step = None, None
    self._flops_per_device, self._peak_tflops, self._num_devices = None, None, jax.device_count()
    self._analytic_flops, self._data_wait = None, None
    if self.is_lead:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._wandb = _init_wandb(workdir, config)

  def start(self, step: int) -> None:
    """Starts a timed interval at `step` (after compiling, checkpointing or evaluating: not counted)."""
    self._last_time, self._last_step = time.perf_counter(), step
    if self._data_wait is not None:
      self._data_wait.take()

  def set_step_flops(
    self,
    flops_per_device: float | None,
    peak_tflops_per_device: float | None,
    analytic_flops_per_device: float | None = None,
  ) -> None:
    """FLOPs of one train step per device (XLA's count, and the analytic model count where the task has one) and
    the device's peak rate, for TFLOP/s and MFU."""
    self._flops_per_device, self._peak_tflops = flops_per_device, peak_tflops_per_device
    self._analytic_flops = analytic_flops_per_device

  def set_data_wait(self, source: Any) -> None:
    """Where the input wait comes from: an object whose `take()` returns the seconds the loop was blocked on its
    input since the last call (`throughput.DataWait`); logged per interval as `data_wait_ms` (per step) and
    `data_wait_frac` (of the interval's wall time)."""
    self._data_wait = source

  def write_scalars(self, step: int, scalars: Mapping[str, Any], progress: bool = True) -> None:
    """Logs one step's scalars; with `progress`, adds and prints steps/s, images/s, TFLOP/s, MFU and ETA."""
    if not self.is_lead:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if progress and self._last_time is not None and step > self._last_step:
      now = time.perf_counter()
      steps, elapsed = step - self._last_step, now - self._last_time
      speed = self._throughput(steps / elapsed)
      if self._data_wait is not None:
        wait = self._data_wait.take()
        speed.update(data_wait_ms=1e3 * wait / steps, data_wait_frac=min(wait / elapsed, 1.0))
      self._last_time, self._last_step = now, step
      print(self._progress_line(step, scalars, speed), flush=True)
      scalars.update(speed)
    elif scalars:
      print(f'step {step} ' + ' '.join(f'{k}={v:.4g}' for k, v in scalars.items()), flush=True)
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def _throughput(self, steps_per_sec: float) -> dict[str, float]:
    from diffusion.throughput import throughput

    speed = throughput(
      1.0 / steps_per_sec,
      self.batch_size,
      self._num_devices,
      self._flops_per_device,
      self._peak_tflops,
      self._analytic_flops,
    )
    return {'steps_per_sec': steps_per_sec, 'images_per_sec': speed['images_per_s'], **speed}

  def _progress_line(self, step: int, scalars: Mapping[str, float], speed: Mapping[str, float]) -> str:
    """`step N/T <scalars> steps/s=.. images/s=.. images/s/device=.. [TFLOP/s=.. MFU=..% MFU_analytic=..%]
    [data_wait=..ms(..%)] eta=..`."""
    steps_per_sec = speed['steps_per_sec']
    eta = _format_eta((self.total_steps - step) / max(steps_per_sec, 1e-9))
    shown = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    rate = f' images/s/device={speed["images_per_s_per_device"]:.3g}'
    rate += f' TFLOP/s={speed["tflops"]:.3g}' if 'tflops' in speed else ''
    rate += f' MFU={100 * speed["mfu"]:.1f}%' if 'mfu' in speed else ''
    rate += f' MFU_analytic={100 * speed["mfu_analytic"]:.1f}%' if 'mfu_analytic' in speed else ''
    if 'data_wait_ms' in speed:
      rate += f' data_wait={speed["data_wait_ms"]:.3g}ms({100 * speed["data_wait_frac"]:.0f}%)'
    return (
      f'step {step}/{self.total_steps} {shown} steps/s={steps_per_sec:.2f} images/s={speed["images_per_s"]:.1f}'
      f'{rate} eta={eta}'
    )

  def write_images(self, step: int, name: str, grid: np.ndarray, caption: str = '') -> str | None:
    """Saves a uint8 grid as `<workdir>/samples/<name>_<step>.png` and logs it to W&B."""
    if not self.is_lead:
      return None
    directory = os.path.join(self.workdir, 'samples')
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f'{name}_{step:07d}.png')
    save_png(grid, path)
    if self._wandb is not None:
      import wandb

      self._wandb.log({name: wandb.Image(path, caption=caption)}, step=step)
    return path

  def close(self) -> None:
    if self.is_lead:
      self._jsonl.close()
      if self._wandb is not None:
        self._wandb.finish()
        self._wandb = None


def _init_wandb(workdir: str, config: ml_collections.ConfigDict):
  if config.wandb.mode == 'disabled':
    return None
  import wandb

  os.environ.setdefault('WANDB_SILENT', 'true')
  tags: Sequence[str] = [t for t in config.wandb.tags.split(',') if t]
  run_id_file = os.path.join(workdir, 'wandb_run_id')
  if os.environ.get('WANDB_RUN_ID'):  # Set by `wandb agent` for sweep runs.
    run_id = os.environ['WANDB_RUN_ID']
  elif os.path.exists(run_id_file):  # A resumed run continues its W&B run.
    run_id = open(run_id_file).read().strip()
  else:
    run_id = secrets.token_hex(4)
  with open(run_id_file, 'w') as f:
    f.write(run_id)
  try:
    return wandb.init(
      project=config.wandb.project,
      entity=config.wandb.entity or None,
      name=config.wandb.name or None,
      group=config.wandb.group or None,
      tags=tags,
      mode=config.wandb.mode,
      dir=workdir,
      config=config.to_dict(),
      id=run_id,
      resume='allow',
    )
  except Exception as e:  # W&B must never stop a training run.
    print(f'warning: W&B could not start ({e}); continuing without it', file=sys.stderr)
    return None
