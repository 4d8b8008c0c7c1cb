"""Runs the real sharded train step of a tiny model on given meshes; used by the sharding and multi-host tests.

Run as a script in a subprocess (the device count is fixed when JAX starts):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_worker.py meshes OUT.npz 1,8fsdp,...
  python tests/parallel_worker.py multihost OUT_DIR PROCESS_ID NUM_PROCESSES PORT   (4 devices per process)

Every run trains `STEPS` steps on the same fixed global batch through `make_train_step` and the task's loss, with the
state created sharded by the logical-axis rules, exactly as `train_and_evaluate` does.
"""

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

STEPS = 5
BATCH = 16


def tiny_vae_config(**overrides):
  from support import VAE, load_config

  config = load_config(
    'vae_base',
    {
      **VAE,
      'model.vae.block_out_channels': (16,),
      'mesh.min_shard_size': 0,
      'optim.warmup_steps': 0,
      'optim.lr': 1e-3,
      'train.batch_size': BATCH,
      'data.image_size': 16,
    },
    '',
    **overrides,
  )
  return config


def cheap_init(init_params):
  """Deterministic generic params with the network's shapes, without compiling its random initialisers (tens of
  seconds on CPU); the state is still created by the sharded `jax.jit(init, out_shardings=...)`."""
  import jax
  import jax.numpy as jnp

  def init(rng):
    shapes = jax.eval_shape(init_params, rng)

    def fill(i, path, leaf):
      n = int(np.prod(leaf.shape))
      wave = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 1.618 + i).reshape(leaf.shape)
      if path[-1].key == 'kernel':
        return wave * np.sqrt(3.0 / max(np.prod(leaf.shape[:-1]), 1))
      return (path[-1].key == 'scale') + 0.1 * wave

    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    return jax.tree_util.tree_unflatten(treedef, [fill(i, p, x) for i, (p, x) in enumerate(flat)])

  return init


def tiny_ldm_config(**overrides):
  """The test suite's tiny LDM (U-Net + text transformer on a frozen VAE) with tensor-parallel-friendly sizes."""
  from support import LDM, load_config

  return load_config(
    'ldm_base',
    {
      **LDM,
      'mesh.min_shard_size': 0,
      'optim.warmup_steps': 0,
      'optim.lr': 1e-3,
      'train.batch_size': BATCH,
      'model.vae.scaling_factor': 1.0,
      'diffusion.caption_dropout': 0.5,
    },
    '',
    **overrides,
  )


def make_task(config, workdir):
  """The real task; for stage 2 a workdir holding a generic frozen VAE (no stage-1 run needed)."""
  import jax

  from diffusion import checkpoint, models
  from diffusion.training.ldm_task import LDMTask
  from diffusion.training.vae_task import VAETask

  if config.model_type == 'vae':
    task = VAETask(config, workdir)
  else:
    vae_dir = os.path.join(workdir, 'frozen', 'vae')
    if jax.process_index() == 0 and not os.path.isdir(vae_dir):
      vae = models.create_vae(config.model.vae)
      size = config.data.image_size
      init = lambda r: vae.init(r, np.zeros((1, size, size, 3), np.float32), sample_posterior=False)['params']
      checkpoint.save_pytree(vae_dir, jax.jit(cheap_init(init))(jax.random.PRNGKey(0)))
    task = LDMTask(config, workdir)
  task.init_params = cheap_init(task.init_params)
  return task


def global_batch(config):
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = {'image': rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)}
  if config.model_type == 'ldm':
    batch['input_ids'] = rng.integers(0, 12, (BATCH, config.data.max_text_length)).astype(np.int32)
  return batch


