"""The machinery every sampler shares: the registry, timestep and noise-level grids, and the one loop driver.

A sampler is written as a *plan*: `spec(schedule, num_steps, **options) -> Plan`, i.e. its grid of noise levels and
a pure step function. `register_sampler` turns the spec into the public sampler

  sampler(denoise_fn, x_T, schedule, *, num_steps, rng, prediction_type, init_latents=None, strength=1.0,
          mask=None, return_trajectory=False, **options) -> x_0 (or a `Trajectory`)

whose whole loop is one `lax.scan`, so the caller's jit compiles it once per (sampler, steps, shape, options).
The driver owns what is common: the family check (flow samplers need a flow schedule and the reverse), the start
state (pure noise, or an init image noised to the level where sampling starts: img2img with `strength`), the
inpainting blend after every step (known region `mask == 0` re-noised to the next level from the same noise), and
the model call, which converts the raw output through `process.convert` only.
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import process
from diffusion.errors import UserError
from diffusion.registry import Registry

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]
# model(x_state, t, alpha, sigma) -> Prediction, for a state x = alpha x0 + sigma eps at model time t (scalars).
ModelFn = Callable[[Array, Array, Array, Array], process.Prediction]
# step(i, x, carry, model, rng) -> (x_next, carry): step i of the plan, i traced.
StepFn = Callable[[Array, Array, Any, ModelFn, Any], tuple[Array, Any]]
FAMILIES = ('diffusion', 'flow')


class Grid(NamedTuple):
  """Where a sampler goes: the model time of each step and the noise level (x = alpha x0 + sigma eps, in the
  sampler's own state space) at the start of each step, then after the last one. (n,), (n + 1,), (n + 1,)."""

  timesteps: Array
  alphas: Array
  sigmas: Array


def _no_carry(x: Array) -> tuple[()]:
  del x
  return ()


class Plan(NamedTuple):
  """A sampler's grid and step. `init_carry(x_start)`: the step's initial extra state (multistep memory).
  `vp_input`: the state is rescaled to unit alpha^2 + sigma^2 for the model (for samplers that step in the
  variance-exploding space of a variance-preserving model)."""

  grid: Grid
  step: StepFn
  init_carry: Callable[[Array], Any] = _no_carry
  needs_rng: bool = False
  vp_input: bool = False


class Trajectory(NamedTuple):
  """Every state of one sampling run (`return_trajectory=True`), in the sampler's state space.

  states[0] is the start state and states[k] the state after the k-th step taken; alphas / sigmas are the grid
  levels from the start step on (the last one is the final level); timesteps the model times of the steps taken.
  """

  x0: Array
  states: Array
  alphas: Array
  sigmas: Array
  timesteps: Array


class SamplerInfo(NamedTuple):
  """A sampler's family, its option names and their defaults ((name, value) pairs, in signature order)."""

  family: str
  options: tuple[str, ...]
  defaults: tuple[tuple[str, Any], ...] = ()


# name -> sampler; each sampler carries its `SamplerInfo` as `.info` and its plan function as `.spec`.
SAMPLERS: Registry[Callable[..., Any]] = Registry('sampler')


def register_sampler(name: str, family: str = 'diffusion') -> Callable[[Callable[..., Plan]], Callable[..., Any]]:
  """Registers `spec(schedule, num_steps, **options) -> Plan` as the sampler `name` of `family`."""
  if family not in FAMILIES:
    raise ValueError(f'unknown sampler family {family!r}; known: {FAMILIES}')

  def decorator(spec: Callable[..., Plan]) -> Callable[..., Any]:
    params = [p for p in inspect.signature(spec).parameters.values() if p.name not in ('schedule', 'num_steps')]
    sampler = _make_sampler(name, family, spec)
    sampler.info = SamplerInfo(family, tuple(p.name for p in params), tuple((p.name, p.default) for p in params))
    SAMPLERS.add(name, sampler)
    return sampler

  return decorator


def get_sampler(name: str) -> Callable[..., Any]:
  """The sampler registered as `name`; a `UserError` listing the known names otherwise."""
  return SAMPLERS.get(name)


def available_samplers(family: str | None = None) -> list[str]:
  return [n for n in SAMPLERS.names() if family is None or SAMPLERS.get(n).info.family == family]


def sampler_info(name: str) -> SamplerInfo:
  """The family ('diffusion' or 'flow'), the option names and their defaults of a registered sampler."""
  return SAMPLERS.get(name).info


def family_error(name: str, schedule: process.NoiseSchedule) -> str | None:
  """Why sampler `name` cannot sample a model on `schedule` (the other family), or None."""
  family = sampler_info(name).family
  model_family = 'flow' if schedule.is_flow else 'diffusion'
  if family == model_family:
    return None
  return (
    f'sampler {name!r} is a {family} sampler but the model is a {model_family} model '
    f'(diffusion.schedule={schedule.name or schedule.kind!r}); use one of: '
    f'{", ".join(available_samplers(model_family))}'
  )


# ----------------------------------------------------------------------------------------------------------
# Timesteps, as each diffusers scheduler's `set_timesteps` makes them.

SPACINGS = ('leading', 'trailing', 'linspace')


def _check_steps(num_train_timesteps: int, num_steps: int, spacing: str) -> None:
  if not 1 <= num_steps <= num_train_timesteps:
    raise UserError(f'num_steps must be in [1, {num_train_timesteps}], got {num_steps}')
  if spacing not in SPACINGS:
    raise UserError(f'unknown timestep_spacing {spacing!r}; known: {", ".join(SPACINGS)}')


def make_timesteps(
  num_train_timesteps: int, num_steps: int, spacing: str = 'leading', steps_offset: int = 0
) -> np.ndarray:
  """Descending int timesteps of DDPM / DDIM (diffusers' DDPMScheduler / DDIMScheduler).

  'leading': 0, r, 2r, ... (r = T // n) plus `steps_offset`; 'trailing': from T-1 down in steps of T / n;
  'linspace': n points rounded from [0, T-1] (Lin et al. 2023, Table 2).
  """
  _check_steps(num_train_timesteps, num_steps, spacing)
  if spacing == 'linspace':
    return np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
  if spacing == 'leading':
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
  ratio = num_train_timesteps / num_steps
  return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def k_timesteps(
  num_train_timesteps: int, num_steps: int, spacing: str = 'linspace', steps_offset: int = 0
) -> np.ndarray:
  """Descending float32 timesteps of Euler / Euler ancestral / Heun: as `make_timesteps`, but 'linspace' is
  not rounded."""
  _check_steps(num_train_timesteps, num_steps, spacing)
  if spacing == 'linspace':
    return np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1].copy()
  return make_timesteps(num_train_timesteps, num_steps, spacing, steps_offset).astype(np.float32)


def dpm_timesteps(
  num_train_timesteps: int, num_steps: int, spacing: str = 'linspace', steps_offset: int = 0
) -> np.ndarray:
  """Descending int timesteps of DPMSolverMultistepScheduler: n of n + 1 points, the last (0) dropped."""
  _check_steps(num_train_timesteps, num_steps, spacing)
  T = num_train_timesteps
  if spacing == 'linspace':
    return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  if spacing == 'leading':
    ratio = T // (num_steps + 1)
    return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
  return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1


# ----------------------------------------------------------------------------------------------------------
# Variance-exploding noise levels sigma_t / alpha_t of diffusion schedules (traceable: the schedule may be traced).


def _ve_table(schedule: process.NoiseSchedule) -> Array:
  ac = jnp.maximum(schedule.alphas_cumprod, 2.0**-24)  # diffusers' stand-in for SNR 0 at the last step.
  return jnp.sqrt((1.0 - ac) / ac)


def ve_sigma_at(schedule: process.NoiseSchedule, t: Array) -> Array:
  """sigma_t / alpha_t at float model times t (discrete: linear in sigma between integers, as diffusers)."""
  t = jnp.asarray(t, jnp.float32)
  if schedule.kind == 'edm':
    return process.edm_sigma_at(schedule, t)
  return jnp.interp(t, jnp.arange(schedule.num_timesteps, dtype=jnp.float32), _ve_table(schedule))


