"""Throughput and model-FLOPs utilisation (MFU): peak rates per device, FLOPs of a compiled step, the arithmetic.

Imports only jax (no data, logging or W&B stack), so the benchmark scripts can use it on a bare accelerator machine.

FLOPs come from XLA's cost analysis of the compiled program. For a program compiled on a mesh that is the
*per-device* program (the SPMD-partitioned module), so the per-device FLOPs divided by the step time against the
per-device peak is the MFU, whatever the mesh. XLA counts what it will execute: with `remat` the recomputed forward
pass is included, so the figure is then nearer hardware-FLOPs utilisation than model-FLOPs utilisation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Dense peak TFLOP/s of one device (one chip). `fp32` is the rate XLA's default float32 matmul precision
  reaches: TF32 tensor cores on NVIDIA Ampere/Hopper; None where the vendor publishes no float32 matmul rate."""

  name: str
  bf16: float
  fp32: float | None


# Dense (no structured sparsity) peak TFLOP/s per device, from the vendors' spec sheets:
#   Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): bf16 per chip.
#   NVIDIA A100 datasheet (SXM / PCIe): BF16 312, TF32 156 dense.
#   NVIDIA H100 datasheet: SXM BF16 989, TF32 495; PCIe BF16 756, TF32 378; NVL BF16 835, TF32 418 (dense = half of
#   the "with sparsity" figures printed there).
#   NVIDIA H200 datasheet (SXM): BF16 989, TF32 495 (same compute as H100 SXM, more and faster memory).
# Each pattern is matched (case-insensitively, first match wins) against `jax.Device.device_kind`, e.g.
# 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e), 'NVIDIA A100-SXM4-80GB',
# 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200'. More specific patterns come first.
PEAKS: tuple[tuple[str, DevicePeak], ...] = (
  (r'^tpu v4', DevicePeak('TPU v4', 275.0, None)),
  (r'^tpu v5 ?(lite|e\b)', DevicePeak('TPU v5e', 197.0, None)),
  (r'^tpu v5p?\b', DevicePeak('TPU v5p', 459.0, None)),
  (r'^tpu v6 ?(lite|e\b)', DevicePeak('TPU v6e', 918.0, None)),
  (r'a100', DevicePeak('A100', 312.0, 156.0)),
  (r'h100.*pcie', DevicePeak('H100 PCIe', 756.0, 378.0)),
  (r'h100.*nvl', DevicePeak('H100 NVL', 835.0, 418.0)),
  (r'h100', DevicePeak('H100 SXM', 989.0, 495.0)),
  (r'h200', DevicePeak('H200', 989.0, 495.0)),
)


def device_peak(device_kind: str) -> DevicePeak | None:
  """The peak rates of a device kind string (`jax.devices()[0].device_kind`); None if unknown (e.g. 'cpu')."""
  kind = device_kind.strip().lower()
  for pattern, peak in PEAKS:
    if re.search(pattern, kind):
      return peak
  return None


def peak_tflops(device_kind: str, dtype: Any = 'bfloat16') -> float | None:
  """Dense peak TFLOP/s of one device for matmuls computed in `dtype` (bfloat16 / float16 use the bf16 rate,
  float32 the default-precision float32 rate); None where unknown."""
  peak = device_peak(device_kind)
  if peak is None:
    return None
  name = getattr(dtype, '__name__', None) or str(dtype)
  name = name.rsplit('.', 1)[-1].lower()
  if name in ('bfloat16', 'float16', 'bf16', 'fp16'):
    return peak.bf16
  if name in ('float32', 'fp32'):
    return peak.fp32
  raise ValueError(f'no peak rate for compute dtype {dtype!r}; known: bfloat16, float16, float32')


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled program (`jax.jit(f).lower(...).compile()`), per device; None if XLA gives
  no count. Accepts the dict this jax returns and the list-of-dicts (one per module) older versions returned."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = float(cost.get('flops', 0.0))
  return flops if flops > 0 else None


def jit_flops(jitted: Any, *args: Any, **kwargs: Any) -> float | None:
  """Per-device FLOPs of `jitted(*args, **kwargs)` (a `jax.jit` function), from its compiled program.

  Lowering and compiling here fills the same caches the first real call uses, so the step is compiled once."""
  return compiled_flops(jitted.lower(*args, **kwargs).compile())


def throughput(
  step_time_s: float,
  global_batch: int,
  num_devices: int,
  flops_per_device: float | None = None,
  peak_tflops_per_device: float | None = None,
) -> dict[str, float]:
  """Step time, images/s (global and per device), achieved model TFLOP/s (per device and all devices together)
  and MFU (achieved per-device rate / per-device peak) of a step processing `global_batch` images.

  Keys without a value (no FLOP count, unknown peak) are left out rather than set to None, so the dict can go
  straight to a metric writer.
  """
  if step_time_s <= 0:
    raise ValueError(f'step_time_s must be positive, got {step_time_s}')
  if num_devices < 1 or global_batch < 1:
    raise ValueError(f'need num_devices >= 1 and global_batch >= 1, got {num_devices} and {global_batch}')
  out = {
    'step_time_s': step_time_s,
    'images_per_s': global_batch / step_time_s,
    'images_per_s_per_device': global_batch / step_time_s / num_devices,
  }
  if flops_per_device:
    per_device = flops_per_device / step_time_s / 1e12
    out['tflops_per_device'] = per_device
    out['tflops'] = per_device * num_devices
    if peak_tflops_per_device:
      out['mfu'] = per_device / peak_tflops_per_device
  return out


def local_device_kind() -> str:
  """`device_kind` of the first device (all devices of a job are one kind)."""
  return jax.devices()[0].device_kind


def compute_dtype(model_config: Any, train_config: Any) -> str:
  """The dtype a network's activations and matmuls run in during training: `train.compute_dtype` when set, else
  the model config's own `dtype`. The one owner of this choice: building the trained model and picking the MFU
  peak both ask here, so MFU is measured against the rate of the dtype the step really computes in."""
  override = train_config.get('compute_dtype', '') if train_config is not None else ''
  return str(override or model_config.get('dtype', 'float32'))


def trained_model_config(config: Any) -> Any:
  """Config of the network a training config trains: the U-Net for 'ldm', the VAE for 'vae'."""
  return config.model.unet if config.model_type == 'ldm' else config.model.vae


def config_peak_tflops(config: Any, device_kind: str | None = None) -> float | None:
  """Per-device peak TFLOP/s for the dtype a training config's step computes in, on this job's devices (None if
  unknown)."""
  dtype = compute_dtype(trained_model_config(config), config.get('train'))
  return peak_tflops(device_kind or local_device_kind(), dtype)
