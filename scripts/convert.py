r"""Converts between diffusers Stable-Diffusion pipeline directories and our training workdirs.

  python scripts/convert.py import PIPELINE_DIR_OR_HUB_ID --workdir W   # then sample.py / train.py on W
  python scripts/convert.py export --workdir W OUT_DIR [--step N] [--raw_params]

`import` writes W as a stage-2 workdir at step 0 (config.json, tokenizer/, frozen/vae, checkpoints/0 with the
pretrained U-Net and text encoder as params and EMA params): `sample.py --workdir W` samples from it and
`train.py --config configs/ldm_base.py:sd15 --workdir W` fine-tunes it. `export` writes the EMA (or raw)
params of a workdir's latest (or given) checkpoint as a pipeline directory that diffusers'
`StableDiffusionPipeline`, `UNet2DConditionModel` and `AutoencoderKL` `.from_pretrained` load.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion.errors import UserError, user_errors_exit  # pylint: disable=wrong-import-position


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are `UserError`s (one `error: ...` line, exit 2)."""

  def error(self, message: str):
    raise UserError(f'{message} (see --help)')


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='convert.py', description=__doc__.split('\n\n')[0].strip())
  commands = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
  to_workdir = commands.add_parser('import', help='a diffusers pipeline directory (or hub id) -> a workdir')
  to_workdir.add_argument('source', help='pipeline directory with unet/ vae/ text_encoder/ tokenizer/ scheduler/')
  to_workdir.add_argument('--workdir', required=True, help='the workdir to create')
  to_pipeline = commands.add_parser('export', help='a workdir -> a diffusers pipeline directory')
  to_pipeline.add_argument('directory', help='the (new or empty) output directory')
  to_pipeline.add_argument('--workdir', required=True, help='a stage-2 (ldm) workdir')
  to_pipeline.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  to_pipeline.add_argument('--raw_params', action='store_true', help='export the raw params, not the EMA params')
  return parser


@user_errors_exit
def main(argv: list[str]) -> None:
  args = _parser().parse_args(argv[1:])
  from configs import ldm_base  # After argument checks: a usage error should not wait for JAX.
  from diffusion.training import pipeline_io

  if args.command == 'import':
    config = pipeline_io.import_pipeline(args.source, args.workdir, ldm_base.get_config('base'))
    unet = config.model.unet
    print(f'imported {args.source} into {args.workdir}: U-Net {tuple(unet.block_out_channels)}, '
          f'{config.data.image_size} px, prediction {config.diffusion.prediction_type}, '
          f'latent scale {config.model.vae.scaling_factor:g}', flush=True)
  else:
    if not os.path.isdir(args.workdir):
      raise UserError(f'workdir {args.workdir!r} does not exist')
    warnings = pipeline_io.export_pipeline(args.workdir, args.directory, step=args.step, use_ema=not args.raw_params)
    for warning in warnings:
      print(f'warning: {warning}', file=sys.stderr, flush=True)
    print(f'exported {args.workdir} to {args.directory}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
