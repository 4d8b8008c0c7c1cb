"""Translation between diffusers / transformers configs and ours (`config.model.unet / vae / text`,
`config.diffusion`), both ways.

Our field names are the diffusers / transformers ones, so most fields copy over; the tables here list the
diffusers options our networks implement only at one value (anything else is refused with the key named,
never silently dropped) and the ones that do not change the computation.
"""

from typing import Any

import transformers

from diffusion.errors import UserError
from diffusion.models.layers import get_activation
from diffusion.models.unet import DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, UP_BLOCK_TYPES

DIFFUSERS_VERSION = '0.39.0'  # Written into exported configs (the format they follow).

# diffusers UNet2DConditionModel options: defaults of the ones we read.
_UNET_DEFAULTS = {
  'sample_size': None,
  'in_channels': 4,
  'out_channels': 4,
  'flip_sin_to_cos': True,
  'freq_shift': 0,
  'down_block_types': ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
  'mid_block_type': 'UNetMidBlock2DCrossAttn',
  'up_block_types': ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
  'block_out_channels': (320, 640, 1280, 1280),
  'layers_per_block': 2,
  'act_fn': 'silu',
  'norm_num_groups': 32,
  'norm_eps': 1e-5,
  'cross_attention_dim': 1280,
  'transformer_layers_per_block': 1,
  'attention_head_dim': 8,
  'num_attention_heads': None,
  'use_linear_projection': False,
}
# Options our U-Net implements at these values only (diffusers' defaults; SDXL's added embeddings etc.).
_UNET_FIXED = {
  'center_input_sample': (False,),
  'only_cross_attention': (False,),
  'dual_cross_attention': (False,),
  'class_embed_type': (None,),
  'addition_embed_type': (None,),
  'num_class_embeds': (None,),
  'resnet_time_scale_shift': ('default',),
  'resnet_skip_time_act': (False,),
  'resnet_out_scale_factor': (1.0,),
  'time_embedding_type': ('positional',),
  'time_embedding_dim': (None,),
  'time_embedding_act_fn': (None,),
  'timestep_post_act': (None,),
  'time_cond_proj_dim': (None,),
  'conv_in_kernel': (3,),
  'conv_out_kernel': (3,),
  'encoder_hid_dim': (None,),
  'encoder_hid_dim_type': (None,),
  'downsample_padding': (1,),
  'mid_block_scale_factor': (1.0,),
  'attention_type': ('default',),
  'class_embeddings_concat': (False,),
  'mid_block_only_cross_attention': (None, False),
  'cross_attention_norm': (None,),
  'reverse_transformer_layers_per_block': (None,),
  'projection_class_embeddings_input_dim': (None,),
  'addition_time_embed_dim': (None,),
}
# Options that do not change our computation: dropout (inference / our training has none), attention upcasting
# (our softmax is always float32), SDXL's head count of an embedding we do not build.
_UNET_IGNORED = ('dropout', 'upcast_attention', 'addition_embed_type_num_heads')

_VAE_DEFAULTS = {
  'in_channels': 3,
  'out_channels': 3,
  'down_block_types': ('DownEncoderBlock2D',),
  'up_block_types': ('UpDecoderBlock2D',),
  'block_out_channels': (64,),
  'layers_per_block': 1,
  'act_fn': 'silu',
  'latent_channels': 4,
  'norm_num_groups': 32,
  'scaling_factor': 0.18215,
  'mid_block_add_attention': True,
}
_VAE_FIXED = {
  'shift_factor': (None,),
  'latents_mean': (None,),
  'latents_std': (None,),
  'use_quant_conv': (True,),
  'use_post_quant_conv': (True,),
}
_VAE_IGNORED = ('sample_size', 'force_upcast')

# diffusers scheduler beta_schedule / prediction_type <-> ours.
BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'squaredcos_cap_v2': 'cosine'}
PREDICTION_TYPES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}


def _check_keys(config: dict[str, Any], source: str, defaults: dict, fixed: dict, ignored: tuple) -> dict:
  """`defaults` overridden by `config`; refuses unknown keys and unsupported values of `fixed` keys."""
  for key, value in config.items():
    if key.startswith('_') or key in defaults or key in ignored:
      continue
    if key not in fixed:
      raise UserError(f'{source}: unknown option {key}={value!r}')
    allowed = fixed[key]
    values = value if isinstance(value, list) and key == 'only_cross_attention' else [value]
    if any(v not in allowed for v in values):
      raise UserError(
        f'{source}: {key}={value!r} is not supported (supported: {" or ".join(repr(a) for a in allowed)})'
      )
  return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def _int_or_tuple(value: Any, key: str, source: str, levels: int) -> int | tuple[int, ...]:
  if isinstance(value, (list, tuple)):
    if len(value) != levels or not all(isinstance(v, int) for v in value):
      raise UserError(f'{source}: {key}={value!r} must be an int or one int per level ({levels})')
    return tuple(value)
  if not isinstance(value, int):
    raise UserError(f'{source}: {key}={value!r} must be an int or one int per level ({levels})')
  return value


