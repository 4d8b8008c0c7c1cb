r"""Peak memory (and time) of one U-Net training step per latent size, attention implementation and remat setting.

  python scripts/unet_memory.py --batch 1 --dtype bfloat16              # every setting, compiled estimate
  python scripts/unet_memory.py --batch 8 --dtype bfloat16 --run        # also run it: measured peak + step time
  python scripts/unet_memory.py --sizes 32 --attention xla --settings off,nothing_saveable,attention:dots_saveable

The U-Net is SD 1.5's (859.5M parameters, float32 params, compute in --dtype) on SxSx4 latents (--sizes: 32 is 256 px
images, 64 is 512 px) with 77x768 text embeddings; the step is grad of mean(output^2) w.r.t. the params. --attention
lists the implementations (`diffusion.models.attention`; default: those this backend has, xla plus cudnn on GPU or
splash on TPU). A remat setting is 'off', a policy ('nothing_saveable', 'dots_saveable', ...: every resnet and
transformer block recomputes, `remat=True`), or 'resnet:<policy>' / 'attention:<policy>' (only that block type,
`remat_blocks`). Without --run the numbers come from XLA's compiled memory analysis (arguments + outputs +
temporaries; nothing is allocated, works on CPU). With --run each setting runs in its own process and reports the
device allocator's peak (`peak_bytes_in_use`, GPU/TPU). Uses only diffusion.models and diffusion.results (no
ml_collections, orbax or data dependencies), so it runs on a bare JAX install. Writes a record (rewritten after each
setting, so a long run keeps what it measured) to docs/results/unet_memory_<compiled|measured>_<backend>.json (or
--record).
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
BACKEND_ATTENTION = {'gpu': ('xla', 'cudnn'), 'tpu': ('xla', 'splash')}  # Default --attention per backend.


def remat_fields(remat: str) -> dict:
  """The U-Net's remat fields for a setting: 'off', '<policy>' (all blocks) or '<resnet|attention>:<policy>'."""
  if remat == 'off':
    return {'remat': False}
  blocks, _, policy = remat.rpartition(':')
  return {'remat': True, 'remat_policy': policy, 'remat_blocks': blocks or 'all'}


def _step_fn(remat: str, attention: str, dtype: str):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from diffusion.models import UNet2DConditionModel  # pylint: disable=import-outside-toplevel

  unet = UNet2DConditionModel(**SD15_UNET, **remat_fields(remat), attention=attention, dtype=jnp.dtype(dtype))

  def loss(params, x, t, ctx):
    return jnp.mean(jnp.square(unet.apply({'params': params}, x, t, ctx).astype(jnp.float32)))

  return unet, jax.jit(jax.value_and_grad(loss))


def _inputs(batch: int, size: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  keys = jax.random.split(jax.random.key(0), 3)
  return (
    jax.random.normal(keys[0], (batch, size, size, 4)),
    jnp.full((batch,), 500.0),
    jax.random.normal(keys[1], (batch, 77, 768)),
  )


def measure(remat: str, batch: int, dtype: str, run: bool, size: int = 64, attention: str = 'xla') -> dict:
  """One setting's numbers (in this process)."""
  import jax  # pylint: disable=import-outside-toplevel

  unet, step = _step_fn(remat, attention, dtype)
  x, t, ctx = _inputs(batch, size)
  shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x[:1], t[:1], ctx[:1]))['params']
  num_params = sum(int(v.size) for v in jax.tree.leaves(shapes))
  start = time.perf_counter()
  compiled = step.lower(shapes, x, t, ctx).compile()
  result = {
    'latent': size,
    'image_px': 8 * size,
    'attention': attention,
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


def _measure_in_subprocess(args: argparse.Namespace, size: int, attention: str, remat: str) -> dict | None:
  """One setting in a fresh process (an allocator's peak cannot be reset), or None if it failed."""
  command = [sys.executable, __file__, '--remat', remat, '--batch', str(args.batch), '--dtype', args.dtype]
  command += ['--sizes', str(size), '--attention', attention] + (['--run'] if args.run else [])
  result = subprocess.run(command, capture_output=True, text=True)
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    print(f'{size}x{size} {attention} {remat}: failed\n{result.stderr[-2000:]}', flush=True)
    return None
  print(lines[-1], flush=True)
  return json.loads(lines[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='bfloat16', help='compute dtype (params stay float32)')
  parser.add_argument('--remat', default=None, help='one remat setting, measured in this process')
  parser.add_argument('--run', action='store_true', help='run the step and read the allocator peak')
  parser.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated remat settings to measure')
  parser.add_argument('--sizes', default='32,64', help='comma-separated latent sides (32: 256 px, 64: 512 px)')
  parser.add_argument('--attention', default=None, help='comma-separated implementations (default: per backend)')
  parser.add_argument(
    '--record',
    default=None,
    help='where the record goes (default: docs/results/unet_memory_<compiled|measured>_<backend>.json)',
  )
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel

  sizes = [int(v) for v in args.sizes.split(',')]
  attentions = (args.attention or ','.join(BACKEND_ATTENTION.get(jax.default_backend(), ('xla',)))).split(',')
  if args.remat is not None:
    print(json.dumps(measure(args.remat, args.batch, args.dtype, args.run, sizes[0], attentions[0])), flush=True)
    return
  load_at_start = results.load_average()
  name = f'unet_memory_{"measured" if args.run else "compiled"}_{jax.default_backend()}'
  settings = {k: v for k, v in vars(args).items() if k not in ('remat', 'record')}
  settings['attention'] = ','.join(attentions)
  rows = []
  for size in sizes:
    for attention in attentions:
      for remat in args.settings.split(','):
        row = _measure_in_subprocess(args, size, attention, remat)
        if row is not None:
          rows.append(row)
          results.write_record(name, rows, path=args.record, load_at_start=load_at_start, settings=settings)


if __name__ == '__main__':
  main()
