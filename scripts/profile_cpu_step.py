r"""Where the U-Net training step spends its time on CPU: ours (JAX) vs diffusers PyTorch, part by part and op by op.

  python scripts/profile_cpu_step.py                     # bench_train's default U-Net (small, 32x32 latents, batch 4)
  python scripts/profile_cpu_step.py --knobs none        # without the XLA-flag sweep
  python scripts/profile_cpu_step.py --tiny              # a seconds-long check of the script (a record not for docs)

The U-Net, its weights and the batch are bench_train's (`scripts/bench_train.py`, imported). Three parts:

1. steps: the whole training step exactly as bench_train times it (fwd + MSE + bwd + AdamW, jitted and donated),
   the forward pass alone (PyTorch under `no_grad`), forward + backward without the update, and the AdamW update of
   all params on given gradients.
2. ops: every leaf op call of one forward pass is recorded (a Flax method interceptor sees its module and input
   shapes), and each distinct (op, shape) is timed alone, fwd and fwd+bwd, on both sides: 3x3 and 1x1 conv (fwd,
   input grad, weight grad: `aten.convolution_backward` on the PyTorch side, what autograd calls), GroupNorm (+SiLU
   where the model applies it), LayerNorm, Dense, and self- / cross-attention (the diffusers `Attention` module,
   projections included; PyTorch runs SDPA). A row's time is the sum over its shapes of time x calls per step. The
   3x3 convs are also timed with XLA in NCHW / OIHW (PyTorch's layout) instead of our NHWC / HWIO.
3. knobs: the whole JAX step compiled under each XLA setting (`XLA_FLAGS`, or `JAX_DEFAULT_MATMUL_PRECISION`), one
   worker process per setting (flags are read once per process); the workers and this process's PyTorch step take
   turns, round by round.

Every timing is a median over rounds in which the sides take turns (a b a b ...), so a change of machine load falls on
both alike; a sample repeats a short op until it lasts `--min-sample-s`. A single jitted op also pays JAX's dispatch
(recorded as `jax_dispatch_ms`), which the fused step does not. PyTorch runs with `--threads` threads (default 2).
"""

import argparse
import json
import math
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import bench_train  # scripts/ is on sys.path when this runs as `python scripts/profile_cpu_step.py`.
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import results

TINY_ARCH = dict(
  block_out_channels=(8, 16),
  layers_per_block=1,
  attention_head_dim=2,
  cross_attention_dim=16,
  norm_num_groups=4,
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
)
# name -> environment of a knob worker. Flags of older XLAs that this one refuses or ignores are listed in
# RETIRED_FLAGS instead of being run.
KNOBS = {
  'default': {},
  'no_xnnpack': {'XLA_FLAGS': '--xla_cpu_use_xnnpack=false'},
  'onednn': {'XLA_FLAGS': '--xla_cpu_use_onednn=true'},
  'onednn_custom_call': {'XLA_FLAGS': '--xla_cpu_experimental_onednn_custom_call=true'},
  'xnn_graph_fusion': {'XLA_FLAGS': '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY'},
  'fast_math': {'XLA_FLAGS': '--xla_cpu_enable_fast_math=true'},
  'vector_width_512': {'XLA_FLAGS': '--xla_cpu_prefer_vector_width=512'},
  'backend_opt_level_0': {'XLA_FLAGS': '--xla_backend_optimization_level=0'},
  'single_thread_eigen': {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'},
  'matmul_precision_bf16': {'JAX_DEFAULT_MATMUL_PRECISION': 'bfloat16'},
  'one_core': {'PROFILE_CPU_ONE_CORE': '1'},  # XLA on one core (one thread); timed beside PyTorch on 1 thread.
}
RETIRED_FLAGS = {
  '--xla_cpu_use_thunk_runtime': 'accepted but ignored by this XLA ("no longer supported"; the thunk runtime is on)',
  '--xla_cpu_use_mkl_dnn': 'unknown to this XLA (oneDNN is --xla_cpu_use_onednn, timed above)',
}
OP_LABELS = {
  'conv3x3': '3x3 conv',
  'conv1x1': '1x1 conv',
  'groupnorm_silu': 'GroupNorm+SiLU',
  'groupnorm': 'GroupNorm',
  'layernorm': 'LayerNorm',
  'dense': 'Dense',
  'self_attention': 'self-attention',
  'cross_attention': 'cross-attention',
}
_FIELDS = {
  'conv': ('features', 'kernel_size', 'strides', 'padding', 'use_bias'),
  'dense': ('features', 'use_bias'),
  'groupnorm': ('num_groups', 'epsilon'),
  'layernorm': ('epsilon',),
  'attention': ('heads', 'dim_head', 'bias', 'out_bias'),
}


def time_interleaved(
  runs: dict[str, Callable[[], Any]], warmup: int, repeats: int, min_sample_s: float
) -> dict[str, list[float]]:
  """Seconds per call of each `runs[name]` (each blocks until done) in `repeats` rounds where the runs take turns,
  after `warmup` untimed calls; a sample repeats its call until it lasts about `min_sample_s`."""
  calls = {}
  for name, run in runs.items():
    for _ in range(warmup):
      run()
    start = time.perf_counter()
    run()
    calls[name] = max(1, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-7)))
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        run()
      times[name].append((time.perf_counter() - start) / calls[name])
  return times