def t_at_ve_sigma(schedule: process.NoiseSchedule, sigma: Array) -> Array:
  """The model time of a VE noise level (discrete: interpolated in log sigma, diffusers' `_sigma_to_t`)."""
  num = schedule.num_timesteps
  if schedule.kind == 'edm':
    return jnp.clip(process.edm_t_at(schedule, sigma), 0.0, num - 1.0)
  log_sigmas = jnp.log(_ve_table(schedule))
  log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
  low = jnp.clip(jnp.searchsorted(log_sigmas, log_sigma, side='right') - 1, 0, num - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
  return (1.0 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: Any, sigma_max: Any, num_steps: int, rho: float = 7.0) -> Any:
  """Karras et al. 2022, Eq. 5: n levels from sigma_max down to sigma_min, uniform in sigma^(1/rho)."""
  ramp = np.linspace(0, 1, num_steps)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def _append(values: Array, last: float) -> Array:
  return jnp.concatenate([jnp.asarray(values, jnp.float32), jnp.full((1,), last, jnp.float32)])


def ve_grid(
  schedule: process.NoiseSchedule,
  timesteps: np.ndarray,
  karras: bool,
  round_karras: bool = False,
  karras_range: tuple[Array, Array] | None = None,
) -> tuple[Array, Array]:
  """(model times (n,), VE sigmas (n + 1,) ending in 0) at `timesteps`, or on Karras levels (then the model
  times come from the levels; `karras_range` (min, max) defaults to the levels at the timesteps' ends)."""
  sigmas = ve_sigma_at(schedule, jnp.asarray(timesteps, jnp.float32))
  ts = jnp.asarray(timesteps, jnp.float32)
  if karras:
    lo, hi = karras_range if karras_range is not None else (sigmas[-1], sigmas[0])
    sigmas = karras_sigmas(lo, hi, len(timesteps))
    ts = t_at_ve_sigma(schedule, sigmas)
    if round_karras:
      ts = jnp.round(ts)
  return ts, _append(sigmas, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Noise.


def _is_key_batch(rng: Array) -> bool:
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def step_noise(rng: Array, step: int | Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
  """N(0, I) noise of `shape` for loop index `step`: example b's from fold_in(key_b, step).

  `rng` is one key (then key_b = fold_in(rng, b)) or a batch of `shape[0]` keys (one per example), so an example's
  noise never depends on the batch it was drawn in.
  """
  keys = rng if _is_key_batch(rng) else jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(shape[0]))
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:], dtype))(keys)


# ----------------------------------------------------------------------------------------------------------
# The driver.


def _model_fn(denoise_fn: DenoiseFn, prediction_type: str, vp_input: bool) -> ModelFn:

  def model(x: Array, t: Array, alpha: Array, sigma: Array) -> process.Prediction:
    if vp_input:
      scale = jax.lax.rsqrt(alpha * alpha + sigma * sigma)
      x, alpha, sigma = x * scale, alpha * scale, sigma * scale
    output = denoise_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    return process.convert(output, x, alpha, sigma, prediction_type)

  return model


def editing_strength(strength: float | None, init: bool, mask: bool, flag_prefix: str = '') -> float:
  """The strength of an edit, checked: `strength` in (0, 1], by default diffusers' 0.8 for img2img and 1.0 with a
  mask (inpainting); 1.0 without an init image, where a mask or another strength is a `UserError`. Errors name the
  options as `flag_prefix + name` (sample.py passes '--', so they name its flags)."""
  names = {key: f'{flag_prefix}{key}' for key in ('strength', 'mask', 'init_image')}
  if not init:
    if mask:
      raise UserError(f'{names["mask"]} needs an init image ({names["init_image"]}, the image to edit)')
    if strength not in (None, 1.0):
      raise UserError(f'{names["strength"]} {strength} needs an init image ({names["init_image"]}, the image to edit)')
    return 1.0
  strength = (1.0 if mask else 0.8) if strength is None else float(strength)
  if not 0.0 < strength <= 1.0:
    raise UserError(f'{names["strength"]} must be in (0, 1], got {strength}')
  return strength


