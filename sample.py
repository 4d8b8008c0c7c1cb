r"""Generates images from a trained latent diffusion workdir.

  python sample.py --workdir workdirs/ldm --prompt "a red circle" --prompt "a blue square" --out samples/
  python sample.py --workdir W --prompts_file prompts.txt --num_images 4 --guidance_scale 3 --seed 1 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --sampler dpmpp_2m --karras --num_steps 20 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --strength 0.6 --out DIR    # img2img
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --mask mask.png --out DIR   # inpaint
  python sample.py --workdir W --prompts_file prompts.txt --guidance_scale 1,3,7 --num_steps 10,25 --out DIR  # sweep

Writes DIR/0000.png, DIR/0001.png, ... (prompt-major: all images of the first prompt first), DIR/grid.png (one row per
prompt) and DIR/settings.json with every setting, so any result can be reproduced exactly. Image i's initial noise
comes from fold_in(seed, i), so the batch size and the device count do not change what an image is (the same
settings give the same bytes; another batch size or device count may round the odd uint8 value the other way).

Sweeps: comma-separated --guidance_scale and/or --num_steps sample every combination from the same noise, into
DIR/gs<scale>_steps<n>/0000.png ... (each with its settings.json), plus DIR/grid.png (a row per image, a column per
combination, labelled) and DIR/settings.json listing the combinations.

Per-prompt seeds: a --prompts_file line `prompt<TAB>seed` (an integer) fixes that prompt's noise: its image j starts
from fold_in(seed, j) whatever else is in the file; lines without a tab use --seed and the file index as above.
"""

import os
import sys

from absl import flags

from diffusion import cli
from diffusion import samplers
from diffusion.errors import user_errors_exit

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage-2 (ldm) training workdir.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file with one prompt per line; a line '
                                    '`prompt<TAB>seed` gives that prompt its own seed.')
