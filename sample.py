r"""Generates images from a trained latent diffusion workdir.

  python sample.py --workdir workdirs/ldm --prompt "a red circle" --prompt "a blue square" --out samples/
  python sample.py --workdir W --prompts_file prompts.txt --num_images 4 --guidance_scale 3 --seed 1 --out DIR

Writes DIR/0000.png, DIR/0001.png, ... (prompt-major: all images of the first prompt first), DIR/grid.png (one row per
prompt) and DIR/settings.json with every setting, so any result can be reproduced exactly. Image i's initial noise
comes from fold_in(seed, i), so the batch size and the device count do not change any image.
"""

import sys

from absl import flags

from diffusion import cli
from diffusion.errors import user_errors_exit

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage-2 (ldm) training workdir.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file with one prompt per line.')
_NEGATIVE = flags.DEFINE_string('negative_prompt', None, 'Negative prompt (default: the config\'s, usually empty).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale (default: the config\'s).')
_ETA = flags.DEFINE_float('eta', None, 'DDIM eta (0: deterministic).')
_SAMPLER = flags.DEFINE_string('sampler', None, 'Sampler name (ddim, ddpm; default: config.sample.sampler).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per device batch; does not change the images.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_RAW = flags.DEFINE_bool('raw_params', False, 'Use the raw params instead of the EMA params.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value) as f:
        prompts += [line.strip() for line in f if line.strip()]
    except OSError as e:
      cli.require(False, f'cannot read --prompts_file: {e}')
  cli.require(bool(prompts), 'no prompt given: use --prompt TEXT (repeatable) or --prompts_file FILE')
  return prompts


def _check_flags() -> None:
  cli.require(bool(_WORKDIR.value), '--workdir is required')
  cli.require(bool(_OUT.value), '--out is required')
  cli.require(_NUM_IMAGES.value >= 1, f'--num_images must be >= 1, got {_NUM_IMAGES.value}')
  cli.require(_BATCH.value >= 1, f'--batch_size must be >= 1, got {_BATCH.value}')
  cli.require(_NUM_STEPS.value is None or _NUM_STEPS.value >= 1, f'--num_steps must be >= 1, got {_NUM_STEPS.value}')
  cli.require(_GUIDANCE.value is None or _GUIDANCE.value >= 0, '--guidance_scale must be >= 0')
  cli.require(_ETA.value is None or _ETA.value >= 0, '--eta must be >= 0')


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, config_flag=None)
  _check_flags()
  prompts = _prompts()
  import os
  from diffusion import samplers
  from diffusion.sampling import sample_to_directory

  names = samplers.available_samplers()
  cli.require(_SAMPLER.value is None or _SAMPLER.value in names,
              f'unknown sampler {_SAMPLER.value!r}; known: {", ".join(names)}')
  cli.require(os.path.isdir(_WORKDIR.value), f'workdir {_WORKDIR.value!r} does not exist')
  settings = sample_to_directory(
      _WORKDIR.value, prompts, _OUT.value, num_images=_NUM_IMAGES.value, seed=_SEED.value,
      negative_prompt=_NEGATIVE.value, sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value,
      guidance_scale=_GUIDANCE.value, eta=_ETA.value, batch_size=_BATCH.value, step=_STEP.value,
      use_ema=not _RAW.value)
  print(f'wrote {settings["num_images"]} images and grid.png to {_OUT.value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
