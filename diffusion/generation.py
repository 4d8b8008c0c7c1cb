"""Sampling a trained workdir into a directory of PNGs, a grid and the settings that reproduce them.

Sweeps: several guidance scales and/or step counts are sampled from the same per-image noise, one subfolder per
combination (`gs3_steps25/0000.png ...`, each with its own settings.json), plus a labelled grid (a row per image, a
column per combination) and a settings.json listing every combination. Per-prompt seeds come from a prompts file
whose lines are `prompt<TAB>seed` (see `read_prompts_file`).
"""

import itertools
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from diffusion import interop, samplers
from diffusion import lora as lora_lib
from diffusion import outpaint as outpaint_lib
from diffusion import watermark as watermark_lib
from diffusion import workdir as workdir_lib
from diffusion.errors import UserError
from diffusion.images import labelled_grid, load_image, load_mask, make_grid, read_image, save_png
from diffusion.pipeline import LatentDiffusionPipeline
from diffusion.workdir import load_workdir_config

# frozen/<LORA_RECORD> of a workdir imported with LoRAs: the LoRAs merged into its params (stacked, scales folded in).
LORA_RECORD = 'lora'


def noise_plan(
  num_prompts: int, num_images: int, seed: int, prompt_seeds: Sequence[int | None] | None = None
) -> list[tuple[int, int]]:
  """(root seed, fold-in index) of each output image (prompt-major). Without a per-prompt seed, image i (file index)
  starts from fold_in(PRNGKey(seed), i); with one, image j of that prompt from fold_in(PRNGKey(prompt_seed), j)."""
  prompt_seeds = list(prompt_seeds) if prompt_seeds is not None else [None] * num_prompts
  if len(prompt_seeds) != num_prompts:
    raise UserError(f'{len(prompt_seeds)} prompt seeds for {num_prompts} prompts')
  return [
    (seed, p * num_images + j) if prompt_seeds[p] is None else (int(prompt_seeds[p]), j)
    for p in range(num_prompts)
    for j in range(num_images)
  ]


def _generate(
  pipeline: LatentDiffusionPipeline,
  prompts: Sequence[str],
  noise: Sequence[tuple[int, int]],
  init_images: Any = None,
  **kwargs: Any,
) -> np.ndarray:
  """`pipeline.generate` with each image's (root seed, index): one call per distinct root seed. `init_images`: one
  image for all (H, W, 3) or one per prompt (N, H, W, 3)."""
  out: list[Any] = [None] * len(prompts)
  per_image = init_images is not None and np.ndim(init_images) == 4
  for root in dict.fromkeys(s for s, _ in noise):
    rows = [i for i, (s, _) in enumerate(noise) if s == root]
    kwargs['init_images'] = np.asarray(init_images)[rows] if per_image else init_images
    images = pipeline.generate([prompts[i] for i in rows], seed=root, indices=[noise[i][1] for i in rows], **kwargs)
    for i, image in zip(rows, images):
      out[i] = image
  return np.stack(out)


def outpaint_window_keys(number: int) -> tuple[int, ...]:
  """The `key_path` of outpainting window `number`: window 0 samples from the image's own key (a canvas of the
  model's size is sampled from exactly the image's noise), window k > 0 from fold_in(fold_in(key, 2), k)."""
  return () if number == 0 else (2, number)


def outpaint_images(
  pipeline: LatentDiffusionPipeline,
  prompts: Sequence[str],
  noise: Sequence[tuple[int, int]],
  image: np.ndarray,
  amounts: Sequence[int],
  blur: int = outpaint_lib.DEFAULT_BLUR,
  **kwargs: Any,
) -> np.ndarray:
  """uint8 outpaintings (N, H', W', 3) of the uint8 `image` by `amounts` (left, top, right, bottom), one per prompt,
  image n's noise from `noise[n]` (see `noise_plan`), in windows at the model's size (see `diffusion.outpaint`).
  `kwargs`: those of `pipeline.generate` (settings, batch_size, strength)."""
  window = lambda crops, mask, number: _generate(
    pipeline, prompts, noise, init_images=crops, masks=mask, key_path=outpaint_window_keys(number), **kwargs
  )
  return outpaint_lib.outpaint(window, image, amounts, pipeline.config.data.image_size, len(prompts), blur=blur)


def workdir_lora(workdir: str, use_ema: bool = True, step: int | None = None) -> Any:
  """The LoRA a workdir holds ({'unet': ..., 'text': ...}): the (EMA) LoRA of a LoRA-trained workdir's checkpoint
  (`step`, default the latest) with its alpha, else the record of the LoRAs merged at import."""
  config = load_workdir_config(workdir, expect='ldm')
  if lora_lib.trains_lora(config):
    trained, _ = workdir_lib.load_trained_params(workdir, 'ema_params' if use_ema else 'params', step)
    return lora_lib.with_alpha(trained, config.lora.alpha)
  if workdir_lib.has_frozen(workdir, LORA_RECORD):
    return workdir_lib.load_frozen(workdir, LORA_RECORD)
  raise UserError(
    f'workdir {workdir!r} holds no LoRA (train one with lora.rank > 0, or scripts/convert.py import ... --lora FILE)'
  )


def load_adapter(path: str) -> Any:
  """A LoRA from a file (diffusers / kohya), a directory with pytorch_lora_weights.safetensors, or a workdir."""
  if os.path.isdir(path) and workdir_lib.has_config(path):
    return workdir_lora(path)
  return interop.load_lora(path)


def merge_adapters(params: Any, loras: Sequence[tuple[str, float]]) -> Any:
  """`params` with each (LoRA path, scale) of `loras` merged in, once (not per sampling step); errors name the path."""
  trees = [load_adapter(path) for path, _ in loras]  # Every file read and checked before any merge.
  for (path, scale), tree in zip(loras, trees):
    try:
      params = lora_lib.merge(params, [tree], [scale])
    except UserError as e:
      raise UserError(f'--lora {path}: {e}') from None
  return params


def _as_list(value: Any) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def sample_to_directory(
  workdir: str,
  prompts: Sequence[str],
  out: str,
  *,
  num_images: int = 1,
  seed: int = 0,
  num_steps: int | Sequence[int] | None = None,
  guidance_scale: float | Sequence[float] | None = None,
  batch_size: int = 64,
  step: int | None = None,
  use_ema: bool = True,
  init_image: str | None = None,
  mask: str | None = None,
  strength: float | None = None,
  prompt_seeds: Sequence[int | None] | None = None,
  loras: Sequence[tuple[str, float]] = (),
  watermark: str | None = None,
  watermark_method: str = watermark_lib.DEFAULT_METHOD,
  outpaint: Sequence[int] | None = None,
  outpaint_blur: int = outpaint_lib.DEFAULT_BLUR,
  **overrides: Any,
) -> dict:
  """Writes OUT/0000.png ... (prompt-major), OUT/grid.png (a row per prompt) and OUT/settings.json.

  `overrides` are those of `SamplingSettings.from_config` (sampler, negative_prompt, guidance_rescale,
  guidance_interval and sampler options such as eta, karras, timestep_spacing, s_churn); None keeps the config's.
  `guidance_scale` / `num_steps` given as lists sweep every combination (see the module docstring); the returned
  record then lists them under 'sweep'. `batch_size`: images per sampling call (all local devices together).
  `prompt_seeds` (one per prompt, None = `seed`): see `noise_plan`. `loras`: (path, scale) pairs of LoRA files or
  workdirs merged into the workdir's weights for this call (see `merge_adapters`). `watermark`: a text every written
  image (samples and grids) carries as an invisible watermark by `watermark_method` (see `diffusion.watermark`);
  None writes them unmarked. Images smaller than the scheme's minimum are written unmarked, with one warning, and
  settings.json records it (`watermark.too_small`). `outpaint`: (left, top, right, bottom) pixels to add to
  `init_image` (kept at its own size), the new region generated with the seam band `outpaint_blur` (see
  `diffusion.outpaint`); the images then have the grown size.
  """
  outpaint_lib.check(outpaint, outpaint_blur, init_image is not None, mask is not None)
  edits = (init_image is not None, mask is not None or outpaint is not None)
  strength = None if init_image is None else samplers.editing_strength(strength, *edits)  # Checks them.
  noise = noise_plan(len(prompts), num_images, seed, prompt_seeds)
  combos = list(itertools.product(_as_list(guidance_scale), _as_list(num_steps)))
  size = load_workdir_config(workdir, expect='ldm').data.image_size
  image = None if init_image is None or outpaint is not None else load_image(init_image, size)
  if outpaint is not None:
    image, outpaint_record = _outpaint_input(init_image, outpaint, outpaint_blur, size)
  out_size = size if outpaint is None else tuple(outpaint_record['outpaint_size'][::-1])
  mark, watermark_record = _watermarker(watermark, watermark_method, out_size)
  mask_array = None if mask is None else load_mask(mask, init_image, size)
  pipeline = LatentDiffusionPipeline.from_workdir(workdir, use_ema=use_ema, step=step)
  if loras:
    pipeline.params = merge_adapters(pipeline.params, loras)
  settings = [pipeline.sampling_settings(guidance_scale=gs, num_steps=n, **overrides) for gs, n in combos]
  common = dict(
    workdir=os.path.abspath(workdir),
    prompts=list(prompts),
    num_images_per_prompt=num_images,
    num_images=len(prompts) * num_images,
    seed=seed,
    step=pipeline.step,
    use_ema=use_ema,
    batch_size=batch_size,
    init_image=init_image and os.path.abspath(init_image),
    mask=mask and os.path.abspath(mask),
    strength=strength,
    outpaint=outpaint and [int(v) for v in outpaint],
    noise='image i (file index) starts from fold_in(PRNGKey(seed), i)',
    watermark=watermark_record,
  )
  if outpaint is not None:
    common.update(outpaint_record)
  if loras:
    common['loras'] = [{'path': os.path.abspath(path), 'scale': float(scale)} for path, scale in loras]
  if prompt_seeds is not None and any(v is not None for v in prompt_seeds):
    common.update(
      prompt_seeds=list(prompt_seeds),
      noise=(
        'image j of a prompt with a seed starts from fold_in(PRNGKey(prompt seed), j); other images i (file index) '
        'from fold_in(PRNGKey(seed), i)'
      ),
    )
  expanded = [p for p in prompts for _ in range(num_images)]
  run = lambda s: _generate(
    pipeline, expanded, noise, settings=s, batch_size=batch_size, init_images=image, masks=mask_array, strength=strength
  )
  if outpaint is not None:
    run = lambda s: outpaint_images(
      pipeline, expanded, noise, image, outpaint, outpaint_blur, settings=s, batch_size=batch_size, strength=strength
    )
  if len(settings) == 1:
    record = {**common, **_settings_record(settings[0])}
    _write(out, run(settings[0]), record, num_images, mark)
    return record
  return _sweep(run, settings, common, noise, out, mark)


def _outpaint_input(path: str, amounts: Sequence[int], blur: int, size: int) -> tuple[np.ndarray, dict]:
  """(the image to outpaint, uint8 at its own size; the settings.json fields of the outpainting)."""
  image = read_image(path)
  height, width = outpaint_lib.canvas_size(*image.shape[:2], amounts)
  windows = [[x, y] for y, x in outpaint_lib.plan(image.shape, amounts, size)]
  record = dict(outpaint_blur=blur, outpaint_size=[width, height], outpaint_windows=windows)
  record['outpaint_noise'] = 'window 0 (of outpaint_windows, [left, top]) from the image key, window k from ' + (
    'fold_in(fold_in(key, 2), k)'
  )
  return image, record


def _settings_record(settings: samplers.SamplingSettings) -> dict:
  """The settings.json fields of one setting: those of `SamplingSettings.to_dict` at the top level."""
  record = settings.to_dict()
  options = record.pop('options')
  return {**record, 'sampler_options': options, 'eta': options.get('eta')}


Marker = Callable[[np.ndarray], np.ndarray] | None


def _watermarker(text: str | None, method: str, size: int | tuple[int, int]) -> tuple[Marker, dict | None]:
  """(the function that marks a uint8 image, or None; the settings.json record). Checks the text and method first
  (a text longer than a `size` (side, or (height, width)) image carries is a `UserError`) and warns once when such
  images are too small."""
  if text is None:
    return None, None
  height, width = (size, size) if isinstance(size, int) else size
  too_small = not watermark_lib.markable(height, width)
  # Small samples leave only grids to mark: then the text must fit the smallest image that gets a mark.
  side = (watermark_lib.MIN_SIDE,) * 2 if too_small else (height, width)
  watermark_lib.check(text, method, *side)
  if too_small:
    print(
      f'warning: {width}x{height} images are too small for a watermark (height x width must be >= '
      f'{watermark_lib.MIN_PIXELS}): the samples are written unmarked (settings.json: watermark.too_small)',
      file=sys.stderr,
      flush=True,
    )
  mark = lambda image: watermark_lib.encode(image, text, method)  # Unchanged where too small (a small grid).
  return mark, {'text': text, 'method': method, 'too_small': too_small}


def _write(out: str, images: np.ndarray, record: dict, num_images: int, mark: Marker = None) -> None:
  os.makedirs(out, exist_ok=True)
  if mark is not None:
    images = mark(images)
  for i, image_i in enumerate(images):
    save_png(image_i, os.path.join(out, f'{i:04d}.png'))
  grid = make_grid(images, ncols=num_images if num_images > 1 else None)
  if mark is None:
    save_png(grid, os.path.join(out, 'grid.png'), upscale=2)
  else:  # Marked at the size it is written (enlarged 2x, nearest neighbour, as save_png's upscale).
    save_png(mark(grid.repeat(2, 0).repeat(2, 1)), os.path.join(out, 'grid.png'))
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(record, f, indent=2)


def setting_name(guidance_scale: float, num_steps: int) -> str:
  """The subfolder of one sweep combination, e.g. 'gs3_steps25', 'gs7.5_steps10'."""
  return f'gs{guidance_scale:g}_steps{num_steps}'


def _sweep(
  run: Any,
  settings: Sequence[samplers.SamplingSettings],
  common: dict,
  noise: Sequence[tuple[int, int]],
  out: str,
  mark: Marker = None,
) -> dict:
  """Every (guidance scale, steps) combination from the same noise: subfolders, a labelled grid, settings.json."""
  columns, entries, record = [], [], {}
  num_images = common['num_images_per_prompt']
  for number, setting in enumerate(settings, 1):
    name = setting_name(setting.guidance_scale, setting.num_steps)
    if any(e['dir'] == name for e in entries):
      raise UserError(f'the sweep repeats the setting {name}: give distinct values')
    images, record = run(setting), {**common, **_settings_record(setting)}
    _write(os.path.join(out, name), images, record, num_images, mark)
    entries.append({'dir': name, 'guidance_scale': setting.guidance_scale, 'num_steps': setting.num_steps})
    columns.append(images)
    print(f'setting {number}/{len(settings)}: {name}', flush=True)
  rows = [
    f'{p[:40]} (seed {s}, #{i})' for p, (s, i) in zip([p for p in common['prompts'] for _ in range(num_images)], noise)
  ]
  labels = [f'gs {e["guidance_scale"]:g}, {e["num_steps"]} steps' for e in entries]
  grid = np.asarray(labelled_grid(np.stack(columns, 1), rows, labels))
  save_png(grid if mark is None else mark(grid), os.path.join(out, 'grid.png'))
  summary = {k: v for k, v in record.items() if k not in ('guidance_scale', 'num_steps')}
  summary.update(
    sweep=entries,
    num_images=len(entries) * common['num_images'],
    grid='grid.png: a row per image (prompt-major), a column per setting',
  )
  with open(os.path.join(out, 'settings.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary
