r"""Stage-2 training steps/s from a latent cache vs encoding images with the frozen VAE on the fly.

  python scripts/bench_latent_cache.py [--image_sizes 32,64] [--steps 30] [--chunk 5] [--batch_size 64]
                                       [--vae_workdir W] [--num_train 512] [--root DIR]

The model is the tiny preset (configs/ldm_base.py:tiny); at a larger image size the U-Net's sample size follows
(image size / the VAE factor). Without --vae_workdir a tiny VAE is trained for one step first (its weights do not
matter for speed). For each image size: the training split is encoded once (precompute images/s is printed), then
both ways train from the same initial state, in alternating chunks of --chunk steps so that load drift on a shared
machine hits both; a timed step includes fetching its batch from the input pipeline. Prints steps/s of each way
and the ratio cache / on the fly.
"""

import argparse
import os
import tempfile
import time

from diffusion import results
from diffusion.errors import UserError, user_errors_exit


def _config(image_size: int, batch_size: int, num_train: int, data_dir: str, vae_workdir: str, cache: str = ''):
  from configs import ldm_base  # pylint: disable=import-outside-toplevel

  config = ldm_base.get_config('tiny')
  config.data.image_size = image_size
  config.data.data_dir = data_dir
  config.data.shapes.num_train = num_train
  config.data.shapes.num_eval = 16
  config.data.random_flip = True
  config.data.latent_cache = cache
  config.model.unet.sample_size = image_size // 4  # The tiny VAE's factor.
  config.train.batch_size = batch_size
  config.vae_workdir = vae_workdir
  config.wandb.mode = 'disabled'
  return config


def train_tiny_vae(root: str, data_dir: str) -> str:
  """A 1-step tiny VAE on 64 shapes images under `root`/vae (the frozen stage 1 of the cache benchmarks)."""
  from configs import vae_base  # pylint: disable=import-outside-toplevel
  from diffusion.training import train_and_evaluate  # pylint: disable=import-outside-toplevel

  config = vae_base.get_config('tiny')
  config.data.data_dir = data_dir
  config.data.shapes.num_train = 64
  config.data.shapes.num_eval = 16
  config.train.num_steps = config.train.log_every = config.train.checkpoint_every = 1
  config.train.batch_size = 8
  config.train.eval_every = config.train.sample_every = 0
  config.wandb.mode = 'disabled'
  workdir = os.path.join(root, 'vae')
  train_and_evaluate(config, workdir)
  return workdir


