r"""Caption alignment of a model trained on the embedded shapes dataset, read by the dataset's oracle.

  python -m eval.caption_accuracy --workdir workdirs/demo/ldm

Generates every single-object prompt ("a red circle", ... all colour x shape pairs) with several seeds, three ways:
at the config's guidance scale (guided), at scale 1 (unguided) and from the empty prompt (unconditional), and counts
an image right when the oracle finds the prompt's colour AND shape. It also prints how honest the oracle is: its
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

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage-2 workdir trained on the shapes dataset.')
_SEEDS = flags.DEFINE_integer('num_seeds', 8, 'Images per prompt.')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, 'Guided scale (default: config.sample.guidance_scale).')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).')
_SAMPLER = flags.DEFINE_string('sampler', None, 'Sampler (default: config.sample.sampler).')
_OUT = flags.DEFINE_string('out', None, 'JSON output (default: <workdir>/eval/caption_accuracy.json).')


def evaluate(workdir: str, num_seeds: int = 8, guidance_scale: float | None = None, num_steps: int | None = None,
             sampler: str | None = None) -> dict:
  """The three caption accuracies and the oracle's self-check numbers, as a dict."""
  import numpy as np

  from diffusion.data import oracle, shapes
  from diffusion.pipeline import LatentDiffusionPipeline

  pipeline = LatentDiffusionPipeline.from_workdir(workdir)
  config = pipeline.config
  cli.require(config.data.name == 'shapes', f'{workdir!r} was not trained on the shapes dataset; the oracle '
              'only reads shapes scenes')
  guidance_scale = config.sample.guidance_scale if guidance_scale is None else guidance_scale
  prompts = [p for p in oracle.single_object_prompts() for _ in range(num_seeds)]
  indices = np.arange(len(prompts))
  kwargs = dict(seed=config.seed, indices=indices, num_steps=num_steps, sampler=sampler)
  results = {'num_prompts': len(oracle.single_object_prompts()), 'num_seeds': num_seeds,
             'guidance_scale': guidance_scale, 'sampler': sampler or config.sample.sampler,
             'num_steps': num_steps or config.sample.num_steps}
  start = time.time()
  guided = pipeline.generate(prompts, guidance_scale=guidance_scale, **kwargs)
  results['guided'] = oracle.caption_accuracy(guided, prompts)
  results['unguided'] = oracle.caption_accuracy(pipeline.generate(prompts, guidance_scale=1.0, **kwargs), prompts)
  unconditional = pipeline.generate([''] * len(prompts), guidance_scale=1.0, **kwargs)
  results['unconditional'] = oracle.caption_accuracy(unconditional, prompts)
  shuffled = [prompts[i] for i in np.random.default_rng(0).permutation(len(prompts))]
  results['generated_vs_shuffled_prompts'] = oracle.caption_accuracy(guided, shuffled)
  real, captions = shapes.generate_arrays(len(prompts), config.data.image_size, 1, seed=(config.seed, 777))
  check = oracle.oracle_self_check(real, captions, seed=0)
  results.update({f'oracle_{k}': v for k, v in check.items()})
  results['seconds'] = time.time() - start
  return results


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, config_flag=None)
  cli.require(bool(_WORKDIR.value), '--workdir is required')
  cli.require(os.path.isdir(_WORKDIR.value), f'workdir {_WORKDIR.value!r} does not exist')
  cli.require(_SEEDS.value >= 1, '--num_seeds must be >= 1')
  results = evaluate(_WORKDIR.value, _SEEDS.value, _GUIDANCE.value, _NUM_STEPS.value, _SAMPLER.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, 'eval', 'caption_accuracy.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'oracle on held-out real images: real={results["oracle_real"]:.3f} blurred={results["oracle_blurred"]:.3f} '
        f'shuffled_captions={results["oracle_shuffled"]:.3f}')
  print(f'oracle on generated images vs shuffled prompts: {results["generated_vs_shuffled_prompts"]:.3f} '
        f'(chance ~ {1 / results["num_prompts"]:.3f})')
  print(f'wrote {out}')
  print(f'caption_accuracy guided={results["guided"]:.3f} unguided={results["unguided"]:.3f} '
        f'unconditional={results["unconditional"]:.3f}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
