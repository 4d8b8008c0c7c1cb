r"""Caption alignment of a model trained on the embedded shapes dataset, read by the dataset's oracle.

  python -m eval.caption_accuracy --workdir workdirs/demo/ldm

Generates every single-object prompt ("a red circle", ... all colour x shape pairs) with several seeds, three ways: at
the config's guidance scale (guided), at scale 1 (unguided) and from the empty prompt (unconditional), and counts an
image right when the oracle finds the prompt's colour AND shape: three 'oracle' evaluators of one evaluation suite
(`diffusion.evaluation`), each process generating its share of the images. It also prints how honest the oracle is: its
accuracy on held-out real and blurred images, and on generated images scored against shuffled prompts (near chance).
The last line is `caption_accuracy guided=<x> unguided=<y> unconditional=<z>`; the numbers also go to
`<workdir>/eval/caption_accuracy.json` (or --out).
"""

import json
import os
import sys
import time

from absl import flags

from diffusion import cli
from diffusion.errors import user_errors_exit


def _define_flags() -> dict:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  f = flags
  return dict(
    workdir=f.DEFINE_string('workdir', None, 'A stage-2 workdir trained on the shapes dataset.'),
    num_seeds=f.DEFINE_integer('num_seeds', 8, 'Images per prompt.'),
    guidance_scale=f.DEFINE_float(
      'guidance_scale', None, 'Guided scale, one value (default: config.sample.guidance_scale).'
    ),
    num_steps=f.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).'),
    sampler=f.DEFINE_string('sampler', None, 'Sampler (default: config.sample.sampler).'),
    out=f.DEFINE_string('out', None, 'JSON output (default: <workdir>/eval/caption_accuracy.json).'),
  )


def evaluate(
  workdir: str,
  num_seeds: int = 8,
  guidance_scale: float | None = None,
  num_steps: int | None = None,
  sampler: str | None = None,
) -> dict:
  """The three caption accuracies and the oracle's self-check numbers, as a dict.

  Three 'oracle' evaluators of one suite on the same prompts and noise: guided, unguided (scale 1) and
  unconditional (scale 0 with an empty negative prompt: the samples of the empty prompt, scored against the prompts).
  """
  import jax

  from diffusion.data import oracle, shapes
  from diffusion.evaluation import EvalSuite, parse_evaluator
  from diffusion.pipeline import LatentDiffusionPipeline

  pipeline = LatentDiffusionPipeline.from_workdir(workdir)
  config = pipeline.config
  cli.require(
    config.data.name == 'shapes',
    f'{workdir!r} was not trained on the shapes dataset; the oracle only reads shapes scenes',
  )
  guidance_scale = config.sample.guidance_scale if guidance_scale is None else guidance_scale
  prompts = tuple(p for p in oracle.single_object_prompts() for _ in range(num_seeds))
  common = dict(
    type='oracle',
    num_samples=len(prompts),
    prompts=prompts,
    batch_size=64 * jax.process_count(),
    num_steps=num_steps,
    sampler=sampler,
  )
  settings = {
    'guided': dict(guidance_scale=guidance_scale),
    'unguided': dict(guidance_scale=1.0),
    'unconditional': dict(guidance_scale=0.0, negative_prompt=''),
  }
  specs = [parse_evaluator(name, {**common, **extra}, config) for name, extra in settings.items()]
  suite = EvalSuite(specs, config, workdir, pipeline)
  first = suite.evaluators[0].settings
  results = {
    'num_prompts': len(oracle.single_object_prompts()),
    'num_seeds': num_seeds,
    'guidance_scale': guidance_scale,
    'sampler': first.sampler,
    'num_steps': first.num_steps,
  }
  start = time.time()
  scores = suite.evaluate(None)
  for name in settings:
    results[name] = scores[f'{name}/oracle_caption_accuracy']
  results['generated_vs_shuffled_prompts'] = scores['guided/oracle_shuffled_prompts']
  real, captions = shapes.generate_arrays(len(prompts), config.data.image_size, 1, seed=(config.seed, 777))
  check = oracle.oracle_self_check(real, captions, seed=0)
  results.update({f'oracle_{k}': v for k, v in check.items()})
  results['seconds'] = time.time() - start
  results['evaluators'] = suite.describe()
  return results


@user_errors_exit
def main(argv: list[str]) -> None:
  defined = _define_flags()
  cli.parse_flags(argv, config_flag=None, required=('workdir',))
  v = {name: flag.value for name, flag in defined.items()}
  cli.require(os.path.isdir(v['workdir']), f'workdir {v["workdir"]!r} does not exist')
  cli.require(v['num_seeds'] >= 1, '--num_seeds must be >= 1')
  from diffusion import parallel

  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.
  results = evaluate(v['workdir'], v['num_seeds'], v['guidance_scale'], v['num_steps'], v['sampler'])
  import jax

  if jax.process_index():
    return
  out = v['out'] or os.path.join(v['workdir'], 'eval', 'caption_accuracy.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(
    f'oracle on held-out real images: real={results["oracle_real"]:.3f} blurred={results["oracle_blurred"]:.3f} '
    f'shuffled_captions={results["oracle_shuffled"]:.3f}'
  )
  print(
    f'oracle on generated images vs shuffled prompts: {results["generated_vs_shuffled_prompts"]:.3f} '
    f'(chance ~ {1 / results["num_prompts"]:.3f})'
  )
  print(f'wrote {out}')
  print(
    f'caption_accuracy guided={results["guided"]:.3f} unguided={results["unguided"]:.3f} '
    f'unconditional={results["unconditional"]:.3f}',
    flush=True,
  )


if __name__ == '__main__':
  main(sys.argv)
