"""The one training loop for every task: `train_and_evaluate(config, workdir)`.

The loop knows tasks only through the protocol in `diffusion.training.task` (`TASKS.get(config.model_type)`): it
never asks which task it runs. It writes the task's resolved config to `config.json`, records what the run is built
on (`workdir.record_built_on`: the task's frozen sources, `config.init_from`, `config.base_workdir`), and builds the
eval loader and the task's sampling setup once per run. Later in-training evaluators can use
`task.sampling_pipeline()` at their own interval in `_Run`, the same way for every task.

Resumes from the latest checkpoint in `workdir` (train state and data-iterator position), so rerunning the same
command after an interruption continues the same run; rerunning a finished run says so and returns. SIGTERM saves a
checkpoint at the next step boundary and stops cleanly.
"""

import itertools
import os
import signal
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from diffusion import checkpoint, evaluation, parallel, throughput
from diffusion import workdir as workdir_lib
from diffusion.config import validate_config
from diffusion.data import inputs
from diffusion.errors import ConfigError
from diffusion.logging import MetricWriter
from diffusion.training import lora_task, vae_task  # noqa: F401  (they register the 'ldm' and 'vae' tasks)
from diffusion.training.state import TrainState, create_optimizer, make_train_step, sharded_train_state, shardings_of
from diffusion.training.task import TASKS, Task, load_base_params, load_init_params


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


def _input_pipeline(
  config: ml_collections.ConfigDict,
  split: str,
  tokenizer: Any,
  batch_size: int,
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
):
  return inputs.create_input_pipeline(
    config.data,
    split,
    tokenizer=tokenizer,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )


def _global_batches(iterator, mesh):
  for batch in iterator:
    # Latents: a latent cache's; loss_weight: per-example loss weights (a folder's captions file column).
    keys = ('image', 'input_ids', 'latent_mean', 'latent_logvar', 'text_embedding', 'loss_weight')
    yield parallel.make_global_batch({k: batch[k] for k in keys if k in batch}, mesh)


def _evaluate(state: TrainState, config, mesh, eval_loader, eval_step, frozen) -> dict:
  """Mean of the task's eval metrics over `train.eval_batches` held-out batches, with fixed noise.

  `eval_loader` is built once per run; each evaluation reads it from the top (a new iterator over the same loader).
  """
  totals, count = {}, 0
  for i, batch in enumerate(_global_batches(iter(eval_loader), mesh)):
    if i >= config.train.eval_batches:
      break
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(config.seed + 1000 + i), config.train.batch_size))
    keys = jax.device_put(keys, parallel.replicated(mesh))  # The same keys on every process.
    metrics = jax.device_get(eval_step(state.ema_params, frozen, batch, keys))
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    count += 1
  return {f'eval/{k}': v / max(count, 1) for k, v in totals.items()}


def _finished(ckpt: checkpoint.Checkpointer, config: ml_collections.ConfigDict) -> tuple[int | None, bool]:
  """(latest valid step or None, whether the run already reached train.num_steps)."""
  latest = ckpt.latest_step()
  if latest is not None and latest >= config.train.num_steps:
    latest = ckpt.latest_valid_step()  # A damaged final checkpoint must not pass for a finished run.
  return latest, latest is not None and latest >= config.train.num_steps


def _start_params(task: Task, config: ml_collections.ConfigDict, workdir: str, fresh: bool) -> Any:
  """Records (or at resume verifies) what the run is built on; returns the `init_from` params of a fresh run."""
  used = dict(task.built_on())
  init = load_init_params(config, task.init_params) if fresh and config.get('init_from') else None
  if init is not None:
    used['init_from'] = init
  if config.get('base_workdir'):
    used['base_workdir'] = load_base_params(config)
  workdir_lib.record_built_on(workdir, config, used, resume=not fresh)
  return init


