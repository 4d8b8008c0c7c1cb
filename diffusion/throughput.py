"""Throughput and model-FLOPs utilisation (MFU): peak rates per device, FLOPs of a compiled step, the arithmetic.

Imports only jax (no data, logging or W&B stack), so the benchmark scripts can use it on a bare accelerator machine.

FLOPs come from XLA's cost analysis of the compiled program. For a program compiled on a mesh that is the
*per-device* program (the SPMD-partitioned module), so the per-device FLOPs divided by the step time against the
per-device peak is the MFU, whatever the mesh. XLA counts what it will execute: with `remat` the recomputed forward
pass is included, so the figure is then nearer hardware-FLOPs utilisation than model-FLOPs utilisation.

The analytic count (`unet_forward_flops`, `unet_train_step_flops`) is the model-FLOPs figure: the U-Net's convs,
linears and attention matmuls from its config alone (no compile, no remat recompute), so MFU from it compares across
implementations and remat settings. `DataWait` times the host's wait on the input iterator, for the progress line.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
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
  analytic_flops_per_device: float | None = None,
) -> dict[str, float]:
  """Step time, images/s (global and per device), achieved model TFLOP/s (per device and all devices together)
  and MFU (achieved per-device rate / per-device peak) of a step processing `global_batch` images.

  `flops_per_device` is XLA's count (`tflops*`, `mfu`); `analytic_flops_per_device` the analytic model count
  (`tflops*_analytic`, `mfu_analytic`). Keys without a value (no FLOP count, unknown peak) are left out rather than
  set to None, so the dict can go straight to a metric writer.
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
  for suffix, flops in (('', flops_per_device), ('_analytic', analytic_flops_per_device)):
    if flops:
      per_device = flops / step_time_s / 1e12
      out[f'tflops_per_device{suffix}'] = per_device
      out[f'tflops{suffix}'] = per_device * num_devices
      if peak_tflops_per_device:
        out[f'mfu{suffix}'] = per_device / peak_tflops_per_device
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


def _arch_get(arch: Any) -> Any:
  """A `get(name, default)` over a U-Net config: a mapping / ConfigDict, or a module (a dataclass) itself."""
  if dataclasses.is_dataclass(arch):
    return lambda name, default=None: getattr(arch, name, default)
  return lambda name, default=None: arch.get(name, default)


def _per_level(value: Any, n: int) -> tuple:
  return (value,) * n if value is None or isinstance(value, int) else tuple(value)


def _conv_taps(size: int, kernel: int, stride: int, valid_only: bool) -> int:
  """Kernel taps summed over the output positions of one spatial axis ('same' padding, kernel // 2 each side, as
  the U-Net's convs); with `valid_only`, only the taps that fall inside the input (not on the zero padding)."""
  pad = kernel // 2
  out = (size + 2 * pad - kernel) // stride + 1
  if not valid_only:
    return out * kernel
  return sum(1 for i in range(out) for k in range(kernel) if 0 <= stride * i + k - pad < size)


def conv_flops(
  kernel: int, c_in: int, c_out: int, height: int, width: int, stride: int = 1, valid_taps: bool = False
) -> float:
  """FLOPs of one 'same'-padded conv on a (height, width, c_in) input: 2 * taps * c_in * c_out, taps = kernel^2 per
  output position (or, with `valid_taps`, only those inside the input, as XLA's cost analysis counts)."""
  taps = _conv_taps(height, kernel, stride, valid_taps) * _conv_taps(width, kernel, stride, valid_taps)
  return 2.0 * taps * c_in * c_out


def linear_flops(d_in: int, d_out: int, tokens: int = 1) -> float:
  """FLOPs of a dense layer applied to `tokens` vectors: 2 * tokens * d_in * d_out (the bias add not counted)."""
  return 2.0 * tokens * d_in * d_out


