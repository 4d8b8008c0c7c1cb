r"""What a DreamBooth / LoRA run on the shapes demo's model learned and what it kept, read by the shapes oracle.

  python -m eval.lora_accuracy --workdir workdirs/demo/lora [--export workdirs/demo/lora_export]

The run taught its base a concept shape (`diffusion.data.shapes.CONCEPT_SHAPES`, e.g. 'cross': a new word). Every
prompt 'a <colour> <concept>' (new) and every base prompt 'a <colour> <shape>' (old) is drawn with `--num_seeds` seeds
by the fine-tuned model and by its base (the same prompts, noise and sampling settings: paired), and an image is right
when the oracle, which tells the concept shapes apart from the base's, finds the prompt's colour and shape. The base
reads the new word through the run's tokenizer (the base's ids plus the new word's spare slot, a row of the base's
embedding table that no base caption ever used). `size_ratio` is the bytes of the LoRA file `scripts/convert.py
export-lora` wrote (--lora_file; without it the same export goes to a temporary folder) over the bytes of the base's
U-Net and text-encoder params. The last line is

  lora_accuracy new=<x> base_new=<y> old=<z> base_old=<w> size_ratio=<r>

and the numbers also go to `<workdir>/eval/lora_accuracy.json` (or --out).
"""

import json
import os
import sys
import tempfile
import time

from absl import flags

from diffusion import cli
from diffusion.errors import user_errors_exit


def _define_flags() -> dict:
  f = flags
  return dict(
    workdir=f.DEFINE_string('workdir', None, 'A DreamBooth / LoRA workdir trained on the shapes demo model.'),
    concept=f.DEFINE_string('concept', 'cross', 'The concept shape the run learned.'),
    num_seeds=f.DEFINE_integer('num_seeds', 32, 'Images per prompt (the same seeds for the run and its base).'),
    guidance_scale=f.DEFINE_float('guidance_scale', None, 'Guidance scale (default: config.sample.guidance_scale).'),
    num_steps=f.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).'),
    sampler=f.DEFINE_string('sampler', None, 'Sampler (default: config.sample.sampler).'),
    lora_file=f.DEFINE_string('lora_file', None, "The workdir's LoRA file from export-lora (default: export it anew)."),
    out=f.DEFINE_string('out', None, 'JSON output (default: <workdir>/eval/lora_accuracy.json).'),
  )


def _accuracy(images, prompts) -> float:
  from diffusion.data import oracle

  return oracle.caption_accuracy(images, prompts, shapes=oracle.ALL_SHAPES)


def lora_size_ratio(workdir: str, lora_file: str | None = None) -> dict:
  """Bytes of the workdir's exported LoRA file (`lora_file`, else exported now) over the bytes of its base's U-Net
  and text-encoder params."""
  import jax
  import numpy as np

  from diffusion import interop
  from diffusion import workdir as workdir_lib
  from diffusion.generation import workdir_lora
  from diffusion.training import dreambooth

  config = workdir_lib.load_workdir_config(workdir, expect='ldm')
  base = workdir_lib.load_trained_params(dreambooth.base_workdir(config), 'ema_params')[0]
  base_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves({'unet': base['unet'], 'text': base['text']}))
  if lora_file:
    cli.require(os.path.isfile(lora_file), f'--lora_file {lora_file!r} does not exist')
    lora_bytes, path = os.path.getsize(lora_file), lora_file
  else:
    with tempfile.TemporaryDirectory() as scratch:
      path = interop.save_lora(scratch, workdir_lora(workdir))
      lora_bytes = os.path.getsize(path)
  return {
    'lora_file': path,
    'lora_bytes': lora_bytes,
    'base_bytes': int(base_bytes),
    'size_ratio': lora_bytes / base_bytes,
  }


