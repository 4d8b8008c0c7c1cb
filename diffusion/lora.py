"""LoRA as a transformation of parameter trees: low-rank updates of chosen Dense / Conv kernels, stacked and merged.

A LoRA is a tree shaped like (part of) the params it adapts: at the module path of each adapted kernel it holds

  {'a': A (r, *kernel.shape[:-1]), 'b': B (out, r), 'alpha': () float}

so a Dense kernel (in, out) gets A (r, in) and B (out, r), PyTorch's `lora_A` / `lora_B` weights, and a Conv kernel
(kh, kw, in, out) gets A (r, kh, kw, in) (LoCon: a kh x kw conv down to r channels) and B (out, r) (a 1x1 conv up).
The adapted kernel is W + scale * (alpha / r) * dW with dW[..., o] = sum_r A[r, ...] B[o, r] (our kernels are
(in, out) and HWIO: dW is (B A) transposed). B starts at zero, so a fresh LoRA leaves the model unchanged.

  loras = lora.init(rng, params, rank=4, alpha=4, patterns=lora.DEFAULT_TARGETS)
  merged = lora.merge(params, [loras, other], [1.0, 0.7])     # several LoRAs, each with its own scale

Targets are patterns over our module paths ('/'-joined, e.g. `unet/down_blocks_0/attentions_0/
transformer_blocks_0/attn1/to_q`): a pattern (a regex) names a module when it matches the end of its path at a
'/' boundary, so `to_q` is every U-Net attention's query projection and `resnets_\\d+/conv[12]` the res-block convs.

A merged kernel cannot drop out the LoRA branch's input alone, so LoRA dropout (peft's `lora_dropout`) runs the LoRA
unmerged: inside `with lora.unmerged(loras, rate=p, keys=keys): model.apply(base, x)` every adapted Dense / Conv
returns base(x) + (alpha / r) B A dropout(x), each example's mask drawn from its own key.
"""

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion.errors import ConfigError, UserError

Params = Any
# What diffusers / peft adapt in a Stable-Diffusion U-Net, under our names (`to_out.0` is `to_out_0`).
DEFAULT_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out_0')
# The CLIP text encoder's attention projections (config.lora.text_encoder=True).
TEXT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
KEYS = ('a', 'b', 'alpha')
# Folded into an example's key before LoRA dropout's draws (ASCII 'LoRA'), apart from the example's other draws.
DROPOUT_STREAM = 0x4C6F5241


def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(tree) if tree else {}


def modules(loras: Params) -> dict[tuple[str, ...], dict[str, Any]]:
  """module path -> {'a', 'b'[, 'alpha']} of a LoRA tree."""
  out: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in _flat(loras).items():
    if path[-1] not in KEYS:
      raise ValueError(f'not a LoRA tree: leaf {"/".join(path)!r} is none of {KEYS}')
    out.setdefault(path[:-1], {})[path[-1]] = leaf
  return out


def _name(path: Sequence[str]) -> str:
  return '/'.join(path)


