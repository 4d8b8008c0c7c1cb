r"""GPU benchmark of the SD-1.5-size U-Net: training step and 50-step DDIM sampling, bf16 compute.

  python scripts/bench_gpu.py                  # on a GPU/TPU machine; needs only jax, flax, optax, numpy
  python scripts/bench_gpu.py --tiny           # a tiny U-Net, to check the script on a CPU

Prints, per setting, step time, images/s (global and per device), the model FLOPs of the compiled step (XLA cost
analysis), achieved TFLOP/s and MFU against the device's dense peak bf16 rate (diffusion/throughput.py; None
where the device is not in its table, e.g. CPU). Training runs at 256 px and 512 px (32x32 and 64x64 latents), sampling
(50-step DDIM with classifier-free guidance) at both too; the sampling FLOPs are those of one guided U-Net evaluation
times the number of steps (XLA's cost analysis counts a loop body once). The text encoder is left out (random 77x768
context), as the U-Net dominates. Imports only diffusion.models / process / samplers / throughput / results (no
data, checkpoint or logging stack), so it runs on a bare accelerator machine. Writes its record to
docs/results/bench_gpu.json (--record elsewhere; a --tiny run goes to docs/results/bench_gpu_tiny.json).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import process, results, samplers, throughput
from diffusion.models.unet import UNet2DConditionModel

SD15 = dict(
  sample_size=64,
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
TINY = dict(SD15, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)


def time_fn(fn, *args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def random_params(module, *args):
  """Params of `module`'s shapes drawn with numpy (timing needs no real init; XLA's CPU compile of a whole
  network's init RNG takes minutes)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))['params']
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32), s.dtype), shapes)


def bench_train(arch: dict, latent: int, batch: int, repeats: int, peak: float | None) -> dict:
  unet = UNet2DConditionModel(**{**arch, 'sample_size': latent}, dtype=jnp.bfloat16)
  ctx_dim = arch['cross_attention_dim']
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (batch, latent, latent, 4))
  ctx = jax.random.normal(rng, (batch, 77, ctx_dim))
  t = jax.random.randint(rng, (batch,), 0, 1000)
  params = random_params(unet, x[:1], t[:1], ctx[:1])
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  def step(params, opt_state, x, t, ctx):
    loss, grads = jax.value_and_grad(
      lambda p: jnp.mean(jnp.square(unet.apply({'params': p}, x, t, ctx).astype(jnp.float32) - x))
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  compile_start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x, t, ctx).compile()
  compile_s = time.perf_counter() - compile_start
  flops = throughput.compiled_flops(compiled)
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], x, t, ctx)
    return loss

  seconds = time_fn(lambda: run(), repeats=repeats)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  result = {
    'what': 'train_step',
    'resolution_px': latent * 8,
    'batch': batch,
    'params_M': round(n_params / 1e6, 1),
    'compile_s': round(compile_s, 1),
    'tflops_per_step': round((flops or 0) / 1e12, 3),
  }
  return {**result, **_rounded(throughput.throughput(seconds, batch, 1, flops, peak))}


def _rounded(values: dict) -> dict:
  return {k: float(f'{v:.4g}') for k, v in values.items()}


def bench_sample(arch: dict, latent: int, batch: int, num_steps: int, repeats: int, peak: float | None) -> dict:
  unet = UNet2DConditionModel(**{**arch, 'sample_size': latent}, dtype=jnp.bfloat16)
  rng = jax.random.PRNGKey(0)
  ctx = jax.random.normal(rng, (batch, 77, arch['cross_attention_dim']))
  x = jax.random.normal(rng, (batch, latent, latent, 4))
  params = random_params(unet, x[:1], jnp.zeros((1,), jnp.int32), ctx[:1])
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  schedule = process.schedule_from_betas(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)

  @jax.jit
  def generate(params, x_T, cond, uncond):
    model_fn = lambda z, t, c: unet.apply({'params': params}, z, t, c).astype(jnp.float32)
    denoise = samplers.cfg_denoise_fn(model_fn, cond, uncond, 7.5)
    return samplers.get_sampler('ddim')(denoise, x_T, schedule, num_steps=num_steps, prediction_type='eps')

  compile_start = time.perf_counter()
  jax.block_until_ready(generate(params, x, ctx, ctx * 0))
  compile_s = time.perf_counter() - compile_start
  seconds = time_fn(generate, params, x, ctx, ctx * 0, repeats=repeats)
  # One guided evaluation (U-Net batch 2 x batch), compiled alone: XLA counts the sampler's loop body only once.
  guided = jnp.concatenate([x, x]), jnp.zeros((2 * batch,), jnp.int32), jnp.concatenate([ctx, ctx])
  eval_flops = throughput.jit_flops(jax.jit(lambda p, z, t, c: unet.apply({'params': p}, z, t, c)), params, *guided)
  flops = eval_flops * num_steps if eval_flops else None
  result = {
    'what': f'ddim_{num_steps}_steps_cfg',
    'resolution_px': latent * 8,
    'batch': batch,
    'first_call_s': round(compile_s, 1),
    'tflops_per_run': round((flops or 0) / 1e12, 3),
    'unet_evals_per_s': round(2 * batch * num_steps / seconds, 1),
  }
  return {**result, **_rounded(throughput.throughput(seconds, batch, 1, flops, peak))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true', help='tiny U-Net, small batches (a CPU check of the script)')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument(
    '--record',
    '--json',
    '--out',
    dest='record',
    default=None,
    metavar='OUT',
    help='where the record goes (default docs/results/bench_gpu.json, --tiny: bench_gpu_tiny.json)',
  )
  args = parser.parse_args()
  load_at_start = results.load_average()
  device = jax.devices()[0]
  peak = throughput.peak_tflops(device.device_kind, 'bfloat16')
  arch = TINY if args.tiny else SD15
  print(
    f'device: {device.device_kind} (using 1 of {jax.device_count()}; jax {jax.__version__}); dense peak bf16 '
    f'{peak} TFLOP/s',
    flush=True,
  )
  settings = [(32, 2), (64, 1)] if args.tiny else [(32, 32), (64, 8)]
  rows = []
  for latent, batch in settings:
    rows.append(bench_train(arch, latent, batch, 2 if args.tiny else args.repeats, peak))
    print(json.dumps(rows[-1]), flush=True)
  sample_settings = [(32, 2, 4)] if args.tiny else [(32, 8, 50), (64, 8, 50)]
  for latent, batch, steps in sample_settings:
    rows.append(bench_sample(arch, latent, batch, steps, 1 if args.tiny else 3, peak))
    print(json.dumps(rows[-1]), flush=True)
  results.write_record(
    'bench_gpu_tiny' if args.tiny else 'bench_gpu',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings=vars(args),
    peak_bf16_tflops=peak,
  )


if __name__ == '__main__':
  main()
