"""Sampling a trained workdir into a directory of PNGs, a grid and the settings that reproduce them.

Sweeps: several guidance scales and/or step counts are sampled from the same per-image noise, one subfolder per
combination (`gs3_steps25/0000.png ...`, each with its own settings.json), plus a labelled grid (a row per image, a
column per combination) and a settings.json listing every combination. Per-prompt seeds come from a prompts file
whose lines are `prompt<TAB>seed` (see `read_prompts_file`).
"""

import itertools
import json
import os
from typing import Any, Sequence

import numpy as np

from diffusion.errors import UserError
from diffusion.images import labelled_grid, load_image, load_mask, make_grid, save_png
from diffusion.pipeline import LatentDiffusionPipeline


def noise_plan(num_prompts: int, num_images: int, seed: int,
               prompt_seeds: Sequence[int | None] | None = None) -> list[tuple[int, int]]:
  """(root seed, fold-in index) of each output image (prompt-major). Without a per-prompt seed, image i (file index)
  starts from fold_in(PRNGKey(seed), i); with one, image j of that prompt from fold_in(PRNGKey(prompt_seed), j)."""
  prompt_seeds = list(prompt_seeds) if prompt_seeds is not None else [None] * num_prompts
  if len(prompt_seeds) != num_prompts:
    raise UserError(f'{len(prompt_seeds)} prompt seeds for {num_prompts} prompts')
  return [(seed, p * num_images + j) if prompt_seeds[p] is None else (int(prompt_seeds[p]), j)
          for p in range(num_prompts) for j in range(num_images)]


def _generate(pipeline: LatentDiffusionPipeline, prompts: Sequence[str], noise: Sequence[tuple[int, int]],
              **kwargs: Any) -> np.ndarray:
  """`pipeline.generate` with each image's (root seed, index): one call per distinct root seed."""
  out: list[Any] = [None] * len(prompts)
  for root in dict.fromkeys(s for s, _ in noise):
    rows = [i for i, (s, _) in enumerate(noise) if s == root]
    images = pipeline.generate([prompts[i] for i in rows], seed=root, indices=[noise[i][1] for i in rows], **kwargs)
    for i, image in zip(rows, images):
      out[i] = image
  return np.stack(out)


def _as_list(value: Any) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def sample_to_directory(workdir: str, prompts: Sequence[str], out: str, *, num_images: int = 1, seed: int = 0,
                        negative_prompt: str | None = None, sampler: str | None = None,
                        num_steps: int | Sequence[int] | None = None,
                        guidance_scale: float | Sequence[float] | None = None, eta: float | None = None,
                        batch_size: int = 64, step: int | None = None, use_ema: bool = True,
                        init_image: str | None = None, mask: str | None = None, strength: float | None = None,
                        guidance_rescale: float | None = None, guidance_interval: Sequence[float] | None = None,
                        prompt_seeds: Sequence[int | None] | None = None, **options: Any) -> dict:
  """Writes OUT/0000.png ... (prompt-major), OUT/grid.png (a row per prompt) and OUT/settings.json.

  `guidance_scale` / `num_steps` given as lists sweep every combination (see the module docstring); the returned
  record then lists them under 'sweep'. `prompt_seeds` (one per prompt, None = `seed`): see `noise_plan`.
  `options` are further sampler options (karras, timestep_spacing, s_churn, ...); see `LatentDiffusionPipeline`.
  """
  pipeline = LatentDiffusionPipeline.from_workdir(workdir, use_ema=use_ema, step=step)
  step = pipeline.step  # The step actually restored: a damaged latest checkpoint is skipped with a warning.
  size = pipeline.config.data.image_size
  image = None if init_image is None else load_image(init_image, size)
  mask_array = None if mask is None else load_mask(mask, init_image, size)
  if init_image is not None and strength is None:
    strength = 1.0 if mask else 0.8  # diffusers' defaults for inpainting and img2img.
  common = dict(workdir=workdir, prompts=list(prompts), num_images=num_images, seed=seed, step=step, use_ema=use_ema,
                negative_prompt=pipeline.config.sample.negative_prompt if negative_prompt is None else negative_prompt,
                batch_size=batch_size, init_image=init_image, mask=mask, strength=strength,
                noise=noise_plan(len(prompts), num_images, seed, prompt_seeds), prompt_seeds=prompt_seeds)
  settings = dict(sampler=sampler, guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, eta=eta,
                  **options)
  combos = list(itertools.product(_as_list(guidance_scale), _as_list(num_steps)))
  if len(combos) == 1:
    settings.update(guidance_scale=combos[0][0], num_steps=combos[0][1])
    images, record = _sample_once(pipeline, image, mask_array, settings, common)
    _write(out, images, record, num_images)
    return record
  return _sweep(pipeline, image, mask_array, settings, common, combos, out)