def _median_ms(times: list[float]) -> float:
  return 1e3 * statistics.median(times)


def _blocking(fn: Callable, *args: Any) -> Callable[[], Any]:
  return lambda: jax.block_until_ready(fn(*args))


# ------------------------------------------------------------------------------------------------- part 1: steps


def step_runs(models: bench_train.Models, batch: tuple, threads: int) -> dict[str, Callable[[], Any]]:
  """'<part>:<side>' -> one run: the train step, the forward pass, forward + backward, of both sides."""
  import torch

  torch.set_num_threads(threads)
  apply, params = models.ours_fn(), models.ours_params
  x, t, c, target = (jnp.asarray(a) for a in batch)
  step, _, _ = bench_train.jax_train_step(apply, params, batch)
  loss = lambda p: jnp.mean(jnp.square(apply(p, x, t, c) - target))
  fwd, fwd_bwd = jax.jit(apply), jax.jit(jax.value_and_grad(loss))
  model, torch_apply = models.torch.train(), models.torch_fn()
  tx, tt, tc, ttarget = (torch.from_numpy(a) for a in batch)
  tt = tt.long()

  def torch_fwd():
    with torch.no_grad():
      return torch_apply(tx, tt, tc)

  def torch_fwd_bwd():
    model.zero_grad(set_to_none=True)
    out = torch.mean(torch.square(torch_apply(tx, tt, tc) - ttarget))
    out.backward()
    return out.item()

  return {
    'step:jax': step,
    'step:torch': bench_train.torch_train_step(models, batch, threads),
    'fwd:jax': _blocking(fwd, params, x, t, c),
    'fwd:torch': torch_fwd,
    'fwd+bwd:jax': _blocking(fwd_bwd, params),
    'fwd+bwd:torch': torch_fwd_bwd,
  }


def adamw_runs(models: bench_train.Models) -> dict[str, Callable[[], Any]]:
  """The AdamW update of all params on fixed gradients: optax (jitted, donated) and torch.optim.AdamW."""
  import torch

  tx = optax.adamw(1e-4, weight_decay=0.01)
  params = jax.tree.map(jnp.array, models.ours_params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  state = [params, tx.init(params)]

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))

  def jax_run():
    state[0], state[1] = update(state[0], state[1], grads)
    jax.block_until_ready(state[0])

  model = models.torch
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  for p in model.parameters():
    p.grad = torch.full_like(p, 1e-3)
  return {'adamw:jax': jax_run, 'adamw:torch': opt.step}


def measure_steps(models: bench_train.Models, batch: tuple, args: argparse.Namespace) -> list[dict]:
  """Part 1 rows: part, jax_ms, torch_ms, ratio (JAX time / PyTorch time), and every round's times."""
  runs = {**step_runs(models, batch, args.threads), **adamw_runs(models)}
  times = time_interleaved(runs, args.warmup, args.repeats, 0.0)
  rows = []
  for part in ('step', 'fwd', 'fwd+bwd', 'adamw'):
    jax_ms, torch_ms = _median_ms(times[f'{part}:jax']), _median_ms(times[f'{part}:torch'])
    rows.append(
      {
        'part': part,
        'jax_ms': jax_ms,
        'torch_ms': torch_ms,
        'ratio': jax_ms / torch_ms,
        'jax_times_s': times[f'{part}:jax'],
        'torch_times_s': times[f'{part}:torch'],
      }
    )
    print(f'  {part}: JAX {jax_ms:.1f} ms, PyTorch {torch_ms:.1f} ms, ratio {jax_ms / torch_ms:.2f}', flush=True)
  return rows


# -------------------------------------------------------------------------------------------- part 2: op by op


def _op_kind(module: Any, args: tuple, kwargs: dict) -> str | None:
  import flax.linen as nn

  from diffusion.models import layers

  if isinstance(module, layers.Attention):
    cross = len(args) > 1 and args[1] is not None or kwargs.get('encoder_hidden_states') is not None
    return 'cross_attention' if cross else 'self_attention'
  if isinstance(module, nn.Conv):
    return 'conv3x3' if tuple(module.kernel_size) == (3, 3) else 'conv1x1'
  if isinstance(module, nn.GroupNorm):  # The spatial transformer's input norm has no SiLU after it.
    return 'groupnorm' if isinstance(module.parent, layers.Transformer2DModel) else 'groupnorm_silu'
  if isinstance(module, nn.LayerNorm):
    return 'layernorm'
  if isinstance(module, nn.Dense):
    return 'dense'
  return None


def record_op_calls(models: bench_train.Models, batch: tuple) -> list[dict]:
  """The distinct (op, shape) of one forward pass, each with its call count, in first-call order."""
  import flax.linen as nn

  calls: dict[tuple, dict] = {}
  depth = [0]  # > 0 inside an attention module, whose own ops are timed as part of it.

  def interceptor(next_fun, args, kwargs, context):
    kind = _op_kind(context.module, args, kwargs) if context.method_name == '__call__' else None
    if kind is None or depth[0]:
      return next_fun(*args, **kwargs)
    module = context.module
    group = 'attention' if kind.endswith('attention') else re.sub(r'(_silu|3x3|1x1)$', '', kind)
    fields = tuple((f, getattr(module, f)) for f in _FIELDS[group])
    shapes = tuple(tuple(a.shape) for a in args if hasattr(a, 'shape'))
    key = (kind, shapes, fields)
    if key not in calls:
      first = module.name == 'conv_in'  # The network input needs no gradient.
      calls[key] = dict(kind=kind, shapes=shapes, fields=dict(fields), calls=0, input_grad=not first, module=module)
    calls[key]['calls'] += 1
    depth[0] += group == 'attention'
    try:
      return next_fun(*args, **kwargs)
    finally:
      depth[0] -= group == 'attention'

  x, t, c, _ = batch
  with nn.intercept_methods(interceptor):
    jax.eval_shape(models.ours_fn(), models.ours_params, x, t, c)
  return list(calls.values())


def _jax_op(op: dict) -> tuple[Callable, tuple, Any]:
  """(fn(params, *inputs), inputs, params) of one recorded op, a fresh copy of its module with new params."""
  import flax.linen as nn

  module = op['module'].clone(parent=None)
  rng = np.random.default_rng(0)
  inputs = tuple(jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in op['shapes'])
  params = module.init(jax.random.key(0), *inputs)['params']
  post = nn.silu if op['kind'] == 'groupnorm_silu' else (lambda y: y)
  return (lambda p, *xs: post(module.apply({'params': p}, *xs))), inputs, params


