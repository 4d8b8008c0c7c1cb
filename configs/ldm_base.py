r"""Stage 2: text-conditioned latent diffusion on top of a trained VAE.

Presets:
  base: an SD-1.x-like U-Net (~860M parameters) at 256 px with an f8 VAE and a CLIP-L-sized text transformer,
        on a TFDS image-text dataset (accelerators).
  tiny: a ~1.1M-parameter U-Net on 8x8x4 latents of the embedded shapes dataset (the CPU quickstart).
  sd15: fine-tunes an imported SD 1.x pipeline (512 px, frozen CLIP ViT-L text encoder, remat on):
        python scripts/convert.py import PIPELINE_DIR --workdir W
        python train.py --config configs/ldm_base.py:sd15 --workdir W --config.data.name=...
  dreambooth: DreamBooth (docs/lora.md) on a trained stage-2 workdir BASE, as a LoRA (the default; the model,
        tokenizer and process are BASE's) or fully (--config.lora.rank=0 --config.init_from=BASE instead of
        base_workdir), with prior preservation: BASE draws num_class_images images for the class prompts once.
        python train.py --config configs/ldm_base.py:dreambooth --workdir W --config.base_workdir=BASE \
            --config.dreambooth.instance_dir=DIR --config.dreambooth.instance_prompt='a photo of sks dog' \
            --config.dreambooth.class_prompts="('a photo of a dog',)" --config.dreambooth.num_class_images=200
        make demo-lora teaches the shapes demo's model a new shape this way (a new word, 'cross').

  python train.py --config configs/vae_base.py:tiny --workdir workdirs/vae_tiny
  python train.py --config configs/ldm_base.py:tiny --workdir workdirs/ldm_tiny \
      --config.vae_workdir=workdirs/vae_tiny
"""

import ml_collections

from configs import common


def get_unet_config() -> ml_collections.ConfigDict:
  """SD 1.x's UNet2DConditionModel; field names as diffusers'."""
  unet = ml_collections.ConfigDict()
  unet.sample_size = 32
  unet.in_channels = 4
  unet.out_channels = 4
  unet.block_out_channels = (320, 640, 1280, 1280)
  # Fields diffusers accepts as an int or a per-level tuple take either here too.
  unet.layers_per_block = ml_collections.FieldReference(2, field_type=object)
  unet.down_block_types = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D')
  unet.up_block_types = ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')
  unet.mid_block_type = 'UNetMidBlock2DCrossAttn'
  unet.attention_head_dim = ml_collections.FieldReference(8, field_type=object)
  unet.num_attention_heads = ml_collections.FieldReference(None, field_type=object)
  unet.cross_attention_dim = 768
  unet.transformer_layers_per_block = ml_collections.FieldReference(1, field_type=object)
  unet.use_linear_projection = False
  unet.flip_sin_to_cos = True
  unet.freq_shift = 0
  unet.norm_num_groups = 32
  unet.norm_eps = 1e-5
  unet.act_fn = 'silu'
  unet.dtype = 'float32'
  unet.remat = False  # Recompute each resnet / transformer block's activations in the backward pass.
  unet.remat_policy = 'nothing_saveable'  # Or 'dots_saveable', 'dots_with_no_batch_dims_saveable'.
  unet.remat_blocks = 'all'  # With remat: which blocks recompute, 'all' | 'resnet' | 'attention'.
  unet.attention = 'auto'  # Attention implementation: 'auto' | 'xla' | 'cudnn' (NVIDIA GPU) | 'splash' (TPU).
  return unet


def get_text_config() -> ml_collections.ConfigDict:
  """A text transformer with CLIPTextModel's architecture; field names as transformers' CLIPTextConfig."""
  text = ml_collections.ConfigDict()
  text.type = 'transformer'  # Trained from scratch with the U-Net.
  text.tokenizer = ''  # '' builds a word-level tokenizer from the dataset vocabulary; else a path or hub id.
  text.vocab_size = -1  # Set from the tokenizer at the start of training.
  text.hidden_size = 768
  text.intermediate_size = 3072
  text.num_hidden_layers = 12
  text.num_attention_heads = 12
  text.max_position_embeddings = 77
  text.hidden_act = 'quick_gelu'
  text.layer_norm_eps = 1e-5
  text.eos_token_id = 2
  text.projection_dim = ml_collections.FieldReference(None, field_type=int)
  text.trainable = True
  text.dtype = 'float32'
  text.attention = 'auto'  # 'auto' | 'xla' | 'cudnn' | 'splash', as model.unet.attention.
  return text


