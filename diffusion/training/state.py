"""The train state, the optimizer factory, EMA, and the one generic pure train step.

`train_step(state, batch, frozen) -> (state, metrics)` is the same for both stages: the task supplies the loss. A
step whose loss or gradient norm is not finite leaves params, optimizer state and EMA untouched and counts as bad, so
a NaN batch can never reach the params or a checkpoint.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

LossFn = Callable[[Any, Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  bad_steps: jax.Array  # Consecutive steps whose update was skipped for a non-finite loss or gradient.
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def create_learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  warmup = min(optim.warmup_steps, max(num_steps - 1, 0))
  if optim.lr_schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)],
                                [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(num_steps, warmup + 1),
                                            end_value=optim.lr * optim.end_lr_factor)


def create_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                     frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW with warmup + cosine (or constant) learning rate and global-norm gradient clipping.

  Top-level param groups named in `frozen` (e.g. a pretrained text encoder) get no update at all: no weight decay
  and no Adam moments.
  """
  schedule = create_learning_rate_schedule(optim, num_steps)
  tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  if frozen:
    labels = lambda params: {k: jax.tree.map(lambda _: 'frozen' if k in frozen else 'trained', v)
                             for k, v in params.items()}
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params), rng=rng, bad_steps=jnp.zeros((), jnp.int32), tx=tx)


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with the usual warm-up, so early EMA params are not dominated by the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def per_example_keys(rng: jax.Array, step: jax.Array, batch_size: int) -> jax.Array:
  """Example i of the global batch at `step` draws from fold_in(fold_in(rng, step), i), whatever the sharding."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size))


def make_train_step(loss_fn: LossFn, ema_decay: float) -> Callable[[TrainState, dict, Any], tuple[TrainState, dict]]:
  """Builds the pure step; `loss_fn(params, frozen, batch, example_keys, step) -> (loss, metrics)`."""

  def train_step(state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = per_example_keys(state.rng, state.step, batch_size)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, frozen, batch, keys, state.step)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params),
                              bad_steps=jnp.where(finite, 0, state.bad_steps + 1))
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm, 'skipped': 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step
