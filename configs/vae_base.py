r"""Stage 1: train the AutoencoderKL (VAE) that maps images to latents.

Presets:
  base: the SD 1.x/2.x f8 VAE at 256 px on a TFDS image-text dataset (accelerators).
  tiny: a ~0.24M-parameter f4 VAE on the embedded shapes dataset at 32 px (the CPU quickstart).
  sd_decoder_ft: decoder-only fine-tuning of an imported SD VAE (`init_from`), encoder frozen (SD's ft-MSE).

  python train.py --config configs/vae_base.py:tiny --workdir workdirs/vae_tiny
  python train.py --config configs/vae_base.py --workdir gs://bucket/vae --config.train.batch_size=128
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or 'base'
  config = ml_collections.ConfigDict()
  config.model_type = 'vae'
  config.preset = preset
  config.seed = 0
  config.base_workdir = ''  # A frozen base this run trains on top of (LoRA, ControlNet, a distillation teacher).
  config.init_from = ''  # A workdir whose params the trainable params start from (fine-tuning, a student).
  config.data = common.get_data_config(image_size=256)
  config.data.name = 'coco_captions'
  config.data.caption_key = 'captions/text'
  config.data.random_flip = True
  config.model = ml_collections.ConfigDict()
  config.model.vae = common.get_vae_model_config()
  config.model.disc = ml_collections.ConfigDict(dict(num_layers=3, channels=64))  # taming's NLayerDiscriminator.
  config.loss = ml_collections.ConfigDict()
  config.loss.rec_loss = 'l1'  # 'l1' | 'l2'
  config.loss.kl_weight = 1e-6
  # LPIPS on (input, reconstruction), added at every pixel as in taming's LPIPSWithDiscriminator (0: off).
  config.loss.perceptual_weight = 0.0
  config.loss.lpips_net = 'vgg'  # LPIPS backbone: 'vgg' | 'alex'.
  # The backbone's torchvision state dict ('': torch hub's cache, ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth)
  # and the lpips package's linear heads ('': the installed package's weights/v0.1/<net>.pth); 'random' for either is
  # the explicit, labelled choice of random weights (tests, CPU demos).
  config.loss.vgg_weights = ''
  config.loss.lpips_weights = ''
  # The PatchGAN term (taming's disc_weight; 0: off, no discriminator): adaptively weighted (lambda on the decoder's
  # last layer), from step disc_start on, 'hinge' | 'vanilla' discriminator loss.
  config.loss.adversarial_weight = 0.0
  config.loss.disc_start = 0
  config.loss.disc_loss = 'hinge'
  config.loss.logvar_init = 0.0  # The NLL's log-variance (taming's logvar_init) ...
  config.loss.learn_logvar = False  # ... trained with the discriminator's optimizer when True (LDM keeps it fixed).
  config.train = common.get_train_config()
  config.train.freeze_encoder = False  # True: train the decoder only (encoder + quant_conv get no update).
  config.optim = common.get_optim_config()
  config.optim.lr = 4.5e-6 * 8  # LDM's base lr scaled for batch 8 per accelerator.
  config.optim.weight_decay = 0.0
  config.mesh = common.get_mesh_config()
  config.distributed = common.get_distributed_config()
  config.wandb = common.get_wandb_config('ldm-jax-vae')
  # Reconstruction evaluators (diffusion.evaluation.spec), e.g. config.evals.recon = ConfigDict(dict(type='psnr',
  # every=1000, num_samples=1000)) -> eval/recon/psnr; psnr, ssim, lpips (loss.* LPIPS weights by default), rfid.
  # (eval/psnr, eval/l1, eval/lpips are train.eval_every's batch metrics: name evaluators otherwise.)
  config.evals = ml_collections.ConfigDict()

  if preset == 'base':
    # SD's f8 VAE (LDM's kl-f8 config): KL 1e-6, LPIPS 1.0, discriminator weight 0.5 from step 50001.
    config.loss.perceptual_weight = 1.0
    config.loss.adversarial_weight = 0.5
    config.loss.disc_start = 50001
  elif preset == 'tiny':
    config.data = common.get_data_config(image_size=32)
    config.data.shapes.max_objects = 1
    config.model.vae = common.get_tiny_vae_model_config()
    config.train.num_steps = 1000
    config.train.batch_size = 32
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.sample_every = 1000
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.99
  elif preset == 'sd_decoder_ft':
    # SD's ft-MSE decoder fine-tuning of an imported VAE (scripts/convert.py import, then --config.init_from=W): the
    # encoder is frozen, so the latent space and every LDM trained on it stay valid; MSE + 0.1 LPIPS, EMA weights.
    # (The model card names no adversarial term for ft-MSE: set loss.adversarial_weight to add one.)
    config.train.freeze_encoder = True
    config.loss.rec_loss = 'l2'
    config.loss.perceptual_weight = 0.1
    config.optim.ema_decay = 0.9999
  else:
    raise ValueError(f'unknown preset {preset!r} for configs/vae_base.py; known: base, tiny, sd_decoder_ft')
  # Streamed sources (data.name = 'webdataset' | 'parquet', docs/data.md): shard patterns of the training and eval
  # splits ('' eval: the training shards), samples in the shuffle window, shards read at once (a thread each).
  config.data.webdataset = ml_collections.ConfigDict(dict(urls='', eval_urls='', shuffle_buffer=1000, cycle_length=8))
  config.data.parquet = ml_collections.ConfigDict(
    dict(files='', eval_files='', image_column='image', caption_column='text', shuffle_buffer=1000, cycle_length=8)
  )
  config.model.vae.attention = 'auto'  # Attention: 'auto' | 'xla' | 'cudnn' (NVIDIA GPU) | 'splash' (TPU).
  return config
