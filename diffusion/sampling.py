"""Sampling a trained workdir into a directory of PNGs, a grid and the settings that reproduce them."""

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffusion.errors import UserError
from diffusion.logging import make_grid, save_png
from diffusion.pipeline import LatentDiffusionPipeline


def load_image(path: str, size: int) -> np.ndarray:
  """An RGB image file as (size, size, 3) floats in [-1, 1] (resized with bicubic filtering if needed)."""
  try:
    image = Image.open(path).convert('RGB')
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read image {path!r}: {e}') from None
  if image.size != (size, size):
    image = image.resize((size, size), Image.BICUBIC)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def load_mask(path: str, image_path: str, size: int) -> np.ndarray:
  """A mask file (white = repaint, black = keep) as (size, size, 1) in {0, 1}; it must match the init image's
  size (then both are resized alike)."""
  try:
    mask = Image.open(path).convert('L')
    image_size = Image.open(image_path).size
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read mask {path!r}: {e}') from None
  if mask.size != image_size:
    raise UserError(f'the mask {path!r} is {mask.size[0]}x{mask.size[1]} but the init image is '
                    f'{image_size[0]}x{image_size[1]}: they must have the same size')
  if mask.size != (size, size):
    mask = mask.resize((size, size), Image.NEAREST)
  return (np.asarray(mask, np.float32) > 127.5).astype(np.float32)[..., None]


def sample_to_directory(workdir: str, prompts: Sequence[str], out: str, *, num_images: int = 1, seed: int = 0,
                        negative_prompt: str | None = None, sampler: str | None = None, num_steps: int | None = None,
                        guidance_scale: float | None = None, eta: float | None = None, batch_size: int = 64,
                        step: int | None = None, use_ema: bool = True, init_image: str | None = None,
                        mask: str | None = None, strength: float | None = None, guidance_rescale: float | None = None,
                        guidance_interval: Sequence[float] | None = None, **options: Any) -> dict:
  """Writes OUT/0000.png ... (prompt-major), OUT/grid.png (a row per prompt) and OUT/settings.json.

  `options` are further sampler options (karras, timestep_spacing, s_churn, ...); see `LatentDiffusionPipeline`.
  """
  pipeline = LatentDiffusionPipeline.from_workdir(workdir, use_ema=use_ema, step=step)
  s = pipeline.config.sample
  size = pipeline.config.data.image_size
  image = None if init_image is None else load_image(init_image, size)
  mask_array = None if mask is None else load_mask(mask, init_image, size)
  negative_prompt = s.negative_prompt if negative_prompt is None else negative_prompt
  if init_image is not None and strength is None:
    strength = 1.0 if mask else 0.8  # diffusers' defaults for inpainting and img2img.
  settings = {'sampler': sampler, 'num_steps': num_steps, 'guidance_scale': guidance_scale,
              'guidance_rescale': guidance_rescale, 'guidance_interval': guidance_interval, 'eta': eta, **options}
  expanded = [p for p in prompts for _ in range(num_images)]
  images = pipeline.generate(expanded, negative_prompt=negative_prompt, seed=seed, batch_size=batch_size,
                             init_images=image, masks=mask_array, strength=strength, **settings)
  plan = pipeline.plan(strength=1.0 if strength is None else strength, **settings)
  if step is None:
    from diffusion import checkpoint
    step = checkpoint.Checkpointer(workdir, read_only=True).latest_step()
  record = {
      'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema, 'prompts': list(prompts),
      'num_images_per_prompt': num_images, 'num_images': len(expanded), 'seed': seed,
      'negative_prompt': negative_prompt, 'sampler': plan.sampler, 'num_steps': plan.num_steps,
      'guidance_scale': plan.guidance_scale, 'guidance_rescale': plan.guidance_rescale,
      'guidance_interval': list(s.get('guidance_interval', (0.0, 1.0)) if guidance_interval is None
                                else guidance_interval),
      'sampler_options': dict(plan.options), 'eta': float(s.eta if eta is None else eta), 'batch_size': batch_size,
      'init_image': init_image and os.path.abspath(init_image), 'mask': mask and os.path.abspath(mask),
      'strength': strength,
      'noise': 'image i (file index) starts from fold_in(PRNGKey(seed), i)',
  }
  os.makedirs(out, exist_ok=True)
  for i, image_i in enumerate(images):
    save_png(image_i, os.path.join(out, f'{i:04d}.png'))
  save_png(make_grid(images, ncols=num_images if num_images > 1 else None), os.path.join(out, 'grid.png'), upscale=2)
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(record, f, indent=2)
  return record
