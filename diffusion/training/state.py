"""The train state, the optimizer factory, EMA, and the one generic pure train step.

`train_step(state, batch, frozen) -> (state, metrics)` is the same for both stages: the task supplies the loss. A
step whose loss or gradient norm is not finite leaves params, optimizer state and EMA untouched and counts as bad, so
a NaN batch can never reach the params or a checkpoint.

A task may train auxiliary networks beside its params (`AuxNetworks`, e.g. the VAE's discriminator): they live in
`aux_params` with their own optimizer (`aux_tx`, `aux_opt_state`), are sharded and checkpointed with the state, get
no EMA, and are not what a workdir's readers load. The loss sees them as `frozen['aux']`; one gradient of the loss
w.r.t. (params, aux_params) updates both (the task's loss decides, with stop_gradient, which term trains which).
"""

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion import throughput

LossFn = Callable[[Any, Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


class AuxNetworks(NamedTuple):
  """Networks a task trains beside its params: `init(rng) -> params` and their own optimizer."""

  init: Callable[[jax.Array], Any]
  tx: optax.GradientTransformation


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  bad_steps: jax.Array  # Consecutive steps whose update was skipped for a non-finite loss or gradient.
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  aux_params: Any = None  # The task's auxiliary networks (None: it has none).
  aux_opt_state: Any = None
  aux_tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)


def create_learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  warmup = min(optim.warmup_steps, max(num_steps - 1, 0))
  if optim.lr_schedule == 'constant':
    return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
    0.0, optim.lr, warmup, max(num_steps, warmup + 1), end_value=optim.lr * optim.end_lr_factor
  )


def create_optimizer(
  optim: ml_collections.ConfigDict, num_steps: int, frozen: tuple[str, ...] = ()
) -> optax.GradientTransformation:
  """AdamW with warmup + cosine (or constant) learning rate and global-norm gradient clipping.

  Top-level param groups named in `frozen` (e.g. a pretrained text encoder) get no update at all: no weight decay
  and no Adam moments.
  """
  schedule = create_learning_rate_schedule(optim, num_steps)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  if frozen:
    labels = lambda params: {
      k: jax.tree.map(lambda _: 'frozen' if k in frozen else 'trained', v) for k, v in params.items()
    }
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx


def create_train_state(
  params: Any, tx: optax.GradientTransformation, rng: jax.Array, aux_params: Any = None, aux_tx: Any = None
) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params),
    rng=rng,
    bad_steps=jnp.zeros((), jnp.int32),
    tx=tx,
    aux_params=aux_params,
    aux_opt_state=None if aux_tx is None else aux_tx.init(aux_params),
    aux_tx=aux_tx,
  )


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with the usual warm-up, so early EMA params are not dominated by the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def per_example_keys(rng: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """Example i of the global batch at `step` draws from fold_in(fold_in(rng, step), i), whatever the sharding."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size))


def _micro_batches(tree: Any, num: int, sharding: Any = None) -> Any:
  """(B, ...) -> (num, B / num, ...) with micro-batch j = examples j, j + num, j + 2 num, ...

  Strided rather than contiguous, so each micro-batch is spread over every device of the batch sharding (a device's
  contiguous block of examples holds B / (num x devices) examples of each micro-batch): no data moves between devices.
  """

  def split(x):
    x = jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

  return jax.tree.map(split, tree)


def accumulated_grads(
  loss_fn: LossFn,
  params: Any,
  frozen: Any,
  batch: dict,
  keys: jax.Array,
  step: jax.Array,
  num_micro: int,
  micro_sharding: Any = None,
) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, metrics), grads) of the whole batch, computed in `num_micro` micro-batches (lax.scan) and averaged.

  Each micro-batch's loss is its mean over equally many examples, so the average over micro-batches is the mean over
  the batch: the same update as one step on the whole batch, up to float summation order.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, frozen, batch, keys, step)
  micro = _micro_batches((batch, keys), num_micro, micro_sharding)
  (loss0, metrics0), grads0 = jax.eval_shape(grad_fn, params, frozen, *jax.tree.map(lambda x: x[0], micro), step)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, metrics0, grads0))

  def body(carry, xs):
    (loss, metrics), grads = grad_fn(params, frozen, xs[0], xs[1], step)
    return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

  (loss, metrics, grads), _ = jax.lax.scan(body, zeros, micro)
  loss, metrics, grads = jax.tree.map(lambda x: x / num_micro, (loss, metrics, grads))
  return (loss, metrics), grads


def make_train_step(
  loss_fn: LossFn, ema_decay: float, grad_accum_steps: int = 1, micro_sharding: Any = None
) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
  """Builds the pure step; `loss_fn(params, frozen, batch, example_keys, step) -> (loss, metrics)`.

  With `grad_accum_steps` > 1 the gradient is accumulated over that many micro-batches of the (global) batch; every
  example keeps the key of its index in the global batch, so accumulation changes no example's noise, timestep or
  caption dropout. `micro_sharding` (optional) pins the (micro-batch, example, ...) layout, e.g.
  P(None, ('data', 'fsdp')).
  """

  def train_step(state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = per_example_keys(state.rng, state.step, batch_size)
    aux = state.aux_tx is not None
    fn, trained = loss_fn, state.params
    if aux:  # One gradient w.r.t. both trees; the loss sees the auxiliary networks as frozen['aux'].
      fn = lambda both, fz, b, k, s: loss_fn(both['params'], {**fz, 'aux': both['aux']}, b, k, s)
      trained = {'params': state.params, 'aux': state.aux_params}
    (loss, metrics), grads = accumulated_grads(
      fn, trained, frozen, batch, keys, state.step, grad_accum_steps, micro_sharding
    )
    aux_grads = grads['aux'] if aux else None
    grads = grads['params'] if aux else grads
    loss = loss.astype(jnp.float32)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if aux:
      aux_norm = optax.global_norm(aux_grads)
      finite = finite & jnp.isfinite(aux_norm)
      metrics = {**metrics, 'aux_grad_norm': aux_norm}
    zero_bad = lambda tree: jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), tree)
    updates, opt_state = state.tx.update(zero_bad(grads), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema, state.ema_params),
      bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
    )
    if aux:
      aux_updates, aux_opt = state.aux_tx.update(zero_bad(aux_grads), state.aux_opt_state, state.aux_params)
      aux_params = optax.apply_updates(state.aux_params, aux_updates)
      new_state = new_state.replace(
        aux_params=keep(aux_params, state.aux_params), aux_opt_state=keep(aux_opt, state.aux_opt_state)
      )
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm, 'skipped': 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def sharded_train_state(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  rng_init: jax.Array,
  rng_train: jax.Array,
  mesh: Any,
  rules: Any,
  min_shard_size: int = 0,
  create: bool = True,
  params: Any = None,
  aux: AuxNetworks | None = None,
) -> tuple[TrainState | None, TrainState]:
  """(state, target): the train state created already sharded, and its abstract twin carrying the shardings.

  Shapes come from `jax.eval_shape`, shardings from the logical-axis rules (`parallel.tree_shardings`), and the state
  is built by `jax.jit(..., out_shardings=...)`, so no device ever holds a full copy of a sharded parameter. The
  target (ShapeDtypeStructs with shardings) is what a checkpoint restores into; `create=False` skips the creation.
  `params` (shaped as `init_params` makes them, e.g. a fine-tuning run's start) replace the fresh init. `aux`: the
  task's auxiliary networks (initialized from a key folded from `rng_init`; the params' own init is unchanged).
  """
  from diffusion import parallel

  aux_init = (lambda: None) if aux is None else (lambda: aux.init(jax.random.fold_in(rng_init, 1)))
  aux_tx = None if aux is None else aux.tx
  init = lambda: create_train_state(init_params(rng_init), tx, rng_train, aux_init(), aux_tx)
  abstract = jax.eval_shape(init)
  shardings = parallel.tree_shardings(abstract, mesh, rules, min_shard_size)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  if not create:
    return None, target
  if params is None:
    return jax.jit(init, out_shardings=shardings)(), target
  start = lambda p: create_train_state(p, tx, rng_train, aux_init(), aux_tx)  # p an argument: no HLO constants.
  return jax.jit(start, out_shardings=shardings)(params), target


def shardings_of(tree: Any) -> Any:
  """The `.sharding` of every leaf (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def with_compute_dtype(
  model_config: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """`model_config` with `dtype` = `train.compute_dtype` when that is set ('' keeps the model's own `dtype`).

  The dtype is the networks' activation / matmul dtype; params are created and kept in float32 (the master copy the
  optimizer updates), and the tasks compute their losses in float32. bfloat16 needs no loss scaling.
  """
  dtype = throughput.compute_dtype(model_config, train_config)
  if model_config.get('dtype', 'float32') == dtype:
    return model_config
  copy = model_config.copy_and_resolve_references()
  copy.dtype = dtype
  return copy
