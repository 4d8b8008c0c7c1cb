r"""LoRA vs full fine-tuning: train-step time of the tiny stage-2 model, compiled memory of the SD 1.5 U-Net's step.

  python scripts/bench_lora.py                                # both parts (the SD 1.5 compiles take minutes on CPU)
  python scripts/bench_lora.py --tiny-only --repeats 5 --warmup 2
  python scripts/bench_lora.py --skip-tiny                    # only the SD 1.5 compiled memory

Both sides of each part are the project's train step (`state.make_train_step`: loss, gradient, global-norm clipping,
AdamW from `state.create_optimizer`, EMA), jitted with the state donated:

- full: the LDM task (`LDMTask`), gradients, Adam moments and EMA for every trained param (the tiny preset trains
  the U-Net and its text encoder; the SD 1.5 step the U-Net, its text encoder being frozen and absent);
- lora: the LoRA task (`LoRATask`, rank --rank on the default targets `lora.DEFAULT_TARGETS`), gradients, Adam moments
  and EMA for the LoRA factors only; the base params are frozen (an argument of the step) and the loss is the LDM
  task's on `lora.apply(base, factors, 1.0, multiplier=alpha / rank)`.

Tiny part: configs/ldm_base.py:tiny with random weights. The base is written as a workdir (frozen VAE, tokenizer,
checkpoint, config.json; as `scripts/convert.py import` writes one), the full side is the LDM task on it and the LoRA
side the LoRA task with `base_workdir` naming it. Batches of --batch random 32 px images with random captions (the
frozen VAE encodes the images in the step, as a run without a latent cache does; --inputs latents: batches of latent
posteriors, as from a latent cache). The sides take turns (lora full lora full ...) for --repeats timed steps each
after --warmup untimed ones; the record holds every step's time, the medians and their ratio lora / full, the trained
parameter counts, the bytes of the optimizer state, the EMA and the frozen params, XLA's FLOPs per step and its
compiled memory analysis.

SD 1.5 part: SD 1.5's U-Net (configs/ldm_base.py `get_unet_config()` on 64x64x4 latents, batch 1) with float32
params and --sd15-dtype compute (bfloat16, as scripts/unet_memory.py measures it; remat off, XLA attention). The
batches carry a latent posterior and a (1, 77, 768) text embedding (as a latent cache with text embeddings gives
them), so no text encoder runs and none is in the state. Only compiled: shapes come from `jax.eval_shape`, nothing
SD-sized is allocated. XLA's `compiled.memory_analysis()` gives arguments, outputs, temporaries, the bytes aliased
by donation and their total (arguments + outputs + temporaries - aliased, as unet_memory.py adds them) per side and
the ratios lora / full. The tasks of this part are built without workdirs (`_build` on a config: the same networks,
loss and caption dropout; the VAE and text encoder do not run).

Writes a record (rewritten after each part) to docs/results/bench_lora.json (or --record) and prints the ratios.
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from bench_train import time_runs  # scripts/ is on the path of a script run from it.

from diffusion import results, throughput

SIDES = ('lora', 'full')


def tree_size(tree: Any) -> int:
  """Scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_analysis(compiled: Any) -> dict[str, int] | None:
  """XLA's compiled memory analysis in bytes (None where the backend gives none); total as scripts/unet_memory.py."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  arguments, outputs = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
  temporaries, aliased = int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)
  return {
    'arguments_bytes': arguments,
    'outputs_bytes': outputs,
    'temporaries_bytes': temporaries,
    'aliased_bytes': aliased,
    'total_bytes': arguments + outputs + temporaries - aliased,
  }


def state_sizes(state: Any, frozen: Any) -> dict[str, int]:
  """What a side holds: trained params, their optimizer state and EMA (bytes), and the frozen params (bytes)."""
  return {
    'trained_params': tree_size(state.params),
    'params_bytes': tree_bytes(state.params),
    'opt_state_bytes': tree_bytes(state.opt_state),
    'ema_bytes': tree_bytes(state.ema_params),
    'frozen_bytes': tree_bytes(frozen),
  }


def ratios(lora: dict, full: dict, keys: tuple[str, ...]) -> dict[str, float]:
  return {key: lora[key] / full[key] for key in keys if lora.get(key) and full.get(key)}


def random_params(shapes: Any, seed: int) -> Any:
  """Params of the given shapes drawn with numpy (no init to compile): kernels ~ N(0, 1 / fan-in), norm scales 1,
  embeddings ~ N(0, 0.02^2), biases 0."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return np.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
    if name == 'embedding':
      return np.asarray(0.02 * rng.normal(size=leaf.shape), leaf.dtype)
    return np.full(leaf.shape, float(name == 'scale'), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny model: step time.


def tiny_config(args: argparse.Namespace, overrides: dict | None = None):
  """configs/ldm_base.py:tiny at --batch, with `overrides` (dotted keys, as on the command line)."""
  import ml_collections  # pylint: disable=import-outside-toplevel

  from configs import ldm_base  # pylint: disable=import-outside-toplevel

  config = ldm_base.get_config('tiny')
  config.evals = ml_collections.ConfigDict()
  config.wandb.mode = 'disabled'
  config.model.vae.scaling_factor = 1.0  # No calibration (it does not change the speed).
  config.train.batch_size = args.batch
  for key, value in (overrides or {}).items():
    *path, leaf = key.split('.')
    node = config
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def write_base(config, root: str, seed: int = 0) -> tuple[str, Any, Any]:
  """A random-weight tiny LDM workdir under `root`/base: (its path, its LDM task, its params)."""
  from diffusion import checkpoint, models  # pylint: disable=import-outside-toplevel
  from diffusion import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  from diffusion.training.ldm_task import LDMTask  # pylint: disable=import-outside-toplevel

  base = os.path.join(root, 'base')
  size = config.data.image_size
  vae = models.create_vae(config.model.vae)
  image = jnp.zeros((1, size, size, config.model.vae.in_channels), jnp.float32)
  vae_shapes = jax.eval_shape(lambda k: vae.init({'params': k}, image, k)['params'], jax.random.PRNGKey(0))
  workdir_lib.save_frozen(base, 'vae', random_params(vae_shapes, seed))  # The task reads it as a resumed run would.
  task = LDMTask(config, base)  # Builds the tokenizer from the shapes vocabulary and saves it in the workdir.
  params = random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)), seed + 1)
  state = train_state(task, jax.tree.map(jnp.asarray, params))
  ckpt = checkpoint.Checkpointer(base, async_save=False)
  ckpt.save(0, state, None, {'model_type': 'ldm', 'scaling_factor': 1.0, 'imported_from': 'random'}, force=True)
  ckpt.close()
  workdir_lib.write_config(base, task.config)
  return base, task, params


def tiny_batch(task: Any, batch: int, inputs: str, seed: int = 0) -> dict:
  """A random global batch: images and token ids, or (inputs='latents') latent posteriors and token ids."""
  c = task.config
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, len(task.tokenizer), (batch, c.data.max_text_length)).astype(np.int32)
  if inputs == 'latents':
    side, channels = c.model.unet.sample_size, c.model.unet.in_channels
    mean = rng.standard_normal((batch, side, side, channels)).astype(np.float32)
    return {'latent_mean': mean, 'latent_logvar': np.full_like(mean, -4.0), 'input_ids': ids}
  size = c.data.image_size
  image = rng.uniform(-1.0, 1.0, (batch, size, size, c.model.vae.in_channels)).astype(np.float32)
  return {'image': image, 'input_ids': ids}


def train_state(task: Any, params: Any) -> Any:
  """The train state of `task` starting from `params`, as the loop creates it (AdamW of `create_optimizer`, EMA)."""
  from diffusion.training import state as state_lib  # pylint: disable=import-outside-toplevel

  c = task.config
  tx = state_lib.create_optimizer(c.optim, c.train.num_steps, frozen=task.frozen_param_groups)
  return state_lib.create_train_state(params, tx, jax.random.PRNGKey(2))


def compile_step(task: Any, state: Any, batch: Any, frozen: Any) -> tuple[Any, float]:
  """(the compiled train step of `task`, jitted with the state donated; compile seconds). Arrays or shapes."""
  from diffusion.training import state as state_lib  # pylint: disable=import-outside-toplevel

  step = jax.jit(state_lib.make_train_step(task.loss_fn, task.config.optim.ema_decay), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  return compiled, time.perf_counter() - start


def compiled_numbers(compiled: Any, compile_s: float) -> dict:
  flops = throughput.compiled_flops(compiled)
  return {
    'compile_s': round(compile_s, 2),
    'gflops_per_step': flops / 1e9 if flops else None,
    'compiled_memory': memory_analysis(compiled),
  }


def tiny_tasks(args: argparse.Namespace, root: str, overrides: dict | None = None) -> dict[str, tuple[Any, Any]]:
  """{side: (task, start params)}: the LDM task on a random base workdir written under `root` and its params, the
  LoRA task on that base and fresh factors."""
  from diffusion.training.lora_task import LoRATask  # pylint: disable=import-outside-toplevel

  config = tiny_config(args, overrides)
  base, full_task, base_params = write_base(config, root)
  lora_config = config.copy_and_resolve_references()
  lora_config.base_workdir = base
  lora_config.lora.rank = args.rank
  lora_config.lora.alpha = float(args.rank if args.alpha is None else args.alpha)
  lora_task = LoRATask(lora_config, os.path.join(root, 'lora'))
  return {'lora': (lora_task, lora_task.init_params(jax.random.PRNGKey(3))), 'full': (full_task, base_params)}


def measure_tiny(args: argparse.Namespace, overrides: dict | None = None) -> dict:
  from diffusion import lora as lora_lib  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as root:
    tasks = tiny_tasks(args, root, overrides)
    (lora_task, factors), (full_task, base_params) = tasks['lora'], tasks['full']
    config = full_task.config
    batch = jax.tree.map(jnp.asarray, tiny_batch(full_task, args.batch, args.inputs))
    sides, runs = {}, {}
    for side in SIDES:
      task, params = tasks[side]
      print(f'tiny: compiling the {side} step ...', flush=True)
      state = train_state(task, jax.tree.map(jnp.array, params))
      frozen = jax.tree.map(jnp.asarray, task.frozen)
      compiled, compile_s = compile_step(task, state, batch, frozen)
      sides[side] = {**state_sizes(state, frozen), **compiled_numbers(compiled, compile_s)}
      holder = [state]

      def run(compiled=compiled, holder=holder, frozen=frozen):
        holder[0], metrics = compiled(holder[0], batch, frozen)
        return jax.block_until_ready(metrics['loss'])

      runs[side] = run
    print(f'tiny: {args.warmup} warm-up and {args.repeats} timed steps per side, taking turns', flush=True)
    times = time_runs(runs, args.warmup, args.repeats)
  for side in SIDES:
    t = times[side]
    median = statistics.median(t)
    sides[side].update(
      {'median_s': median, 'min_s': min(t), 'max_s': max(t), 'images_per_s': args.batch / median, 'times_s': t}
    )
  lora, full = sides['lora'], sides['full']
  unet = config.model.unet
  return {
    'model': {
      'config': 'configs/ldm_base.py:tiny' + (f' with {overrides}' if overrides else ''),
      'unet_params': tree_size(base_params['unet']),
      'text_params': tree_size(base_params['text']),
      'text_trainable': bool(config.model.text.trainable),
      'latents': f'{unet.sample_size}x{unet.sample_size}x{unet.in_channels}',
      'image_size': config.data.image_size,
      'batch': args.batch,
      'inputs': args.inputs,
      'compute_dtype': throughput.compute_dtype(unet, config.train),
    },
    'lora': {
      'rank': args.rank,
      'alpha': lora_task.config.lora.alpha,
      'targets': list(lora_lib.config_targets(lora_task.config.lora)),
      'modules': len(lora_lib.modules(factors)),
    },
    'sides': sides,
    'ratio_lora_over_full': {
      'median_s': lora['median_s'] / full['median_s'],
      **ratios(lora, full, ('trained_params', 'opt_state_bytes', 'ema_bytes', 'gflops_per_step')),
      **(
        ratios(lora['compiled_memory'], full['compiled_memory'], ('temporaries_bytes', 'total_bytes'))
        if lora['compiled_memory'] and full['compiled_memory']
        else {}
      ),
    },
  }


# ---------------------------------------------------------------------------------------------------------------------
# SD 1.5 U-Net: compiled memory.


def sd15_tasks(args: argparse.Namespace, unet_overrides: dict | None = None) -> tuple[Any, Any, Any]:
  """(config, LDM task, LoRA task) of the SD 1.5 U-Net (with `unet_overrides`: fields of `model.unet`, for tests),
  built without workdirs (nothing is read or allocated)."""
  from configs import ldm_base  # pylint: disable=import-outside-toplevel
  from diffusion.data import shapes as shapes_lib  # pylint: disable=import-outside-toplevel
  from diffusion.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from diffusion.training.ldm_task import LDMTask  # pylint: disable=import-outside-toplevel
  from diffusion.training.lora_task import LoRATask, multiplier  # pylint: disable=import-outside-toplevel

  config = ldm_base.get_config('sd15')  # Frozen text encoder, the fine-tuning optimizer; its U-Net remat is reset:
  config.model.unet = ldm_base.get_unet_config()  # get_unet_config()'s defaults, on 64x64x4 latents.
  config.model.unet.sample_size = 64
  config.model.unet.attention = 'xla'
  config.model.unet.update(unet_overrides or {})
  config.model.text.type = 'transformer'  # Never runs: the batches carry the text embeddings.
  config.train.compute_dtype = args.sd15_dtype
  config.lora.rank = args.rank
  config.lora.alpha = float(args.rank if args.alpha is None else args.alpha)
  # A small word tokenizer: the null prompt's ids only (the text encoder does not run).
  tokenizer = tokenizer_lib.build_word_tokenizer(list(shapes_lib.vocabulary()), config.data.max_text_length)
  built = []
  for cls in (LDMTask, LoRATask):
    task = cls.__new__(cls)
    task._build(config.copy_and_resolve_references(), None, tokenizer, '')  # pylint: disable=protected-access
    # The empty prompt's embedding caption dropout swaps in (as from a latent cache with text embeddings).
    task.null_context = jnp.zeros((config.data.max_text_length, config.model.unet.cross_attention_dim), jnp.float32)
    built.append(task)
  built[1].multiplier = multiplier(config)
  return config, built[0], built[1]


def measure_sd15(args: argparse.Namespace, unet_overrides: dict | None = None) -> dict:
  from diffusion import lora as lora_lib  # pylint: disable=import-outside-toplevel

  config, full_task, lora_task = sd15_tasks(args, unet_overrides)
  u = config.model.unet
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = {
    'latent_mean': f32(1, u.sample_size, u.sample_size, u.in_channels),
    'latent_logvar': f32(1, u.sample_size, u.sample_size, u.in_channels),
    'text_embedding': f32(1, config.data.max_text_length, u.cross_attention_dim),
  }
  x, t = batch['latent_mean'], jax.ShapeDtypeStruct((1,), jnp.int32)
  unet_shapes = jax.eval_shape(full_task.unet.init, jax.random.PRNGKey(0), x, t, batch['text_embedding'])['params']
  factor_shapes = jax.eval_shape(
    lambda k, p: lora_lib.factors(lora_lib.init(k, p, config.lora.rank, config.lora.alpha, lora_lib.DEFAULT_TARGETS)),
    jax.random.PRNGKey(0),
    {'unet': unet_shapes},
  )
  setups = {
    'lora': (lora_task, factor_shapes, {'vae': {}, 'base': {'unet': unet_shapes}}),  # No VAE: latents in the batch.
    'full': (full_task, {'unet': unet_shapes}, {'vae': {}}),
  }
  sides = {}
  for side in SIDES:
    task, params, frozen = setups[side]
    state = jax.eval_shape(lambda p, task=task: train_state(task, p), params)
    print(f'SD 1.5: compiling the {side} step ...', flush=True)
    compiled, compile_s = compile_step(task, state, batch, frozen)
    sides[side] = {**state_sizes(state, frozen), **compiled_numbers(compiled, compile_s)}
    memory = sides[side]['compiled_memory'] or {}
    print(
      f'SD 1.5 {side}: compiled in {compile_s:.0f} s; '
      + ', '.join(f'{k[: -len("_bytes")]} {v / 2**30:.3f} GiB' for k, v in memory.items()),
      flush=True,
    )
  lora, full = sides['lora'], sides['full']
  memory_keys = ('arguments_bytes', 'outputs_bytes', 'temporaries_bytes', 'total_bytes')
  return {
    'model': {
      'unet': 'SD 1.5 (configs/ldm_base.py get_unet_config() defaults: remat off)'
      + (f' with {unet_overrides}' if unet_overrides else ''),
      'unet_params': tree_size(unet_shapes),
      'latents': f'{u.sample_size}x{u.sample_size}x{u.in_channels}',
      'batch': 1,
      'context': f'(1, {config.data.max_text_length}, {u.cross_attention_dim}) text embedding in the batch; '
      'no text encoder in the step',
      'param_dtype': 'float32',
      'compute_dtype': args.sd15_dtype,
      'attention': u.attention,
      'optimizer': 'configs/ldm_base.py:sd15 optim (AdamW, global-norm clipping) with EMA',
    },
    'lora': {
      'rank': config.lora.rank,
      'alpha': config.lora.alpha,
      'targets': list(lora_lib.DEFAULT_TARGETS),
      'modules': len(lora_lib.modules(factor_shapes)),
    },
    'sides': sides,
    'ratio_lora_over_full': {
      **ratios(lora, full, ('trained_params', 'opt_state_bytes', 'ema_bytes', 'gflops_per_step')),
      **(ratios(lora['compiled_memory'], full['compiled_memory'], memory_keys) if lora['compiled_memory'] else {}),
    },
  }


def print_tiny(r: dict) -> None:
  m, ratio = r['model'], r['ratio_lora_over_full']
  print(
    f'\ntiny stage-2 model ({m["unet_params"]:,} U-Net + {m["text_params"]:,} text params), batch {m["batch"]}, '
    f'inputs {m["inputs"]}; LoRA rank {r["lora"]["rank"]} on {r["lora"]["modules"]} modules'
  )
  print('| side | ms/step (median) | min-max (s) | trained params | optimizer state | EMA | frozen |')
  print('|---|---|---|---|---|---|---|')
  for side in SIDES:
    s = r['sides'][side]
    print(
      f'| {side} | {1e3 * s["median_s"]:.1f} | {s["min_s"]:.3g}-{s["max_s"]:.3g} | {s["trained_params"]:,} | '
      f'{s["opt_state_bytes"] / 2**20:.3f} MiB | {s["ema_bytes"] / 2**20:.3f} MiB | '
      f'{s["frozen_bytes"] / 2**20:.2f} MiB |'
    )
  print('ratios lora / full: ' + ', '.join(f'{k} {v:.3g}' for k, v in ratio.items()))


def print_sd15(r: dict) -> None:
  print(
    f'\nSD 1.5 U-Net ({r["model"]["unet_params"]:,} params), {r["model"]["compute_dtype"]} compute, compiled memory'
  )
  print('| side | arguments | outputs | temporaries | aliased | total | trained params | optimizer state |')
  print('|---|---|---|---|---|---|---|---|')
  for side in SIDES:
    s, m = r['sides'][side], r['sides'][side]['compiled_memory'] or {}
    gib = lambda key, m=m: f'{m[key] / 2**30:.3f} GiB' if key in m else '-'
    print(
      f'| {side} | {gib("arguments_bytes")} | {gib("outputs_bytes")} | {gib("temporaries_bytes")} | '
      f'{gib("aliased_bytes")} | {gib("total_bytes")} | {s["trained_params"]:,} | '
      f'{s["opt_state_bytes"] / 2**30:.3f} GiB |'
    )
  print('ratios lora / full: ' + ', '.join(f'{k} {v:.3g}' for k, v in r['ratio_lora_over_full'].items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--tiny-only', '--skip-sd15', dest='skip_sd15', action='store_true', help='no SD 1.5 part')
  parser.add_argument('--skip-tiny', action='store_true', help='no tiny part (only the SD 1.5 compiled memory)')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per side (the median is reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per side before the timed ones')
  parser.add_argument('--batch', type=int, default=64, help='global batch of the tiny part (the tiny preset: 64)')
  parser.add_argument('--inputs', choices=('images', 'latents'), default='images', help='tiny batches: what they hold')
  parser.add_argument('--rank', type=int, default=4, help='LoRA rank (both parts)')
  parser.add_argument('--alpha', type=float, default=None, help='LoRA alpha (default: the rank)')
  parser.add_argument('--sd15-dtype', default='bfloat16', help='compute dtype of the SD 1.5 part (params: float32)')
  parser.add_argument('--record', default=None, metavar='OUT', help='default docs/results/bench_lora.json')
  args = parser.parse_args(argv)
  if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1:
    parser.error('need --repeats >= 1, --warmup >= 0, --batch >= 1 and --rank >= 1')
  if args.skip_sd15 and args.skip_tiny:
    parser.error('--tiny-only and --skip-tiny leave nothing to measure')
  return args


def main(argv: list[str] | None = None, tiny_overrides: dict | None = None, sd15_overrides: dict | None = None) -> str:
  """Runs the parts; returns the record's path. Smaller models for tests: `tiny_overrides` (dotted config keys of the
  tiny part), `sd15_overrides` (fields of the SD 1.5 part's `model.unet`)."""
  args = parse_args(argv)
  load_at_start = results.load_average()
  print(f'device {throughput.local_device_kind()}, {os.cpu_count()} cores, load average {load_at_start}', flush=True)
  measured, path = {}, None
  write = lambda: results.write_record(
    'bench_lora', measured, path=args.record, load_at_start=load_at_start, settings=vars(args)
  )
  if not args.skip_tiny:
    measured['tiny'] = measure_tiny(args, tiny_overrides)
    print_tiny(measured['tiny'])
    path = write()
  if not args.skip_sd15:
    measured['sd15'] = measure_sd15(args, sd15_overrides)
    print_sd15(measured['sd15'])
    path = write()
  return path


if __name__ == '__main__':
  main()
