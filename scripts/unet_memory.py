r"""Peak memory (and time) of one U-Net forward+backward step, with and without rematerialisation.

  python scripts/unet_memory.py --batch 1 --dtype bfloat16              # every remat setting, compiled estimate
  python scripts/unet_memory.py --batch 8 --dtype bfloat16 --run        # also run it: measured peak + step time

The U-Net is SD 1.5's (859.5M parameters, float32 params, compute in --dtype) on 64x64x4 latents with 77x768
text embeddings; the step is grad of mean(output^2) w.r.t. the params. Without --run the numbers come from XLA's
compiled memory analysis (arguments + outputs + temporaries; nothing is allocated, works on CPU). With --run
each setting runs in its own process and reports the device allocator's peak (`peak_bytes_in_use`, GPU/TPU).
Uses only diffusion.models and diffusion.results (no ml_collections, orbax or data dependencies), so it runs on a
bare JAX install. Writes a record to docs/results/unet_memory_<compiled|measured>_<backend>.json (or --record).
"""

import argparse
import json
import subprocess
import sys
import time

from diffusion import results

# SD 1.5's unet/config.json in our field names (diffusion.interop.configs.unet_from_diffusers gives the same).
SD15_UNET = dict(
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
  use_linear_projection=False,
  flip_sin_to_cos=True,
  freq_shift=0,
  norm_num_groups=32,
  norm_eps=1e-5,
  act_fn='silu',
)
SETTINGS = ('off', 'nothing_saveable', 'dots_saveable')


def _step_fn(remat: str, dtype: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from diffusion.models import UNet2DConditionModel  # pylint: disable=import-outside-toplevel

  unet = UNet2DConditionModel(
    **SD15_UNET,
    remat=remat != 'off',
    remat_policy=remat if remat != 'off' else 'nothing_saveable',
    dtype=jnp.dtype(dtype),
  )

  def loss(params, x, t, ctx):
    return jnp.mean(jnp.square(unet.apply({'params': params}, x, t, ctx).astype(jnp.float32)))

  return unet, jax.jit(jax.value_and_grad(loss))


def _inputs(batch: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  keys = jax.random.split(jax.random.key(0), 3)
  return (
    jax.random.normal(keys[0], (batch, 64, 64, 4)),
    jnp.full((batch,), 500.0),
    jax.random.normal(keys[1], (batch, 77, 768)),
  )


def measure(remat: str, batch: int, dtype: str, run: bool) -> dict:
  """One setting's numbers (in this process)."""
  import jax  # pylint: disable=import-outside-toplevel

  unet, step = _step_fn(remat, dtype)
  x, t, ctx = _inputs(batch)
  shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x[:1], t[:1], ctx[:1]))['params']
  num_params = sum(int(v.size) for v in jax.tree.leaves(shapes))
  start = time.perf_counter()
  compiled = step.lower(shapes, x, t, ctx).compile()
  result = {
    'remat': remat,
    'batch': batch,
    'dtype': dtype,
    'params': num_params,
    'compile_s': round(time.perf_counter() - start, 1),
    'device': jax.devices()[0].device_kind,
  }
  stats = compiled.memory_analysis()
  if stats is not None:
    result['compiled_temp_gib'] = stats.temp_size_in_bytes / 2**30
    result['compiled_total_gib'] = (
      stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes - stats.alias_size_in_bytes
    ) / 2**30
  if run:
    params = jax.jit(lambda k: unet.init(k, x[:1], t[:1], ctx[:1])['params'])(jax.random.key(1))
    jax.block_until_ready(compiled(params, x, t, ctx))
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x, t, ctx))
      times.append(time.perf_counter() - start)
    result['step_s'] = round(min(times), 4)
    memory = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in memory:
      result['peak_gib'] = memory['peak_bytes_in_use'] / 2**30
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='bfloat16', help='compute dtype (params stay float32)')
  parser.add_argument('--remat', choices=SETTINGS, default=None, help='one setting, in this process')
  parser.add_argument('--run', action='store_true', help='run the step and read the allocator peak')
  parser.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated remat settings to measure')
  parser.add_argument(
    '--record',
    default=None,
    help='where the record goes (default: docs/results/unet_memory_<compiled|measured>_<backend>.json)',
  )
  args = parser.parse_args()
  if args.remat is not None:
    print(json.dumps(measure(args.remat, args.batch, args.dtype, args.run)), flush=True)
    return
  import jax  # pylint: disable=import-outside-toplevel

  load_at_start = results.load_average()
  rows = []
  for remat in args.settings.split(','):  # One process per setting: an allocator's peak cannot be reset.
    command = [sys.executable, __file__, '--remat', remat, '--batch', str(args.batch), '--dtype', args.dtype]
    result = subprocess.run(command + (['--run'] if args.run else []), capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
      print(f'{remat}: failed\n{result.stderr[-2000:]}', flush=True)
      continue
    rows.append(json.loads(lines[-1]))
    print(lines[-1], flush=True)
  name = f'unet_memory_{"measured" if args.run else "compiled"}_{jax.default_backend()}'
  results.write_record(
    name,
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings={k: v for k, v in vars(args).items() if k not in ('remat', 'record')},
  )


if __name__ == '__main__':
  main()