def _check_activation(name: Any, key: str, source: str) -> None:
  try:
    get_activation(name)
  except (ValueError, TypeError):
    raise UserError(f'{source}: {key}={name!r} is not a supported activation') from None


def _class_name(config: dict[str, Any], expected: str, source: str) -> None:
  name = config.get('_class_name', expected)
  if name != expected:
    raise UserError(f'{source}: _class_name={name!r}, expected {expected!r}')


def unet_from_diffusers(config: dict[str, Any], source: str) -> dict[str, Any]:
  """A diffusers UNet2DConditionModel config -> our `config.model.unet` fields."""
  _class_name(config, 'UNet2DConditionModel', source)
  c = _check_keys(config, source, _UNET_DEFAULTS, _UNET_FIXED, _UNET_IGNORED)
  channels = tuple(c['block_out_channels'])
  levels = len(channels)
  for key, known in (('down_block_types', DOWN_BLOCK_TYPES), ('up_block_types', UP_BLOCK_TYPES)):
    types = tuple(c[key])
    if len(types) != levels:
      raise UserError(f'{source}: {key} has {len(types)} entries, block_out_channels has {levels}')
    for t in types:
      if t not in known:
        raise UserError(f'{source}: {key} has unknown block type {t!r}; known: {", ".join(known)}')
  if c['mid_block_type'] not in MID_BLOCK_TYPES:
    raise UserError(
      f'{source}: mid_block_type={c["mid_block_type"]!r} is not supported; known: '
      f'{", ".join(repr(t) for t in MID_BLOCK_TYPES)}'
    )
  if c['norm_num_groups'] is None:
    raise UserError(f'{source}: norm_num_groups=None (no output norm) is not supported')
  _check_activation(c['act_fn'], 'act_fn', source)
  cross = c['cross_attention_dim']
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      raise UserError(f'{source}: cross_attention_dim={cross!r} differs between levels (not supported)')
    cross = cross[0]
  heads = c['num_attention_heads'] or c['attention_head_dim']  # diffusers' naming: this is the head count.
  sample_size = c['sample_size']
  if isinstance(sample_size, (list, tuple)):
    if len(set(sample_size)) != 1:
      raise UserError(f'{source}: sample_size={sample_size!r} is not square (not supported)')
    sample_size = sample_size[0]
  return {
    'sample_size': sample_size,
    'in_channels': c['in_channels'],
    'out_channels': c['out_channels'],
    'block_out_channels': channels,
    'layers_per_block': _int_or_tuple(c['layers_per_block'], 'layers_per_block', source, levels),
    'down_block_types': tuple(c['down_block_types']),
    'up_block_types': tuple(c['up_block_types']),
    'mid_block_type': c['mid_block_type'],
    'attention_head_dim': _int_or_tuple(heads, 'attention_head_dim', source, levels),
    'num_attention_heads': None,
    'cross_attention_dim': int(cross),
    'transformer_layers_per_block': _int_or_tuple(
      c['transformer_layers_per_block'], 'transformer_layers_per_block', source, levels
    ),
    'use_linear_projection': bool(c['use_linear_projection']),
    'flip_sin_to_cos': bool(c['flip_sin_to_cos']),
    'freq_shift': int(c['freq_shift']),
    'norm_num_groups': int(c['norm_num_groups']),
    'norm_eps': float(c['norm_eps']),
    'act_fn': c['act_fn'],
  }


def unet_to_diffusers(unet: Any) -> dict[str, Any]:
  """Our `config.model.unet` -> a diffusers UNet2DConditionModel config (heads as `attention_head_dim`,
  diffusers' historical spelling, which every diffusers version reads the same way)."""
  listify = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  heads = unet['num_attention_heads'] or unet['attention_head_dim']
  config = {k: listify(unet[k]) for k in _UNET_DEFAULTS if k not in ('attention_head_dim', 'num_attention_heads')}
  config.update(
    {
      '_class_name': 'UNet2DConditionModel',
      '_diffusers_version': DIFFUSERS_VERSION,
      'attention_head_dim': listify(heads),
      'num_attention_heads': None,
    }
  )
  config.update({k: v[0] for k, v in _UNET_FIXED.items()})
  return config


