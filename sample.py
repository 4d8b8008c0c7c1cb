r"""Generates images from a trained latent diffusion workdir.

  python sample.py --workdir workdirs/ldm --prompt "a red circle" --prompt "a blue square" --out samples/
  python sample.py --workdir W --prompts_file prompts.txt --num_images 4 --guidance_scale 3 --seed 1 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --sampler dpmpp_2m --karras --num_steps 20 --out DIR
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --strength 0.6 --out DIR    # img2img
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --mask mask.png --out DIR   # inpaint
  python sample.py --workdir W --prompt "a blue circle" --init_image in.png --outpaint 64,0,64,0 --out DIR  # outpaint
  python sample.py --workdir W --prompts_file prompts.txt --guidance_scale 1,3,7 --num_steps 10,25 --out DIR  # sweep
  python sample.py --workdir W --prompt "a blue circle" --lora style.safetensors:0.7 --lora W2 --out DIR  # LoRAs
  python sample.py --workdir W --prompt "a blue circle" --watermark "my-lab" --watermark_method dwtDctSvd --out DIR

Writes DIR/0000.png, DIR/0001.png, ... (prompt-major: all images of the first prompt first), DIR/grid.png (one row per
prompt) and DIR/settings.json with every setting, so any result can be reproduced exactly. Image i's initial noise
comes from fold_in(seed, i), so the batch size and the device count do not change what an image is (the same
settings give the same bytes; another batch size or device count may round the odd uint8 value the other way).

Sweeps: comma-separated --guidance_scale and/or --num_steps sample every combination from the same noise, into
DIR/gs<scale>_steps<n>/0000.png ... (each with its settings.json), plus DIR/grid.png (a row per image, a column per
combination, labelled) and DIR/settings.json listing the combinations.

Outpainting: --outpaint LEFT,TOP,RIGHT,BOTTOM adds that many pixels to --init_image (kept at its own size) and
generates them by inpainting, in overlapping windows of the model's size where the canvas is larger (see
diffusion/outpaint.py for the window order); outside a seam band of --outpaint_blur pixels the input is pasted back
exactly (an invisible watermark, on images of 256x256 or more, changes pixels by design: --watermark none keeps them).

Watermarks: every image written (samples and grids) carries an invisible watermark, the text --watermark (default
`ldm-jax`; `none`: no mark) by the `invisible-watermark` package's scheme --watermark_method, which that package's
WatermarkDecoder and `python -m eval.watermark --images DIR` read. Images under 256x256 pixels are written unmarked
(one warning; settings.json says so).

Per-prompt seeds: a --prompts_file line `prompt<TAB>seed` (an integer) fixes that prompt's noise: its image j starts
from fold_in(seed, j) whatever else is in the file; lines without a tab use --seed and the file index as above.
"""

import os
import sys

from absl import flags

from diffusion import cli, outpaint, samplers, watermark
from diffusion.errors import user_errors_exit
from diffusion.prompts import read_prompts_file

_WORKDIR = flags.DEFINE_string('workdir', None, 'A stage-2 (ldm) training workdir.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_PROMPTS_FILE = flags.DEFINE_string(
  'prompts_file', None, 'A text file with one prompt per line; a line `prompt<TAB>seed` gives that prompt its own seed.'
)
_NEGATIVE = flags.DEFINE_string('negative_prompt', None, "Negative prompt (default: the config's, usually empty).")
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1, 'Images per prompt.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
_NUM_STEPS = flags.DEFINE_string(
  'num_steps', None, 'Sampling steps (default: config.sample.num_steps); a comma list (10,25) sweeps.'
)
_GUIDANCE = flags.DEFINE_string(
  'guidance_scale', None, "Classifier-free guidance scale (default: the config's); a comma list (1,3,7) sweeps."
)
_ETA = flags.DEFINE_float('eta', None, 'DDIM eta (0: deterministic; ddim only).')
_SAMPLER = flags.DEFINE_string(
  'sampler',
  None,
  'Sampler (default: config.sample.sampler). Diffusion models: '
  f'{", ".join(samplers.available_samplers("diffusion"))}; flow-matching models: '
  f'{", ".join(samplers.available_samplers("flow"))}.',
)
_KARRAS = flags.DEFINE_bool('karras', None, 'Karras noise levels (euler, euler_a, heun, dpmpp_*, flow_*).')
_SPACING = flags.DEFINE_enum(
  'timestep_spacing', None, list(samplers.SPACINGS), "Timestep spacing (default: the sampler's; not for flow samplers)."
)
_CHURN = flags.DEFINE_float('s_churn', None, "Heun only: EDM's stochasticity S_churn (0: deterministic).")
_RESCALE = flags.DEFINE_float('guidance_rescale', None, 'Guidance rescale phi in [0, 1] (Lin et al. 2023).')
_INTERVAL = flags.DEFINE_string(
  'guidance_interval', None, 'LO,HI: guide only where LO <= t / T <= HI (fractions of the training time).'
)
_INIT = flags.DEFINE_string(
  'init_image', None, "An image to edit (img2img, inpainting: resized to the model's size; --outpaint: as it is)."
)
_MASK = flags.DEFINE_string('mask', None, 'Inpainting mask, same size as --init_image: white = repaint, black = keep.')
_STRENGTH = flags.DEFINE_float(
  'strength', None, 'How much of --init_image to redo, in (0, 1] (default 0.8; 1.0 with --mask or --outpaint).'
)
_OUTPAINT = flags.DEFINE_string(
  'outpaint', None, 'LEFT,TOP,RIGHT,BOTTOM: pixels to add to --init_image on each side, generated (outpainting).'
)
_OUTPAINT_BLUR = flags.DEFINE_integer(
  'outpaint_blur', outpaint.DEFAULT_BLUR, 'Outpainting: width in pixels of the feathered seam band inside the input.'
)
_BATCH = flags.DEFINE_integer(
  'batch_size', 64, 'Images per sampling call, all local devices together; does not change the images.'
)
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_RAW = flags.DEFINE_bool('raw_params', False, 'Use the raw params instead of the EMA params.')
_LORA = flags.DEFINE_multi_string(
  'lora',
  [],
  'PATH[:SCALE]: a LoRA (diffusers / kohya file, a directory with pytorch_lora_weights.safetensors, or a LoRA '
  'workdir) merged into the weights for this call, with its scale (default 1); repeat to stack several.',
)
_WATERMARK = flags.DEFINE_string(
  'watermark', watermark.DEFAULT_TEXT, "Text of the invisible watermark every written image carries; 'none': no mark."
)
_WATERMARK_METHOD = flags.DEFINE_enum(
  'watermark_method',
  watermark.DEFAULT_METHOD,
  list(watermark.METHODS),
  "The watermark's scheme (invisible-watermark's).",
)
_OUT = flags.DEFINE_string('out', None, 'Output directory.')


