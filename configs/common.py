"""Config sections shared by both training stages.

Every field here is part of the stable config surface: tools outside the repository override them with
`--config.a.b=value`, so rename nothing without keeping the old spelling working.
"""

import ml_collections

from diffusion import parallel


def get_data_config(image_size: int = 32) -> ml_collections.ConfigDict:
  """Input pipeline settings (see diffusion/data/pipeline.py)."""
  data = ml_collections.ConfigDict()
  data.name = 'shapes'  # 'shapes' (embedded), 'folder', or any TFDS dataset prepared in ArrayRecord format.
  data.data_dir = ''  # '' = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  data.image_size = image_size
  data.image_key = 'image'
  data.caption_key = 'caption'
  data.train_split = 'train'
  data.eval_split = 'validation'
  data.random_crop = False
  data.random_flip = False  # Off by default: flipping breaks "left of" captions.
  data.max_text_length = 16
  data.worker_count = 0
  data.shapes = ml_collections.ConfigDict(dict(max_objects=2, num_train=20000, num_eval=1000))
  data.folder = ml_collections.ConfigDict(dict(path='', captions_file=''))
  return data


def get_train_config() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.num_steps = 100_000
  train.batch_size = 256  # Global batch, over all hosts and devices.
  train.log_every = 50
  train.eval_every = 1000
  train.eval_batches = 4
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.sample_every = 5000
  train.max_bad_steps = 10
  train.grad_accum_steps = 1  # Micro-batches per step (batch_size stays the global batch).
  train.compute_dtype = ''  # '' (each model.*.dtype) | 'float32' | 'bfloat16': activations; params stay float32.
  return train


def get_lora_config() -> ml_collections.ConfigDict:
  """LoRA of a stage-2 model (diffusion/lora.py); rank 0 = off (the validator owning it: diffusion.lora)."""
  lora = ml_collections.ConfigDict()
  lora.rank = 0  # > 0: trains LoRA factors on the frozen config.base_workdir (diffusion/training/lora_task.py).
  lora.alpha = 1.0  # The update is (alpha / rank) * B A.
  lora.dropout = 0.0  # In [0, 1): dropout of each adapted module's LoRA-branch input, in training only (peft's).
  lora.targets = ('to_q', 'to_k', 'to_v', 'to_out_0')  # Module-path patterns (diffusers/peft's SD U-Net set).
  lora.text_encoder = False  # Also the CLIP q_proj, k_proj, v_proj, out_proj.
  return lora


def get_dreambooth_config() -> ml_collections.ConfigDict:
  """DreamBooth on a trained stage-2 model (rules: diffusion/data/dreambooth.py); off while instance_dir is ''."""
  dreambooth = ml_collections.ConfigDict()
  dreambooth.instance_dir = ''  # Instance images (with a metadata.jsonl / .csv captions file, or plain images).
  dreambooth.instance_prompt = ''  # '' = the folder's captions; else every instance image's caption.
  dreambooth.class_prompts = ()  # Prior preservation: what the base draws num_class_images images for (once).
  dreambooth.class_prompts_file = ''  # More class prompts, one per line (a prompts file as sample.py reads).
  dreambooth.num_class_images = 0
  dreambooth.prior_loss_weight = 1.0
  dreambooth.new_words = ()  # Words new to the base's tokenizer (a word-level tokenizer's spare slots).
  return dreambooth


def get_optim_config() -> ml_collections.ConfigDict:
  optim = ml_collections.ConfigDict()
  optim.lr = 1e-4
  optim.warmup_steps = 1000
  optim.lr_schedule = 'cosine'  # 'cosine' | 'constant'
  optim.end_lr_factor = 0.1
  optim.weight_decay = 0.01
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip = 1.0
  optim.ema_decay = 0.9999
  return optim


def get_mesh_config() -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1 takes the devices the other axes leave.
  mesh.fsdp = 1
  mesh.tensor = 1
  # Across-slice (DCN) degrees of the data / fsdp axes on multi-slice pods; 1 = one slice (or no pod).
  mesh.dcn_data = 1
  mesh.dcn_fsdp = 1
  # Logical axis -> mesh axis (None: replicated); see diffusion/parallel.py for the logical axes of each param.
  mesh.rules = parallel.DEFAULT_RULES
  mesh.min_shard_size = 2**14  # Params with fewer elements stay replicated.
  return mesh


def get_distributed_config() -> ml_collections.ConfigDict:
  """Multi-process start-up (diffusion.parallel.initialize_distributed)."""
  distributed = ml_collections.ConfigDict()
  distributed.initialize = 'auto'  # 'auto': when a cluster launch is detected | 'yes' | 'no'.
  distributed.coordinator_address = ''  # 'host:port' of process 0; '' = from the cluster environment.
  distributed.num_processes = -1
  distributed.process_id = -1
  return distributed


def get_wandb_config(project: str) -> ml_collections.ConfigDict:
  wandb = ml_collections.ConfigDict()
  wandb.mode = 'offline'  # 'online' | 'offline' | 'disabled'
  wandb.project = project
  wandb.entity = ''
  wandb.name = ''
  wandb.group = ''
  wandb.tags = ''  # Comma-separated.
  return wandb


def get_vae_model_config() -> ml_collections.ConfigDict:
  """The SD 1.x/2.x f8 AutoencoderKL; field names as diffusers' `AutoencoderKL`."""
  vae = ml_collections.ConfigDict()
  vae.in_channels = 3
  vae.out_channels = 3
  vae.block_out_channels = (128, 256, 512, 512)
  vae.layers_per_block = 2
  vae.latent_channels = 4
  vae.norm_num_groups = 32
  vae.act_fn = 'silu'
  vae.mid_block_add_attention = True
  vae.scaling_factor = -1.0  # -1: computed from data at the start of stage 2 (as LDM does) and stored.
  vae.dtype = 'float32'
  return vae


def get_tiny_vae_model_config() -> ml_collections.ConfigDict:
  """A ~0.24M-parameter f4 autoencoder: 32 px images -> 8x8x4 latents."""
  vae = get_vae_model_config()
  vae.block_out_channels = (16, 32, 32)
  vae.layers_per_block = 1
  vae.norm_num_groups = 8
  return vae
