r"""SD-1.5 U-Net on one accelerator, ours (JAX) against diffusers PyTorch: training step and 50-step guided DDIM, bf16.

  PYTHONPATH=. python scripts/bench_gpu.py                  # SD 1.5 at 512 px (64x64 latents), batch 8
  PYTHONPATH=. python scripts/bench_gpu.py --tiny           # a tiny U-Net on CPU in float32: checks every path
  PYTHONPATH=. python scripts/bench_gpu.py --batch 16 --attention xla --torch_compile

Settings, each measured in a fresh subprocess (so allocator peaks never mix and a crash or timeout costs one row):
ours with attention 'xla' and with 'cudnn' (the U-Net's `attention` field; where the module has no such field the
one default path runs), then diffusers' `UNet2DConditionModel` (SDPA attention; `--torch_compile` optional). Each
subprocess first samples, then trains, and reads its allocator peak after each, so the peaks are those of sampling
and of training (the training peak is the larger).

Training step: fp32 params, bf16 compute (ours: the module's `dtype`; PyTorch: autocast), MSE against a random
target, backward, AdamW (lr 1e-4, weight decay 0.01) on both sides. Sampling: bf16 weights, DDIM with classifier-free
guidance (scale 7.5, one U-Net call on a 2x batch per step), `diffusers.DDIMScheduler` with the same U-Net on the
PyTorch side. The text encoder is left out (a random 77-token context), as the U-Net dominates.

MFU: analytic model FLOPs (`throughput.unet_train_step_flops`: 3x the forward, no remat recompute, the same for both
sides) and, for ours, XLA's count of the compiled step. XLA gives a custom call (the cuDNN attention kernel) no
FLOPs, so with 'cudnn' its count leaves out the attention matmuls; the analytic MFU is the one to compare.

Imports only jax, flax, optax, numpy (torch and diffusers lazily, in the PyTorch subprocess) and the diffusion modules
that need nothing more (models.unet, process, samplers, throughput, results), so it runs on a bare accelerator
machine. Without diffusers the PyTorch side is skipped with one line. Writes docs/results/bench_gpu.json (--tiny:
bench_gpu_tiny.json; --record elsewhere).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

SD15 = dict(
  in_channels=4,
  out_channels=4,
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
  up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  mid_block_type='UNetMidBlock2DCrossAttn',
  attention_head_dim=8,
  cross_attention_dim=768,
  norm_num_groups=32,
)
TINY = dict(  # Every block type of SD 1.5, two levels: compiles in seconds on a CPU.
  SD15,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=32,
  norm_num_groups=8,
  attention_head_dim=2,
)
CONTEXT_LENGTH = 77
GUIDANCE = 7.5
RESULT_PREFIX = 'bench_gpu result: '


def _unet_class():
  """Our `UNet2DConditionModel`. `diffusion.models/__init__` also loads config validation (ml_collections), which
  a bare accelerator machine may lack; the network itself needs only flax, so then the subpackage is entered
  without its `__init__`."""
  try:
    from diffusion.models.unet import UNet2DConditionModel
  except ModuleNotFoundError as e:
    if e.name != 'ml_collections':
      raise
    import diffusion

    package = types.ModuleType('diffusion.models')
    package.__path__ = [os.path.join(os.path.dirname(diffusion.__file__), 'models')]
    sys.modules['diffusion.models'] = package
    from diffusion.models.unet import UNet2DConditionModel
  return UNet2DConditionModel


def _rounded(values: dict) -> dict:
  return {k: float(f'{v:.4g}') if isinstance(v, float) else v for k, v in values.items()}


def _speed(seconds: float, images: int, analytic: float, xla: float | None, peak: float | None) -> dict:
  """images/s (global, per device: one device here), TFLOP/s and MFU from the analytic and (ours) XLA counts."""
  from diffusion import throughput

  out = throughput.throughput(seconds, images, 1, xla, peak, analytic)
  del out['step_time_s']
  return {'seconds': seconds, **out}


# ---------------------------------------------------------------------------------------------------- ours (JAX)


def _jax_peak_gib() -> float | None:
  import jax

  stats = jax.devices()[0].memory_stats()  # None on CPU.
  return stats['peak_bytes_in_use'] / 2**30 if stats and 'peak_bytes_in_use' in stats else None


def _our_unet(arch: dict, latent: int, attention: str, dtype: str):
  import jax.numpy as jnp

  cls = _unet_class()
  kwargs = dict(arch, sample_size=latent, dtype=jnp.dtype(dtype))
  if 'attention' in {f.name for f in dataclasses.fields(cls)}:
    kwargs['attention'] = attention
  return cls(**kwargs), 'attention' in kwargs


def _random_params(module, *args):
  """Params of `module`'s shapes drawn with numpy (timing needs no real init; XLA's compile of a whole network's
  init RNG takes minutes)."""
  import jax
  import jax.numpy as jnp

  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32), s.dtype), shapes)


def _time_jax(run, warmup: int, repeats: int, rounds: int) -> float:
  """Median over `rounds` of the mean seconds per call over `repeats` back-to-back calls (one sync per round)."""
  import jax

  for _ in range(warmup):
    jax.block_until_ready(run())
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / repeats)
  return float(np.median(times))


def jax_sample(args, unet, params32, peak: float | None) -> dict:
  import jax
  import jax.numpy as jnp

  from diffusion import process, samplers, throughput

  b, latent, ctx_dim = args.sample_batch, args.latent, args.arch['cross_attention_dim']
  params = jax.tree.map(lambda p: p.astype(args.dtype), params32)
  x = jax.random.normal(jax.random.PRNGKey(1), (b, latent, latent, 4))
  cond = jax.random.normal(jax.random.PRNGKey(2), (b, CONTEXT_LENGTH, ctx_dim))
  uncond = jnp.zeros_like(cond)
  schedule = process.schedule_from_betas(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)

  @jax.jit
  def generate(params, x_T, cond, uncond):
    model_fn = lambda z, t, c: unet.apply({'params': params}, z, t, c).astype(jnp.float32)
    denoise = samplers.cfg_denoise_fn(model_fn, cond, uncond, GUIDANCE)
    return samplers.get_sampler('ddim')(denoise, x_T, schedule, num_steps=args.sample_steps, prediction_type='eps')

  start = time.perf_counter()
  jax.block_until_ready(generate(params, x, cond, uncond))
  first_call_s = time.perf_counter() - start
  seconds = _time_jax(lambda: generate(params, x, cond, uncond), 0, 1, args.sample_repeats)
  # XLA counts a loop body once: one guided evaluation (batch 2b), lowered alone (no compile), times the steps.
  guided = (jnp.concatenate([x, x]), jnp.zeros((2 * b,), jnp.int32), jnp.concatenate([cond, uncond]))
  lowered = jax.jit(lambda p, z, t, c: unet.apply({'params': p}, z, t, c)).lower(params, *guided)
  cost = lowered.cost_analysis()
  xla = float(cost['flops']) * args.sample_steps if cost and cost.get('flops') else None
  analytic = args.sample_steps * throughput.unet_forward_flops(args.arch, latent, latent, CONTEXT_LENGTH, 2 * b)
  return {'first_call_s': first_call_s, **_speed(seconds, b, analytic, xla, peak), 'peak_memory_gib': _jax_peak_gib()}


def jax_train(args, unet, params, peak: float | None) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from diffusion import throughput

  b, latent = args.batch, args.latent
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(keys[0], (b, latent, latent, 4))
  target = jax.random.normal(keys[1], x.shape)
  t = jax.random.randint(keys[2], (b,), 0, 1000)
  ctx = jax.random.normal(keys[3], (b, CONTEXT_LENGTH, args.arch['cross_attention_dim']))
  tx = optax.adamw(1e-4, weight_decay=0.01)

  def step(params, opt_state, x, t, ctx, target):
    def loss_fn(p):
      return jnp.mean(jnp.square(unet.apply({'params': p}, x, t, ctx).astype(jnp.float32) - target))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, x, t, ctx, target).compile()
  compile_s = time.perf_counter() - start

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], x, t, ctx, target)
    return loss

  seconds = _time_jax(run, args.warmup, args.repeats, args.rounds)
  analytic = throughput.unet_train_step_flops(args.arch, latent, latent, CONTEXT_LENGTH, b)
  xla = throughput.compiled_flops(compiled)
  return {'compile_s': compile_s, **_speed(seconds, b, analytic, xla, peak), 'peak_memory_gib': _jax_peak_gib()}


def jax_worker(args) -> dict:
  """Ours with `args.impl` attention: sampling, then training, in this (fresh) process."""
  import jax
  import jax.numpy as jnp

  from diffusion import throughput

  device = jax.devices()[0]
  info = {'side': 'ours', 'attention': args.impl, 'device_kind': device.device_kind, 'backend': jax.default_backend()}
  if args.impl == 'cudnn' and jax.default_backend() != 'gpu':
    return {**info, 'skipped': f'attention cudnn needs a GPU (backend {jax.default_backend()})'}
  unet, has_field = _our_unet(args.arch, args.latent, args.impl, args.dtype)
  if not has_field:
    if args.impl != args.attention.split(',')[0]:  # One default path only: the other settings would repeat it.
      return {**info, 'skipped': f'attention {args.impl}: the U-Net has no attention field (measured once, default)'}
    info['attention'] = 'default (the U-Net has no attention field)'
  peak = throughput.peak_tflops(device.device_kind, args.dtype)
  zeros = (jnp.zeros((1, args.latent, args.latent, 4)), jnp.zeros((1,), jnp.int32))
  params = _random_params(unet, *zeros, jnp.zeros((1, CONTEXT_LENGTH, args.arch['cross_attention_dim'])))
  info['params_M'] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) / 1e6
  info['peak_tflops'] = peak
  info['sample'] = _rounded(jax_sample(args, unet, params, peak))
  print(f'  ours ({info["attention"]}) sampling: {json.dumps(info["sample"])}', flush=True)
  info['train'] = _rounded(jax_train(args, unet, params, peak))
  return info


# ------------------------------------------------------------------------------------------- diffusers PyTorch


def _torch_peak_gib(torch, device) -> float | None:
  return torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else None


def _time_torch(torch, device, run, warmup: int, repeats: int, rounds: int) -> float:
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  for _ in range(warmup):
    run()
  sync()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      run()
    sync()
    times.append((time.perf_counter() - start) / repeats)
  return float(np.median(times))


def torch_sample(args, torch, model, device, peak: float | None) -> dict:
  from diffusers import DDIMScheduler

  from diffusion import throughput

  b, latent, dtype = args.sample_batch, args.latent, getattr(torch, args.dtype)
  scheduler = DDIMScheduler(
    beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False
  )
  gen = torch.Generator(device='cpu').manual_seed(0)
  x_T = torch.randn((b, 4, latent, latent), generator=gen).to(device)
  cond = torch.randn((b, CONTEXT_LENGTH, args.arch['cross_attention_dim']), generator=gen).to(device, dtype)
  context = torch.cat([cond, torch.zeros_like(cond)])

  @torch.no_grad()
  def generate():
    scheduler.set_timesteps(args.sample_steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      eps = model(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=context).sample.float()
      eps_cond, eps_uncond = eps.chunk(2)
      x = scheduler.step(eps_uncond + GUIDANCE * (eps_cond - eps_uncond), t, x).prev_sample
    return x

  start = time.perf_counter()
  generate()
  if device.type == 'cuda':
    torch.cuda.synchronize()
  first_call_s = time.perf_counter() - start
  seconds = _time_torch(torch, device, generate, 0, 1, args.sample_repeats)
  analytic = args.sample_steps * throughput.unet_forward_flops(args.arch, latent, latent, CONTEXT_LENGTH, 2 * b)
  return {
    'first_call_s': first_call_s,
    **_speed(seconds, b, analytic, None, peak),
    'peak_memory_gib': _torch_peak_gib(torch, device),
  }


def torch_train(args, torch, model, device, peak: float | None) -> dict:
  from diffusion import throughput

  b, latent = args.batch, args.latent
  gen = torch.Generator(device='cpu').manual_seed(3)
  x = torch.randn((b, 4, latent, latent), generator=gen).to(device)
  target = torch.randn(x.shape, generator=gen).to(device)
  t = torch.randint(0, 1000, (b,), generator=gen).to(device)
  ctx = torch.randn((b, CONTEXT_LENGTH, args.arch['cross_attention_dim']), generator=gen).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  forward = torch.compile(model) if args.torch_compile else model

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'):
      out = forward(x, t, encoder_hidden_states=ctx).sample
    loss = torch.mean(torch.square(out.float() - target))
    loss.backward()
    opt.step()

  start = time.perf_counter()
  run()  # The first step (and, with --torch_compile, the compile).
  if device.type == 'cuda':
    torch.cuda.synchronize()
  first_step_s = time.perf_counter() - start
  seconds = _time_torch(torch, device, run, args.warmup, args.repeats, args.rounds)
  analytic = throughput.unet_train_step_flops(args.arch, latent, latent, CONTEXT_LENGTH, b)
  return {
    'first_step_s': first_step_s,
    **_speed(seconds, b, analytic, None, peak),
    'peak_memory_gib': _torch_peak_gib(torch, device),
  }


def torch_worker(args) -> dict:
  """diffusers' U-Net in PyTorch: sampling (bf16 weights), then training (fp32 weights, bf16 autocast)."""
  try:
    import diffusers
    import torch
  except ImportError as e:
    return {'side': 'torch', 'skipped': f'diffusers PyTorch side skipped: {e}'}
  from diffusion import throughput

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  kind = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
  peak = throughput.peak_tflops(kind, args.dtype)
  torch.manual_seed(0)
  arch = {k: list(v) if isinstance(v, tuple) else v for k, v in args.arch.items()}
  model = diffusers.UNet2DConditionModel(sample_size=args.latent, **arch).to(device)
  info = {
    'side': 'torch',
    'attention': 'sdpa' + (' + torch.compile' if args.torch_compile else ''),
    'device_kind': kind,
    'params_M': sum(p.numel() for p in model.parameters()) / 1e6,
    'torch': torch.__version__,
    'diffusers': diffusers.__version__,
  }
  info['sample'] = _rounded(torch_sample(args, torch, model.to(getattr(torch, args.dtype)).eval(), device, peak))
  print(f'  diffusers PyTorch sampling: {json.dumps(info["sample"])}', flush=True)
  model = model.float().train()
  if device.type == 'cuda':
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  info['train'] = _rounded(torch_train(args, torch, model, device, peak))
  return info