class _Trainer:
  """One way of training (cache or on the fly): task, input pipeline and jitted train step, stepped in chunks."""

  def __init__(self, config, workdir: str):
    import jax  # pylint: disable=import-outside-toplevel

    from diffusion import parallel  # pylint: disable=import-outside-toplevel
    from diffusion.data import inputs  # pylint: disable=import-outside-toplevel
    from diffusion.training import state as state_lib  # pylint: disable=import-outside-toplevel
    from diffusion.training.ldm_task import LDMTask  # pylint: disable=import-outside-toplevel

    self.task = LDMTask(config, workdir)
    self.task.config.model.vae.scaling_factor = 1.0  # Calibration does not change the speed.
    mesh = parallel.create_mesh(config.mesh)
    loader = inputs.create_input_pipeline(
      config.data,
      config.data.train_split,
      tokenizer=self.task.tokenizer,
      batch_size=config.train.batch_size,
      seed=config.seed,
    )
    self.batches = (parallel.make_global_batch(b, mesh) for b in loader)
    tx = state_lib.create_optimizer(config.optim, 1000, frozen=self.task.frozen_param_groups)
    self.state = state_lib.create_train_state(self.task.init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
    self.step = jax.jit(state_lib.make_train_step(self.task.loss_fn, config.optim.ema_decay), donate_argnums=(0,))
    self.seconds = 0.0
    self.steps = 0

  def run(self, n: int, timed: bool = True) -> None:
    import jax  # pylint: disable=import-outside-toplevel

    start = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step(self.state, next(self.batches), self.task.frozen)
    jax.block_until_ready(metrics)
    if timed:
      self.seconds += time.perf_counter() - start
      self.steps += n


def _bench_size(args, image_size: int, root: str, vae_workdir: str) -> dict:
  from diffusion import latent_cache_writer  # pylint: disable=import-outside-toplevel

  data_dir = os.path.join(root, 'tfds')
  cache = os.path.join(root, f'latents_{image_size}')
  start = time.perf_counter()
  latent_cache_writer.precompute(
    _config(image_size, args.batch_size, args.num_train, data_dir, vae_workdir),
    vae_workdir,
    cache,
    batch_size=args.batch_size,
    log=lambda line: None,
  )
  precompute_s = time.perf_counter() - start
  print(
    f'{image_size} px: precomputed {args.num_train} images x 2 flips in {precompute_s:.1f} s '
    f'({args.num_train / precompute_s:.1f} images/s, compile included)',
    flush=True,
  )
  trainers = {}
  for name, cache_dir in (('on the fly', ''), ('cache', cache)):
    config = _config(image_size, args.batch_size, args.num_train, data_dir, vae_workdir, cache_dir)
    trainers[name] = _Trainer(config, os.path.join(root, f'run_{image_size}_{name.replace(" ", "_")}'))
    trainers[name].run(3, timed=False)  # Compile and warm up.
  for _ in range(max(1, args.steps // args.chunk)):
    for trainer in trainers.values():
      trainer.run(args.chunk)
  rates = {name: t.steps / t.seconds for name, t in trainers.items()}
  print(
    f'{image_size} px, batch {args.batch_size}: on the fly {rates["on the fly"]:.2f} steps/s, cache '
    f'{rates["cache"]:.2f} steps/s, ratio cache / on the fly = {rates["cache"] / rates["on the fly"]:.2f}',
    flush=True,
  )
  return {
    'image_size': image_size,
    'latent_side': image_size // 4,
    'batch_size': args.batch_size,
    'precompute_s': precompute_s,
    'on_the_fly_steps_per_s': rates['on the fly'],
    'cache_steps_per_s': rates['cache'],
    'ratio_cache_over_on_the_fly': rates['cache'] / rates['on the fly'],
    'timed_steps_each': trainers['cache'].steps,
  }


@user_errors_exit
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--image_sizes', default='32,64', help='comma-separated; multiples of 8 (tiny VAE x U-Net)')
  parser.add_argument('--steps', type=int, default=30, help='timed steps per way and image size')
  parser.add_argument('--chunk', type=int, default=5, help='steps per alternation between the two ways')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--num_train', type=int, default=512, help='training images (shapes dataset)')
  parser.add_argument('--vae_workdir', default='', help='a trained tiny VAE (default: train one for one step)')
  parser.add_argument('--root', default='', help='scratch directory (default: a temporary one)')
  parser.add_argument(
    '--record', default=None, help='where the record goes (default docs/results/bench_latent_cache.json)'
  )
  args = parser.parse_args()
  sizes = [int(s) for s in args.image_sizes.split(',') if s]
  if not sizes or any(s <= 0 or s % 8 for s in sizes):
    raise UserError(f'--image_sizes must be positive multiples of 8, got {args.image_sizes!r}')
  if min(args.steps, args.chunk, args.batch_size, args.num_train) < 1:
    raise UserError('--steps, --chunk, --batch_size and --num_train must be >= 1')
  root = args.root or tempfile.mkdtemp(prefix='bench_latent_cache_')
  load_at_start = results.load_average()
  print(f'load average at start: {load_at_start} on {os.cpu_count()} cores; scratch {root}', flush=True)
  vae_workdir = args.vae_workdir or train_tiny_vae(root, os.path.join(root, 'tfds'))
  rows = [_bench_size(args, size, root, vae_workdir) for size in sizes]
  print(f'load average at end: {results.load_average()}', flush=True)
  results.write_record(
    'bench_latent_cache',
    rows,
    path=args.record,
    load_at_start=load_at_start,
    settings={k: v for k, v in vars(args).items() if k not in ('root', 'record')},
  )


if __name__ == '__main__':
  main()