def get_diffusion_config() -> ml_collections.ConfigDict:
  """The process and the objective (see diffusion/process.py and diffusion/losses.py).

  Flow matching instead of v-prediction: prediction_type='flow', schedule='flow', sample.sampler='flow_euler'.
  """
  diffusion = ml_collections.ConfigDict()
  diffusion.prediction_type = 'eps'  # 'eps' | 'x0' | 'v' | 'flow' (rectified-flow velocity; schedule 'flow')
  diffusion.schedule = 'scaled_linear'  # 'linear' | 'scaled_linear' | 'cosine' | 'edm' | 'flow'
  diffusion.num_train_timesteps = 1000
  diffusion.beta_start = 0.00085
  diffusion.beta_end = 0.012
  diffusion.rescale_zero_terminal_snr = False
  diffusion.loss_weighting = 'uniform'  # 'uniform' | 'min_snr' | 'edm' | 'v_loss'
  diffusion.min_snr_gamma = 5.0
  diffusion.offset_noise = 0.0
  diffusion.caption_dropout = 0.1  # Probability of training on the empty prompt (classifier-free guidance).
  # schedule='edm': VE noise levels log-linear in t over [sigma_min, sigma_max]; training ln(sigma) ~ N(p_mean, p_std).
  diffusion.edm_sigma_min = 0.002
  diffusion.edm_sigma_max = 80.0
  diffusion.edm_p_mean = -1.2
  diffusion.edm_p_std = 1.2
  diffusion.edm_sigma_data = 0.5  # loss_weighting='edm': lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.
  # schedule='flow': x_t = (1 - s) x0 + s eps, s = t / T drawn uniformly or logit-normally, then shifted (SD3).
  diffusion.flow_t_sampling = 'uniform'  # 'uniform' | 'logit_normal'
  diffusion.flow_logit_mean = 0.0
  diffusion.flow_logit_std = 1.0
  diffusion.flow_shift = 1.0  # Also shifts the flow samplers' levels.
  return diffusion


def get_sample_config() -> ml_collections.ConfigDict:
  sample = ml_collections.ConfigDict()
  sample.sampler = 'ddim'  # ddpm ddim euler euler_a heun dpmpp_2m dpmpp_2m_sde lcm | flow_euler flow_heun
  sample.num_steps = 50
  sample.guidance_scale = 7.5
  sample.guidance_rescale = 0.0  # phi of Lin et al. 2023 (0.7 with zero terminal SNR).
  sample.guidance_interval = (0.0, 1.0)  # Guide only for t / T in [lo, hi] (Kynkaanniemi et al. 2024).
  sample.eta = 0.0  # ddim only.
  sample.timestep_spacing = ''  # '' (the sampler's default) | 'leading' | 'trailing' | 'linspace'
  sample.karras = False  # Karras noise levels (euler, euler_a, heun, dpmpp_*, flow_*).
  sample.s_churn = 0.0  # heun only: EDM's stochastic churn.
  sample.negative_prompt = ''
  sample.prompts = ('a red circle', 'a blue square', 'a green triangle', 'a yellow circle')
  sample.num_images_per_prompt = 2
  sample.use_ema = True
  return sample


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or 'base'
  config = ml_collections.ConfigDict()
  config.model_type = 'ldm'
  config.preset = preset
  config.seed = 0
  config.vae_workdir = ''  # Where stage 2 takes the frozen VAE from; its params are copied into this workdir.
  config.base_workdir = ''  # A frozen base this run trains on top of (LoRA, ControlNet, a distillation teacher).
  config.init_from = ''  # A workdir whose params the trainable params start from (fine-tuning, a student).
  config.data = common.get_data_config(image_size=256)
  config.data.name = 'coco_captions'
  config.data.caption_key = 'captions/text'
  config.data.max_text_length = 77
  config.model = ml_collections.ConfigDict()
  config.model.vae = common.get_vae_model_config()  # Replaced by the VAE workdir's model config at start.
  config.model.unet = get_unet_config()
  config.model.text = get_text_config()
  config.model.text.tokenizer = 'openai/clip-vit-large-patch14'
  config.model.text.eos_token_id = -1  # CLIP BPE: pool at argmax(input_ids).
  config.diffusion = get_diffusion_config()
  config.sample = get_sample_config()
  config.sample.prompts = ('a photo of a dog', 'a red bus on a street', 'a bowl of fruit', 'a city at night')
  config.train = common.get_train_config()
  config.optim = common.get_optim_config()
  config.mesh = common.get_mesh_config()
  config.distributed = common.get_distributed_config()
  config.wandb = common.get_wandb_config('ldm-jax')
  config.lora = common.get_lora_config()  # Off (rank 0); see diffusion/lora.py.
  config.dreambooth = common.get_dreambooth_config()  # Off ('' instance_dir); see diffusion/data/dreambooth.py.
  # Evaluators of generated samples, run during training and by eval/run.py (keys: diffusion/evaluation/spec.py):
  # each is a metric (type: fid | oracle | clip) on num_samples images, with optional sampling overrides
  # (guidance_scale, num_steps, sampler, seed) and metric options (inception_weights, clip_model, split, ...).
  config.evals = ml_collections.ConfigDict()

  if preset == 'base':
    pass
  elif preset == 'tiny':
    config.data = common.get_data_config(image_size=32)
    config.data.shapes.max_objects = 1
    config.model.vae = common.get_tiny_vae_model_config()
    unet = config.model.unet
    unet.sample_size = 8
    unet.block_out_channels = (32, 64)
    unet.layers_per_block = 1
    unet.down_block_types = ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D')
    unet.up_block_types = ('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D')
    unet.attention_head_dim = 4
    unet.cross_attention_dim = 64
    unet.norm_num_groups = 8
    text = config.model.text
    text.tokenizer = ''
    text.hidden_size = 64
    text.intermediate_size = 128
    text.num_hidden_layers = 2
    text.num_attention_heads = 4
    text.max_position_embeddings = 16
    text.eos_token_id = 2
    # v-prediction with min-SNR-5 weighting at lr 2e-3 learns the colour-shape binding in 2000 steps (eps with
    # uniform weighting at lr 1e-3 needed 3000; README, "Quickstart").
    config.diffusion.prediction_type = 'v'
    config.diffusion.loss_weighting = 'min_snr'
    config.train.num_steps = 2000
    config.train.batch_size = 64
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.sample_every = 1000
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 200
    config.optim.weight_decay = 0.0
    config.optim.ema_decay = 0.999
    config.sample.num_steps = 25
    config.sample.guidance_scale = 3.0
    config.sample.prompts = ('a red circle', 'a blue square', 'a green triangle', 'a yellow circle')
    # At the last step: caption accuracy of 144 samples (prompts: training captions), read by the shapes oracle.
    config.evals.oracle = ml_collections.ConfigDict(
      {'type': 'oracle', 'every': 0, 'num_samples': 144, 'batch_size': 48}
    )
  elif preset == 'sd15':
    config.data.image_size = 512
    config.model.unet.sample_size = 64
    config.model.unet.remat = True
    config.model.text.type = 'clip'  # Pretrained weights come from the workdir (scripts/convert.py import).
    config.model.text.trainable = False
    config.optim.lr = 1e-5
    config.optim.warmup_steps = 500
    config.optim.weight_decay = 0.0  # Also keeps the frozen text encoder exactly as imported.
    config.optim.ema_decay = 0.9999
  elif preset == 'dreambooth':
    # Sized for small models (the shapes demo's). A LoRA run trains with its base's model, tokenizer, process and
    # image size; the tiny sections here only keep the config valid on its own.
    config = get_config('tiny')
    config.preset = preset
    config.evals = ml_collections.ConfigDict()
    # Rank 4 on the attention projections and (LoCon) the res-block convolutions of the U-Net, and on the text
    # encoder's projections: on the shapes demo a new shape needs the convolutions (attention alone, at rank 8, drew
    # far fewer recognisable crosses in the same time).
    config.lora.rank = 4
    config.lora.alpha = 4.0
    config.lora.targets = ('to_q', 'to_k', 'to_v', 'to_out_0', r'resnets_\d+/conv[12]')
    config.lora.text_encoder = True
    config.dreambooth.num_class_images = 144
    config.train.num_steps = 800
    config.train.batch_size = 32
    config.train.log_every = 50
    config.train.eval_every = 0
    config.train.checkpoint_every = 200
    config.train.sample_every = 0
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.lr_schedule = 'constant'
    config.optim.weight_decay = 0.0
    config.optim.ema_decay = 0.99
    return config
  else:
    raise ValueError(f'unknown preset {preset!r} for configs/ldm_base.py; known: base, tiny, sd15, dreambooth')
  config.model.vae.attention = 'auto'  # 'auto' | 'xla' | 'cudnn' | 'splash', as model.unet.attention.
  # '' encodes images with the frozen VAE every step; a directory written by scripts/precompute_latents.py trains
  # from its stored posteriors instead (same losses, no encoder pass).
  config.data.latent_cache = ''
  # Streamed sources (data.name = 'webdataset' | 'parquet', docs/data.md): shard patterns of the training and eval
  # splits ('' eval: the training shards), samples in the shuffle window, shards read at once (a thread each).
  config.data.webdataset = ml_collections.ConfigDict(dict(urls='', eval_urls='', shuffle_buffer=1000, cycle_length=8))
  config.data.parquet = ml_collections.ConfigDict(
    dict(files='', eval_files='', image_column='image', caption_column='text', shuffle_buffer=1000, cycle_length=8)
  )
  config.train.frozen_param_dtype = 'float32'  # 'bfloat16': frozen VAE / text encoder params in bf16 (half memory).
  return config