def _comparison_grid(workdir: str, concept: str, firsts: dict) -> str:
  """`<workdir>/eval/lora_grid.png`: one column per colour; rows: the base and the tuned model on 'a <colour>
  <concept>', then on 'a <colour> circle' (an old prompt), each the prompt's first seed."""
  import numpy as np

  from diffusion.data import shapes
  from diffusion.images import labelled_grid

  circles = slice(0, None, len(shapes.SHAPES))  # The old prompts run colour by colour over SHAPES: circle first.
  rows = [firsts['base_new'], firsts['new'], firsts['base_old'][circles], firsts['old'][circles]]
  labels = [f'base: a C {concept}', f'tuned: a C {concept}', 'base: a C circle', 'tuned: a C circle']
  path = os.path.join(workdir, 'eval', 'lora_grid.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  labelled_grid(np.stack(rows), labels, [f'C = {c}' for c in shapes.COLOURS]).save(path)
  return path


def evaluate(
  workdir: str,
  concept: str = 'cross',
  num_seeds: int = 32,
  guidance_scale: float | None = None,
  num_steps: int | None = None,
  sampler: str | None = None,
  lora_file: str | None = None,
) -> dict:
  """The four paired accuracies, the size ratio and the settings, as a dict."""
  from diffusion.data import oracle, shapes
  from diffusion.pipeline import LatentDiffusionPipeline
  from diffusion.training import dreambooth

  cli.require(concept in shapes.CONCEPT_SHAPES, f'--concept {concept!r}: known concept shapes {shapes.CONCEPT_SHAPES}')
  tuned = LatentDiffusionPipeline.from_workdir(workdir)
  config = tuned.config
  base_dir = dreambooth.base_workdir(config)
  cli.require(bool(base_dir), f'{workdir!r} is not built on a base (no base_workdir / init_from in its config)')
  base = LatentDiffusionPipeline.from_workdir(base_dir)
  cli.require(
    base.config.data.name == 'shapes', f'the base {base_dir!r} was not trained on the shapes dataset: no oracle for it'
  )
  base.tokenizer = tuned.tokenizer  # The base's ids, plus the new word's spare slot.
  settings = tuned.sampling_settings(guidance_scale=guidance_scale, num_steps=num_steps, sampler=sampler)
  prompt_sets = {
    'new': [p for p in oracle.single_object_prompts((concept,)) for _ in range(num_seeds)],
    'old': [p for p in oracle.single_object_prompts() for _ in range(num_seeds)],
  }
  start = time.time()
  results = {'concept': concept, 'num_seeds': num_seeds, 'base_workdir': base_dir}
  results.update(
    {'guidance_scale': settings.guidance_scale, 'sampler': settings.sampler, 'num_steps': settings.num_steps}
  )
  firsts = {}  # Each prompt's first seed, for the comparison grid.
  for name, prompts in prompt_sets.items():
    for label, pipeline in ((name, tuned), (f'base_{name}', base)):
      images = pipeline.generate(prompts, settings, seed=config.seed)
      results[label] = _accuracy(images, prompts)
      firsts[label] = images[::num_seeds]
      print(f'{label}: {results[label]:.3f} ({len(prompts)} images)', flush=True)
    results[f'num_{name}_prompts'] = len(prompts) // num_seeds
  results['grid'] = _comparison_grid(workdir, concept, firsts)
  results['seconds'] = time.time() - start
  results.update(lora_size_ratio(workdir, lora_file))
  return results


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None, required=('workdir',))
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(os.path.isdir(v['workdir']), f'workdir {v["workdir"]!r} does not exist')
  cli.require(v['num_seeds'] >= 1, '--num_seeds must be >= 1')
  results = evaluate(
    v['workdir'], v['concept'], v['num_seeds'], v['guidance_scale'], v['num_steps'], v['sampler'], v['lora_file']
  )
  out = v['out'] or os.path.join(v['workdir'], 'eval', 'lora_accuracy.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {out}')
  print(
    f'lora_accuracy new={results["new"]:.3f} base_new={results["base_new"]:.3f} old={results["old"]:.3f} '
    f'base_old={results["base_old"]:.3f} size_ratio={results["size_ratio"]:.4f}',
    flush=True,
  )


if __name__ == '__main__':
  main(sys.argv)