def vae_from_diffusers(config: dict[str, Any], source: str) -> dict[str, Any]:
  """A diffusers AutoencoderKL config -> our `config.model.vae` fields (with `scaling_factor`)."""
  _class_name(config, 'AutoencoderKL', source)
  c = _check_keys(config, source, _VAE_DEFAULTS, _VAE_FIXED, _VAE_IGNORED)
  channels = tuple(c['block_out_channels'])
  for key, block in (('down_block_types', 'DownEncoderBlock2D'), ('up_block_types', 'UpDecoderBlock2D')):
    types = tuple(c[key])
    if len(types) != len(channels):
      raise UserError(f'{source}: {key} has {len(types)} entries, block_out_channels has {len(channels)}')
    for t in types:
      if t != block:
        raise UserError(f'{source}: {key} has unknown block type {t!r}; known: {block}')
  _check_activation(c['act_fn'], 'act_fn', source)
  if not isinstance(c['layers_per_block'], int):
    raise UserError(f'{source}: layers_per_block={c["layers_per_block"]!r} must be an int')
  return {
    'in_channels': c['in_channels'],
    'out_channels': c['out_channels'],
    'block_out_channels': channels,
    'layers_per_block': c['layers_per_block'],
    'latent_channels': c['latent_channels'],
    'norm_num_groups': c['norm_num_groups'],
    'act_fn': c['act_fn'],
    'mid_block_add_attention': bool(c['mid_block_add_attention']),
    'scaling_factor': float(c['scaling_factor']),
  }


def vae_to_diffusers(vae: Any) -> dict[str, Any]:
  """Our `config.model.vae` -> a diffusers AutoencoderKL config."""
  levels = len(vae['block_out_channels'])
  config = {
    k: vae[k]
    for k in (
      'in_channels',
      'out_channels',
      'layers_per_block',
      'act_fn',
      'latent_channels',
      'norm_num_groups',
      'mid_block_add_attention',
    )
  }
  scale = float(vae['scaling_factor'])
  config.update(
    {
      '_class_name': 'AutoencoderKL',
      '_diffusers_version': DIFFUSERS_VERSION,
      'block_out_channels': list(vae['block_out_channels']),
      'down_block_types': ['DownEncoderBlock2D'] * levels,
      'up_block_types': ['UpDecoderBlock2D'] * levels,
      'scaling_factor': scale if scale > 0 else _VAE_DEFAULTS['scaling_factor'],
      'use_quant_conv': True,
      'use_post_quant_conv': True,
    }
  )
  return config


def text_from_transformers(config: dict[str, Any], source: str, has_projection: bool) -> dict[str, Any]:
  """A transformers CLIPTextConfig (or a CLIPConfig's text part) -> our `config.model.text` fields.

  transformers pools at argmax(input_ids) when eos_token_id == 2 (configs written before the fix of
  transformers PR 24773, like SD 1.x's); that is our eos_token_id -1.
  """
  model_type = config.get('model_type', 'clip_text_model')
  try:
    if model_type == 'clip':
      full = transformers.CLIPConfig.from_dict(config)
      text, projection_dim = full.text_config, full.projection_dim
    elif model_type == 'clip_text_model':
      text = transformers.CLIPTextConfig.from_dict(config)
      projection_dim = text.projection_dim
    else:
      raise UserError(f'{source}: model_type={model_type!r}; expected clip_text_model or clip')
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f'{source}: not a CLIP text config: {e}') from None
  _check_activation(text.hidden_act, 'hidden_act', source)
  eos = text.eos_token_id
  return {
    'vocab_size': text.vocab_size,
    'hidden_size': text.hidden_size,
    'intermediate_size': text.intermediate_size,
    'num_hidden_layers': text.num_hidden_layers,
    'num_attention_heads': text.num_attention_heads,
    'max_position_embeddings': text.max_position_embeddings,
    'hidden_act': text.hidden_act,
    'layer_norm_eps': float(text.layer_norm_eps),
    'eos_token_id': -1 if eos in (None, 2) else int(eos),
    'projection_dim': int(projection_dim) if has_projection else None,
  }


def text_to_transformers(text: Any, special_ids: dict[str, int] | None = None) -> transformers.CLIPTextConfig:
  """Our `config.model.text` -> a CLIPTextConfig for CLIPTextModel (or ...WithProjection).

  Our eos_token_id -1 (argmax pooling) is written as transformers' legacy value 2. A real eos id of 2 cannot
  be expressed (transformers would pool at argmax): such an export keeps the hidden states exact but not
  the pooled output; `eos_id_representable` says which case applies.
  """
  eos = text['eos_token_id']
  ids = dict(special_ids or {})
  projection = text['projection_dim']
  return transformers.CLIPTextConfig(
    vocab_size=text['vocab_size'],
    hidden_size=text['hidden_size'],
    intermediate_size=text['intermediate_size'],
    projection_dim=projection or text['hidden_size'],
    num_hidden_layers=text['num_hidden_layers'],
    num_attention_heads=text['num_attention_heads'],
    max_position_embeddings=text['max_position_embeddings'],
    hidden_act=text['hidden_act'],
    layer_norm_eps=text['layer_norm_eps'],
    eos_token_id=2 if eos is None or eos < 0 else int(eos),
    bos_token_id=ids.get('bos', 49406),
    pad_token_id=ids.get('pad', 1),
    architectures=['CLIPTextModelWithProjection' if projection else 'CLIPTextModel'],
  )


def is_t5(config: dict[str, Any]) -> bool:
  """Whether a transformers config.json describes a T5 model (model_type 't5', or a T5 architecture)."""
  architectures = config.get('architectures') or ()
  return config.get('model_type') == 't5' or any(str(a).startswith('T5') for a in architectures)


def t5_from_transformers(config: dict[str, Any], source: str) -> dict[str, Any]:
  """A transformers T5Config (T5EncoderModel, or the encoder of a T5Model / T5ForConditionalGeneration) -> the
  fields of `diffusion.models.T5EncoderModel`; `feed_forward_proj` expands as transformers expands it ('relu',
  'gated-gelu' -> gelu_new gated, ...). Dropout does not change the (inference) computation."""
  model_type = config.get('model_type', 't5')
  if model_type != 't5':
    raise UserError(f'{source}: model_type={model_type!r}; expected t5')
  try:
    t5 = transformers.T5Config.from_dict(config)
  except (TypeError, ValueError) as e:
    raise UserError(f'{source}: not a T5 config: {e}') from None
  _check_activation(t5.dense_act_fn, 'feed_forward_proj', source)
  return {
    'vocab_size': int(t5.vocab_size),
    'd_model': int(t5.d_model),
    'd_kv': int(t5.d_kv),
    'd_ff': int(t5.d_ff),
    'num_layers': int(t5.num_layers),
    'num_heads': int(t5.num_heads),
    'relative_attention_num_buckets': int(t5.relative_attention_num_buckets),
    'relative_attention_max_distance': int(t5.relative_attention_max_distance),
    'layer_norm_epsilon': float(t5.layer_norm_epsilon),
    'dense_act_fn': t5.dense_act_fn,
    'is_gated_act': bool(t5.is_gated_act),
  }


def eos_id_representable(text: Any) -> bool:
  """False when transformers would pool our text encoder's output elsewhere (a real eos id of 2)."""
  return text['eos_token_id'] != 2


def diffusion_from_scheduler(config: dict[str, Any], source: str) -> dict[str, Any]:
  """A diffusers scheduler config -> our `config.diffusion` fields (schedule and prediction type)."""
  if config.get('trained_betas') is not None:
    raise UserError(f'{source}: trained_betas is not supported (use a named beta_schedule)')
  schedule = config.get('beta_schedule', 'linear')
  if schedule not in BETA_SCHEDULES:
    raise UserError(f'{source}: beta_schedule={schedule!r} is not supported; known: {", ".join(BETA_SCHEDULES)}')
  prediction = config.get('prediction_type', 'epsilon')
  if prediction not in PREDICTION_TYPES:
    raise UserError(f'{source}: prediction_type={prediction!r} is not supported; known: {", ".join(PREDICTION_TYPES)}')
  return {
    'schedule': BETA_SCHEDULES[schedule],
    'prediction_type': PREDICTION_TYPES[prediction],
    'num_train_timesteps': int(config.get('num_train_timesteps', 1000)),
    'beta_start': float(config.get('beta_start', 0.0001)),
    'beta_end': float(config.get('beta_end', 0.02)),
    'rescale_zero_terminal_snr': bool(config.get('rescale_betas_zero_snr', False)),
  }


def scheduler_from_diffusion(diffusion: Any) -> dict[str, Any]:
  """Our `config.diffusion` -> a diffusers DDIMScheduler config with the same process (SD's DDIM settings)."""
  schedules = {v: k for k, v in BETA_SCHEDULES.items()}
  predictions = {v: k for k, v in PREDICTION_TYPES.items()}
  for key, table in (('schedule', schedules), ('prediction_type', predictions)):
    if diffusion[key] not in table:
      raise UserError(
        f'config.diffusion.{key}={diffusion[key]!r} has no diffusers equivalent; known: {", ".join(table)}'
      )
  return {
    '_class_name': 'DDIMScheduler',
    '_diffusers_version': DIFFUSERS_VERSION,
    'beta_schedule': schedules[diffusion['schedule']],
    'beta_start': float(diffusion['beta_start']),
    'beta_end': float(diffusion['beta_end']),
    'num_train_timesteps': int(diffusion['num_train_timesteps']),
    'prediction_type': predictions[diffusion['prediction_type']],
    'rescale_betas_zero_snr': bool(diffusion['rescale_zero_terminal_snr']),
    'clip_sample': False,
    'set_alpha_to_one': False,
    'steps_offset': 1,
    'timestep_spacing': 'leading',
    'trained_betas': None,
  }
