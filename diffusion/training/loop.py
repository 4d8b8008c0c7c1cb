"""The one training loop for both stages: `train_and_evaluate(config, workdir)`.

Resumes from the latest checkpoint in `workdir` (train state and data-iterator position), so rerunning the same
command after an interruption continues the same run; rerunning a finished run says so and returns. SIGTERM saves a
checkpoint at the next step boundary and stops cleanly.
"""

import itertools
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import checkpoint, parallel
from diffusion.config import config_to_json, validate_config
from diffusion.data import inputs
from diffusion.errors import UserError
from diffusion.logging import MetricWriter
from diffusion import throughput
from diffusion.training.ldm_task import LDMTask
from diffusion.training.state import (TrainState, create_optimizer, make_train_step, sharded_train_state,
                                      shardings_of)
from diffusion.training.vae_task import VAETask

TASKS = {'vae': VAETask, 'ldm': LDMTask}


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _input_pipeline(config: ml_collections.ConfigDict, split: str, tokenizer: Any, batch_size: int, seed: int,
                    shuffle: bool = True, num_epochs: int | None = None):
  return inputs.create_input_pipeline(
      config.data, split, tokenizer=tokenizer, batch_size=batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, process_index=jax.process_index(), process_count=jax.process_count())


def _global_batches(iterator, mesh):
  for batch in iterator:
    keys = ('image', 'input_ids', 'latent_mean', 'latent_logvar')  # Latents: batches of a latent cache.
    yield parallel.make_global_batch({k: batch[k] for k in keys if k in batch}, mesh)


def _evaluate(task, state: TrainState, config, mesh, local_batch: int, eval_step, frozen) -> dict:
  """Mean of the task's eval metrics over `train.eval_batches` held-out batches, with fixed noise."""
  loader = _input_pipeline(config, config.data.eval_split, task.tokenizer, local_batch, config.seed, shuffle=False,
                           num_epochs=1)
  totals, count = {}, 0
  for i, batch in enumerate(_global_batches(iter(loader), mesh)):
    if i >= config.train.eval_batches:
      break
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(config.seed + 1000 + i), config.train.batch_size))
    keys = jax.device_put(keys, parallel.replicated(mesh))  # The same keys on every process.
    metrics = jax.device_get(eval_step(state.ema_params, frozen, batch, keys))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    count += 1
  return {f'eval/{k}': v / max(count, 1) for k, v in totals.items()}