_NEGATIVE = flags.DEFINE_string('negative_prompt', None, 'Negative prompt (default: the config\'s, usually empty).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
_NUM_STEPS = flags.DEFINE_string('num_steps', None, 'Sampling steps (default: config.sample.num_steps); a comma '
                                 'list (10,25) sweeps.')
_GUIDANCE = flags.DEFINE_string('guidance_scale', None, 'Classifier-free guidance scale (default: the config\'s); a '
                                'comma list (1,3,7) sweeps.')
_ETA = flags.DEFINE_float('eta', None, 'DDIM eta (0: deterministic; ddim only).')
_SAMPLER = flags.DEFINE_string(
    'sampler', None, 'Sampler (default: config.sample.sampler). Diffusion models: '
    f'{", ".join(samplers.available_samplers("diffusion"))}; flow-matching models: '
    f'{", ".join(samplers.available_samplers("flow"))}.')
_KARRAS = flags.DEFINE_bool('karras', None, 'Karras noise levels (euler, euler_a, heun, dpmpp_*, flow_*).')
_SPACING = flags.DEFINE_enum('timestep_spacing', None, list(samplers.SPACINGS),
                             'Timestep spacing (default: the sampler\'s; not for flow samplers).')
_CHURN = flags.DEFINE_float('s_churn', None, 'Heun only: EDM\'s stochasticity S_churn (0: deterministic).')
_RESCALE = flags.DEFINE_float('guidance_rescale', None, 'Guidance rescale phi in [0, 1] (Lin et al. 2023).')
_INTERVAL = flags.DEFINE_string('guidance_interval', None,
                                'LO,HI: guide only where LO <= t / T <= HI (fractions of the training time).')
_INIT = flags.DEFINE_string('init_image', None, 'An image to edit (img2img; resized to the model\'s size).')
_MASK = flags.DEFINE_string('mask', None, 'Inpainting mask, same size as --init_image: white = repaint, black = keep.')
_STRENGTH = flags.DEFINE_float('strength', None, 'How much of --init_image to redo, in (0, 1] (default 0.8; 1.0 '
                               'with --mask).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per device batch; does not change the images.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_RAW = flags.DEFINE_bool('raw_params', False, 'Use the raw params instead of the EMA params.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')


def _prompts() -> tuple[list[str], list[int | None]]:
  from diffusion.prompts import read_prompts_file

  prompts, seeds = list(_PROMPT.value), [None] * len(_PROMPT.value)
  if _PROMPTS_FILE.value:
    more, more_seeds = read_prompts_file(_PROMPTS_FILE.value)
    prompts, seeds = prompts + more, seeds + more_seeds
  cli.require(bool(prompts), 'no prompt given: use --prompt TEXT (repeatable) or --prompts_file FILE')
  return prompts, seeds


def _values(flag, kind: type, minimum: float) -> list | None:
  """A flag's comma-separated values (None if unset), each >= minimum."""
  if flag.value is None:
    return None
  try:
    values = [kind(v) for v in flag.value.split(',')]
  except ValueError:
    values = []
  cli.require(bool(values) and all(v >= minimum for v in values),
              f'--{flag.name} must be a number >= {minimum} or a comma list of them, got {flag.value!r}')
  return values


def _check_flags() -> None:
  cli.require(bool(_WORKDIR.value), '--workdir is required')
  cli.require(bool(_OUT.value), '--out is required')
  cli.require(_NUM_IMAGES.value >= 1, f'--num_images must be >= 1, got {_NUM_IMAGES.value}')
  cli.require(_BATCH.value >= 1, f'--batch_size must be >= 1, got {_BATCH.value}')
  _values(_NUM_STEPS, int, 1)
  _values(_GUIDANCE, float, 0)
  cli.require(_ETA.value is None or _ETA.value >= 0, '--eta must be >= 0')
  cli.require(_CHURN.value is None or _CHURN.value >= 0, '--s_churn must be >= 0')
  cli.require(_RESCALE.value is None or 0 <= _RESCALE.value <= 1, '--guidance_rescale must be in [0, 1]')
  cli.require(_STRENGTH.value is None or 0 < _STRENGTH.value <= 1,
              f'--strength must be in (0, 1], got {_STRENGTH.value}')
  cli.require(_INIT.value is not None or (_MASK.value is None and _STRENGTH.value is None),
              '--mask and --strength need --init_image')
  for flag in (_INIT, _MASK):
    cli.require(flag.value is None or os.path.isfile(flag.value), f'--{flag.name} {flag.value!r} does not exist')
  if _MASK.value:
    from PIL import Image
    mask, image = Image.open(_MASK.value).size, Image.open(_INIT.value).size
    cli.require(mask == image, f'--mask is {mask[0]}x{mask[1]} but --init_image is {image[0]}x{image[1]}: '
                'they must have the same size')


def _guidance_interval() -> tuple[float, float] | None:
  if _INTERVAL.value is None:
    return None
  try:
    lo, hi = (float(v) for v in _INTERVAL.value.split(','))
  except ValueError:
    lo = hi = -1.0
  cli.require(0 <= lo <= hi <= 1, f'--guidance_interval must be LO,HI with 0 <= LO <= HI <= 1, got {_INTERVAL.value!r}')
  return lo, hi


def _sampler_options() -> dict:
  """The sampler options given on the command line; each must be one the chosen sampler takes."""
  given = {'eta': _ETA.value, 'karras': _KARRAS.value, 'timestep_spacing': _SPACING.value, 's_churn': _CHURN.value}
  given = {k: v for k, v in given.items() if v is not None}
  names = samplers.available_samplers()
  cli.require(_SAMPLER.value is None or _SAMPLER.value in names,
              f'unknown sampler {_SAMPLER.value!r}; known: {", ".join(names)}')
  if _SAMPLER.value:
    accepted = samplers.sampler_info(_SAMPLER.value).options
    for key in given:
      cli.require(key in accepted, f'--{key} does not apply to sampler {_SAMPLER.value!r}')
  return given


@user_errors_exit
def main(argv: list[str]) -> None:
  if any(arg in ('--help', '-h', '--helpshort') for arg in argv[1:]):
    print(__doc__ + '\nFlags:\n' + flags.FLAGS.main_module_help())
    return
  cli.parse_flags(argv, config_flag=None)
  _check_flags()
  prompts, seeds = _prompts()
  options = _sampler_options()
  interval = _guidance_interval()
  from diffusion import parallel
  from diffusion.generation import sample_to_directory

  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.

  cli.require(os.path.isdir(_WORKDIR.value), f'workdir {_WORKDIR.value!r} does not exist')
  single = lambda values: values[0] if values is not None and len(values) == 1 else values
  settings = sample_to_directory(
      _WORKDIR.value, prompts, _OUT.value, num_images=_NUM_IMAGES.value, seed=_SEED.value,
      negative_prompt=_NEGATIVE.value, sampler=_SAMPLER.value, num_steps=single(_values(_NUM_STEPS, int, 1)),
      guidance_scale=single(_values(_GUIDANCE, float, 0)), batch_size=_BATCH.value, step=_STEP.value,
      use_ema=not _RAW.value, init_image=_INIT.value, mask=_MASK.value, strength=_STRENGTH.value,
      guidance_rescale=_RESCALE.value, guidance_interval=interval, prompt_seeds=seeds, **options)
  print(f'wrote {settings["num_images"]} images and grid.png to {_OUT.value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
