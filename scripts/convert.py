r"""Converts between diffusers Stable-Diffusion pipeline directories and our training workdirs.

  python scripts/convert.py import PIPELINE_DIR_OR_HUB_ID --workdir W   # then sample.py / train.py on W
  python scripts/convert.py export --workdir W OUT_DIR [--step N] [--raw_params]

`import` writes W as a stage-2 workdir at step 0 (config.json, tokenizer/, frozen/vae, checkpoints/0 with the
pretrained U-Net and text encoder as params and EMA params): `sample.py --workdir W` samples from it and
`train.py --config configs/ldm_base.py:sd15 --workdir W` fine-tunes it. `export` writes the EMA (or raw)
params of a workdir's latest (or given) checkpoint as a pipeline directory that diffusers'
`StableDiffusionPipeline`, `UNet2DConditionModel` and `AutoencoderKL` `.from_pretrained` load.
"""

import os
import sys

from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit

# command -> its positional arguments: `import SOURCE`, `export DIRECTORY`.
COMMANDS = {'import': ('source',), 'export': ('directory',)}
_WORKDIR = flags.DEFINE_string('workdir', None, 'import: the workdir to create; export: a stage-2 (ldm) workdir.')
_STEP = flags.DEFINE_integer('step', None, 'export: checkpoint step (default: the latest).')
_RAW = flags.DEFINE_bool('raw_params', False, 'export: the raw params, not the EMA params.')


@user_errors_exit
def main(argv: list[str]) -> None:
  command, path = cli.parse_flags(argv, config_flag=None, commands=COMMANDS, required=('workdir',), doc=__doc__)
  cli.require(command == 'export' or (_STEP.value is None and not _RAW.value), '--step and --raw_params are for export')
  from configs import ldm_base  # After argument checks: a usage error should not wait for JAX.
  from diffusion.training import pipeline_io

  if command == 'import':
    config = pipeline_io.import_pipeline(path, _WORKDIR.value, ldm_base.get_config('base'))
    unet = config.model.unet
    print(
      f'imported {path} into {_WORKDIR.value}: U-Net {tuple(unet.block_out_channels)}, '
      f'{config.data.image_size} px, prediction {config.diffusion.prediction_type}, '
      f'latent scale {config.model.vae.scaling_factor:g}',
      flush=True,
    )
  else:
    if not os.path.isdir(_WORKDIR.value):
      raise UserError(f'workdir {_WORKDIR.value!r} does not exist')
    warnings = pipeline_io.export_pipeline(_WORKDIR.value, path, step=_STEP.value, use_ema=not _RAW.value)
    for warning in warnings:
      print(f'warning: {warning}', file=sys.stderr, flush=True)
    print(f'exported {_WORKDIR.value} to {path}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