def jax_op_runs(op: dict, nchw: bool = False) -> dict[str, Callable[[], Any]]:
  """Pass name -> jitted run of one op: 'fwd', and 'input_grad' / 'weight_grad' (convs) or 'fwd+bwd' (others)."""
  fn, inputs, params = _jax_op(op)
  if nchw:
    fn, inputs, params = _nchw_conv(op, inputs, params)
  x, rest = inputs[0], inputs[1:]
  g = jnp.ones(jax.eval_shape(fn, params, *inputs).shape, jnp.float32)
  runs = {'fwd': _blocking(jax.jit(fn), params, *inputs)}
  if op['kind'].startswith('conv'):
    if op['input_grad']:
      dgrad = jax.jit(lambda p, x, g: jax.vjp(lambda x: fn(p, x, *rest), x)[1](g))
      runs['input_grad'] = _blocking(dgrad, params, x, g)
    wgrad = jax.jit(lambda p, x, g: jax.vjp(lambda p: fn(p, x, *rest), p)[1](g))
    runs['weight_grad'] = _blocking(wgrad, params, x, g)
    return runs

  def fwd_bwd(p, x, g):
    y, vjp = jax.vjp(lambda p, x: fn(p, x, *rest), p, x)
    return y, vjp(g)

  runs['fwd+bwd'] = _blocking(jax.jit(fwd_bwd), params, x, g)
  return runs


def _nchw_conv(op: dict, inputs: tuple, params: dict) -> tuple[Callable, tuple, dict]:
  """The same conv in PyTorch's layout: input NCHW, kernel OIHW, output NCHW (`lax.conv_general_dilated`)."""
  f = op['fields']
  kernel, bias = params['kernel'].transpose(3, 2, 0, 1), params.get('bias')

  def fn(p, x):
    y = jax.lax.conv_general_dilated(
      x, p['kernel'], f['strides'], f['padding'], dimension_numbers=('NCHW', 'OIHW', 'NCHW')
    )
    return y + p['bias'][None, :, None, None] if 'bias' in p else y

  new = {'kernel': kernel, **({'bias': bias} if bias is not None else {})}
  return fn, (inputs[0].transpose(0, 3, 1, 2),), new


def _torch_module(op: dict):
  """A fresh PyTorch module computing the recorded op (random weights: the times do not depend on them)."""
  import torch
  from diffusers.models.attention_processor import Attention

  f, shape, kind = op['fields'], op['shapes'][0], op['kind']
  if kind == 'dense':
    return torch.nn.Linear(shape[-1], f['features'], bias=f['use_bias'])
  if kind == 'layernorm':
    return torch.nn.LayerNorm(shape[-1], eps=f['epsilon'])
  if kind.startswith('groupnorm'):
    norm = torch.nn.GroupNorm(f['num_groups'], shape[-1], eps=f['epsilon'])
    return torch.nn.Sequential(norm, torch.nn.SiLU()) if kind == 'groupnorm_silu' else norm
  context = op['shapes'][1][-1] if kind == 'cross_attention' else None
  return Attention(shape[-1], context, heads=f['heads'], dim_head=f['dim_head'], bias=f['bias'], out_bias=f['out_bias'])


def _torch_inputs(op: dict) -> list:
  """The op's inputs as PyTorch tensors: images NCHW (diffusers' layout), sequences (B, L, C)."""
  import torch

  rng = np.random.default_rng(0)
  tensors = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for s in op['shapes']]
  if len(op['shapes'][0]) == 4:
    tensors[0] = tensors[0].permute(0, 3, 1, 2).contiguous()
  return tensors


def torch_op_runs(op: dict) -> dict[str, Callable[[], Any]]:
  """Pass name -> run of one op on the PyTorch side (same passes as `jax_op_runs`)."""
  import torch

  inputs = _torch_inputs(op)
  if op['kind'].startswith('conv'):
    return _torch_conv_runs(op, inputs[0])
  module = _torch_module(op)
  x, rest = inputs[0], inputs[1:]
  x_grad = x.clone().requires_grad_(True)
  call = (lambda x: module(x, encoder_hidden_states=rest[0])) if op['kind'] == 'cross_attention' else module

  def fwd():
    with torch.no_grad():
      return call(x)

  with torch.no_grad():
    g = torch.ones_like(call(x))

  def fwd_bwd():
    module.zero_grad(set_to_none=True)
    x_grad.grad = None
    call(x_grad).backward(g)

  return {'fwd': fwd, 'fwd+bwd': fwd_bwd}


