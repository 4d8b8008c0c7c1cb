"""Classifier-free guidance: wraps a conditional model into a `denoise_fn` (one batched call for both branches)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion.samplers.core import DenoiseFn

Array = jax.Array


def _concat(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def _rescale_guidance(guided: Array, cond: Array, phi: float) -> Array:
  """Lin et al. 2023, Eq. 15-16: match the guided output's per-example std to the conditional one's."""
  axes = tuple(range(1, guided.ndim))
  rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
  return phi * rescaled + (1.0 - phi) * guided


def cfg_denoise_fn(
  model_fn: Callable[[Array, Array, Any], Array],
  cond_context: Any,
  uncond_context: Any,
  guidance_scale: float | Array,
  guidance_rescale: float = 0.0,
  guidance_interval: tuple[float, float] | None = None,
) -> DenoiseFn:
  """A classifier-free-guided denoise_fn: uncond + s * (cond - uncond), from one batched model call.

  `model_fn(x_t, t, context)` returns the raw output; contexts are pytrees with a leading batch axis equal to
  x_t's (the negative prompt is `uncond_context`). With a Python `guidance_scale == 1` only the conditional
  branch runs. `guidance_rescale` (phi, static) blends in the std-rescaled output as diffusers does.
  `guidance_interval` (lo, hi) in model-time units applies guidance only where lo <= t <= hi (Kynkaanniemi et al.
  2024); elsewhere the output is the conditional one.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1:
    return lambda x_t, t: model_fn(x_t, t, cond_context)

  context = _concat(uncond_context, cond_context)

  def denoise_fn(x_t: Array, t: Array) -> Array:
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), context)
    uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
      guided = _rescale_guidance(guided, cond, guidance_rescale)
    if guidance_interval is not None:
      lo, hi = guidance_interval
      inside = ((t >= lo) & (t <= hi)).reshape((-1,) + (1,) * (guided.ndim - 1))
      guided = jnp.where(inside, guided, cond)
    return guided

  return denoise_fn