class _FlopCount:
  """Accumulates FLOPs (2 per multiply-add) per (level, kind); kind is 'conv', 'linear' or 'attention'."""

  def __init__(self, batch: int, context_length: int, context_dim: int, valid_taps: bool):
    self.batch, self.context_length, self.context_dim = batch, context_length, context_dim
    self.valid_taps = valid_taps
    self.parts: dict[tuple[str, str], float] = {}

  def add(self, level: str, kind: str, flops: float) -> None:
    self.parts[level, kind] = self.parts.get((level, kind), 0.0) + self.batch * flops

  def conv(self, level: str, kernel: int, c_in: int, c_out: int, hw: tuple[int, int], stride: int = 1) -> None:
    """A conv on an (h, w) input (output (h, w), or (h / 2, w / 2) with stride 2)."""
    self.add(level, 'conv', conv_flops(kernel, c_in, c_out, *hw, stride=stride, valid_taps=self.valid_taps))

  def resnet(self, level: str, c_in: int, c_out: int, hw: tuple[int, int], temb_dim: int) -> int:
    self.conv(level, 3, c_in, c_out, hw)
    self.conv(level, 3, c_out, c_out, hw)
    if c_in != c_out:
      self.conv(level, 1, c_in, c_out, hw)  # conv_shortcut
    self.add(level, 'linear', linear_flops(temb_dim, c_out))  # time_emb_proj, once per image
    return c_out

  def transformer(self, level: str, channels: int, heads: int, pixels: int, layers: int) -> None:
    """Spatial transformer: proj_in/out (1x1 conv or linear: the same count), per block self-attention,
    cross-attention over the context and the GEGLU feed-forward."""
    inner = heads * (channels // heads)
    n, length, dim = pixels, self.context_length, self.context_dim
    self.add(level, 'linear', 2.0 * n * channels * inner * 2)  # proj_in, proj_out
    for _ in range(layers):
      self.add(level, 'linear', 2.0 * n * inner * inner * 4)  # attn1: to_q, to_k, to_v, to_out_0
      self.add(level, 'attention', 2.0 * n * n * inner * 2)  # attn1: Q K^T and A V
      self.add(level, 'linear', 2.0 * (n * inner * inner * 2 + length * dim * inner * 2))  # attn2 q, out; k, v
      self.add(level, 'attention', 2.0 * n * length * inner * 2)  # attn2: Q K^T and A V
      self.add(level, 'linear', 2.0 * n * (inner * 8 * inner + 4 * inner * inner))  # ff: GEGLU proj, net_2


def unet_flops_breakdown(
  arch: Any, height: int, width: int, context_length: int = 77, batch: int = 1, valid_taps: bool = False
) -> dict:
  """Forward-pass FLOPs of a text U-Net (`diffusion.models.unet.UNet2DConditionModel` fields, as a module, a
  mapping or a ConfigDict) on (batch, height, width) latents and a context of `context_length` tokens, by
  (level, kind): level 'down_i' / 'mid' / 'up_i' / 'io' (conv_in, conv_out, time embedding), kind 'conv', 'linear'
  or 'attention' (the Q K^T and A V matmuls). Walks the blocks the way the module builds them.

  Counts matmuls and convolutions only (2 FLOPs per multiply-add), the usual model-FLOPs convention: the norms,
  activations, softmax, residual adds and the upsampling copy are left out. A 3x3 conv counts all 9 taps at every
  output position (what a dense conv kernel computes). XLA's cost analysis differs in two ways: it counts only the
  taps that fall inside the input, not on the zero padding (`valid_taps=True` counts that way: a 3x3 conv loses 2%
  of its taps at 64x64, 16% at 8x8; SD 1.5's forward at 64x64 latents is 0.782 TFLOP so counted), and it counts
  every elementwise op too (on CPU its count is 1.0% above the valid-tap count for SD 1.5, 3.9% for the small U-Net
  of tests/training/test_analytic_flops.py). SD 1.5 at 64x64 latents with 77 tokens: 0.803 TFLOP per image, of
  which 0.126 are the attention Q K^T and A V matmuls (0.677 without them).
  """
  get = _arch_get(arch)
  channels = tuple(get('block_out_channels'))
  n = len(channels)
  heads = _per_level(get('num_attention_heads') or get('attention_head_dim', 8), n)
  layers = _per_level(get('layers_per_block', 2), n)
  tlayers = _per_level(get('transformer_layers_per_block', 1), n)
  attn = [t.startswith('CrossAttn') for t in get('down_block_types')]
  up_attn = [t.startswith('CrossAttn') for t in get('up_block_types')]
  count = _FlopCount(batch, context_length, int(get('cross_attention_dim')), valid_taps)
  h, w = height, width
  temb = 4 * channels[0]
  count.add(
    'io', 'linear', linear_flops(channels[0], temb) + linear_flops(temb, temb)
  )  # time_embedding linear_1, linear_2
  count.conv('io', 3, int(get('in_channels', 4)), channels[0], (h, w))
  x, skips = channels[0], [channels[0]]
  for i, c in enumerate(channels):
    for _ in range(layers[i]):
      x = count.resnet(f'down_{i}', x, c, (h, w), temb)
      if attn[i]:
        count.transformer(f'down_{i}', c, heads[i], h * w, tlayers[i])
      skips.append(x)
    if i < n - 1:
      count.conv(f'down_{i}', 3, c, c, (h, w), stride=2)
      h, w = (h + 1) // 2, (w + 1) // 2
      skips.append(c)
  if get('mid_block_type', 'UNetMidBlock2DCrossAttn') is not None:
    count.resnet('mid', x, x, (h, w), temb)
    count.transformer('mid', x, heads[-1], h * w, tlayers[-1])
    count.resnet('mid', x, x, (h, w), temb)
  for i, c in enumerate(channels[::-1]):
    level = n - 1 - i
    for _ in range(layers[level] + 1):
      x = count.resnet(f'up_{i}', x + skips.pop(), c, (h, w), temb)
      if up_attn[i]:
        count.transformer(f'up_{i}', c, heads[level], h * w, tlayers[level])
    if i < n - 1:
      h, w = 2 * h, 2 * w
      count.conv(f'up_{i}', 3, c, c, (h, w))
  count.conv('io', 3, channels[0], int(get('out_channels', 4)), (h, w))
  return count.parts


def unet_forward_flops(
  arch: Any, height: int, width: int, context_length: int = 77, batch: int = 1, valid_taps: bool = False
) -> float:
  """Total forward-pass FLOPs of `unet_flops_breakdown` (SD 1.5 at 64x64 latents, 77 tokens: 0.803 TFLOP/image)."""
  return sum(unet_flops_breakdown(arch, height, width, context_length, batch, valid_taps).values())


def unet_train_step_flops(arch: Any, height: int, width: int, context_length: int = 77, batch: int = 1) -> float:
  """Model FLOPs of one training step: 3x the forward pass (the backward pass computes the gradients of both the
  inputs and the weights of every matmul, 2x the forward). A remat recompute is not counted (it is not model work);
  neither is the optimizer update (a few FLOPs per parameter, negligible)."""
  return 3.0 * unet_forward_flops(arch, height, width, context_length, batch)


def config_train_step_flops(config: Any, batch: Any) -> float | None:
  """Analytic model FLOPs per step of a training config on one global `batch` (arrays with shapes): the U-Net's
  3x forward for 'ldm' (latent side `model.unet.sample_size`; context length from `text_embedding` (B, L, D) of a
  text cache, else `input_ids` (B, L)); None for a task without an analytic count. Frozen parts (VAE encoder, a
  frozen text encoder) are not model work of the step."""
  text = batch.get('text_embedding', batch.get('input_ids'))
  if config.get('model_type') != 'ldm' or text is None:
    return None
  unet = config.model.unet
  side = int(unet.sample_size)
  return unet_train_step_flops(unet, side, side, int(text.shape[1]), int(text.shape[0]))


class DataWait:
  """Wraps a batch iterator and adds up the host seconds spent inside `next` (input pipeline plus the host->device
  put): time the training loop is blocked on its input. Adds no device sync: a jitted step is dispatched
  asynchronously, so a compute-bound loop spends its time elsewhere and this stays small."""

  def __init__(self, iterator: Iterator):
    self._iterator = iterator
    self.seconds = 0.0

  def __iter__(self) -> 'DataWait':
    return self

  def __next__(self) -> Any:
    start = time.perf_counter()
    try:
      return next(self._iterator)
    finally:
      self.seconds += time.perf_counter() - start

  def take(self) -> float:
    """The seconds waited since the last `take`, and starts counting afresh."""
    seconds, self.seconds = self.seconds, 0.0
    return seconds