def _build_task(config: ml_collections.ConfigDict, workdir: str, mesh, local_batch: int, fresh: bool) -> tuple:
  """(task, its resolved config, init_from params or None); a fresh run calibrates; writes config.json."""
  task = TASKS.get(config.model_type)(config, workdir)
  init = _start_params(task, config, workdir, fresh)
  if fresh:
    batches = lambda: _global_batches(
      iter(_input_pipeline(task.config, task.config.data.train_split, task.tokenizer, local_batch, config.seed + 1)),
      mesh,
    )
    line = task.calibrate(batches)
    if line:
      print(line, flush=True)
  if jax.process_index() == 0:
    workdir_lib.write_config(workdir, task.config)
  return task, task.config, init


def _held_out(eval_loader, mesh) -> Callable[[], dict]:
  """One held-out global batch gathered to every process (a collective), for the task's sample grid."""
  return lambda: parallel.host_local(next(_global_batches(iter(eval_loader), mesh)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
  """Trains the task `config.model_type` names in `workdir`; returns the final state (None if already done)."""
  if config.get('model_type') not in TASKS:
    raise ConfigError('model_type', TASKS.unknown(config.get('model_type')))
  validate_config(config)
  evaluation.validate_evals(config)  # config.evals too, before anything is compiled.
  workdir = os.path.abspath(workdir)
  mesh = parallel.create_mesh(config.mesh)
  accum = int(config.train.get('grad_accum_steps', 1))
  local_batch = parallel.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=accum)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  latest, finished = _finished(ckpt, config)
  if finished:
    print(
      f'{workdir} already finished: checkpoint at step {latest} >= train.num_steps={config.train.num_steps}; '
      'nothing to do',
      flush=True,
    )
    ckpt.close()
    return None
  task, config, init = _build_task(config, workdir, mesh, local_batch, fresh=latest is None)
  loader = _input_pipeline(config, config.data.train_split, task.tokenizer, local_batch, config.seed)
  train_iter = iter(loader)
  tx = create_optimizer(config.optim, config.train.num_steps, frozen=task.frozen_param_groups)
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
  rules, min_size = parallel.mesh_rules(config.mesh)
  state, target = sharded_train_state(
    task.init_params,
    tx,
    rng_init,
    rng_train,
    mesh,
    rules,
    min_size,
    create=latest is None,
    params=init,
    aux=task.aux_networks(),
  )
  frozen_shardings = parallel.tree_shardings(task.frozen, mesh, rules, min_size)
  frozen = jax.device_put(task.frozen, frozen_shardings)
  sharded, total = parallel.sharded_bytes(target.params, shardings_of(target).params)
  print(f'params: {sharded / 2**20:.2f} of {total / 2**20:.2f} MiB sharded over mesh {dict(mesh.shape)}', flush=True)
  if latest is not None:
    state, data_state, meta = ckpt.restore(target)  # Falls back past a damaged latest checkpoint.
    if data_state is not None:  # None for imported weights (scripts/convert.py): start the data from the top.
      train_iter.set_state(data_state.encode() if isinstance(data_state, str) else data_state)
    print(f'resumed from step {meta["step"]}', flush=True)
  run = _Run(task, config, workdir, mesh, local_batch, ckpt, frozen, frozen_shardings, target)
  return run.train(state, train_iter)


class _Run:
  """What one run of the loop holds: the task, compiled steps, the eval loader and the sampling setup (built once)."""

  def __init__(self, task: Task, config, workdir: str, mesh, local_batch: int, ckpt, frozen, frozen_shardings, target):
    self.task, self.config, self.mesh, self.ckpt, self.frozen = task, config, mesh, ckpt, frozen
    accum = int(config.train.get('grad_accum_steps', 1))
    shardings = shardings_of(target)
    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES))
    self.train_step = jax.jit(
      make_train_step(task.loss_fn, config.optim.ema_decay, accum, micro_sharding),
      in_shardings=(shardings, parallel.batch_sharding(mesh), frozen_shardings),
      out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=(0,),
    )
    self.eval_step = jax.jit(task.eval_step)
    self.eval_loader = None
    if config.train.eval_every or config.train.sample_every:
      self.eval_loader = _input_pipeline(
        config, config.data.eval_split, task.tokenizer, local_batch, config.seed, shuffle=False, num_epochs=1
      )
    self.frozen_local = None
    if config.train.sample_every:
      task.prepare_sampling(_held_out(self.eval_loader, mesh))
    pipeline = task.sampling_pipeline()
    self.suite = None if pipeline is None else evaluation.build_suite(config, workdir, pipeline)
    if config.train.sample_every or self.suite is not None:
      self.frozen_local = parallel.host_local(task.frozen)  # Host copies, for sample grids and evaluators.
    self.writer = MetricWriter(workdir, config, config.train.num_steps, config.train.batch_size)

  def _close(self) -> None:
    self.ckpt.close()
    self.writer.close()

  def train(self, state: TrainState, train_iter) -> TrainState:
    """Steps to train.num_steps with logging, eval, sample grids and checkpoints; stops early on SIGTERM."""
    config, writer = self.config, self.writer
    batches = _global_batches(train_iter, self.mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(
      f'training {config.model_type} ({num_params / 1e6:.2f}M params) from step {int(state.step)} to '
      f'{config.train.num_steps} with global batch {config.train.batch_size} on {jax.device_count()} devices',
      flush=True,
    )
    step = int(state.step)
    first = next(batches)  # Compiles the step here (FLOPs for TFLOP/s and MFU), outside the timed interval.
    batches = throughput.DataWait(itertools.chain([first], batches))  # Time blocked on the input, per interval.
    analytic = throughput.config_train_step_flops(config, first)
    writer.set_step_flops(
      throughput.jit_flops(self.train_step, state, first, self.frozen),
      throughput.config_peak_tflops(config),
      analytic / jax.device_count() if analytic else None,
    )
    writer.set_data_wait(batches)
    writer.start(step)
    pending = []
    with _StopRequest() as stop:
      while step < config.train.num_steps:
        state, metrics = self.train_step(state, next(batches), self.frozen)
        pending.append(metrics)
        step += 1
        last = step == config.train.num_steps
        if step % config.train.log_every == 0 or last:
          self._log(step, state, pending)
          pending = []
        self._evaluate_and_sample(step, state, last)
        preempted = stop.requested or self.ckpt.reached_preemption(step)
        if step % config.train.checkpoint_every == 0 or last or preempted:
          data_state = train_iter.get_state()
          data_state = data_state.decode() if isinstance(data_state, bytes) else data_state
          self.ckpt.save(step, state, data_state, self.task.meta(), force=True)
          writer.start(step)  # Do not count checkpoint/eval time in steps/s.
        if preempted:
          print(f'preempted (SIGTERM): saved a checkpoint at step {step}; rerun the same command to resume', flush=True)
          break
    self._close()
    return state

  def _log(self, step: int, state: TrainState, pending: list) -> None:
    """Writes the mean of the pending steps' metrics; raises once train.max_bad_steps steps in a row went bad."""
    summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
    summary['skipped'] = summary['skipped'] * len(pending)
    self.writer.write_scalars(step, summary)
    bad, limit = int(state.bad_steps), self.config.train.max_bad_steps
    if bad >= limit:
      self._close()
      raise FloatingPointError(
        f'{bad} consecutive steps had a non-finite loss or gradient (limit '
        f'train.max_bad_steps={limit}); the last checkpoint holds the last finite params'
      )

  def _evaluate_and_sample(self, step: int, state: TrainState, last: bool) -> None:
    train = self.config.train
    if train.eval_every and (step % train.eval_every == 0 or last):
      self.writer.write_scalars(
        step, _evaluate(state, self.config, self.mesh, self.eval_loader, self.eval_step, self.frozen), progress=False
      )
    grid = train.sample_every and (step % train.sample_every == 0 or last)
    evals = self.suite is not None and self.suite.due(step, last)
    if not (grid or evals):
      return
    params = parallel.host_local(state.ema_params)  # Gathered on every process.
    if grid and jax.process_index() == 0:
      self.writer.write_images(step, 'samples', *self.task.sample_grid(params, self.frozen_local))
    if evals:  # Every process generates its share of each evaluator's samples; results are combined once.
      results = self.suite.evaluate(self.task.sampling_params(params, self.frozen_local), step, last=last)
      self.writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items()}, progress=False)
