r"""Stage-2 training steps/s with a frozen CLIP-L-sized text encoder: cached text embeddings vs encoding on the fly.

  python scripts/bench_text_cache.py [--steps 6] [--chunk 2] [--batch_size 8] [--num_train 64]
                                     [--text_embedding_dtype float32] [--root DIR]

The text encoder has CLIP ViT-L's text transformer size (hidden 768, 12 layers, 12 heads, MLP 3072, 77 tokens; random
weights, frozen: model.text.trainable=False) and the tokenizer is the shapes vocabulary's (a small embedding table: the
vocabulary size does not change the encoder's FLOPs); the U-Net is the tiny preset's with 768-wide cross-attention, on
8x8x4 latents of 32 px shapes images. A tiny VAE is trained for one step first. The training split is precomputed once
with latents and text embeddings; then both ways train from the same latent cache and the same initial state, one on
the batches with their cached embeddings (the text encoder does not run), one on the same batches without them (the
text encoder encodes the token ids every step), in alternating chunks of --chunk steps so load drift on a shared
machine hits both. A timed step includes fetching its batch. Prints steps/s of each way and the ratio.
"""

import argparse
import os
import tempfile
import time

from bench_latent_cache import train_tiny_vae  # scripts/ is on the path of a script run from it.

from diffusion import results
from diffusion.errors import UserError, user_errors_exit

CLIP_L = {'hidden_size': 768, 'intermediate_size': 3072, 'num_hidden_layers': 12, 'num_attention_heads': 12}


def _config(args, data_dir: str, vae_workdir: str, cache: str = ''):
  from configs import ldm_base  # pylint: disable=import-outside-toplevel

  config = ldm_base.get_config('tiny')
  config.data.data_dir = data_dir
  config.data.shapes.num_train = args.num_train
  config.data.shapes.num_eval = 16
  config.data.random_flip = False
  config.data.max_text_length = 77
  config.data.latent_cache = cache
  config.model.text.update({**CLIP_L, 'max_position_embeddings': 77, 'trainable': False})
  config.model.unet.cross_attention_dim = CLIP_L['hidden_size']
  config.train.batch_size = args.batch_size
  config.vae_workdir = vae_workdir
  config.wandb.mode = 'disabled'
  return config


