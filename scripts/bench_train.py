r"""U-Net training-step benchmark: ours vs diffusers-Flax vs diffusers PyTorch, same weights, same batch.

  python scripts/bench_train.py                       # small SD-like U-Net, 32x32 latents, batch 4, on CPU
  python scripts/bench_train.py --preset medium --batch 8 --json train.json
  python scripts/bench_train.py --preset sd15 --latent 64 --batch 1 --skip torch   # the real SD 1.5 shape

One step = forward, MSE loss, backward and an AdamW update (lr 1e-4, weight decay 0.01) of all U-Net params, in
float32. The weights are one random diffusers `UNet2DConditionModel`, saved with `save_pretrained` and loaded by
each side (`diffusion.interop.load_unet`; `FlaxUNet2DConditionModel.from_pretrained(from_pt=True)`), so the three
compute the same function with the same FLOPs; the script checks that their forward outputs agree. The JAX steps
are jitted with the params and optimizer state donated. Warm-up steps are excluded; the table gives the median of
`--repeats` timed steps. diffusers-Flax needs diffusers <= 0.39 (the last release with Flax models). Each row has
XLA's FLOP count (JAX sides) and the analytic model count (`throughput.unet_train_step_flops`, every side).
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import results, throughput

SIDES = ('ours', 'flax', 'torch')
LABELS = {'ours': 'ours (JAX)', 'flax': 'diffusers-Flax', 'torch': 'diffusers PyTorch'}
_SD_BLOCKS = dict(
  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
)
PRESETS = {
  # SD 1.x layout (cross-attention on all but the lowest level, 8 heads, 2 resnets per level), scaled down.
  'small': dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=64,
    norm_num_groups=32,
    **_SD_BLOCKS,
  ),
  'medium': dict(
    block_out_channels=(64, 128, 128),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=256,
    norm_num_groups=32,
    **_SD_BLOCKS,
  ),
  'sd15': dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  ),
}


def add_common_flags(parser: argparse.ArgumentParser, batch: int) -> None:
  """Flags shared with bench_sample.py."""
  parser.add_argument('--preset', choices=sorted(PRESETS), default='small', help='U-Net architecture')
  parser.add_argument('--latent', type=int, default=32, help='latent side (images are 8x larger)')
  parser.add_argument('--batch', type=int, default=batch)
  parser.add_argument('--context-length', type=int, default=77)
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per side (the median is reported)')
  parser.add_argument(
    '--warmup', type=int, default=2, help='untimed runs per side (sampling: at least 1, as it compiles)'
  )
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch.set_num_threads')
  parser.add_argument('--skip', action='append', default=[], choices=SIDES, help='leave a side out (repeatable)')
  parser.add_argument(
    '--record',
    '--json',
    dest='record',
    default=None,
    metavar='OUT',
    help='where the record goes (default docs/results/<benchmark>.json)',
  )


class Models:
  """One random diffusers U-Net, loaded by all three sides from a `save_pretrained` directory."""

  def __init__(self, arch: dict, latent: int, skip: list[str]):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    self.torch = TorchUNet(sample_size=latent, **arch).float()
    with torch.no_grad():  # Random (non-zero) output convs and norms, so every layer matters in the comparison.
      for p in self.torch.parameters():
        p.add_(0.02 * torch.randn_like(p))
    self.num_params = sum(p.numel() for p in self.torch.parameters())
    with tempfile.TemporaryDirectory() as directory:
      self.torch.save_pretrained(directory)  # safetensors for ours, and the .bin diffusers-Flax's from_pt reads.
      self.torch.save_pretrained(directory, safe_serialization=False)
      from diffusion import interop

      self.ours, self.ours_params = interop.load_unet(directory)
      self.flax = self.flax_params = None
      if 'flax' not in skip:
        import logging

        from diffusers import FlaxUNet2DConditionModel

        logging.getLogger('diffusers').setLevel(logging.ERROR)  # Its Flax deprecation notice.
        self.flax, self.flax_params = FlaxUNet2DConditionModel.from_pretrained(directory, from_pt=True)

  def ours_fn(self) -> Callable:
    return lambda p, x, t, c: self.ours.apply({'params': p}, x, t, c)

  def flax_fn(self) -> Callable:  # NHWC in and out, like ours (diffusers-Flax takes and returns NCHW).
    return lambda p, x, t, c: self.flax.apply({'params': p}, x.transpose(0, 3, 1, 2), t, c).sample.transpose(0, 2, 3, 1)

  def torch_fn(self) -> Callable:
    def apply(x, t, c):
      return self.torch(x.permute(0, 3, 1, 2), t, c).sample.permute(0, 2, 3, 1)

    return apply


def inputs(batch: int, latent: int, context_length: int, context_dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  t = rng.integers(0, 1000, (batch,)).astype(np.int32)
  c = rng.standard_normal((batch, context_length, context_dim)).astype(np.float32)
  target = rng.standard_normal((batch, latent, latent, 4)).astype(np.float32)
  return x, t, c, target


def check_agreement(models: Models, x, t, c, skip: list[str]) -> dict[str, float]:
  """Max |difference| of each side's forward output from ours (same weights: should be ~1e-5)."""
  import torch

  ours = np.asarray(jax.jit(models.ours_fn())(models.ours_params, x, t, c))
  diffs = {}
  if 'flax' not in skip:
    diffs['flax'] = float(np.abs(np.asarray(jax.jit(models.flax_fn())(models.flax_params, x, t, c)) - ours).max())
  if 'torch' not in skip:
    with torch.no_grad():
      out = models.torch_fn()(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(c)).numpy()
    diffs['torch'] = float(np.abs(out - ours).max())
  return diffs


