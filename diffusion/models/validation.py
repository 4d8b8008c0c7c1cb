"""Checks of `config.model` (vae / unet / text) and the sizes the networks must agree on, before anything compiles.

Each error is a `ConfigError` naming the key and what would fix it: image size vs the VAE factor and the U-Net
levels, heads vs channels, text width vs cross-attention width, U-Net input channels vs the VAE latents, an
attention implementation this backend (or the section's dtype / head dims) cannot run, unknown remat settings.
"""

from typing import TYPE_CHECKING, Any

from diffusion.errors import ConfigError
from diffusion.models import discriminator
from diffusion.models.attention import IMPLEMENTATIONS, backend_error, kernel_limitation
from diffusion.models.sizes import downsample_factor
from diffusion.models.unet import DOWN_BLOCK_TYPES, REMAT_BLOCKS, REMAT_POLICIES, UP_BLOCK_TYPES

if TYPE_CHECKING:  # Only for annotations: the networks import without ml_collections (scripts/unet_memory.py).
  import ml_collections

MODEL_DTYPES = ('float32', 'bfloat16', 'float16')


def _check(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(key, message)


def vae_downsample_factor(vae_config: Any) -> int:
  """Image pixels per latent pixel along each side (`vae_config`: config.model.vae or the module)."""
  return downsample_factor(vae_config.block_out_channels)


def unet_downsample_factor(unet_config: Any) -> int:
  """The factor the U-Net input sides must be divisible by (`unet_config`: config.model.unet or the module)."""
  return downsample_factor(unet_config.block_out_channels)


def _per_level(value: Any, levels: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    _check(len(value) == levels, key, f'has {len(value)} entries but the U-Net has {levels} levels')
    return tuple(value)
  return (value,) * levels


def _channels(section: Any, key: str) -> tuple:
  channels = tuple(section.block_out_channels)
  _check(len(channels) >= 1, f'{key}.block_out_channels', 'needs at least one level')
  for c in channels:
    _check(
      isinstance(c, int) and c > 0 and c % section.norm_num_groups == 0,
      f'{key}.block_out_channels',
      f'every entry must be a positive multiple of {key}.norm_num_groups={section.norm_num_groups}, got {channels}',
    )
  return channels


def _validate_vae(config: 'ml_collections.ConfigDict') -> None:
  vae = config.model.vae
  _channels(vae, 'model.vae')
  _check(vae.layers_per_block >= 1, 'model.vae.layers_per_block', 'must be >= 1')
  _check(vae.latent_channels >= 1, 'model.vae.latent_channels', 'must be >= 1')
  factor, size = vae_downsample_factor(vae), config.data.image_size
  _check(
    size % factor == 0,
    'data.image_size',
    f'{size} is not divisible by the VAE downsampling factor {factor} '
    '(one halving per level of model.vae.block_out_channels after the first)',
  )


def _validate_unet(config: 'ml_collections.ConfigDict') -> None:
  unet = config.model.unet
  channels = _channels(unet, 'model.unet')
  levels = len(channels)
  for key, known in (('down_block_types', DOWN_BLOCK_TYPES), ('up_block_types', UP_BLOCK_TYPES)):
    _check(
      len(unet[key]) == levels,
      f'model.unet.{key}',
      f'has {len(unet[key])} entries, model.unet.block_out_channels has {levels}',
    )
    for t in unet[key]:
      _check(t in known, f'model.unet.{key}', f'unknown block {t!r}; known: {known}')
  heads_key = 'model.unet.num_attention_heads' if unet.num_attention_heads else 'model.unet.attention_head_dim'
  heads = _per_level(unet.num_attention_heads or unet.attention_head_dim, levels, heads_key)
  for c, h in zip(channels, heads):
    _check(h >= 1 and c % h == 0, heads_key, f'{h} heads do not divide {c} channels (model.unet.block_out_channels)')
  for key in ('layers_per_block', 'transformer_layers_per_block'):
    for n in _per_level(unet[key], levels, f'model.unet.{key}'):
      _check(isinstance(n, int) and n >= 1, f'model.unet.{key}', f'entries must be integers >= 1, got {unet[key]!r}')


def _validate_remat(unet: Any) -> None:
  _check(isinstance(unet.get('remat', False), bool), 'model.unet.remat', f'must be True or False, got {unet.remat!r}')
  for key, known in (('remat_policy', REMAT_POLICIES), ('remat_blocks', REMAT_BLOCKS)):
    if key in unet:
      _check(unet[key] in known, f'model.unet.{key}', f'unknown {unet[key]!r}; known: {", ".join(known)}')


def _attention_head_dims(name: str, section: Any) -> tuple[int, ...]:
  """The head dims of the attention layers of model.<name> (the checks of that section have passed)."""
  if name == 'text':
    return (section.hidden_size // section.num_attention_heads,)
  channels = tuple(section.block_out_channels)
  if name == 'vae':
    return (channels[-1],) if section.get('mid_block_add_attention', True) else ()
  heads = _per_level(section.num_attention_heads or section.attention_head_dim, len(channels), 'heads')
  with_attention = [
    i
    for i in range(len(channels))
    if section.down_block_types[i].startswith('CrossAttn') or section.up_block_types[-1 - i].startswith('CrossAttn')
  ]
  if section.get('mid_block_type', 'UNetMidBlock2DCrossAttn') is not None:
    with_attention.append(len(channels) - 1)
  return tuple(sorted({channels[i] // heads[i] for i in with_attention}))


def _validate_attention(config: 'ml_collections.ConfigDict', name: str) -> None:
  """model.<name>.attention: a known implementation that this backend, dtype and these head dims can run."""
  section, key = config.model[name], f'model.{name}.attention'
  value = section.get('attention', 'auto')
  _check(value in IMPLEMENTATIONS, key, f'unknown {value!r}; known: {", ".join(IMPLEMENTATIONS)}')
  _check(backend_error(value) is None, key, str(backend_error(value)))
  if value != 'auto' and 'dtype' in section:
    for head_dim in _attention_head_dims(name, section):
      reason = kernel_limitation(value, head_dim, section.dtype)
      _check(reason is None, key, f'{reason} (model.{name}.dtype / head dims); use "auto" to fall back to xla')


def _validate_agreement(config: 'ml_collections.ConfigDict') -> None:
  """The sizes the VAE, U-Net and text encoder of a stage-2 model must agree on."""
  vae, unet, text = config.model.vae, config.model.unet, config.model.text
  _check(
    unet.in_channels == vae.latent_channels,
    'model.unet.in_channels',
    f'is {unet.in_channels} but the VAE has model.vae.latent_channels={vae.latent_channels}',
  )
  vae_factor = vae_downsample_factor(vae)
  latent, unet_factor = config.data.image_size // vae_factor, unet_downsample_factor(unet)
  _check(
    latent % unet_factor == 0,
    'data.image_size',
    f'gives {latent}x{latent} latents (VAE factor {vae_factor}), not divisible by the U-Net factor {unet_factor}',
  )
  _check(
    unet.sample_size == latent,
    'model.unet.sample_size',
    f'is {unet.sample_size} but data.image_size / VAE factor = {latent}',
  )
  text_width = text.projection_dim or text.hidden_size
  _check(
    unet.cross_attention_dim == text_width,
    'model.unet.cross_attention_dim',
    f'is {unet.cross_attention_dim} but the text encoder outputs {text_width} (model.text.hidden_size)',
  )
  _check(
    text.hidden_size % text.num_attention_heads == 0,
    'model.text.num_attention_heads',
    f'{text.num_attention_heads} heads do not divide model.text.hidden_size={text.hidden_size}',
  )
  _check(
    config.data.max_text_length <= text.max_position_embeddings,
    'data.max_text_length',
    f'{config.data.max_text_length} exceeds model.text.max_position_embeddings={text.max_position_embeddings}',
  )


def _validate_disc(config: 'ml_collections.ConfigDict') -> None:
  """`model.disc` (the VAE's PatchGAN discriminator): positive sizes, and a logit map the image size leaves room for."""
  disc = config.model.disc
  for key in ('num_layers', 'channels'):
    value = disc[key]
    _check(isinstance(value, int) and value >= 1, f'model.disc.{key}', f'must be an integer >= 1, got {value!r}')
  size = discriminator.output_size(config.data.image_size, disc.num_layers)
  _check(
    size >= 1,
    'model.disc.num_layers',
    f'{disc.num_layers} layers leave no patch of a {config.data.image_size}-px image (logit map {size} px): use fewer',
  )


def validate_config(config: 'ml_collections.ConfigDict') -> None:
  """Checks `config.model`: the VAE always (and its discriminator), the U-Net, the text encoder and their size
  agreements for stage 2."""
  for name in ('vae', 'unet', 'text'):
    if name in config.model and 'dtype' in config.model[name]:
      value = config.model[name].dtype
      _check(value in MODEL_DTYPES, f'model.{name}.dtype', f'unknown {value!r}; known: {", ".join(MODEL_DTYPES)}')
  _validate_vae(config)
  _validate_attention(config, 'vae')
  if config.model_type == 'vae' and 'disc' in config.model and config.get('loss', {}).get('adversarial_weight', 0) > 0:
    _validate_disc(config)  # The discriminator exists only with the adversarial term.
  if config.model_type == 'ldm':
    _validate_unet(config)
    _validate_remat(config.model.unet)
    _validate_agreement(config)
    _validate_attention(config, 'unet')
    _validate_attention(config, 'text')
