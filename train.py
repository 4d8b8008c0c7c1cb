r"""Trains a model described by a config file: the VAE (stage 1) or the latent diffusion model (stage 2).

  python train.py --config configs/vae_base.py:tiny --workdir workdirs/vae
  python train.py --config configs/ldm_base.py:tiny --workdir workdirs/ldm --config.vae_workdir=workdirs/vae

Any config field can be overridden, e.g. `--config.optim.lr=3e-4 --config.train.num_steps=2000`. Rerunning the same
command resumes from the last checkpoint in the workdir.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from diffusion import cli
from diffusion.errors import user_errors_exit

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, optionally with a preset: FILE[:preset].', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  'workdir',
  None,
  'Directory for checkpoints, logs and samples; `{wandb_run_id}` is '
  'replaced by $WANDB_RUN_ID (set by `wandb agent`), one workdir per sweep run.',
)


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, doc=__doc__)
  cli.require(_CONFIG.value is not None, '--config is required, e.g. --config configs/ldm_base.py:tiny')
  cli.require(bool(_WORKDIR.value), '--workdir is required')
  workdir = _WORKDIR.value
  if '{wandb_run_id}' in workdir:
    cli.require(bool(os.environ.get('WANDB_RUN_ID')), '--workdir uses {wandb_run_id} but WANDB_RUN_ID is not set')
    workdir = workdir.replace('{wandb_run_id}', os.environ['WANDB_RUN_ID'])
  from diffusion import parallel, training  # Imported after flag checks: a usage error should not wait for JAX.

  parallel.initialize_distributed(_CONFIG.value.get('distributed'))  # Multi-host launches; else a no-op.

  try:
    training.train_and_evaluate(_CONFIG.value, workdir)
  except FloatingPointError as e:  # The NaN guard gave up: a clear message, not a traceback.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  main(sys.argv)
