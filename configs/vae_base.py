r"""Stage 1: train the AutoencoderKL (VAE) that maps images to latents.

Presets:
  base: the SD 1.x/2.x f8 VAE at 256 px on a TFDS image-text dataset (accelerators).
  tiny: a ~0.24M-parameter f4 VAE on the embedded shapes dataset at 32 px (the CPU quickstart).

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
  config.loss.adversarial_weight = 0.0  # Not implemented yet: must stay 0 (a nonzero value is refused at load).
  config.train = common.get_train_config()
  config.optim = common.get_optim_config()
  config.optim.lr = 4.5e-6 * 8  # LDM's base lr scaled for batch 8 per accelerator.
  config.optim.weight_decay = 0.0
  config.mesh = common.get_mesh_config()
  config.distributed = common.get_distributed_config()
  config.wandb = common.get_wandb_config('ldm-jax-vae')

  if preset == 'base':
    config.loss.perceptual_weight = 1.0  # SD's f8 VAE (LDM's kl-f8 config): KL 1e-6, LPIPS 1.0.
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
  else:
    raise ValueError(f'unknown preset {preset!r} for configs/vae_base.py; known: base, tiny')
  # Streamed sources (data.name = 'webdataset' | 'parquet', docs/data.md): shard patterns of the training and eval
  # splits ('' eval: the training shards), samples in the shuffle window, shards read at once (a thread each).
  config.data.webdataset = ml_collections.ConfigDict(dict(urls='', eval_urls='', shuffle_buffer=1000, cycle_length=8))
  config.data.parquet = ml_collections.ConfigDict(
    dict(files='', eval_files='', image_column='image', caption_column='text', shuffle_buffer=1000, cycle_length=8)
  )
  config.model.vae.attention = 'auto'  # Attention: 'auto' | 'xla' | 'cudnn' (NVIDIA GPU) | 'splash' (TPU).
  return config