def time_runs(runs: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
  """Seconds of each of `repeats` calls of every `runs[side]` (each must block until its work is done), after
  `warmup` untimed calls. The sides take turns (a b c a b c ...), so a change of machine load during the
  benchmark falls on all of them alike."""
  for _ in range(warmup):
    for run in runs.values():
      run()
  times = {side: [] for side in runs}
  for i in range(repeats):
    for side, run in runs.items():
      start = time.perf_counter()
      run()
      times[side].append(time.perf_counter() - start)
    print(f'  round {i + 1}/{repeats}: ' + ', '.join(f'{s} {t[-1]:.3g}s' for s, t in times.items()), flush=True)
  return times


def jax_train_step(apply: Callable, params: Any, batch: tuple) -> tuple[Callable[[], Any], float | None, float]:
  """(run one step, per-device FLOPs, compile seconds) of a jitted, donated fwd+bwd+AdamW step."""
  tx = optax.adamw(1e-4, weight_decay=0.01)
  x, t, c, target = (jnp.asarray(a) for a in batch)

  def step(params, opt_state, x, t, c, target):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(jnp.square(apply(p, x, t, c) - target)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [jax.tree.map(jnp.array, params), None]
  state[1] = tx.init(state[0])
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state[0], state[1], x, t, c, target).compile()
  compile_s = time.perf_counter() - start

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], x, t, c, target)
    return jax.block_until_ready(loss)

  return run, throughput.compiled_flops(compiled), compile_s


def torch_train_step(models: Models, batch: tuple, threads: int) -> Callable[[], Any]:
  import torch

  torch.set_num_threads(threads)
  model = models.torch.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  x, t, c, target = (torch.from_numpy(a) for a in batch)
  t = t.long()
  apply = models.torch_fn()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.mean(torch.square(apply(x, t, c) - target))
    loss.backward()
    opt.step()
    return loss.item()

  return run


