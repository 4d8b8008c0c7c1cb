r"""50-step DDIM sampling benchmark with classifier-free guidance: ours vs diffusers-Flax vs diffusers PyTorch.

  python scripts/bench_sample.py                      # small SD-like U-Net, 32x32 latents, 2 images, on CPU
  python scripts/bench_sample.py --preset medium --batch 4 --json sample.json

Same U-Net and weights as scripts/bench_train.py (one random diffusers model loaded by all three sides). Each run
generates `--batch` latents with guidance scale 7.5, so the U-Net sees batch 2x`--batch` at every step, with SD's
DDIM settings (scaled-linear betas 0.00085-0.012, 'leading' spacing, steps_offset 1, set_alpha_to_one False):
  ours:            diffusion.samplers 'ddim' + cfg_denoise_fn, the whole loop one jitted lax.scan;
  diffusers-Flax:  FlaxDDIMScheduler in a jitted lax.fori_loop, as FlaxStableDiffusionPipeline runs it;
  PyTorch:         DDIMScheduler in a Python loop under torch.no_grad, as StableDiffusionPipeline runs it.
The final latents of the three are compared (same noise, same schedule). Warm-up runs (and compilation) are
excluded; the table gives the median of `--repeats` runs, in ms per sampler step and images/s.
"""

import argparse
import os
from typing import Callable

import bench_train as common  # scripts/ is on sys.path when this runs as `python scripts/bench_sample.py`.
import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process, results, samplers, throughput

SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule='scaled_linear',
  clip_sample=False,
  set_alpha_to_one=False,
  steps_offset=1,
)


def ours_generate(models: common.Models, steps: int, guidance: float) -> Callable:
  """(x_T NHWC, cond, uncond) -> x_0 NHWC, jitted."""
  betas = np.linspace(SCHEDULER['beta_start'] ** 0.5, SCHEDULER['beta_end'] ** 0.5, 1000, dtype=np.float64) ** 2
  schedule = process.schedule_from_betas(betas)
  apply = models.ours_fn()
  sampler = samplers.get_sampler('ddim')

  @jax.jit
  def generate(params, x_T, cond, uncond):
    denoise = samplers.cfg_denoise_fn(lambda z, t, c: apply(params, z, t, c), cond, uncond, guidance)
    return sampler(denoise, x_T, schedule, num_steps=steps, prediction_type='eps', steps_offset=1)

  return lambda x, cond, uncond: generate(models.ours_params, x, cond, uncond)


def flax_generate(models: common.Models, steps: int, guidance: float) -> Callable:
  """The denoising loop of diffusers' FlaxStableDiffusionPipeline._generate (NCHW latents), jitted."""
  from diffusers import FlaxDDIMScheduler

  scheduler = FlaxDDIMScheduler(**SCHEDULER)
  unet = models.flax

  @jax.jit
  def generate(params, latents, cond, uncond):
    context = jnp.concatenate([uncond, cond])
    state = scheduler.set_timesteps(scheduler.create_state(), steps, shape=latents.shape)
    latents = latents * state.init_noise_sigma

    def loop_body(step, args):
      latents, state = args
      latents_input = jnp.concatenate([latents] * 2)
      t = jnp.array(state.timesteps, dtype=jnp.int32)[step]
      timestep = jnp.broadcast_to(t, latents_input.shape[0])
      latents_input = scheduler.scale_model_input(state, latents_input, t)
      noise_pred = unet.apply({'params': params}, latents_input, timestep, encoder_hidden_states=context).sample
      uncond_pred, text_pred = jnp.split(noise_pred, 2, axis=0)
      noise_pred = uncond_pred + guidance * (text_pred - uncond_pred)
      latents, state = scheduler.step(state, noise_pred, t, latents).to_tuple()
      return latents, state

    latents, _ = jax.lax.fori_loop(0, steps, loop_body, (latents, state))
    return latents

  return lambda x, cond, uncond: generate(models.flax_params, x.transpose(0, 3, 1, 2), cond, uncond).transpose(
    0, 2, 3, 1
  )