def target_kernels(params: Params, patterns: Sequence[str]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """module path -> kernel shape of every Dense (rank 2) or Conv (rank 4) kernel whose module a pattern names.

  A pattern that names no kernel is a `UserError` (a typo would otherwise train nothing)."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append((pattern, re.compile(rf'(?:^|/)(?:{pattern})$')))
    except re.error as e:
      raise UserError(f'LoRA target {pattern!r} is not a valid pattern: {e}') from None
  found: dict[tuple[str, ...], tuple[int, ...]] = {}
  used = set()
  for path, leaf in _flat(params).items():
    if path[-1] != 'kernel' or len(leaf.shape) not in (2, 4):
      continue
    for pattern, regex in compiled:
      if regex.search(_name(path[:-1])):
        found[path[:-1]] = tuple(leaf.shape)
        used.add(pattern)
  unused = [p for p in patterns if p not in used]
  if unused:
    raise UserError(f'LoRA targets {unused} name no Dense or Conv kernel of the model')
  return found


def check_rank(rank: int, shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> None:
  """A rank above a target's dimensions (min(fan-in, out)) cannot be low-rank: a `UserError` naming the target."""
  for path, shape in shapes.items():
    limit = min(int(np.prod(shape[:-1])), shape[-1])
    if rank > limit:
      raise UserError(
        f'LoRA rank {rank} is larger than the dimensions of {_name(path)} (kernel {shape}, at most {limit})'
      )


def init(
  rng: jax.Array, params: Params, rank: int, alpha: float | None = None, patterns: Sequence[str] = DEFAULT_TARGETS
) -> Params:
  """A fresh LoRA of `rank` on the kernels `patterns` name: A uniform in +-1/sqrt(fan-in) (peft's Kaiming init),
  B zero (the adapted model starts as the base). `alpha` defaults to `rank` (scale 1)."""
  shapes = target_kernels(params, patterns)
  check_rank(rank, shapes)
  alpha = float(rank if alpha is None else alpha)
  shapes = sorted(shapes.items())
  sizes = [rank * int(np.prod(shape[:-1])) for _, shape in shapes]
  draws = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)  # One draw for all: one compile.
  xp = _xp(draws)
  draws = draws if xp is jnp else np.asarray(draws)
  flat, start = {}, 0
  for (path, shape), size in zip(shapes, sizes):
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
    flat[path + ('a',)] = draws[start : start + size].reshape(rank, *shape[:-1]) * bound
    flat[path + ('b',)] = xp.zeros((shape[-1], rank), xp.float32)
    flat[path + ('alpha',)] = xp.asarray(alpha, xp.float32)
    start += size
  return flax.traverse_util.unflatten_dict(flat)


def count_params(loras: Params) -> int:
  """The number of trained LoRA values (A and B; alpha is a constant)."""
  return sum(int(np.prod(m['a'].shape)) + int(np.prod(m['b'].shape)) for m in modules(loras).values())


def _xp(*arrays: Any) -> Any:
  """jax.numpy under a trace (training), else numpy: a merge on the host compiles nothing."""
  return jnp if any(isinstance(x, jax.core.Tracer) for x in arrays) else np


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
  """The kernel update B A in our layout: (r, *rest) x (out, r) -> (*rest, out)."""
  xp = _xp(a, b)
  return xp.einsum('r...,or->...o', xp.asarray(a, xp.float32), xp.asarray(b, xp.float32))


def _multiplier(module: Mapping[str, Any]) -> Any:
  rank = module['a'].shape[0]
  return module.get('alpha', rank) / rank


def apply(params: Params, loras: Params, scale: float = 1.0, *, multiplier: float | None = None) -> Params:
  """`params` with each adapted kernel W replaced by W + scale * (alpha / r) * dW (jittable).

  `multiplier` overrides alpha / r for every module (training keeps alpha out of the trained tree). A LoRA module
  that matches no kernel of `params`, or whose factors do not fit it, is a `UserError` naming them."""
  flat = _flat(params)
  missing, wrong = [], []
  for path, module in modules(loras).items():
    kernel = flat.get(path + ('kernel',))
    if kernel is None:
      missing.append(_name(path))
      continue
    a, b = module['a'], module['b']
    if a.shape[1:] != kernel.shape[:-1] or b.shape != (kernel.shape[-1], a.shape[0]):
      wrong.append(f'{_name(path)} (kernel {tuple(kernel.shape)}, LoRA A {tuple(a.shape)} B {tuple(b.shape)})')
      continue
    factor = scale * (_multiplier(module) if multiplier is None else multiplier)
    xp = _xp(kernel, a, b, factor)
    factor = factor if xp is jnp else np.float32(factor)  # A concrete jax scalar (a loaded alpha) stays on the host.
    flat[path + ('kernel',)] = (xp.asarray(kernel, xp.float32) + factor * delta(a, b)).astype(kernel.dtype)
  if missing:
    more = f' ({len(missing)} in all)' if len(missing) > 5 else ''
    raise UserError(f'LoRA modules match no kernel of the model: {", ".join(sorted(missing)[:5])}{more}')
  if wrong:
    raise UserError(f'LoRA does not fit the model (a LoRA of another base?): {"; ".join(sorted(wrong)[:3])}')
  return flax.traverse_util.unflatten_dict(flat)