def _eval_step_fn(task):
  if isinstance(task, VAETask):
    return jax.jit(lambda p, f, b, k: task.eval_step(p, f, b))
  return jax.jit(task.eval_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
  """Trains the model `config.model_type` describes in `workdir`; returns the final state (None if already done)."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  mesh = parallel.create_mesh(config.mesh)
  accum = int(config.train.get('grad_accum_steps', 1))
  local_batch = parallel.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=accum)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None and latest >= config.train.num_steps:
    latest = ckpt.latest_valid_step()  # A damaged final checkpoint must not pass for a finished run.
  if latest is not None and latest >= config.train.num_steps:
    print(f'{workdir} already finished: checkpoint at step {latest} >= train.num_steps={config.train.num_steps}; '
          'nothing to do', flush=True)
    ckpt.close()
    return None

  task = TASKS[config.model_type](config, workdir)
  loader = _input_pipeline(config, config.data.train_split, task.tokenizer, local_batch, config.seed)
  train_iter = iter(loader)
  if latest is None and getattr(task, 'needs_calibration', False):
    calib = iter(_input_pipeline(config, config.data.train_split, task.tokenizer, local_batch, config.seed + 1))
    factor = task.calibrate(_global_batches(calib, mesh))
    print(f'latent scaling factor computed from data: {factor:.5f}', flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_to_json(config))

  tx = create_optimizer(config.optim, config.train.num_steps, frozen=getattr(task, 'frozen_param_groups', ()))
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
  replicated = parallel.replicated(mesh)
  rules, min_size = parallel.mesh_rules(config.mesh)
  state, target = sharded_train_state(task.init_params, tx, rng_init, rng_train, mesh, rules, min_size,
                                      create=latest is None)
  shardings = shardings_of(target)
  frozen_shardings = parallel.tree_shardings(task.frozen, mesh, rules, min_size)
  frozen = jax.device_put(task.frozen, frozen_shardings)
  task.frozen = parallel.host_local(task.frozen)  # Its own copy, for process 0's sample grids.
  sharded, total = parallel.sharded_bytes(target.params, shardings.params)
  print(f'params: {sharded / 2**20:.2f} of {total / 2**20:.2f} MiB sharded over mesh '
        f'{dict(mesh.shape)}', flush=True)
  if latest is not None:
    state, data_state, meta = ckpt.restore(target)  # Falls back past a damaged latest checkpoint.
    if data_state is not None:  # None for imported weights (scripts/convert.py): start the data from the top.
      train_iter.set_state(data_state.encode() if isinstance(data_state, str) else data_state)
    print(f'resumed from step {meta["step"]}', flush=True)

  micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))
  train_step = jax.jit(make_train_step(task.loss_fn, config.optim.ema_decay, accum, micro_sharding),
                       in_shardings=(shardings, parallel.batch_sharding(mesh), frozen_shardings),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
  eval_step = _eval_step_fn(task)
  writer = MetricWriter(workdir, config, config.train.num_steps, config.train.batch_size)
  batches = _global_batches(train_iter, mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  print(f'training {config.model_type} ({num_params / 1e6:.2f}M params) from step {int(state.step)} to '
        f'{config.train.num_steps} with global batch {config.train.batch_size} on {jax.device_count()} devices',
        flush=True)

  step = int(state.step)
  first = next(batches)  # Compiles the step here (FLOPs for TFLOP/s and MFU), outside the timed interval.
  batches = itertools.chain([first], batches)
  writer.set_step_flops(throughput.jit_flops(train_step, state, first, frozen),
                        throughput.config_peak_tflops(config))
  writer.start(step)
  pending = []
  with _StopRequest() as stop:
    while step < config.train.num_steps:
      state, metrics = train_step(state, next(batches), frozen)
      pending.append(metrics)
      step += 1
      last = step == config.train.num_steps
      if step % config.train.log_every == 0 or last:
        summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        summary['skipped'] = summary['skipped'] * len(pending)
        pending = []
        writer.write_scalars(step, summary)
        bad = int(state.bad_steps)
        if bad >= config.train.max_bad_steps:
          ckpt.close()
          writer.close()
          raise FloatingPointError(f'{bad} consecutive steps had a non-finite loss or gradient (limit '
                                   f'train.max_bad_steps={config.train.max_bad_steps}); the last checkpoint holds '
                                   'the last finite params')
      if config.train.eval_every and (step % config.train.eval_every == 0 or last):
        writer.write_scalars(step, _evaluate(task, state, config, mesh, local_batch, eval_step, frozen),
                             progress=False)
      if config.train.sample_every and (step % config.train.sample_every == 0 or last):
        eval_batch = next(_global_batches(iter(_input_pipeline(
            config, config.data.eval_split, task.tokenizer, local_batch, config.seed, shuffle=False)), mesh))
        params, eval_batch = parallel.host_local((state.ema_params, eval_batch))  # Gathered on every process.
        if jax.process_index() == 0:
          writer.write_images(step, 'samples', *task.sample_grid(params, eval_batch))
      preempted = stop.requested or ckpt.reached_preemption(step)
      if step % config.train.checkpoint_every == 0 or last or preempted:
        data_state = train_iter.get_state()
        data_state = data_state.decode() if isinstance(data_state, bytes) else data_state
        ckpt.save(step, state, data_state, task.meta(), force=True)
        writer.start(step)  # Do not count checkpoint/eval time in steps/s.
      if preempted:
        print(f'preempted (SIGTERM): saved a checkpoint at step {step}; rerun the same command to resume', flush=True)
        break
  ckpt.close()
  writer.close()
  return state