def torch_generate(models: common.Models, steps: int, guidance: float, threads: int) -> Callable:
  """The denoising loop of diffusers' StableDiffusionPipeline.__call__ (NCHW latents)."""
  import torch
  from diffusers import DDIMScheduler

  torch.set_num_threads(threads)
  scheduler = DDIMScheduler(**SCHEDULER)
  unet = models.torch.eval()

  def generate(x, cond, uncond):
    with torch.no_grad():
      scheduler.set_timesteps(steps)
      latents = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2) * scheduler.init_noise_sigma
      context = torch.cat([torch.from_numpy(np.asarray(uncond)), torch.from_numpy(np.asarray(cond))])
      for t in scheduler.timesteps:
        latents_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(latents_input, t, encoder_hidden_states=context).sample
        uncond_pred, text_pred = noise_pred.chunk(2)
        noise_pred = uncond_pred + guidance * (text_pred - uncond_pred)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
      return latents.permute(0, 2, 3, 1).numpy()

  return generate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_common_flags(parser, batch=2)
  parser.add_argument('--steps', type=int, default=50, help='DDIM steps')
  parser.add_argument('--guidance-scale', type=float, default=7.5)
  parser.set_defaults(repeats=3, warmup=1)
  args = parser.parse_args()
  if args.batch < 1 or args.latent % 8 or args.repeats < 1 or args.steps < 1:
    parser.error('need --batch >= 1, --latent a multiple of 8, --repeats >= 1 and --steps >= 1')
  arch = common.PRESETS[args.preset]
  load_at_start = results.load_average()
  print(f'device {throughput.local_device_kind()}, {os.cpu_count()} cores, load average {load_at_start}', flush=True)
  models = common.Models(arch, args.latent, args.skip)
  x, _, cond, _ = common.inputs(args.batch, args.latent, args.context_length, arch['cross_attention_dim'])
  uncond = common.inputs(args.batch, args.latent, args.context_length, arch['cross_attention_dim'], seed=1)[2]
  print(
    f'U-Net {args.preset}: {models.num_params / 1e6:.2f}M params, latents {args.latent}x{args.latent}x4, '
    f'{args.batch} images (U-Net batch {2 * args.batch}), {args.steps} DDIM steps',
    flush=True,
  )
  makers = {
    'ours': lambda: ours_generate(models, args.steps, args.guidance_scale),
    'flax': lambda: flax_generate(models, args.steps, args.guidance_scale),
    'torch': lambda: torch_generate(models, args.steps, args.guidance_scale, args.threads),
  }
  finals, runs = {}, {}
  for side in [s for s in common.SIDES if s not in args.skip]:
    generate = makers[side]()
    runs[side] = lambda side=side, generate=generate: finals.__setitem__(
      side, np.asarray(jax.block_until_ready(generate(x, cond, uncond)))
    )
  times = common.time_runs(runs, max(args.warmup, 1), args.repeats)  # The first JAX call compiles.
  rows = [
    common.summarize(
      side,
      times[side],
      args.batch,
      None,
      {'ms_per_sampler_step': 1e3 * float(np.median(times[side])) / args.steps, 'times_s': times[side]},
    )
    for side in runs
  ]
  agreement = {
    s: float(np.abs(v - finals['ours']).max()) for s, v in finals.items() if s != 'ours' and 'ours' in finals
  }
  common.print_table(
    f'{args.steps}-step DDIM, CFG {args.guidance_scale}, {args.preset} U-Net, {args.batch} images '
    f'(U-Net batch {2 * args.batch}), {args.latent}x{args.latent} latents, float32; load avg '
    f'{load_at_start} -> {results.load_average()}',
    rows,
    'sampler step',
    per=args.steps,
  )
  print(f'max |final latents - ours| (same noise and weights): {agreement}')
  results.write_record(
    'bench_sample',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings=vars(args),
    num_params=models.num_params,
    max_abs_diff_vs_ours=agreement,
  )


if __name__ == '__main__':
  main()