def stack(loras: Sequence[Params], scales: Sequence[float]) -> Params:
  """One LoRA equal to the sum of `scale_i * LoRA_i` (on the host): per module, the factors concatenated along
  the rank.

  A module one LoRA adapts keeps its factors (the scale goes into alpha); where several meet, each B carries its
  scale * alpha / r and alpha is the total rank."""
  if len(loras) != len(scales):
    raise ValueError(f'{len(loras)} LoRAs but {len(scales)} scales')
  parts: dict[tuple[str, ...], list[tuple[dict[str, Any], float]]] = {}
  for tree, scale in zip(loras, scales):
    for path, module in modules(tree).items():
      parts.setdefault(path, []).append((module, float(scale)))
  flat = {}
  for path, group in parts.items():
    if len(group) == 1:
      ((module, scale),) = group
      a, b, alpha = module['a'], module['b'], scale * _multiplier(module) * module['a'].shape[0]
    else:
      a = np.concatenate([np.asarray(m['a'], np.float32) for m, _ in group])
      b = np.concatenate([np.asarray(m['b'], np.float32) * s * _multiplier(m) for m, s in group], axis=1)
      alpha = a.shape[0]
    flat.update({path + ('a',): a, path + ('b',): b, path + ('alpha',): np.float32(alpha)})
  return flax.traverse_util.unflatten_dict(flat)


def merge(params: Params, loras: Sequence[Params], scales: Sequence[float]) -> Params:
  """`params` with every LoRA of `loras` merged in with its scale: W + sum_i scale_i * (alpha_i / r_i) * dW_i."""
  if len(loras) != len(scales):
    raise UserError(f'{len(loras)} LoRAs but {len(scales)} scales')
  for tree, scale in zip(loras, scales):
    params = apply(params, tree, scale)
  return params


def dropout_keys(keys: jax.Array, index: int) -> jax.Array:
  """The keys of LoRA dropout's masks at the `index`-th adapted module (sorted paths): fold_in(fold_in(key,
  DROPOUT_STREAM), index) of each example's key, apart from whatever else the example draws from its key."""
  return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, DROPOUT_STREAM), index))(keys)


