r"""Ablation of the VAE loss on the shapes data: the tiny VAE trained the same number of steps with L1 + KL,
+ LPIPS, + LPIPS + PatchGAN; held-out PSNR, SSIM, LPIPS and rFID of each. Writes docs/results/vae_loss_ablation.json.

  python scripts/ablate_vae_losses.py [--steps 1000] [--num_eval 128] [--root DIR] [--disc_channels 16]
      [--lpips_net vgg|alex] [--vgg_weights F --lpips_weights F] [--inception_weights F] [--record OUT.json]

Without weight files the LPIPS network (training loss and metric) and the Inception network (rFID; BatchNorm
calibrated on the held-out images) have random weights, and the record says so: such LPIPS / rFID values rank the
variants on this data only, they are not comparable with published numbers. PSNR and SSIM need no weights.

The PatchGAN has taming's 3 layers and `--disc_channels` base channels (16: about the tiny VAE's own size; taming's 64,
sized for 256-px images and SD's 84M-param VAE, makes a CPU step of the GAN variant ~10x slower than the +LPIPS
variant's); it starts half-way (`loss.disc_start` = steps / 2). Each variant's workdir is `--root`/<variant>: a rerun
resumes a stopped variant and re-scores finished ones; a variant that stopped short of `--steps` (preempted) is an
error, and nothing is recorded.
"""

import argparse
import os
import tempfile

from diffusion import results
from diffusion.errors import UserError, user_errors_exit

VARIANTS = {
  'l1_kl': {},
  'l1_kl_lpips': {'perceptual_weight': 1.0},
  'l1_kl_lpips_gan': {'perceptual_weight': 1.0, 'adversarial_weight': 0.5},
}


def _config(args, data_dir: str, loss: dict):
  from configs import vae_base  # pylint: disable=import-outside-toplevel

  config = vae_base.get_config('tiny')
  config.data.data_dir = data_dir
  config.data.shapes.num_eval = args.num_eval
  config.train.num_steps = args.steps
  config.train.sample_every = 0
  config.train.eval_every = 0
  config.wandb.mode = 'disabled'
  config.loss.vgg_weights, config.loss.lpips_weights = args.vgg_weights, args.lpips_weights
  config.loss.lpips_net = args.lpips_net
  config.loss.disc_start = args.steps // 2  # Reconstruction-only first, as LDM does.
  config.model.disc.channels = args.disc_channels
  for key, value in loss.items():
    config.loss[key] = value
  return config


def _evals(args):
  import ml_collections  # pylint: disable=import-outside-toplevel

  options = {'vgg_weights': args.vgg_weights, 'lpips_weights': args.lpips_weights, 'lpips_net': args.lpips_net}
  options['inception_weights'] = args.inception_weights
  entry = {'num_samples': args.num_eval, 'batch_size': 32, **{k: v for k, v in options.items() if v}}
  return ml_collections.ConfigDict({m: {'type': m, **entry} for m in ('psnr', 'ssim', 'lpips', 'rfid')})


@user_errors_exit
def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--num_eval', type=int, default=128)
  parser.add_argument('--root', default='')
  parser.add_argument('--vgg_weights', default='random')
  parser.add_argument('--lpips_weights', default='random')
  parser.add_argument('--inception_weights', default='')
  parser.add_argument('--lpips_net', default='vgg', choices=('vgg', 'alex'), help='LPIPS backbone (loss and metric).')
  parser.add_argument('--disc_channels', type=int, default=16, help="The PatchGAN's base channels (taming: 64).")
  parser.add_argument('--record', default='', help='Where to write the record (default docs/results/...).')
  args = parser.parse_args()
  from diffusion.evaluation import EvalSuite, parse_evals  # pylint: disable=import-outside-toplevel
  from diffusion.interop import lpips as lpips_weights  # pylint: disable=import-outside-toplevel
  from diffusion.pipeline import AutoencoderPipeline  # pylint: disable=import-outside-toplevel
  from diffusion.training import train_and_evaluate  # pylint: disable=import-outside-toplevel

  root = args.root or tempfile.mkdtemp(prefix='vae_ablation_')
  data_dir = os.path.join(root, 'tfds')
  rows = []
  for name, loss in VARIANTS.items():
    config = _config(args, data_dir, loss)
    workdir = os.path.join(root, name)
    train_and_evaluate(config, workdir)
    pipeline = AutoencoderPipeline.from_workdir(workdir)  # The last step's EMA params.
    if pipeline.step != args.steps:
      raise UserError(
        f'variant {name} stopped at step {pipeline.step} of {args.steps} (preempted?): nothing recorded; rerun the '
        'same command to resume it'
      )
    with pipeline.config.unlocked():
      pipeline.config.evals = _evals(args)
    scores = EvalSuite(parse_evals(pipeline.config), pipeline.config, workdir, pipeline).evaluate(None)
    row = {'variant': name, 'steps': pipeline.step, **scores}
    print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()), flush=True)
    rows.append(row)
  weights = {
    'lpips': lpips_weights.describe(args.vgg_weights, args.lpips_weights, args.lpips_net),
    'inception': args.inception_weights or 'random, BatchNorm calibrated on up to 64 held-out images',
  }
  gan = {'num_layers': config.model.disc.num_layers, 'channels': args.disc_channels, 'disc_start': args.steps // 2}
  record = {'rows': rows, 'weights': weights, 'num_eval': args.num_eval, 'lpips_net': args.lpips_net, 'disc': gan}
  results.write_record('vae_loss_ablation', record, path=args.record or None)


if __name__ == '__main__':
  main()