def _torch_conv_runs(op: dict, x) -> dict[str, Callable[[], Any]]:
  """F.conv2d, and its input / weight (+bias) gradients through `aten.convolution_backward`."""
  import torch

  f = op['fields']
  (kh, kw), cout, cin = f['kernel_size'], f['features'], x.shape[1]
  stride, padding = list(f['strides']), [p[0] for p in f['padding']]
  weight, bias = torch.randn(cout, cin, kh, kw), torch.randn(cout) if f['use_bias'] else None
  fwd = lambda: torch.nn.functional.conv2d(x, weight, bias, stride, padding)
  g = torch.ones_like(fwd())
  backward = lambda mask: torch.ops.aten.convolution_backward(
    g, x, weight, [cout] if bias is not None else None, stride, padding, [1, 1], False, [0, 0], 1, mask
  )
  runs = {'fwd': fwd}
  if op['input_grad']:
    runs['input_grad'] = lambda: backward([True, False, False])
  runs['weight_grad'] = lambda: backward([False, True, bias is not None])
  return runs


def measure_ops(ops: list[dict], args: argparse.Namespace) -> list[dict]:
  """Per distinct (op, shape): median ms per call of every pass on each side (and XLA NCHW for 3x3 convs)."""
  rows = []
  for i, op in enumerate(ops):
    runs = {f'jax:{k}': v for k, v in jax_op_runs(op).items()}
    runs.update({f'torch:{k}': v for k, v in torch_op_runs(op).items()})
    if op['kind'] == 'conv3x3':
      runs.update({f'jax_nchw:{k}': v for k, v in jax_op_runs(op, nchw=True).items()})
    times = time_interleaved(runs, args.warmup, args.op_repeats, args.min_sample_s)
    row = {k: op[k] for k in ('kind', 'shapes', 'calls', 'input_grad')}
    row['fields'] = {k: v for k, v in op['fields'].items()}
    row['ms'] = {name: _median_ms(ts) for name, ts in times.items()}
    rows.append(row)
    ms = row['ms']
    print(
      f'  [{i + 1}/{len(ops)}] {op["kind"]} {op["shapes"]} x{op["calls"]}: '
      + ', '.join(f'{k} {v:.3g}' for k, v in ms.items())
      + ' ms',
      flush=True,
    )
  return rows


def summarize_ops(rows: list[dict]) -> list[dict]:
  """Per op type: calls per step and ms per step (sum over shapes of ms x calls) of every pass and side. A conv's
  'fwd+bwd' is its fwd + input grad + weight grad."""
  summary = {}
  for row in rows:
    entry = summary.setdefault(row['kind'], {'op': row['kind'], 'label': OP_LABELS[row['kind']], 'calls': 0, 'ms': {}})
    entry['calls'] += row['calls']
    ms = dict(row['ms'])
    for side in ('jax', 'torch', 'jax_nchw'):
      if f'{side}:weight_grad' in ms:
        ms[f'{side}:fwd+bwd'] = sum(ms.get(f'{side}:{p}', 0.0) for p in ('fwd', 'input_grad', 'weight_grad'))
    for name, value in ms.items():
      entry['ms'][name] = entry['ms'].get(name, 0.0) + value * row['calls']
  for entry in summary.values():
    for p in ('fwd', 'fwd+bwd'):
      entry[f'ratio_{p}'] = entry['ms'][f'jax:{p}'] / entry['ms'][f'torch:{p}']
  return sorted(summary.values(), key=lambda e: -e['ms']['jax:fwd+bwd'])


def dispatch_ms(args: argparse.Namespace) -> float:
  """Median ms of one call of a trivial jitted function (what each separately timed JAX op pays on top)."""
  x = jnp.ones((8,), jnp.float32)
  add = jax.jit(lambda x: x + 1)
  return _median_ms(time_interleaved({'add': _blocking(add, x)}, 3, args.op_repeats, args.min_sample_s)['add'])