def _branch(module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """B A x of a Dense (x A^T B^T) or a Conv (the module's own conv down to r channels with A, then B as a 1x1)."""
  if isinstance(module, nn.Dense):
    down = jnp.einsum('...i,ri->...r', x, a.astype(x.dtype))
  else:
    kernel = jnp.moveaxis(a, 0, -1).astype(x.dtype)  # (r, kh, kw, in) -> HWIO with r output channels.
    down = module.clone(parent=None, name=None, features=a.shape[0], use_bias=False).apply(
      {'params': {'kernel': kernel}}, x
    )
  return jnp.einsum('...r,or->...o', down, b.astype(down.dtype))


@contextlib.contextmanager
def unmerged(
  loras: Params,
  *,
  multiplier: float | None = None,
  rate: float = 0.0,
  keys: jax.Array | None = None,
  parts: Mapping[str, nn.Module] | None = None,
) -> Iterator[None]:
  """Within the block, every Dense / Conv module that `loras` adapts returns base(x) + m * B A dropout(x), peft's
  LoRA layer, instead of the merged kernel's output (m = `multiplier`, else the module's alpha / r; the base params
  are the ones given to `apply`, unchanged). Jittable; gradients reach the factors through the branch.

  `rate` > 0 needs `keys`, one per example, the leading axis of every adapted module's input: example i's mask at
  the j-th adapted module (sorted paths) is bernoulli(dropout_keys(keys, j)[i], 1 - rate) over its input, kept values
  scaled by 1 / (1 - rate), so an example's mask is the same in any batch. Rate 0 is the unmerged LoRA: the merged
  model's output up to float rounding.

  Paths are relative to the network applied inside the block; with `parts` ({'unet': unet_module, 'text': ...}),
  `loras` is keyed by part and a network is recognised by its class when it is applied. A module of `loras` that no
  Dense or Conv call reached inside the block is a `ValueError` at its end (its update would be missing)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'LoRA dropout rate must be in [0, 1), got {rate}')
  if rate > 0 and keys is None:
    raise ValueError('LoRA dropout needs the per-example keys')
  by_path = modules(loras)
  index = {path: i for i, path in enumerate(sorted(by_path))}
  roots = {type(network): name for name, network in (parts or {}).items()}
  if len(roots) != len(parts or {}):
    raise ValueError(f'the parts {sorted(parts)} must be networks of distinct classes')
  current: list[str] = []  # The part whose network runs now.
  reached: set[tuple[str, ...]] = set()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if module.scope is None:
      return next_fun(*args, **kwargs)
    if parts is not None and module.path == () and type(module) in roots:
      current.append(roots[type(module)])
      try:
        return next_fun(*args, **kwargs)
      finally:
        current.pop()
    if context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    if parts is not None and not current:
      return next_fun(*args, **kwargs)
    path = tuple(current[-1:]) + tuple(module.path)
    factors = by_path.get(path)
    if factors is None:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Conv) and module.feature_group_count != 1:
      raise ValueError(f'LoRA on the grouped convolution {_name(path)} is not supported')
    reached.add(path)
    out = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs['inputs']
    x = x.astype(out.dtype)
    if rate > 0:
      if x.shape[0] != keys.shape[0]:
        raise ValueError(f'LoRA dropout at {_name(path)}: input batch {x.shape[0]} but {keys.shape[0]} example keys')
      shape = x.shape[1:]
      keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, shape))(dropout_keys(keys, index[path]))
      x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))
    m = _multiplier(factors) if multiplier is None else multiplier
    return out + (m * _branch(module, x, factors['a'], factors['b'])).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield
  missing = sorted(_name(p) for p in set(by_path) - reached)
  if missing:
    raise ValueError(f'LoRA modules no Dense or Conv call reached: {", ".join(missing[:5])}')


def config_targets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The target patterns of a `config.lora` section: its targets, plus the CLIP ones when text_encoder is set."""
  return tuple(config.targets) + (TEXT_TARGETS if config.text_encoder else ())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """The `config.lora` section (rank 0 = off): sizes, targets, and a base workdir to train on."""
  section = config.get('lora')
  if section is None:
    return
  rank = section.rank
  if not isinstance(rank, int) or rank < 0:
    raise ConfigError('lora.rank', f'must be an integer >= 0 (0 = no LoRA), got {rank!r}')
  if rank == 0:
    return
  if not float(section.alpha) > 0:
    raise ConfigError('lora.alpha', f'must be > 0, got {section.alpha!r}')
  if not 0.0 <= float(section.dropout) < 1.0:
    raise ConfigError('lora.dropout', f'must be in [0, 1), got {section.dropout!r}')
  if not section.targets:
    raise ConfigError('lora.targets', 'name at least one module pattern (e.g. to_q)')
  for pattern in section.targets:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError('lora.targets', f'{pattern!r} is not a valid pattern: {e}') from None
  if not config.get('base_workdir'):
    raise ConfigError('base_workdir', 'LoRA training (lora.rank > 0) needs the workdir of the frozen base model')


def trains_lora(config: ml_collections.ConfigDict) -> bool:
  """Whether a stage-2 config trains (or a workdir's config was trained as) a LoRA on a frozen `base_workdir`."""
  section = config.get('lora')
  return section is not None and int(section.get('rank', 0)) > 0 and bool(config.get('base_workdir'))


def factors(loras: Params) -> Params:
  """A LoRA tree without its alphas: what training optimizes (alpha is a constant, `apply(..., multiplier=)`)."""
  return flax.traverse_util.unflatten_dict({p: v for p, v in _flat(loras).items() if p[-1] != 'alpha'})


def with_alpha(trained: Params, alpha: float) -> Params:
  """A trained tree of factors as a full LoRA tree with `alpha` at every module (what files and merges read)."""
  flat = {}
  for path, module in modules(trained).items():
    flat.update({path + (k,): v for k, v in module.items()})
    flat[path + ('alpha',)] = np.float32(alpha)
  return flax.traverse_util.unflatten_dict(flat)
