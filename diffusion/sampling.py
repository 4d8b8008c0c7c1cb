"""Sampling a trained workdir into a directory of PNGs, a grid and the settings that reproduce them."""

import json
import os
from typing import Sequence

from diffusion.logging import make_grid, save_png
from diffusion.pipeline import LatentDiffusionPipeline


def sample_to_directory(workdir: str, prompts: Sequence[str], out: str, *, num_images: int = 1, seed: int = 0,
                        negative_prompt: str | None = None, sampler: str | None = None, num_steps: int | None = None,
                        guidance_scale: float | None = None, eta: float | None = None, batch_size: int = 64,
                        step: int | None = None, use_ema: bool = True) -> dict:
  """Writes OUT/0000.png ... (prompt-major), OUT/grid.png (a row per prompt) and OUT/settings.json."""
  pipeline = LatentDiffusionPipeline.from_workdir(workdir, use_ema=use_ema, step=step)
  s = pipeline.config.sample
  settings = {
      'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema, 'prompts': list(prompts),
      'num_images_per_prompt': num_images, 'num_images': len(prompts) * num_images, 'seed': seed,
      'negative_prompt': s.negative_prompt if negative_prompt is None else negative_prompt,
      'sampler': sampler or s.sampler, 'num_steps': int(num_steps or s.num_steps),
      'guidance_scale': float(s.guidance_scale if guidance_scale is None else guidance_scale),
      'eta': float(s.eta if eta is None else eta), 'batch_size': batch_size,
      'noise': 'image i (file index) starts from fold_in(PRNGKey(seed), i)',
  }
  if step is None:
    from diffusion import checkpoint
    settings['step'] = checkpoint.Checkpointer(workdir, read_only=True).latest_step()
  expanded = [p for p in prompts for _ in range(num_images)]
  images = pipeline.generate(expanded, negative_prompt=settings['negative_prompt'], seed=seed,
                             sampler=settings['sampler'], num_steps=settings['num_steps'],
                             guidance_scale=settings['guidance_scale'], eta=settings['eta'], batch_size=batch_size)
  os.makedirs(out, exist_ok=True)
  for i, image in enumerate(images):
    save_png(image, os.path.join(out, f'{i:04d}.png'))
  save_png(make_grid(images, ncols=num_images if num_images > 1 else None), os.path.join(out, "grid.png"), upscale=2)
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(settings, f, indent=2)
  return settings