# ------------------------------------------------------------------------------------------ part 3: XLA knobs


def worker(problem_file: str) -> None:
  """A knob worker: compiles bench_train's JAX step under this process's flags (on one core with
  PROFILE_CPU_ONE_CORE=1: XLA sizes its thread pool by the cores it may use), prints 'ready <compile s>', then runs
  one step per 'run' line on stdin and prints its seconds; any other line ends it."""
  if os.environ.get('PROFILE_CPU_ONE_CORE') == '1':
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  with open(problem_file, 'rb') as f:
    module, params, batch = pickle.load(f)
  start = time.perf_counter()
  run, _, _ = bench_train.jax_train_step(lambda p, x, t, c: module.apply({'params': p}, x, t, c), params, batch)
  run()
  print(f'ready {time.perf_counter() - start:.3f}', flush=True)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    start = time.perf_counter()
    run()
    print(f'{time.perf_counter() - start:.6f}', flush=True)


def _start_worker(env: dict, problem_file: str) -> tuple[subprocess.Popen, float]:
  """A worker process with `env` added to this one's (compiled and warm), and its compile seconds."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **env}
  if 'XLA_FLAGS' in env and os.environ.get('XLA_FLAGS'):
    env['XLA_FLAGS'] = f'{os.environ["XLA_FLAGS"]} {env["XLA_FLAGS"]}'
  argv = [sys.executable, os.path.abspath(__file__), '--worker', problem_file]
  proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
  line = proc.stdout.readline()
  if not line.startswith('ready'):
    proc.kill()
    raise RuntimeError(f'knob worker with {env.get("XLA_FLAGS", "")!r} failed (exit {proc.wait()})')
  return proc, float(line.split()[1])


def _remote(proc: subprocess.Popen) -> Callable[[], float]:
  def run():
    proc.stdin.write('run\n')
    return float(proc.stdout.readline())

  return run


def _torch_one_thread(step: Callable[[], Any], threads: int) -> Callable[[], Any]:
  import torch

  def run():
    torch.set_num_threads(1)
    try:
      return step()
    finally:
      torch.set_num_threads(threads)

  return run


def measure_knobs(models: bench_train.Models, batch: tuple, args: argparse.Namespace) -> list[dict]:
  """Part 3 rows: per setting, its environment, the step's median ms, and that over the 'default' worker's."""
  names = [k for k in KNOBS if k in args.knobs or k == 'default']
  torch_step = bench_train.torch_train_step(models, batch, args.threads)
  workers, compile_s = {}, {}
  with tempfile.TemporaryDirectory() as directory:
    problem_file = os.path.join(directory, 'problem.pkl')
    with open(problem_file, 'wb') as f:
      pickle.dump((models.ours, jax.tree.map(np.asarray, models.ours_params), batch), f)
    try:
      for name in names:
        print(f'  compiling the step with {name}: {KNOBS[name]}', flush=True)
        workers[name], compile_s[name] = _start_worker(KNOBS[name], problem_file)
      runs = {name: _remote(proc) for name, proc in workers.items()}
      runs['torch'] = torch_step
      if 'one_core' in names:
        runs['torch_1_thread'] = _torch_one_thread(torch_step, args.threads)
      times = time_interleaved(runs, args.warmup, args.repeats, 0.0)
    finally:
      for proc in workers.values():
        proc.stdin.write('quit\n')
        proc.stdin.close()
        proc.wait(timeout=60)
  default = _median_ms(times['default'])
  rows = []
  for name in names:
    ms = _median_ms(times[name])
    rows.append(
      {'knob': name, 'env': KNOBS[name], 'step_ms': ms, 'vs_default': ms / default, 'compile_s': compile_s[name]}
    )
    rows[-1]['times_s'] = times[name]
    print(f'  {name}: {ms:.1f} ms/step ({ms / default:.2f} x default), compile {compile_s[name]:.1f} s', flush=True)
  for name in [n for n in ('torch', 'torch_1_thread') if n in times]:
    ms = _median_ms(times[name])
    rows.append({'knob': name, 'env': {}, 'step_ms': ms, 'vs_default': ms / default, 'times_s': times[name]})
    print(f'  {name}: {ms:.1f} ms/step ({ms / default:.2f} x default)', flush=True)
  return rows


# ----------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', choices=sorted(bench_train.PRESETS), default='small', help='U-Net architecture')
  parser.add_argument('--latent', type=int, default=32, help='latent side')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--context-length', type=int, default=77)
  parser.add_argument('--repeats', type=int, default=5, help='rounds of the whole-step parts (median reported)')
  parser.add_argument('--op-repeats', type=int, default=7, help='rounds of each op')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls of every run first')
  parser.add_argument('--min-sample-s', type=float, default=0.05, help='an op sample repeats calls to last this long')
  parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
  parser.add_argument('--knobs', default='all', help=f'comma list of {", ".join(KNOBS)}; "all" or "none"')
  parser.add_argument('--parts', default='steps,ops,knobs', help='comma list of steps, ops, knobs')
  parser.add_argument('--tiny', action='store_true', help='a tiny U-Net and few rounds: checks the script')
  parser.add_argument('--record', default=None, metavar='OUT', help='default docs/results/profile_cpu_step.json')
  args = parser.parse_args()
  args.knobs = list(KNOBS) if args.knobs == 'all' else [] if args.knobs == 'none' else args.knobs.split(',')
  args.parts = args.parts.split(',')
  unknown = [k for k in args.knobs if k not in KNOBS] + [p for p in args.parts if p not in ('steps', 'ops', 'knobs')]
  if unknown:
    parser.error(f'unknown knob or part: {", ".join(unknown)}')
  if args.tiny:
    args.latent, args.batch, args.context_length, args.repeats, args.op_repeats = 8, 1, 8, 2, 2
    args.warmup, args.min_sample_s, args.preset = 1, 0.0, 'tiny'
    args.record = args.record or results.record_path('profile_cpu_step_tiny')
  return args


def main() -> None:
  if len(sys.argv) == 3 and sys.argv[1] == '--worker':
    return worker(sys.argv[2])
  args = parse_args()
  arch = TINY_ARCH if args.tiny else bench_train.PRESETS[args.preset]
  load_at_start = results.load_average()
  print(f'{os.cpu_count()} cores, load average {load_at_start}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  models = bench_train.Models(arch, args.latent, ['flax'])
  batch = bench_train.inputs(args.batch, args.latent, args.context_length, arch['cross_attention_dim'])
  agreement = bench_train.check_agreement(models, *batch[:3], ['flax'])
  print(f'U-Net {models.num_params / 1e6:.2f}M params; max |torch - ours| forward {agreement["torch"]:.2e}', flush=True)
  out: dict[str, Any] = {}
  if 'steps' in args.parts:
    print('whole step, forward, forward+backward, AdamW:', flush=True)
    out['steps'] = measure_steps(models, batch, args)
  if 'ops' in args.parts:
    ops = record_op_calls(models, batch)
    if args.tiny:  # One shape per op type: the check stays short.
      ops = [op for i, op in enumerate(ops) if op['kind'] not in {o['kind'] for o in ops[:i]}]
    print(f'{len(ops)} distinct (op, shape) in one forward pass:', flush=True)
    out['op_shapes'] = measure_ops(ops, args)
    out['ops'] = summarize_ops(out['op_shapes'])
    out['jax_dispatch_ms'] = dispatch_ms(args)
  if 'knobs' in args.parts and args.knobs:
    print('XLA settings (one worker process each, taking turns with the PyTorch step):', flush=True)
    out['knobs'] = measure_knobs(models, batch, args)
    out['retired_flags'] = RETIRED_FLAGS
  settings = {k: v for k, v in vars(args).items() if k != 'record'}
  results.write_record(
    'profile_cpu_step',
    out,
    path=args.record,
    load_at_start=load_at_start,
    settings=settings,
    arch={k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
    num_params=models.num_params,
    max_abs_diff_vs_ours=agreement,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
  )
  print(json.dumps({r['part']: round(r['ratio'], 3) for r in out.get('steps', [])}))


if __name__ == '__main__':
  main()