def _prompts() -> tuple[list[str], list[int | None]]:
  prompts, seeds = list(_PROMPT.value), [None] * len(_PROMPT.value)
  if _PROMPTS_FILE.value:
    more, more_seeds = read_prompts_file(_PROMPTS_FILE.value)
    prompts, seeds = prompts + more, seeds + more_seeds
  cli.require(bool(prompts), 'no prompt given: use --prompt TEXT (repeatable) or --prompts_file FILE')
  return prompts, seeds


def _overrides() -> dict:
  """The sampling settings the flags override (None: the config's), checked as far as they can be without it."""
  interval = cli.comma_list(_INTERVAL, float, length=2)
  overrides = dict(
    sampler=_SAMPLER.value,
    negative_prompt=_NEGATIVE.value,
    guidance_rescale=_RESCALE.value,
    guidance_interval=interval and tuple(interval),
    eta=_ETA.value,
    karras=_KARRAS.value,
    timestep_spacing=_SPACING.value,
    s_churn=_CHURN.value,
  )
  samplers.SamplingSettings.check_overrides(flag_prefix='--', **overrides)
  return overrides


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, config_flag=None, required=('workdir', 'out'), doc=__doc__)
  cli.require(_NUM_IMAGES.value >= 1, f'--num_images must be >= 1, got {_NUM_IMAGES.value}')
  cli.require(_BATCH.value >= 1, f'--batch_size must be >= 1, got {_BATCH.value}')
  num_steps, guidance = cli.comma_list(_NUM_STEPS, int, minimum=1), cli.comma_list(_GUIDANCE, float, minimum=0)
  overrides = _overrides()
  amounts = cli.comma_list(_OUTPAINT, int, minimum=0, length=4)
  edits = (_INIT.value is not None, _MASK.value is not None)
  outpaint.check(amounts, _OUTPAINT_BLUR.value, *edits, flag_prefix='--')
  samplers.editing_strength(_STRENGTH.value, edits[0], edits[1] or amounts is not None, flag_prefix='--')
  for flag in (_INIT, _MASK):
    cli.require(flag.value is None or os.path.isfile(flag.value), f'--{flag.name} {flag.value!r} does not exist')
  prompts, seeds = _prompts()
  mark = None if _WATERMARK.value.lower() == 'none' else _WATERMARK.value
  cli.require(os.path.isdir(_WORKDIR.value), f'workdir {_WORKDIR.value!r} does not exist')
  loras = [cli.adapter_and_scale(value, 'lora') for value in _LORA.value]
  for path, _ in loras:
    cli.require(os.path.exists(path), f'--lora {path!r} does not exist')

  from diffusion import parallel
  from diffusion.generation import sample_to_directory

  parallel.initialize_distributed()  # Multi-host launches (from the environment); else a no-op.
  single = lambda values: values[0] if values is not None and len(values) == 1 else values
  settings = sample_to_directory(
    _WORKDIR.value,
    prompts,
    _OUT.value,
    num_images=_NUM_IMAGES.value,
    seed=_SEED.value,
    num_steps=single(num_steps),
    guidance_scale=single(guidance),
    batch_size=_BATCH.value,
    step=_STEP.value,
    use_ema=not _RAW.value,
    init_image=_INIT.value,
    mask=_MASK.value,
    strength=_STRENGTH.value,
    prompt_seeds=seeds,
    loras=loras,
    watermark=mark,
    watermark_method=_WATERMARK_METHOD.value,
    outpaint=amounts,
    outpaint_blur=_OUTPAINT_BLUR.value,
    **overrides,
  )
  print(f'wrote {settings["num_images"]} images and grid.png to {_OUT.value}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