# --------------------------------------------------------------------------------------------------- the driver


def run_setting(args, worker: str, impl: str, env: dict, deadline: float) -> dict:
  """One setting in a fresh subprocess; its result, or why there is none (error, timeout, no time left)."""
  label = f'ours ({impl})' if worker == 'jax' else 'diffusers PyTorch'
  side = 'ours' if worker == 'jax' else 'torch'
  timeout = min(args.worker_timeout, deadline - time.monotonic() - 10)
  if timeout < 30:
    print(f'--- {label}: skipped, the time budget (--budget_s) is spent', flush=True)
    return {'side': side, 'attention': impl, 'error': 'no time left in --budget_s'}
  print(f'--- {label}', flush=True)
  with tempfile.TemporaryDirectory() as directory:
    out = os.path.join(directory, 'result.json')
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--worker', worker, '--impl', impl]
    command += ['--result_file', out]
    start = time.perf_counter()
    try:
      proc = subprocess.run(command, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
      print(f'{label}: timed out after {timeout:.0f} s', flush=True)
      return {'side': side, 'attention': impl, 'error': f'timed out after {timeout:.0f} s'}
    if proc.returncode != 0 or not os.path.exists(out):
      print(f'{label}: failed (exit {proc.returncode})', flush=True)
      return {'side': side, 'attention': impl, 'error': f'exit {proc.returncode}'}
    with open(out) as f:
      result = json.load(f)
  result['wall_s'] = round(time.perf_counter() - start, 1)
  if 'skipped' in result:
    print(result['skipped'], flush=True)
  return result


def rows_of(settings: list[dict], args) -> list[dict]:
  """One row per (setting, what): times, images/s, TFLOP/s, MFUs, peak memory, and ours/PyTorch time ratios."""
  torch_row = next((s for s in settings if s['side'] == 'torch' and 'train' in s), None)
  rows = []
  for s in settings:
    if 'train' not in s:
      continue
    label = ('ours, attention ' if s['side'] == 'ours' else 'diffusers PyTorch, ') + s['attention']
    for what, batch in (('train_step', args.batch), (f'ddim_{args.sample_steps}_cfg', args.sample_batch)):
      r = s['train' if what == 'train_step' else 'sample']
      row = {'what': what, 'impl': label, 'resolution_px': 8 * args.latent, 'batch': batch, **r}
      if torch_row is not None and s is not torch_row:
        other = torch_row['train' if what == 'train_step' else 'sample']
        row['time_ours_over_torch'] = round(r['seconds'] / other['seconds'], 3)
      rows.append(row)
  return rows


def print_table(rows: list[dict]) -> None:
  print(
    '\n| what | implementation | batch | time | images/s | MFU analytic | MFU XLA count | peak memory | ours/PyTorch |'
  )
  print('|---|---|---|---|---|---|---|---|---|')
  pct = lambda v: '-' if v is None else f'{100 * v:.1f}%'
  for r in rows:
    mem = '-' if r.get('peak_memory_gib') is None else f'{r["peak_memory_gib"]:.1f} GiB'
    print(
      f'| {r["what"]} | {r["impl"]} | {r["batch"]} | {1e3 * r["seconds"]:.1f} ms | {r["images_per_s"]:.3g} | '
      f'{pct(r.get("mfu_analytic"))} | {pct(r.get("mfu"))} | {mem} | {r.get("time_ours_over_torch", "-")} |'
    )


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='tiny U-Net, 16x16 latents, few steps (a CPU check)')
  parser.add_argument('--batch', type=int, default=None, help='training batch (default 8; --tiny 2)')
  parser.add_argument('--sample_batch', type=int, default=None, help='images per sampling run (default = --batch)')
  parser.add_argument('--latent', type=int, default=None, help='latent side (default 64 = 512 px; --tiny 16)')
  parser.add_argument('--sample_steps', type=int, default=None, help='DDIM steps (default 50; --tiny 4)')
  parser.add_argument(
    '--dtype', choices=('bfloat16', 'float32'), default=None, help='compute (default bf16; --tiny f32)'
  )
  parser.add_argument('--attention', default='xla,cudnn', help='our attention implementations, comma-separated')
  parser.add_argument('--skip_torch', action='store_true', help='leave the diffusers PyTorch side out')
  parser.add_argument('--torch_compile', action='store_true', help='torch.compile the PyTorch U-Net for training')
  parser.add_argument('--repeats', type=int, default=None, help='training steps per timed round (default 10)')
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds (the median round is reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed training steps after the first')
  parser.add_argument('--sample_repeats', type=int, default=None, help='timed sampling runs (default 2)')
  parser.add_argument('--worker_timeout', type=float, default=240.0, help='seconds per setting (subprocess)')
  parser.add_argument('--budget_s', type=float, default=None, help='total seconds for all settings (then skip)')
  parser.add_argument(
    '--source_commit',
    default=os.environ.get('BENCH_COMMIT', ''),
    help='commit the tree was copied from, for the record where it has no .git (default $BENCH_COMMIT)',
  )
  parser.add_argument('--record', '--json', '--out', dest='record', default=None, metavar='OUT')
  parser.add_argument('--worker', choices=('jax', 'torch'), default=None, help=argparse.SUPPRESS)
  parser.add_argument('--impl', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--result_file', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  tiny = args.tiny
  defaults = dict(batch=2 if tiny else 8, latent=16 if tiny else 64, sample_steps=4 if tiny else 50)
  defaults.update(repeats=2 if tiny else 10, sample_repeats=1 if tiny else 2)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.sample_batch = args.sample_batch or args.batch
  args.dtype = args.dtype or ('float32' if tiny else 'bfloat16')  # This CPU has no bf16 units (torch's is slow).
  args.arch = TINY if tiny else SD15
  return args


def main() -> None:
  args = parse_args()
  if args.worker:  # One setting, in its own process: write the result and stop.
    result = jax_worker(args) if args.worker == 'jax' else torch_worker(args)
    with open(args.result_file, 'w') as f:
      json.dump(result, f)
    return
  from diffusion import results, throughput

  load_at_start = results.load_average()
  env = dict(os.environ)
  if args.tiny:
    env.setdefault('JAX_PLATFORMS', 'cpu')
  print(
    f'U-Net {"tiny" if args.tiny else "SD 1.5"}: train batch {args.batch}, sample batch {args.sample_batch} '
    f'(CFG: {2 * args.sample_batch} per U-Net call), {8 * args.latent} px; analytic forward '
    f'{throughput.unet_forward_flops(args.arch, args.latent, args.latent, CONTEXT_LENGTH) / 1e12:.4g} TFLOP/image',
    flush=True,
  )
  deadline = time.monotonic() + (args.budget_s or float('inf'))
  # PyTorch first: it compiles nothing (unless --torch_compile), and every ratio needs it.
  settings = [] if args.skip_torch else [run_setting(args, 'torch', 'sdpa', env, deadline)]
  settings += [run_setting(args, 'jax', impl, env, deadline) for impl in args.attention.split(',') if impl]
  rows = rows_of(settings, args)
  print_table(rows)
  failed = {
    f'{s["side"]}:{s.get("attention")}': s.get('error') or s.get('skipped') for s in settings if 'train' not in s
  }
  kinds = {s['device_kind'] for s in settings if 'device_kind' in s}
  os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'  # The record's device query: no need for 75% of the GPU.
  git = {}
  if args.source_commit and results.git_state()['commit'] == 'unknown':  # A copied tree without .git.
    git = {'git': {'commit': args.source_commit, 'dirty': None, 'from': '--source_commit'}}
  results.write_record(
    'bench_gpu_tiny' if args.tiny else 'bench_gpu',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings={k: v for k, v in vars(args).items() if k not in ('worker', 'impl', 'result_file')},
    device_kinds=sorted(kinds),
    peak_tflops=next((s['peak_tflops'] for s in settings if s.get('peak_tflops')), None),
    analytic_forward_tflop_per_image=throughput.unet_forward_flops(args.arch, args.latent, args.latent) / 1e12,
    not_measured=failed,
    **git,
  )


if __name__ == '__main__':
  main()