def summarize(name: str, times: list[float], batch: int, flops: float | None, extra: dict | None = None) -> dict:
  median = statistics.median(times)
  row = {
    'side': name,
    'label': LABELS[name],
    'median_s': median,
    'min_s': min(times),
    'max_s': max(times),
    'runs': len(times),
    'images_per_s': batch / median,
  }
  if flops:
    row['gflops_per_run'] = flops / 1e9
    row['achieved_tflops'] = flops / median / 1e12
  row.update(extra or {})
  return row


def print_table(title: str, rows: list[dict], unit: str, per: int = 1) -> None:
  """ms per `unit` (a run is `per` units), images/s, and this side's time / ours (>1: ours is faster)."""
  ours = next((r for r in rows if r['side'] == 'ours'), None)
  print(f'\n{title}')
  print(f'| implementation | ms/{unit} (median) | run min-max (s) | images/s | time / ours |')
  print('|---|---|---|---|---|')
  for r in rows:
    ratio = f'{r["median_s"] / ours["median_s"]:.2f}' if ours and r is not ours else '-'
    print(
      f'| {r["label"]} | {1e3 * r["median_s"] / per:.1f} | {r["min_s"]:.3g}-{r["max_s"]:.3g} | '
      f'{r["images_per_s"]:.3g} | {ratio} |'
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_common_flags(parser, batch=4)
  args = parser.parse_args()
  if args.batch < 1 or args.latent % 8 or args.repeats < 1:
    parser.error('need --batch >= 1, --latent a multiple of 8 and --repeats >= 1')
  arch = PRESETS[args.preset]
  load_at_start = results.load_average()
  print(f'device {throughput.local_device_kind()}, {os.cpu_count()} cores, load average {load_at_start}', flush=True)
  models = Models(arch, args.latent, args.skip)
  batch = inputs(args.batch, args.latent, args.context_length, arch['cross_attention_dim'])
  agreement = check_agreement(models, *batch[:3], args.skip)
  print(
    f'U-Net {args.preset}: {models.num_params / 1e6:.2f}M params, latents {args.latent}x{args.latent}x4, batch '
    f'{args.batch}; max |output - ours| on the same weights: {agreement}',
    flush=True,
  )
  runs, flops, extra = {}, {}, {}
  for side in [s for s in SIDES if s not in args.skip]:
    print(f'compiling / setting up {LABELS[side]} ...', flush=True)
    if side == 'torch':
      runs[side], flops[side], extra[side] = torch_train_step(models, batch, args.threads), None, {}
    else:
      apply, params = (
        (models.ours_fn(), models.ours_params) if side == 'ours' else (models.flax_fn(), models.flax_params)
      )
      runs[side], flops[side], compile_s = jax_train_step(apply, params, batch)
      extra[side] = {'compile_s': compile_s}
  times = time_runs(runs, args.warmup, args.repeats)
  # Analytic model FLOPs (3x the forward; the same network on every side), so PyTorch gets a TFLOP/s figure too.
  analytic = throughput.unet_train_step_flops(arch, args.latent, args.latent, args.context_length, args.batch)
  rows = []
  for side in runs:
    median = statistics.median(times[side])
    model = {'analytic_gflops_per_run': analytic / 1e9, 'analytic_tflops': analytic / median / 1e12}
    rows.append(summarize(side, times[side], args.batch, flops[side], {**extra[side], **model, 'times_s': times[side]}))
  print_table(
    f'train step (fwd+bwd+AdamW, float32), {args.preset} U-Net, batch {args.batch}, '
    f'{args.latent}x{args.latent} latents; load avg {load_at_start} -> {results.load_average()}',
    rows,
    'step',
  )
  flops_line = ', '.join(f'{r["label"]} {r["gflops_per_run"]:.1f}' for r in rows if 'gflops_per_run' in r)
  print(f'XLA FLOPs per step (GFLOP): {flops_line}; analytic model FLOPs {analytic / 1e9:.1f} GFLOP')
  results.write_record(
    'bench_train',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings=vars(args),
    num_params=models.num_params,
    max_abs_diff_vs_ours=agreement,
  )


if __name__ == '__main__':
  main()