def _random_params(shapes, seed: int = 0):
  """Params of the given shapes drawn with numpy (compiling a threefry init of CLIP-L on CPU takes minutes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return np.asarray(rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), leaf.dtype)
    return np.asarray(
      (name in ('scale', 'embedding')) * 0.02 * rng.normal(size=leaf.shape) + (name == 'scale'), leaf.dtype
    )

  return jax.tree_util.tree_map_with_path(draw, shapes)


class _Trainer:
  """One way of training: a jitted train step over the cached batches, with or without their text embeddings."""

  def __init__(self, task, params, batches, keep_embeddings: bool):
    import jax  # pylint: disable=import-outside-toplevel

    from diffusion.training import state as state_lib  # pylint: disable=import-outside-toplevel

    self.task, self.source, self.keep = task, batches, keep_embeddings
    tx = state_lib.create_optimizer(task.config.optim, 1000, frozen=task.frozen_param_groups)
    self.state = state_lib.create_train_state(jax.tree.map(jax.numpy.array, params), tx, jax.random.PRNGKey(1))
    self.step = jax.jit(state_lib.make_train_step(task.loss_fn, task.config.optim.ema_decay), donate_argnums=(0,))
    self.seconds, self.steps = 0.0, 0

  def run(self, n: int, timed: bool = True) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    for _ in range(n):
      batch = next(self.source)
      batch = batch if self.keep else {k: v for k, v in batch.items() if k != 'text_embedding'}
      self.state, metrics = self.step(self.state, batch, self.task.frozen)
    jax.block_until_ready(metrics)
    if timed:
      self.seconds += time.perf_counter() - start
      self.steps += n


def _bench(args, root: str, vae_workdir: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  from diffusion import latent_cache_writer, parallel  # pylint: disable=import-outside-toplevel
  from diffusion.data import inputs, latent_cache  # pylint: disable=import-outside-toplevel
  from diffusion.training.ldm_task import LDMTask  # pylint: disable=import-outside-toplevel

  data_dir, cache = os.path.join(root, 'tfds'), os.path.join(root, 'latents')
  # The task is built without the cache (its fresh-run check would compile the threefry init); the cache is written
  # from exactly the text params both ways train with.
  task = LDMTask(_config(args, data_dir, vae_workdir), os.path.join(root, 'run'))
  task.config.model.vae.scaling_factor = 1.0  # Calibration does not change the speed.
  params = _random_params(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
  text = latent_cache_writer.FrozenTextEncoder(task.config.model.text, params['text'], task.tokenizer, 'random')
  start = time.perf_counter()
  meta = latent_cache_writer.precompute(
    _config(args, data_dir, vae_workdir),
    vae_workdir,
    cache,
    batch_size=args.batch_size,
    text_encoder=text,
    text_embedding_dtype=args.text_embedding_dtype,
    log=lambda line: None,
  )
  precompute_s = time.perf_counter() - start
  task.null_context = jax.numpy.asarray(latent_cache.load_null_text_embedding(cache, 'train'))
  print(f'precomputed {args.num_train} images with text embeddings in {precompute_s:.1f} s (compile included)')
  mesh = parallel.create_mesh(task.config.mesh)
  trainers = {}
  for name, keep in (('on the fly', False), ('cache', True)):
    loader = inputs.create_input_pipeline(
      _config(args, data_dir, vae_workdir, cache).data,
      'train',
      tokenizer=task.tokenizer,
      batch_size=args.batch_size,
      seed=0,
    )
    trainers[name] = _Trainer(task, params, (parallel.make_global_batch(b, mesh) for b in loader), keep)
    trainers[name].run(2, timed=False)  # Compile and warm up.
  for _ in range(max(1, args.steps // args.chunk)):
    for trainer in trainers.values():
      trainer.run(args.chunk)
  rates = {name: t.steps / t.seconds for name, t in trainers.items()}
  ratio = rates['cache'] / rates['on the fly']
  print(
    f'batch {args.batch_size}, CLIP-L-sized frozen text encoder: on the fly {rates["on the fly"]:.3f} steps/s, '
    f'cached embeddings {rates["cache"]:.3f} steps/s, ratio cache / on the fly = {ratio:.2f}',
    flush=True,
  )
  length, width = meta['text_encoder']['embedding_shape']
  return {
    'text_encoder': 'CLIP ViT-L text size (768 wide, 12 layers, 77 tokens), random init, frozen',
    'batch_size': args.batch_size,
    'latent_side': 8,
    'embedding_dtype': args.text_embedding_dtype,
    'embedding_bytes_per_caption': length * width * (4 if args.text_embedding_dtype == 'float32' else 2),
    'precompute_s': precompute_s,
    'on_the_fly_steps_per_s': rates['on the fly'],
    'cache_steps_per_s': rates['cache'],
    'ratio_cache_over_on_the_fly': ratio,
    'timed_steps_each': trainers['cache'].steps,
  }


@user_errors_exit
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=6, help='timed steps per way')
  parser.add_argument('--chunk', type=int, default=2, help='steps per alternation between the two ways')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--num_train', type=int, default=64, help='training images (shapes dataset)')
  parser.add_argument('--text_embedding_dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
  parser.add_argument('--root', default='', help='scratch directory (default: a temporary one)')
  parser.add_argument(
    '--record', default=None, help='where the record goes (default docs/results/bench_text_cache.json)'
  )
  args = parser.parse_args()
  if min(args.steps, args.chunk, args.batch_size, args.num_train) < 1:
    raise UserError('--steps, --chunk, --batch_size and --num_train must be >= 1')
  root = args.root or tempfile.mkdtemp(prefix='bench_text_cache_')
  load_at_start = results.load_average()
  print(f'load average at start: {load_at_start} on {os.cpu_count()} cores; scratch {root}', flush=True)
  row = _bench(args, root, train_tiny_vae(root, os.path.join(root, 'tfds')))
  print(f'load average at end: {results.load_average()}', flush=True)
  results.write_record(
    'bench_text_cache',
    [row],
    path=args.record,
    load_at_start=load_at_start,
    settings={k: v for k, v in vars(args).items() if k not in ('root', 'record')},
  )


if __name__ == '__main__':
  main()
