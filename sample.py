r"""Generates images from a trained latent diffusion workdir.

  python sample.py --workdir workdirs/ldm --prompt "a red circle" --prompt "a blue square" --out samples/
  python sample.py --workdir W --prompts_file prompts.txt --num_images 4 --guidance_scale 3 --seed 1 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --sampler dpmpp_2m --karras --num_steps 20 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --strength 0.6 --out DIR    # img2img
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --mask mask.png --out DIR   # inpaint

Writes DIR/0000.png, DIR/0001.png, ... (prompt-major: all images of the first prompt first), DIR/grid.png (one row per
prompt) and DIR/settings.json with every setting, so any result can be reproduced exactly. Image i's initial noise
comes from fold_in(seed, i), so the batch size and the device count do not change any image.
"""

import os
import sys

from absl import flags

from diffusion import cli
from diffusion import samplers
from diffusion.errors import user_errors_exit

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage-2 (ldm) training workdir.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file with one prompt per line.')
_NEGATIVE = flags.DEFINE_string('negative_prompt', None, 'Negative prompt (default: the config\'s, usually empty).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
_NUM_STEPS = flags.DEFINE_integer('num_steps', None, 'Sampling steps (default: config.sample.num_steps).')
_GUIDANCE = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale (default: the config\'s).')
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
  prompts = _prompts()
  options = _sampler_options()
  interval = _guidance_interval()
  from diffusion.sampling import sample_to_directory

  cli.require(os.path.isdir(_WORKDIR.value), f'workdir {_WORKDIR.value!r} does not exist')
  settings = sample_to_directory(
      _WORKDIR.value, prompts, _OUT.value, num_images=_NUM_IMAGES.value, seed=_SEED.value,
      negative_prompt=_NEGATIVE.value, sampler=_SAMPLER.value, num_steps=_NUM_STEPS.value,
      guidance_scale=_GUIDANCE.value, batch_size=_BATCH.value, step=_STEP.value, use_ema=not _RAW.value,
      init_image=_INIT.value, mask=_MASK.value, strength=_STRENGTH.value, guidance_rescale=_RESCALE.value,
      guidance_interval=interval, **options)
  print(f'wrote {settings["num_images"]} images and grid.png to {_OUT.value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