def _sample_once(pipeline: LatentDiffusionPipeline, image: Any, mask_array: Any, settings: dict,
                 common: dict) -> tuple[np.ndarray, dict]:
  """The images of one setting and the settings.json record that reproduces them."""
  c, s = common, pipeline.config.sample
  expanded = [p for p in c['prompts'] for _ in range(c['num_images'])]
  images = _generate(pipeline, expanded, c['noise'], negative_prompt=c['negative_prompt'],
                     batch_size=c['batch_size'], init_images=image, masks=mask_array, strength=c['strength'],
                     **settings)
  plan = pipeline.plan(strength=1.0 if c['strength'] is None else c['strength'], **settings)
  interval, eta = settings['guidance_interval'], settings['eta']
  record = {
      'workdir': os.path.abspath(c['workdir']), 'step': c['step'], 'use_ema': c['use_ema'], 'prompts': c['prompts'],
      'num_images_per_prompt': c['num_images'], 'num_images': len(expanded), 'seed': c['seed'],
      'negative_prompt': c['negative_prompt'], 'sampler': plan.sampler, 'num_steps': plan.num_steps,
      'guidance_scale': plan.guidance_scale, 'guidance_rescale': plan.guidance_rescale,
      'guidance_interval': list(s.get('guidance_interval', (0.0, 1.0)) if interval is None else interval),
      'sampler_options': dict(plan.options), 'eta': float(s.eta if eta is None else eta),
      'batch_size': c['batch_size'], 'init_image': c['init_image'] and os.path.abspath(c['init_image']),
      'mask': c['mask'] and os.path.abspath(c['mask']), 'strength': c['strength'],
      'noise': 'image i (file index) starts from fold_in(PRNGKey(seed), i)',
  }
  if c['prompt_seeds'] is not None and any(v is not None for v in c['prompt_seeds']):
    record['prompt_seeds'] = list(c['prompt_seeds'])
    record['noise'] = ('image j of a prompt with a seed starts from fold_in(PRNGKey(prompt seed), j); other images '
                       'i (file index) from fold_in(PRNGKey(seed), i)')
  return images, record


def _write(out: str, images: np.ndarray, record: dict, num_images: int) -> None:
  os.makedirs(out, exist_ok=True)
  for i, image_i in enumerate(images):
    save_png(image_i, os.path.join(out, f'{i:04d}.png'))
  save_png(make_grid(images, ncols=num_images if num_images > 1 else None), os.path.join(out, 'grid.png'), upscale=2)
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(record, f, indent=2)


def setting_name(guidance_scale: float, num_steps: int) -> str:
  """The subfolder of one sweep combination, e.g. 'gs3_steps25', 'gs7.5_steps10'."""
  return f'gs{guidance_scale:g}_steps{num_steps}'


def _sweep(pipeline: LatentDiffusionPipeline, image: Any, mask_array: Any, settings: dict, common: dict,
           combos: Sequence[tuple], out: str) -> dict:
  """Every (guidance scale, steps) combination from the same noise: subfolders, a labelled grid, settings.json."""
  columns, entries, record = [], [], {}
  for number, (gs, steps) in enumerate(combos, 1):
    images, record = _sample_once(pipeline, image, mask_array, {**settings, 'guidance_scale': gs,
                                                                'num_steps': steps}, common)
    name = setting_name(record['guidance_scale'], record['num_steps'])
    if any(e['dir'] == name for e in entries):
      raise UserError(f'the sweep repeats the setting {name}: give distinct values')
    _write(os.path.join(out, name), images, record, common['num_images'])
    entries.append({'dir': name, 'guidance_scale': record['guidance_scale'], 'num_steps': record['num_steps']})
    columns.append(images)
    print(f'setting {number}/{len(combos)}: {name}', flush=True)
  c = common
  rows = [f'{p[:40]} (seed {s}, #{i})' for p, (s, i) in zip([p for p in c['prompts'] for _ in range(c['num_images'])],
                                                            c['noise'])]
  labels = [f'gs {e["guidance_scale"]:g}, {e["num_steps"]} steps' for e in entries]
  labelled_grid(np.stack(columns, 1), rows, labels).save(os.path.join(out, 'grid.png'))
  summary = {k: v for k, v in record.items() if k not in ('guidance_scale', 'num_steps')}
  summary.update(sweep=entries, num_images=len(entries) * record['num_images'],
                 grid='grid.png: a row per image (prompt-major), a column per setting')
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary
