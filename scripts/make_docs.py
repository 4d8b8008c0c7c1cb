r"""Generates the measured numbers in the docs from the records under docs/results/ (nothing is typed by hand).

  python scripts/make_docs.py            # rewrite the generated blocks of README.md and docs/ (DOCS below)
  python scripts/make_docs.py --check    # exit 1 if a committed doc differs from what the records give

A generated block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` (the README's demo block between
`<!-- demo-results:start -->` and `<!-- demo-results:end -->`) and is rendered from docs/results/NAME.json by
RENDERERS[NAME]; every block names its record, the command that wrote it, the commit and the machine's load. A
block whose record is missing says how to make it. The prose around the blocks is written by hand and carries no
numbers of its own.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = (
  'README.md',
  os.path.join('docs', 'BENCHMARKS.md'),
  os.path.join('docs', 'vae.md'),
  os.path.join('docs', 'lora.md'),
)
DEMO_START, DEMO_END = '<!-- demo-results:start -->', '<!-- demo-results:end -->'
BLOCK = re.compile(r'<!-- results:(?P<name>[\w-]+) -->\n.*?<!-- /results:(?P=name) -->', re.DOTALL)
DEMO_GRID = os.path.join('docs', 'images', 'demo_grid.png')
SIDE_ORDER = ('ours', 'flax', 'torch')


def _g(value: float, digits: int = 3) -> str:
  return f'{value:.{digits}g}'


def _n(count: int, noun: str) -> str:
  return f'{count} {noun}' + ('' if count == 1 else 's')


def read_record(root: str, name: str) -> dict | None:
  path = os.path.join(root, 'docs', 'results', f'{name}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def provenance(record: dict, link: str, href: str) -> str:
  """One paragraph saying where a block's numbers come from: the record (`link`, linked as `href`), its command,
  commit, devices, load and package versions."""
  git, machine, load, packages = record['git'], record['machine'], record['load_average'], record['packages']
  dirty = ' plus uncommitted changes' if git.get('dirty') else ''
  versions = ', '.join(f'{k} {packages[k]}' for k in ('jax', 'flax', 'torch', 'diffusers') if k in packages)
  start = 'n/a' if load.get('start') is None else load['start']
  devices = _n(machine['device_count'], machine['device_kind'] + ' device')
  return (
    f'Record [`{link}`]({href}) ({record["created_utc"][:10]}): `{record["command"]}` at commit '
    f'`{git["commit"][:10]}`{dirty}; JAX on {devices} ({machine["jax_backend"]} backend), {machine["cpu_count"]} '
    f'CPU cores, 1-minute load average {start} at the start and {load["end"]} at the end; {versions}.'
  )


def render_side_table(record: dict, unit: str, per: int) -> list[str]:
  """Table of a side-by-side benchmark (bench_train / bench_sample): median time, spread, images/s, ratio."""
  rows = sorted(record['results'], key=lambda r: SIDE_ORDER.index(r['side']))
  ours = next((r for r in rows if r['side'] == 'ours'), None)
  lines = [
    f'| implementation | ms/{unit} (median) | run min-max (s) | images/s | time / ours |',
    '|---|---|---|---|---|',
  ]
  for r in rows:
    ratio = f'{r["median_s"] / ours["median_s"]:.2f}' if ours and r is not ours else '-'
    lines.append(
      f'| {r["label"]} | {1e3 * r["median_s"] / per:.1f} | {_g(r["min_s"])}-{_g(r["max_s"])} | '
      f'{_g(r["images_per_s"])} | {ratio} |'
    )
  return lines


def render_bench_train(record: dict) -> list[str]:
  s = record['settings']
  head = (
    f'Training step (fwd+bwd+AdamW, float32), {s["preset"]} U-Net ({record["num_params"] / 1e6:.2f}M params), '
    f'batch {s["batch"]}, {s["latent"]}x{s["latent"]}x4 latents; median of {_n(s["repeats"], "round")} after '
    f'{_n(s["warmup"], "warm-up round")}, torch with {_n(s["threads"], "thread")}.'
  )
  flops = ', '.join(f'{r["label"]} {r["gflops_per_run"]:.1f}' for r in record['results'] if 'gflops_per_run' in r)
  diffs = ', '.join(f'{k} {v:.1e}' for k, v in record['max_abs_diff_vs_ours'].items())
  return (
    [head, '']
    + render_side_table(record, 'step', 1)
    + ['', f'XLA FLOPs per step (GFLOP): {flops}. Largest forward-output difference from ours: {diffs}.']
  )


def render_bench_sample(record: dict) -> list[str]:
  s = record['settings']
  head = (
    f'{s["steps"]}-step DDIM with classifier-free guidance (scale {_g(s["guidance_scale"])}), {s["preset"]} '
    f'U-Net, {s["batch"]} image(s) per run (U-Net batch {2 * s["batch"]}), {s["latent"]}x{s["latent"]}x4 '
    f'latents, float32; median of {_n(s["repeats"], "round")} after {_n(max(s["warmup"], 1), "warm-up round")}.'
  )
  diffs = ', '.join(f'{k} {v:.1e}' for k, v in record['max_abs_diff_vs_ours'].items())
  return (
    [head, '']
    + render_side_table(record, 'sampler step', s['steps'])
    + ['', f'Largest difference of the final latents from ours: {diffs}.']
  )


def render_bench_fid(record: dict) -> list[str]:
  r, s = record['results'], record['settings']
  return [
    f'Batch {s["batch_size"]}, {s["batches"]} timed batches (batches alternate between the two), '
    f'{s["image_size"]} px uint8 inputs; PyTorch on {record["torch_device"]} with {record["torch_threads"]} '
    'threads.',
    '',
    '| pytorch-fid | ours (JAX/Flax) | time ratio ours / pytorch-fid |',
    '|---|---|---|',
    f'| {r["pytorch_fid_images_per_s"]:.2f} images/s | {r["ours_images_per_s"]:.2f} images/s | '
    f'{r["time_ratio_ours_over_pytorch_fid"]:.2f} |',
  ]


def render_bench_latent_cache(record: dict) -> list[str]:
  s = record['settings']
  lines = [
    f'Global batch {s["batch_size"]}, {s["num_train"]} training images, {s["steps"]} timed steps per way in '
    f'chunks of {s["chunk"]}.',
    '',
    '| image size | latents | on the fly | from the cache | ratio cache / on the fly | precompute (both flips) |',
    '|---|---|---|---|---|---|',
  ]
  for r in record['results']:
    lines.append(
      f'| {r["image_size"]} px | {r["latent_side"]}x{r["latent_side"]}x4 | '
      f'{r["on_the_fly_steps_per_s"]:.2f} steps/s | {r["cache_steps_per_s"]:.2f} steps/s | '
      f'{r["ratio_cache_over_on_the_fly"]:.2f} | {r["precompute_s"]:.1f} s |'
    )
  return lines


def render_bench_text_cache(record: dict) -> list[str]:
  s = record['settings']
  lines = [
    f'Global batch {s["batch_size"]}, {s["num_train"]} training images, {s["steps"]} timed steps per way in '
    f'chunks of {s["chunk"]}; embeddings stored as {s["text_embedding_dtype"]}.',
    '',
    '| text encoder | latents | encoded on the fly | cached embeddings | ratio cache / on the fly | bytes / caption |',
    '|---|---|---|---|---|---|',
  ]
  for r in record['results']:
    lines.append(
      f'| {r["text_encoder"]} | {r["latent_side"]}x{r["latent_side"]}x4 | {r["on_the_fly_steps_per_s"]:.3f} steps/s | '
      f'{r["cache_steps_per_s"]:.3f} steps/s | {r["ratio_cache_over_on_the_fly"]:.2f} | '
      f'{r["embedding_bytes_per_caption"]:,} |'
    )
  return lines


def render_bench_data_sources(record: dict) -> list[str]:
  s = record['settings']
  lines = [
    f'One shuffled epoch of {s["num_images"]} JPEGs ({s["source_size"]} px wide, cropped to {s["image_size"]} px), '
    f'batches of {s["batch_size"]}; {s["num_shards"]} tar shards / parquet files read {s["cycle_length"]} at a time; '
    f'best of {s["repeats"]}.',
    '',
    '| source | images/s |',
    '|---|---|',
  ]
  lines += [f'| {r["source"]} | {r["images_per_s"]:.0f} |' for r in record['results']]
  return lines


def render_bench_gpu(record: dict) -> list[str]:
  s = record['settings']
  peak = record.get('peak_tflops')
  lines = [
    f'Device {", ".join(record.get("device_kinds", [])) or "?"}; {s["dtype"]} compute, dense peak {peak or "unknown"} '
    f'TFLOP/s; analytic U-Net forward {record["analytic_forward_tflop_per_image"]:.3g} TFLOP per image. '
    "MFU from the analytic model FLOPs and, for ours, from XLA's count of the compiled program; "
    '"ours / PyTorch" is the time ratio measured in the same run (below 1: ours is faster).',
    '',
    '| what | implementation | batch | time | images/s | MFU (analytic) | MFU (XLA count) | peak memory | '
    'ours / PyTorch |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  pct = lambda r, key: f'{100 * r[key]:.1f}%' if r.get(key) is not None else '-'
  for r in record['results']:
    memory = f'{r["peak_memory_gib"]:.1f} GiB' if r.get('peak_memory_gib') is not None else '-'
    ratio = f'{r["time_ours_over_torch"]:.2f}' if 'time_ours_over_torch' in r else '-'
    lines.append(
      f'| {r["what"]} ({r["resolution_px"]} px) | {r["impl"]} | {r["batch"]} | {1e3 * r["seconds"]:.1f} ms | '
      f'{_g(r["images_per_s"])} | {pct(r, "mfu_analytic")} | {pct(r, "mfu")} | {memory} | {ratio} |'
    )
  missing = record.get('not_measured') or {}
  if missing:
    lines += ['', 'Not measured: ' + '; '.join(f'{k} ({v})' for k, v in missing.items()) + '.']
  return lines


def _unet_memory_setting(r: dict) -> str:
  """The size / attention / remat / batch / dtype cells of a unet_memory row (records before the attention and size
  columns measured 64x64 latents with the einsum attention)."""
  latent, attention = r.get('latent', 64), r.get('attention', 'xla')
  return f'| {8 * latent} px ({latent}x{latent}) | {attention} | `{r["remat"]}` | {r["batch"]} | {r["dtype"]} |'


def render_unet_memory(record: dict) -> list[str]:
  head = '| image (latents) | attention | remat | batch | dtype |'
  if record['settings'].get('run'):
    lines = [f'{head} peak memory | step time | compile |', '|---|---|---|---|---|---|---|---|']
    for r in record['results']:
      lines.append(
        f'{_unet_memory_setting(r)} {r.get("peak_gib", float("nan")):.1f} GiB | '
        f'{1e3 * r["step_s"]:.0f} ms | {r["compile_s"]:.0f} s |'
      )
    return lines
  lines = [f'{head} compiled total | of which temporaries | compile |', '|---|---|---|---|---|---|---|---|']
  for r in record['results']:
    lines.append(
      f'{_unet_memory_setting(r)} {r["compiled_total_gib"]:.1f} GiB | {r["compiled_temp_gib"]:.2f} GiB | '
      f'{r["compile_s"]:.0f} s |'
    )
  return lines


def _bytes(count: float) -> str:
  """A byte count in GiB, MiB or KiB (the largest unit that leaves at least 1)."""
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if count >= size:
      value = count / size
      return f'{value:.3g} {unit}' if value < 1000 else f'{value:.0f} {unit}'
  return f'{count:.0f} B'


LORA_SIDES = (('lora', 'LoRA'), ('full', 'full fine-tuning'))


def _lora_tiny(r: dict, settings: dict) -> list[str]:
  m, lora, ratio = r['model'], r['lora'], r['ratio_lora_over_full']
  trained = 'U-Net and text encoder' if m['text_trainable'] else 'U-Net'
  inputs = (
    f'{m["image_size"]} px images (the frozen VAE encodes them in the step)'
    if m['inputs'] == 'images'
    else f'{m["latents"]} latent posteriors (as from a latent cache)'
  )
  lines = [
    f'Step time: the tiny stage-2 model (`{m["config"]}`, random weights: {m["unet_params"]:,} U-Net and '
    f'{m["text_params"]:,} text-encoder params, {m["latents"]} latents), batch {m["batch"]} of {inputs}, '
    f'{m["compute_dtype"]}. Full fine-tuning trains the {trained}; LoRA rank {lora["rank"]} (alpha {lora["alpha"]:g}) '
    f'trains the factors of {lora["modules"]} modules (`{", ".join(lora["targets"])}`). Median of '
    f'{_n(settings["repeats"], "step")} per side after {_n(settings["warmup"], "warm-up step")}, the sides taking '
    'turns.',
    '',
    '| side | trained params | optimizer state | EMA | ms/step (median) | step min-max (s) | images/s | '
    'XLA GFLOP/step | compiled temporaries |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for side, label in LORA_SIDES:
    s = r['sides'][side]
    temporaries = _bytes(s['compiled_memory']['temporaries_bytes']) if s.get('compiled_memory') else '-'
    gflops = f'{s["gflops_per_step"]:.3g}' if s.get('gflops_per_step') else '-'
    lines.append(
      f'| {label} | {s["trained_params"]:,} | {_bytes(s["opt_state_bytes"])} | {_bytes(s["ema_bytes"])} | '
      f'{1e3 * s["median_s"]:.1f} | {_g(s["min_s"])}-{_g(s["max_s"])} | {_g(s["images_per_s"])} | {gflops} | '
      f'{temporaries} |'
    )
  cell = lambda key: f'{ratio[key]:.3g}' if key in ratio else '-'
  lines.append(
    f'| LoRA / full | {cell("trained_params")} | {cell("opt_state_bytes")} | {cell("ema_bytes")} | '
    f'**{ratio["median_s"]:.2f}** | | | {cell("gflops_per_step")} | {cell("temporaries_bytes")} |'
  )
  return lines


def _lora_sd15(r: dict) -> list[str]:
  m, lora, ratio = r['model'], r['lora'], r['ratio_lora_over_full']
  lines = [
    f'Compiled memory: the U-Net of {m["unet"]}, {m["unet_params"] / 1e6:.1f}M params in {m["param_dtype"]}, '
    f'{m["latents"]} latents, batch {m["batch"]}, {m["compute_dtype"]} compute, {m["attention"]} attention; context: '
    f'{m["context"]}. Optimizer: {m["optimizer"]}. LoRA rank {lora["rank"]} on '
    f"{lora['modules']} modules. XLA's compiled memory analysis (nothing allocated); total = arguments + outputs + "
    'temporaries - the state donated to the outputs.',
    '',
    '| side | trained params | optimizer state | arguments | outputs | temporaries | total |',
    '|---|---|---|---|---|---|---|',
  ]
  for side, label in LORA_SIDES:
    s = r['sides'][side]
    mem = s.get('compiled_memory') or {}
    keys = ('arguments_bytes', 'outputs_bytes', 'temporaries_bytes', 'total_bytes')
    cells = ' | '.join(_bytes(mem[k]) if k in mem else '-' for k in keys)
    lines.append(f'| {label} | {s["trained_params"]:,} | {_bytes(s["opt_state_bytes"])} | {cells} |')
  cell = lambda key: f'{ratio[key]:.3g}' if key in ratio else '-'
  lines.append(
    f'| LoRA / full | {cell("trained_params")} | {cell("opt_state_bytes")} | {cell("arguments_bytes")} | '
    f'{cell("outputs_bytes")} | {cell("temporaries_bytes")} | **{cell("total_bytes")}** |'
  )
  return lines


def render_bench_lora(record: dict) -> list[str]:
  """LoRA vs full fine-tuning (scripts/bench_lora.py): the tiny model's step time, SD 1.5's compiled memory."""
  r = record['results']
  lines = []
  if 'tiny' in r:
    lines += _lora_tiny(r['tiny'], record['settings'])
  if 'sd15' in r:
    lines += ([''] if lines else []) + _lora_sd15(r['sd15'])
  return lines


def render_demo(record: dict) -> list[str]:
  acc, r = record['results']['caption_accuracy'], record['results']
  lines = [
    f'Measured by `make demo` ({r["wall_time_s"] / 60:.1f} min wall time, install included):',
    '',
    '| metric | value |',
    '|---|---|',
    f'| caption accuracy, guided (scale {acc["guidance_scale"]:g}) | {acc["guided"]:.3f} |',
    f'| caption accuracy, unguided (scale 1) | {acc["unguided"]:.3f} |',
    f'| caption accuracy, unconditional (empty prompt) | {acc["unconditional"]:.3f} |',
    f'| generated images vs shuffled prompts | {acc["generated_vs_shuffled_prompts"]:.3f} |',
    f'| oracle on held-out real / blurred images | {acc["oracle_real"]:.3f} / {acc["oracle_blurred"]:.3f} |',
    f'| oracle on real images vs shuffled captions | {acc["oracle_shuffled"]:.3f} |',
  ]
  if r.get('vae_psnr') is not None:
    lines.append(f'| VAE held-out PSNR | {r["vae_psnr"]:.2f} dB |')
  if r.get('ldm_val_loss') is not None:
    lines.append(f'| LDM held-out loss | {r["ldm_val_loss"]:.4f} |')
  lines += [
    '',
    f'({acc["num_prompts"]} prompts x {acc["num_seeds"]} seeds, {acc["sampler"]} with {acc["num_steps"]} steps.)',
  ]
  if r.get('phase_seconds'):
    phases = ', '.join(f'{name} {seconds / 60:.1f}' for name, seconds in r['phase_seconds'].items())
    lines += ['', f'Minutes per phase: {phases}.']
  if r.get('grid_sha256'):
    lines += [
      '',
      f'![samples]({DEMO_GRID.replace(os.sep, "/")})',
      '',
      'One row per prompt: ' + ', '.join(r.get('grid_prompts', [])) + '.',
    ]
  return lines


def _profile_steps(record: dict) -> list[str]:
  labels = {'step': 'whole training step', 'fwd': 'forward only', 'fwd+bwd': 'forward + backward', 'adamw': 'AdamW'}
  lines = ['| part | ours (JAX) ms | diffusers PyTorch ms | JAX / PyTorch |', '|---|---|---|---|']
  for r in record['results'].get('steps', []):
    lines.append(f'| {labels[r["part"]]} | {r["jax_ms"]:.1f} | {r["torch_ms"]:.1f} | {r["ratio"]:.2f} |')
  return lines


def _profile_ops(record: dict) -> list[str]:
  lines = [
    '| op (per step) | calls | JAX fwd ms | PyTorch fwd ms | fwd JAX / PyTorch | JAX fwd+bwd ms | PyTorch fwd+bwd ms '
    '| fwd+bwd JAX / PyTorch |',
    '|---|---|---|---|---|---|---|---|',
  ]
  total = {k: 0.0 for k in ('jax:fwd', 'torch:fwd', 'jax:fwd+bwd', 'torch:fwd+bwd')}
  for e in record['results']['ops']:
    ms = e['ms']
    lines.append(
      f'| {e["label"]} | {e["calls"]} | {ms["jax:fwd"]:.1f} | {ms["torch:fwd"]:.1f} | {e["ratio_fwd"]:.2f} | '
      f'{ms["jax:fwd+bwd"]:.1f} | {ms["torch:fwd+bwd"]:.1f} | {e["ratio_fwd+bwd"]:.2f} |'
    )
    total = {k: v + ms[k] for k, v in total.items()}
  lines.append(
    f'| sum of the ops | | {total["jax:fwd"]:.1f} | {total["torch:fwd"]:.1f} | '
    f'{total["jax:fwd"] / total["torch:fwd"]:.2f} | {total["jax:fwd+bwd"]:.1f} | {total["torch:fwd+bwd"]:.1f} | '
    f'{total["jax:fwd+bwd"] / total["torch:fwd+bwd"]:.2f} |'
  )
  conv = next((e['ms'] for e in record['results']['ops'] if e['op'] == 'conv3x3'), None)
  if conv:
    passes = ', '.join(
      f'{p.replace("_", " ")} {conv.get(f"jax:{p}", 0):.1f} / {conv.get(f"jax_nchw:{p}", 0):.1f} / '
      f'{conv.get(f"torch:{p}", 0):.1f}'
      for p in ('fwd', 'input_grad', 'weight_grad')
    )
    lines += ['', f'3x3 convs per step, ms (JAX NHWC / JAX NCHW / PyTorch NCHW): {passes}.']
  return lines


def _profile_knobs(record: dict) -> list[str]:
  knobs = record['results'].get('knobs')
  if not knobs:
    return []
  lines = ['| setting | environment | ms/step | / default |', '|---|---|---|---|']
  for k in knobs:
    torch = {'torch': f'PyTorch, {_n(record["settings"]["threads"], "thread")}', 'torch_1_thread': 'PyTorch, 1 thread'}
    env = ' '.join(f'`{n}={v}`' for n, v in k['env'].items()) or torch.get(k['knob'], '-')
    lines.append(f'| {k["knob"]} | {env} | {k["step_ms"]:.1f} | {k["vs_default"]:.2f} |')
  retired = '; '.join(f'`{f}` {why}' for f, why in record['results'].get('retired_flags', {}).items())
  return lines + (['', f'Not run: {retired}.'] if retired else [])


def render_profile_cpu_step(record: dict) -> list[str]:
  s, r = record['settings'], record['results']
  head = (
    f'{s["preset"]} U-Net ({record["num_params"] / 1e6:.2f}M params), batch {s["batch"]}, '
    f'{s["latent"]}x{s["latent"]}x4 latents, float32, PyTorch with {_n(s["threads"], "thread")}; medians of '
    f'{_n(s["repeats"], "round")} (steps, settings) and {_n(s["op_repeats"], "round")} (ops), the sides taking turns.'
  )
  lines = [head, ''] + _profile_steps(record)
  if 'ops' in r:
    lines += ['', 'Each op alone at every shape the forward pass uses, times its calls per step:', '']
    lines += _profile_ops(record)
    lines += ['', f'A separately jitted op also pays JAX dispatch, {r["jax_dispatch_ms"]:.3f} ms per call.']
  if r.get('knobs'):
    lines += ['', 'The JAX step under XLA settings (one process each; the rows took turns):', ''] + _profile_knobs(
      record
    )
  return lines


VAE_VARIANTS = {'l1_kl': 'L1 + KL', 'l1_kl_lpips': '+ LPIPS', 'l1_kl_lpips_gan': '+ LPIPS + PatchGAN'}


def render_vae_loss_ablation(record: dict) -> list[str]:
  """Table of the VAE loss ablation (scripts/ablate_vae_losses.py): held-out PSNR, SSIM, LPIPS, rFID per variant."""
  r = record['results']
  rows, weights = r['rows'], r['weights']
  # The metric keys say whether random weights were used: lpips_random_weights, rfid_random_inception.
  random_lpips, random_inception = 'lpips_random_weights' in rows[0], 'rfid_random_inception' in rows[0]
  lpips_key = 'lpips_random_weights' if random_lpips else 'lpips'
  rfid_key = 'rfid_random_inception' if random_inception else 'rfid'
  lpips_head = f'LPIPS-{r["lpips_net"]}' + (' (random weights)' if random_lpips else '')
  rfid_head = 'rFID' + (' (random Inception)' if random_inception else '')
  lines = [
    f'The tiny VAE on the shapes data, each variant trained from the same seed for the same steps; metrics of '
    f"{r['num_eval']} held-out images and their reconstructions (posterior mean, the last step's EMA params)."
    + (
      f' The PatchGAN: {r["disc"]["num_layers"]} layers, {r["disc"]["channels"]} base channels, from step '
      f'{r["disc"]["disc_start"]}.'
      if 'disc' in r
      else ''
    ),
    '',
    f'| variant | PSNR (dB) | SSIM | {lpips_head} | {rfid_head} | steps |',
    '|---|---|---|---|---|---|',
  ]
  for row in rows:
    label = VAE_VARIANTS.get(row['variant'], row['variant'])
    lines.append(
      f'| {label} (`{row["variant"]}`) | {row["psnr"]:.2f} | {row["ssim"]:.3f} | {row[lpips_key]:.3g} | '
      f'{row[rfid_key]:.3g} | {row["steps"]} |'
    )
  lpips_note = ' (RANDOM: not the trained LPIPS network)' if random_lpips else ''
  inception_note = ' (RANDOM: not the trained pytorch-fid network)' if random_inception else ''
  caveat = (
    ' With random weights LPIPS and rFID rank the variants on this data only; they are not comparable with published'
    ' LPIPS or rFID values.'
    if random_lpips or random_inception
    else ''
  )
  lines += [
    '',
    f'Weights: LPIPS (the metric, and the loss of the LPIPS variants) {weights["lpips"]}{lpips_note}; Inception '
    f'of rFID {weights["inception"]}{inception_note}.{caveat}',
  ]
  return lines


def render_demo_lora(record: dict) -> list[str]:
  """make demo-lora's numbers: paired oracle accuracies with and without the LoRA, the size ratio, times, the grid."""
  r = record['results']
  a = r['lora_accuracy']
  seeds, concept = a['num_seeds'], a['concept']
  phase = r.get('phase_seconds', {})
  phases = ', '.join(f'{name} {seconds / 60:.1f}' for name, seconds in phase.items())
  base = ', the base demo included' if phase.get('base', 0) > 60 else ''
  lines = [
    f'Measured by `make demo-lora` ({r["wall_time_s"] / 60:.1f} min wall time{base}):',
    '',
    '| oracle accuracy | with the LoRA | the base alone |',
    '|---|---|---|',
    f'| new: "a &lt;colour&gt; {concept}" ({a["num_new_prompts"]} prompts x {seeds} seeds) | {a["new"]:.3f} | '
    f'{a["base_new"]:.3f} |',
    f"| old: the base's prompts ({a['num_old_prompts']} prompts x {seeds} seeds) | {a['old']:.3f} | "
    f'{a["base_old"]:.3f} |',
    '',
    f"LoRA file (`export-lora`) {_bytes(a['lora_bytes'])} over the base's U-Net + text encoder "
    f'{_bytes(a["base_bytes"])}: size_ratio {a["size_ratio"]:.4f}. Sampling: {a["sampler"]}, {a["num_steps"]} steps, '
    f'guidance scale {a["guidance_scale"]:g}; the same noise with and without the LoRA. Minutes per phase: {phases}.',
  ]
  if r.get('grid_sha256'):
    lines += [
      '',
      '![base vs LoRA](images/demo_lora_grid.png)',
      '',
      f'Columns: the six colours; rows: the base and the LoRA on "a C {concept}", then on "a C circle" (first seed).',
    ]
  return lines


# name -> (renderer, how to write its record).
RENDERERS: dict[str, tuple[Callable[[dict], list[str]], str]] = {
  'demo': (render_demo, '`make demo`'),
  'demo_lora': (render_demo_lora, '`make demo-lora`'),
  'bench_train': (render_bench_train, '`python scripts/bench_train.py --repeats 3 --warmup 1`'),
  'bench_sample': (render_bench_sample, '`python scripts/bench_sample.py --batch 1 --repeats 3 --warmup 1`'),
  'bench_fid': (render_bench_fid, '`python scripts/bench_fid.py --batch_size 25 --batches 3`'),
  'bench_latent_cache': (
    render_bench_latent_cache,
    '`python scripts/bench_latent_cache.py --image_sizes 32,64 --steps 10 --chunk 5`',
  ),
  'bench_text_cache': (render_bench_text_cache, '`python scripts/bench_text_cache.py --steps 6 --chunk 2`'),
  'bench_data_sources': (render_bench_data_sources, '`python scripts/bench_data_sources.py --repeats 3`'),
  'bench_gpu': (render_bench_gpu, '`python scripts/bench_gpu.py` on a GPU or TPU'),
  'bench_lora': (render_bench_lora, '`nice -n 19 python scripts/bench_lora.py --repeats 7 --warmup 2`'),
  'unet_memory_measured_gpu': (
    render_unet_memory,
    '`XLA_PYTHON_CLIENT_PREALLOCATE=false python scripts/unet_memory.py --batch 8 --run` on a GPU',
  ),
  'profile_cpu_step': (
    render_profile_cpu_step,
    '`nice -n 19 python scripts/profile_cpu_step.py --warmup 1 --repeats 3 --op-repeats 5 --knobs '
    'no_xnnpack,onednn,xnn_graph_fusion,fast_math,one_core`',
  ),
  'unet_memory_compiled_cpu': (
    render_unet_memory,
    '`python scripts/unet_memory.py --batch 1 --sizes 32,64`',
  ),
  'vae_loss_ablation': (
    render_vae_loss_ablation,
    '`python scripts/ablate_vae_losses.py --steps 1000 --num_eval 256 --lpips_net alex`',
  ),
}


def render_block(root: str, name: str, readme: bool = False) -> str:
  """The text between a block's markers (without them)."""
  if name not in RENDERERS:
    raise SystemExit(f'error: no renderer for results block {name!r}; known: {", ".join(sorted(RENDERERS))}')
  renderer, command = RENDERERS[name]
  record = read_record(root, name)
  if record is None:
    then = ' and fills in this block' if name == 'demo' else ', then `python scripts/make_docs.py` fills in this block'
    return f'No record yet: {command} writes `docs/results/{name}.json`{then}.'
  link = f'docs/results/{name}.json'
  return '\n'.join(renderer(record) + ['', provenance(record, link, link if readme else link[len('docs/') :])])


def generate(root: str, relpath: str) -> str:
  """The doc at `relpath` with every generated block rendered afresh from the records."""
  with open(os.path.join(root, relpath)) as f:
    text = f.read()
  readme = relpath == 'README.md'
  text = BLOCK.sub(
    lambda m: f'<!-- results:{m["name"]} -->\n{render_block(root, m["name"], readme)}\n<!-- /results:{m["name"]} -->',
    text,
  )
  if DEMO_START in text:
    head, rest = text.split(DEMO_START, 1)
    text = f'{head}{DEMO_START}\n{render_block(root, "demo", readme=True)}\n{DEMO_END}{rest.split(DEMO_END, 1)[1]}'
  return text


# Images a record vouches for (by its results' grid_sha256): record name -> the image's path.
GRIDS = {'demo': DEMO_GRID, 'demo_lora': os.path.join('docs', 'images', 'demo_lora_grid.png')}


def stale_artifacts(root: str) -> list[str]:
  """Files the records vouch for that differ from them (the demos' grid images)."""
  stale = []
  for name, relpath in GRIDS.items():
    record = read_record(root, name)
    if record is None or not record['results'].get('grid_sha256'):
      continue
    grid = os.path.join(root, relpath)
    if not os.path.exists(grid):
      stale.append(f'{relpath} is missing (docs/results/{name}.json names it)')
      continue
    with open(grid, 'rb') as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    if digest != record['results']['grid_sha256']:
      stale.append(f'{relpath} is not the image {name}.json records')
  return stale


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='only compare; exit 1 if a doc is out of date')
  parser.add_argument('--root', default=ROOT, help='repository root (docs/results, README.md, docs/)')
  args = parser.parse_args(argv)
  stale = stale_artifacts(args.root)
  for relpath in DOCS:
    path = os.path.join(args.root, relpath)
    with open(path) as f:
      current = f.read()
    text = generate(args.root, relpath)
    if text == current:
      continue
    if args.check:
      stale.append(f'{relpath} differs from what the records give (run python scripts/make_docs.py)')
    else:
      with open(path, 'w') as f:
        f.write(text)
      print(f'updated {relpath}')
  for line in stale:
    print(f'error: {line}', file=sys.stderr)
  return 1 if stale else 0


if __name__ == '__main__':
  sys.exit(main())
