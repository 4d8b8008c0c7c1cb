"""Config loading helpers and validation, run once before anything is compiled.

`validate_config` checks ranges and the sizes that must agree across sections (image size vs the VAE factor and the
U-Net levels, heads vs channels, text width vs cross-attention width, batch vs data parallelism). Unknown keys and
wrong types are already refused by ml_collections when a `--config.a.b=value` override is parsed. Every error names
the key and what would fix it.
"""

import json
import os
from typing import Any

import ml_collections

from diffusion.errors import ConfigError

MODEL_TYPES = ('vae', 'ldm')
WANDB_MODES = ('online', 'offline', 'disabled')
UNET_DOWN_BLOCKS = ('CrossAttnDownBlock2D', 'DownBlock2D')
UNET_UP_BLOCKS = ('CrossAttnUpBlock2D', 'UpBlock2D')


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(key, message)


def _positive(config: ml_collections.ConfigDict, section: str, *names: str) -> None:
  for name in names:
    value = config[section][name]
    _check(value > 0, f'{section}.{name}', f'must be > 0, got {value!r}')


def _per_level(value: Any, levels: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    _check(len(value) == levels, key, f'has {len(value)} entries but the U-Net has {levels} levels')
    return tuple(value)
  return (value,) * levels


def _validate_train(config: ml_collections.ConfigDict) -> None:
  _positive(config, 'train', 'num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
            'max_bad_steps')
  for name in ('eval_every', 'eval_batches', 'sample_every'):
    _check(config.train[name] >= 0, f'train.{name}', f'must be >= 0 (0 disables), got {config.train[name]!r}')
  optim = config.optim
  _check(0 < optim.lr < float('inf'), 'optim.lr', f'the learning rate must be > 0 and finite, got {optim.lr!r}')
  _check(optim.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {optim.warmup_steps!r}')
  _check(optim.lr_schedule in ('cosine', 'constant'), 'optim.lr_schedule',
         f'unknown schedule {optim.lr_schedule!r}; known: cosine, constant')
  _check(0.0 <= optim.end_lr_factor <= 1.0, 'optim.end_lr_factor', f'must be in [0, 1], got {optim.end_lr_factor!r}')
  _check(0.0 <= optim.ema_decay < 1.0, 'optim.ema_decay', f'must be in [0, 1), got {optim.ema_decay!r}')
  _check(optim.weight_decay >= 0, 'optim.weight_decay', f'must be >= 0, got {optim.weight_decay!r}')
  _check(optim.grad_clip >= 0, 'optim.grad_clip', f'must be >= 0 (0 disables), got {optim.grad_clip!r}')
  for name in ('b1', 'b2'):
    _check(0.0 <= optim[name] < 1.0, f'optim.{name}', f'must be in [0, 1), got {optim[name]!r}')
  _check(config.wandb.mode in WANDB_MODES, 'wandb.mode', f'unknown mode {config.wandb.mode!r}; known: {WANDB_MODES}')
  for axis in ('data', 'fsdp', 'tensor'):
    value = config.mesh[axis]
    _check(value == -1 or value >= 1, f'mesh.{axis}', f'must be >= 1 or -1 (the rest), got {value!r}')
  _validate_scaling(config)


COMPUTE_DTYPES = ('float32', 'bfloat16')
MESH_AXES = ('data', 'fsdp', 'tensor')


def _validate_scaling(config: ml_collections.ConfigDict) -> None:
  """Gradient accumulation, compute dtype, mesh rules and DCN degrees, distributed start-up."""
  train, mesh = config.train, config.mesh
  accum = train.get('grad_accum_steps', 1)
  _check(isinstance(accum, int) and accum >= 1, 'train.grad_accum_steps', f'must be an integer >= 1, got {accum!r}')
  degrees = [mesh[axis] for axis in ('data', 'fsdp')]
  parallel = degrees[0] * degrees[1] if -1 not in degrees else 1  # -1: checked once the device count is known.
  _check(train.batch_size % (accum * parallel) == 0, 'train.batch_size',
         f'{train.batch_size} is not divisible by the data parallelism {parallel} (mesh data x fsdp) times '
         f'train.grad_accum_steps={accum}')
  dtype = train.get('compute_dtype', '')
  _check(dtype in ('',) + COMPUTE_DTYPES, 'train.compute_dtype',
         f'unknown {dtype!r}; known: {", ".join(COMPUTE_DTYPES)} ("" = each model.*.dtype)')
  for name in ('vae', 'unet', 'text'):
    if name in config.get('model', {}) and 'dtype' in config.model[name]:
      value = config.model[name].dtype
      _check(value in COMPUTE_DTYPES + ('float16',), f'model.{name}.dtype', f'unknown {value!r}; known: '
             f'{", ".join(COMPUTE_DTYPES + ("float16",))}')
  for axis in ('data', 'fsdp'):
    dcn = mesh.get(f'dcn_{axis}', 1)
    _check(isinstance(dcn, int) and dcn >= 1, f'mesh.dcn_{axis}', f'must be an integer >= 1, got {dcn!r}')
    _check(mesh[axis] == -1 or mesh[axis] % dcn == 0, f'mesh.dcn_{axis}',
           f'{dcn} slices do not divide mesh.{axis}={mesh[axis]}')
  for rule in mesh.get('rules', ()):
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    targets = () if not ok or rule[1] is None else (rule[1],) if isinstance(rule[1], str) else tuple(rule[1])
    _check(ok and all(t in MESH_AXES for t in targets), 'mesh.rules',
           f'each rule is (logical axis, mesh axis in {MESH_AXES} or None), got {rule!r}')
  _check(mesh.get('min_shard_size', 0) >= 0, 'mesh.min_shard_size', 'must be >= 0')
  if 'distributed' in config:
    mode = config.distributed.initialize
    _check(mode in ('auto', 'yes', 'no'), 'distributed.initialize', f'unknown {mode!r}; known: auto, yes, no')


def _validate_data(config: ml_collections.ConfigDict) -> None:
  _positive(config, 'data', 'image_size', 'max_text_length')
  _check(config.data.worker_count >= 0, 'data.worker_count', 'must be >= 0')
  if config.data.name == 'folder':
    _check(bool(config.data.folder.path), 'data.folder.path', "is empty but data.name is 'folder'")
  cache = config.data.get('latent_cache', '')
  if cache:
    _check(config.get('model_type') == 'ldm', 'data.latent_cache', 'latents are cached for stage 2 (ldm) only')
    _check(not config.data.random_crop, 'data.random_crop',
           'random crops cannot be read from a latent cache (data.latent_cache); set it to False')
    _check(os.path.isdir(cache), 'data.latent_cache', f'{cache!r} is not a directory (make it with '
           'scripts/precompute_latents.py, or set it to "" to encode images on the fly)')
  if config.data.name == 'shapes':
    _check(config.data.shapes.max_objects in (1, 2), 'data.shapes.max_objects', 'must be 1 or 2')
    _check(config.data.shapes.num_train > 0, 'data.shapes.num_train', 'must be > 0')
    _check(config.data.shapes.num_eval > 0, 'data.shapes.num_eval', 'must be > 0')


def _validate_vae(config: ml_collections.ConfigDict) -> int:
  """Checks the VAE section; returns its downsampling factor."""
  vae = config.model.vae
  if config.model_type == 'vae':
    from diffusion import losses

    loss = config.loss
    _check(loss.rec_loss in ('l1', 'l2'), 'loss.rec_loss', f'unknown {loss.rec_loss!r}; known: l1, l2')
    _check(loss.kl_weight >= 0, 'loss.kl_weight', f'must be >= 0, got {loss.kl_weight!r}')
    for name in ('perceptual', 'adversarial'):
      weight = loss[f'{name}_weight']
      _check(weight >= 0, f'loss.{name}_weight', f'must be >= 0, got {weight!r}')
      _check(weight == 0 or name in losses.available_vae_loss_terms(), f'loss.{name}_weight',
             f'is {weight} but no {name!r} VAE loss term is registered (losses.register_vae_loss_term)')
  channels = tuple(vae.block_out_channels)
  _check(len(channels) >= 1, 'model.vae.block_out_channels', 'needs at least one level')
  for c in channels:
    _check(isinstance(c, int) and c > 0 and c % vae.norm_num_groups == 0, 'model.vae.block_out_channels',
           f'every entry must be a positive multiple of model.vae.norm_num_groups={vae.norm_num_groups}, got {channels}')
  _check(vae.layers_per_block >= 1, 'model.vae.layers_per_block', 'must be >= 1')
  _check(vae.latent_channels >= 1, 'model.vae.latent_channels', 'must be >= 1')
  factor = 2 ** (len(channels) - 1)
  size = config.data.image_size
  _check(size % factor == 0, 'data.image_size',
         f'{size} is not divisible by the VAE downsampling factor {factor} (2 ** (len(model.vae.block_out_channels) - 1))')
  return factor


def _validate_unet(config: ml_collections.ConfigDict, vae_factor: int) -> None:
  unet, text = config.model.unet, config.model.text
  channels = tuple(unet.block_out_channels)
  levels = len(channels)
  _check(levels >= 1, 'model.unet.block_out_channels', 'needs at least one level')
  _check(len(unet.down_block_types) == levels, 'model.unet.down_block_types',
         f'has {len(unet.down_block_types)} entries, model.unet.block_out_channels has {levels}')
  _check(len(unet.up_block_types) == levels, 'model.unet.up_block_types',
         f'has {len(unet.up_block_types)} entries, model.unet.block_out_channels has {levels}')
  for t in unet.down_block_types:
    _check(t in UNET_DOWN_BLOCKS, 'model.unet.down_block_types', f'unknown block {t!r}; known: {UNET_DOWN_BLOCKS}')
  for t in unet.up_block_types:
    _check(t in UNET_UP_BLOCKS, 'model.unet.up_block_types', f'unknown block {t!r}; known: {UNET_UP_BLOCKS}')
  for c in channels:
    _check(isinstance(c, int) and c > 0 and c % unet.norm_num_groups == 0, 'model.unet.block_out_channels',
           f'every entry must be a positive multiple of model.unet.norm_num_groups={unet.norm_num_groups}, got {channels}')
  heads_key = 'model.unet.num_attention_heads' if unet.num_attention_heads else 'model.unet.attention_head_dim'
  heads = _per_level(unet.num_attention_heads or unet.attention_head_dim, levels, heads_key)
  for c, h in zip(channels, heads):
    _check(h >= 1 and c % h == 0, heads_key, f'{h} heads do not divide {c} channels (model.unet.block_out_channels)')
  for key in ('layers_per_block', 'transformer_layers_per_block'):
    for n in _per_level(unet[key], levels, f'model.unet.{key}'):
      _check(isinstance(n, int) and n >= 1, f'model.unet.{key}', f'entries must be integers >= 1, got {unet[key]!r}')
  _check(unet.in_channels == config.model.vae.latent_channels, 'model.unet.in_channels',
         f'is {unet.in_channels} but the VAE has model.vae.latent_channels={config.model.vae.latent_channels}')
  latent = config.data.image_size // vae_factor
  unet_factor = 2 ** (levels - 1)
  _check(latent % unet_factor == 0, 'data.image_size',
         f'gives {latent}x{latent} latents (VAE factor {vae_factor}), not divisible by the U-Net factor {unet_factor}')
  _check(unet.sample_size == latent, 'model.unet.sample_size',
         f'is {unet.sample_size} but data.image_size / VAE factor = {latent}')
  text_width = text.projection_dim or text.hidden_size
  _check(unet.cross_attention_dim == text_width, 'model.unet.cross_attention_dim',
         f'is {unet.cross_attention_dim} but the text encoder outputs {text_width} (model.text.hidden_size)')
  _check(text.hidden_size % text.num_attention_heads == 0, 'model.text.num_attention_heads',
         f'{text.num_attention_heads} heads do not divide model.text.hidden_size={text.hidden_size}')
  _check(config.data.max_text_length <= text.max_position_embeddings, 'data.max_text_length',
         f'{config.data.max_text_length} exceeds model.text.max_position_embeddings={text.max_position_embeddings}')


def _validate_diffusion(config: ml_collections.ConfigDict) -> None:
  from diffusion import losses, process, samplers  # Registries; imported here to keep this module light.

  d = config.diffusion
  types = process.available_prediction_types()
  _check(d.prediction_type in types, 'diffusion.prediction_type',
         f'unknown {d.prediction_type!r}; known: {", ".join(types)}')
  known = process.available_schedules()
  _check(d.schedule in known, 'diffusion.schedule', f'unknown {d.schedule!r}; known: {", ".join(known)}')
  why = process.check_family(d.schedule, d.prediction_type)
  _check(why is None, 'diffusion.prediction_type', why or '')
  weightings = losses.available_loss_weightings()
  _check(d.loss_weighting in weightings, 'diffusion.loss_weighting',
         f'unknown {d.loss_weighting!r}; known: {", ".join(weightings)}')
  _check(0.0 <= d.caption_dropout < 1.0, 'diffusion.caption_dropout', f'must be in [0, 1), got {d.caption_dropout!r}')
  _check(d.num_train_timesteps >= 2, 'diffusion.num_train_timesteps', 'must be >= 2')
  _check(0 < d.beta_start < d.beta_end < 1, 'diffusion.beta_end', 'need 0 < beta_start < beta_end < 1')
  _check(d.get('offset_noise', 0.0) >= 0, 'diffusion.offset_noise', 'must be >= 0')
  schedule = process.get_noise_schedule(d)  # Checks the edm_* / flow_* keys.
  losses.get_diffusion_loss_fn(d)  # Checks min_snr_gamma / edm_sigma_data.
  s = config.sample
  names = samplers.available_samplers()
  _check(s.sampler in names, 'sample.sampler', f'unknown sampler {s.sampler!r}; known: {", ".join(names)}')
  why = samplers.family_error(s.sampler, schedule)
  _check(why is None, 'sample.sampler', why or '')
  _check(1 <= s.num_steps <= d.num_train_timesteps, 'sample.num_steps',
         f'must be in [1, diffusion.num_train_timesteps={d.num_train_timesteps}], got {s.num_steps}')
  _check(s.guidance_scale >= 0, 'sample.guidance_scale', f'must be >= 0, got {s.guidance_scale}')
  _check(s.num_images_per_prompt >= 1, 'sample.num_images_per_prompt', 'must be >= 1')
  _validate_sample_options(s, samplers.sampler_info(s.sampler).options)


def _validate_sample_options(s: ml_collections.ConfigDict, accepted: tuple[str, ...]) -> None:
  """The sampler options of the sample section: in range, and set only where config.sample.sampler takes them."""
  spacings = ('', 'leading', 'trailing', 'linspace')
  _check(s.get('timestep_spacing', '') in spacings, 'sample.timestep_spacing',
         f'unknown {s.get("timestep_spacing")!r}; known: {spacings} ("" = the sampler\'s default)')
  _check(s.get('eta', 0.0) >= 0, 'sample.eta', f'must be >= 0, got {s.get("eta")}')
  _check(s.get('s_churn', 0.0) >= 0, 'sample.s_churn', f'must be >= 0, got {s.get("s_churn")}')
  _check(0.0 <= s.get('guidance_rescale', 0.0) <= 1.0, 'sample.guidance_rescale', 'must be in [0, 1]')
  interval = tuple(s.get('guidance_interval', (0.0, 1.0)))
  _check(len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0, 'sample.guidance_interval',
         f'must be (lo, hi) with 0 <= lo <= hi <= 1 (fractions of the training time), got {interval}')
  defaults = {'eta': 0.0, 'karras': False, 'timestep_spacing': '', 's_churn': 0.0}
  for key in defaults:
    value = s.get(key, defaults[key])
    _check(value == defaults[key] or key in accepted, f'sample.{key}',
           f'is {value!r} but sampler {s.sampler!r} has no option {key!r} (its options: {", ".join(accepted)})')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first bad key; cheap, so entry points call it before compiling anything."""
  _check(config.get('model_type') in MODEL_TYPES, 'model_type',
         f'unknown model type {config.get("model_type")!r}; known: {MODEL_TYPES}')
  _validate_train(config)
  _validate_data(config)
  vae_factor = _validate_vae(config)
  if config.model_type == 'ldm':
    _validate_unet(config, vae_factor)
    _validate_diffusion(config)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The inverse of `config_to_json`; lists come back as tuples, as the config files write them."""

  def tuples(value):
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
      return tuple(tuples(v) for v in value)
    return value

  return ml_collections.ConfigDict(tuples(json.loads(text)))
