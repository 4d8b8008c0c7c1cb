r"""Converts between diffusers Stable-Diffusion pipeline directories and our training workdirs.

  python scripts/convert.py import PIPELINE_DIR_OR_HUB_ID --workdir W   # then sample.py / train.py on W
  python scripts/convert.py import PIPELINE_DIR --workdir W --lora style.safetensors:0.7 --lora detail.safetensors
  python scripts/convert.py export --workdir W OUT_DIR [--step N] [--raw_params]
  python scripts/convert.py export-lora --workdir W OUT_DIR    # OUT_DIR/pytorch_lora_weights.safetensors

`import` writes W as a stage-2 workdir at step 0 (config.json, tokenizer/, frozen/vae, checkpoints/0 with the
pretrained U-Net and text encoder as params and EMA params): `sample.py --workdir W` samples from it and
`train.py --config configs/ldm_base.py:sd15 --workdir W` fine-tunes it. `--lora FILE[:SCALE]` (repeatable; diffusers /
peft or kohya LoRA files) merges each LoRA with its scale (default 1) into the imported weights and keeps the merged
LoRAs in W/frozen/lora. `export` writes the EMA (or raw) params of a workdir's latest (or given) checkpoint as a
pipeline directory that diffusers' `StableDiffusionPipeline`, `UNet2DConditionModel` and `AutoencoderKL`
`.from_pretrained` load. `export-lora` writes a workdir's LoRA (the EMA LoRA of a LoRA-trained workdir's latest
checkpoint, or the LoRAs merged at import) in diffusers' format (alpha in the safetensors
metadata), which `pipeline.load_lora_weights(OUT_DIR, weight_name='pytorch_lora_weights.safetensors')` loads on the
base pipeline.
"""

import os
import sys

from absl import flags

from diffusion import cli
from diffusion.errors import UserError, user_errors_exit

# command -> its positional arguments: `import SOURCE`, `export DIRECTORY`, `export-lora DIRECTORY`.
COMMANDS = {'import': ('source',), 'export': ('directory',), 'export-lora': ('directory',)}
# allow_override: test modules load this file more than once in one process (each load defines the same flags).
_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'import: the workdir to create; export: a stage-2 (ldm) workdir; export-lora: one trained or imported with a LoRA.',
  allow_override=True,
)
_STEP = flags.DEFINE_integer('step', None, 'export: checkpoint step (default: the latest).', allow_override=True)
_RAW = flags.DEFINE_bool('raw_params', False, 'export: the raw params, not the EMA params.', allow_override=True)
_LORA = flags.DEFINE_multi_string(
  'lora',
  [],
  'import: FILE[:SCALE], a LoRA merged into the imported weights with its scale (default 1); repeatable.',
  allow_override=True,
)


def _import(path: str, loras: list[tuple[str, float]]) -> None:
  from configs import ldm_base  # After argument checks: a usage error should not wait for JAX.
  from diffusion import interop
  from diffusion import lora as lora_lib
  from diffusion import workdir as workdir_lib
  from diffusion.generation import LORA_RECORD, merge_adapters
  from diffusion.training import pipeline_io

  trees = [interop.load_lora(file) for file, _ in loras]  # Unreadable files fail before the pipeline is read.
  merge = (lambda params: merge_adapters(params, loras)) if loras else None
  config = pipeline_io.import_pipeline(path, _WORKDIR.value, ldm_base.get_config('base'), params_fn=merge)
  if loras:
    workdir_lib.save_frozen(os.path.abspath(_WORKDIR.value), LORA_RECORD, lora_lib.stack(trees, [s for _, s in loras]))
  unet = config.model.unet
  merged = f', {len(loras)} LoRA(s) merged' if loras else ''
  print(
    f'imported {path} into {_WORKDIR.value}: U-Net {tuple(unet.block_out_channels)}, '
    f'{config.data.image_size} px, prediction {config.diffusion.prediction_type}, '
    f'latent scale {config.model.vae.scaling_factor:g}{merged}',
    flush=True,
  )


def _export_lora(directory: str) -> None:
  from diffusion import interop
  from diffusion.generation import workdir_lora

  if os.path.isdir(directory) and os.listdir(directory):
    raise UserError(f'export directory {directory!r} is not empty')
  written = interop.save_lora(directory, workdir_lora(_WORKDIR.value))
  print(f'exported the LoRA of {_WORKDIR.value} to {written}', flush=True)


@user_errors_exit
def main(argv: list[str]) -> None:
  command, path = cli.parse_flags(argv, config_flag=None, commands=COMMANDS, required=('workdir',), doc=__doc__)
  cli.require(command == 'export' or (_STEP.value is None and not _RAW.value), '--step and --raw_params are for export')
  cli.require(command == 'import' or not _LORA.value, '--lora is for import')
  loras = [cli.adapter_and_scale(value, 'lora') for value in _LORA.value]
  for file, _ in loras:
    cli.require(os.path.exists(file), f'--lora {file!r} does not exist')
  if command == 'import':
    _import(path, loras)
    return
  if not os.path.isdir(_WORKDIR.value):
    raise UserError(f'workdir {_WORKDIR.value!r} does not exist')
  if command == 'export-lora':
    _export_lora(path)
    return
  from diffusion.training import pipeline_io

  warnings = pipeline_io.export_pipeline(_WORKDIR.value, path, step=_STEP.value, use_ema=not _RAW.value)
  for warning in warnings:
    print(f'warning: {warning}', file=sys.stderr, flush=True)
  print(f'exported {_WORKDIR.value} to {path}', flush=True)


if __name__ == '__main__':
  main(sys.argv)