def _start_step(num_steps: int, strength: float) -> int:
  editing_strength(strength, True, False)
  steps = min(int(num_steps * strength), num_steps)
  if steps < 1:
    raise UserError(f'strength {strength} x num_steps {num_steps} < 1: no step would run')
  return num_steps - steps


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
  try:
    return tuple(np.broadcast_shapes(shape, target)) == tuple(target)
  except ValueError:
    return False


def _check_inputs(
  name: str,
  x_T: Array,
  schedule: process.NoiseSchedule,
  prediction_type: str,
  init_latents: Array | None,
  strength: float,
  mask: Array | None,
) -> None:
  process.get_prediction_type(prediction_type)
  why = family_error(name, schedule) or process.check_family(schedule.name or schedule.kind, prediction_type)
  if why:
    raise UserError(why)
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise UserError(f'x_T must be floating point, got {x_T.dtype}')
  if (strength < 1.0 or mask is not None) and init_latents is None:
    raise UserError('strength < 1 and mask need init_latents (the image to edit)')
  if init_latents is not None and init_latents.shape != x_T.shape:
    raise UserError(f'init_latents {init_latents.shape} do not match x_T {x_T.shape}')
  if mask is not None and not _broadcasts(mask.shape, x_T.shape):
    raise UserError(f'mask {mask.shape} does not broadcast to the latents {x_T.shape}')


def _make_sampler(name: str, family: str, spec: Callable[..., Plan]) -> Callable[..., Any]:

  def sampler(
    denoise_fn: DenoiseFn,
    x_T: Array,
    schedule: process.NoiseSchedule,
    *,
    num_steps: int,
    rng: Array | None = None,
    prediction_type: str,
    init_latents: Array | None = None,
    strength: float = 1.0,
    mask: Array | None = None,
    return_trajectory: bool = False,
    **options: Any,
  ) -> Array | Trajectory:
    _check_inputs(name, x_T, schedule, prediction_type, init_latents, strength, mask)
    plan = spec(schedule, num_steps, **options)
    if plan.needs_rng and rng is None:
      raise UserError(f'sampler {name!r} draws noise with these options: pass rng')
    start = _start_step(num_steps, strength)
    model = _model_fn(denoise_fn, prediction_type, plan.vp_input)
    return _run(plan, model, x_T, rng, start, num_steps, init_latents, mask, return_trajectory)

  sampler.__name__ = sampler.__qualname__ = name
  sampler.__doc__ = spec.__doc__
  sampler.spec = spec
  return sampler


def _run(
  plan: Plan,
  model: ModelFn,
  x_T: Array,
  rng: Array | None,
  start: int,
  num_steps: int,
  init_latents: Array | None,
  mask: Array | None,
  return_trajectory: bool,
) -> Array | Trajectory:
  grid = plan.grid
  noise = x_T.astype(jnp.float32)
  a0, s0 = grid.alphas[start], grid.sigmas[start]
  x0 = None if init_latents is None else init_latents.astype(jnp.float32)
  if x0 is None or start == 0:  # Strength 1 ignores the init image (inpainting still uses it in the blend).
    x_start = noise * jnp.sqrt(a0 * a0 + s0 * s0)  # x_T is the unit-variance (VP) state at the first level.
  else:
    x_start = a0 * x0 + s0 * noise

  def body(state, i):
    x, carry = state
    x, carry = plan.step(i, x, carry, model, rng)
    if mask is not None:  # Inpainting: the known region follows q(x_next | x0) with the start noise; x0 at the end.
      last = i == num_steps - 1
      a = jnp.where(last, 1.0, grid.alphas[i + 1])
      s = jnp.where(last, 0.0, grid.sigmas[i + 1])
      x = mask * x + (1.0 - mask) * (a * x0 + s * noise)
    return (x, carry), (x if return_trajectory else None)

  (x, _), states = jax.lax.scan(body, (x_start, plan.init_carry(x_start)), jnp.arange(start, num_steps))
  out = x.astype(x_T.dtype)
  if not return_trajectory:
    return out
  return Trajectory(
    x0=out,
    states=jnp.concatenate([x_start[None], states]),
    alphas=grid.alphas[start:],
    sigmas=grid.sigmas[start:],
    timesteps=grid.timesteps[start:],
  )