def train(config, mesh, batch, steps=STEPS, workdir=''):
  """(final state, per-step losses) of `steps` steps on `batch` (this process's rows of the global batch)."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from diffusion import parallel
  from diffusion.training.state import create_optimizer, make_train_step, sharded_train_state, shardings_of

  task = make_task(config, workdir)
  tx = create_optimizer(config.optim, config.train.num_steps, frozen=getattr(task, 'frozen_param_groups', ()))
  rng_init, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))
  rules, min_size = parallel.mesh_rules(config.mesh)
  state, target = sharded_train_state(task.init_params, tx, rng_init, rng_train, mesh, rules, min_size)
  shardings = shardings_of(target)
  step_fn = make_train_step(
    task.loss_fn,
    config.optim.ema_decay,
    config.train.grad_accum_steps,
    NamedSharding(mesh, P(None, parallel.BATCH_AXES)),
  )
  frozen_shardings = parallel.tree_shardings(task.frozen, mesh, rules, min_size)
  step = jax.jit(
    step_fn,
    in_shardings=(shardings, parallel.batch_sharding(mesh), frozen_shardings),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
  global_arrays = parallel.make_global_batch(batch, mesh)
  frozen = jax.device_put(task.frozen, frozen_shardings)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, global_arrays, frozen)
    losses.append(float(metrics['loss']))
  return state, losses


def _flat(tree):
  import jax

  return {jax.tree_util.keystr(p): np.asarray(x, np.float32) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# name -> (mesh (data, fsdp, tensor) over all 8 devices, or None: 1 device; grad_accum_steps; compute dtype).
CASES = {
  '1': (None, 1, ''),
  '8data': ((8, 1, 1), 1, ''),
  '2data4fsdp': ((2, 4, 1), 1, ''),
  '8fsdp': ((1, 8, 1), 1, ''),
  '2data4fsdp_accum4': ((2, 4, 1), 4, ''),
  '1_accum4': (None, 4, ''),
  '8fsdp_bf16': ((1, 8, 1), 1, 'bfloat16'),
  'ldm_1': (None, 1, ''),
  'ldm_2data2fsdp2tensor_accum2': ((2, 2, 2), 2, ''),
}


def run_meshes(out, names):
  """For each case: params after STEPS steps (OUT.npz), losses, dtypes and the largest per-device share of the
  param + optimizer-state bytes, measured from the arrays' addressable shards (OUT.json)."""
  import jax

  from diffusion import parallel

  results, report = {}, {}
  for name in names:
    shape, accum, dtype = CASES[name]
    start = time.perf_counter()
    degrees = dict(zip(('data', 'fsdp', 'tensor'), shape or (1, 1, 1)))
    make_config = tiny_ldm_config if name.startswith('ldm') else tiny_vae_config
    config = make_config(
      **{f'mesh.{k}': v for k, v in degrees.items()}, **{'train.grad_accum_steps': accum, 'train.compute_dtype': dtype}
    )
    mesh = parallel.create_mesh(config.mesh, jax.devices()[:1] if shape is None else jax.devices())
    state, losses = train(config, mesh, global_batch(config), workdir=os.path.join(os.path.dirname(out), name))
    results.update({f'{name}:{k}': v for k, v in _flat(state.params).items()})
    held = parallel.device_bytes((state.params, state.opt_state))
    total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    report[name] = {
      'losses': losses,
      'max_device_fraction': max(held.values()) / total,
      'total_bytes': total,
      'devices': len(held),
      'seconds': time.perf_counter() - start,
      'dtypes': sorted({str(x.dtype) for x in jax.tree.leaves((state.params, state.ema_params))}),
    }
  np.savez(out, **results)
  with open(out + '.json', 'w') as f:
    json.dump(report, f)


def run_multihost(out_dir, process_id, num_processes, port):
  """One of several processes: trains on the global batch (each process feeds its rows) and checkpoints."""
  import jax

  from diffusion import checkpoint, parallel

  config = tiny_vae_config(
    **{
      'distributed.coordinator_address': f'127.0.0.1:{port}',
      'distributed.num_processes': num_processes,
      'distributed.process_id': process_id,
      'mesh.data': 2,
      'mesh.fsdp': -1,
    }
  )
  assert parallel.initialize_distributed(config.distributed)
  assert jax.process_count() == num_processes
  mesh = parallel.create_mesh(config.mesh)
  batch = global_batch(config)
  rows = BATCH // num_processes
  local = {k: v[process_id * rows : (process_id + 1) * rows] for k, v in batch.items()}
  state, losses = train(config, mesh, local)
  ckpt = checkpoint.Checkpointer(out_dir, async_save=True)
  ckpt.save(STEPS, state, None, {'model_type': 'vae'}, force=True)
  ckpt.close()
  print(json.dumps({'process': process_id, 'losses': losses}), flush=True)


if __name__ == '__main__':
  if sys.argv[1] == 'meshes':
    run_meshes(sys.argv[2], sys.argv[3].split(','))
  elif sys.argv[1] == 'multihost':
    run_multihost(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
  else:
    raise SystemExit(f'unknown mode {sys.argv[1]!r}; known: meshes, multihost')
