"""Loading diffusers / transformers models into our modules and writing our params back in their format."""

import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import models
from diffusion.errors import UserError
from diffusion.interop import configs, files, naming

Params = Any


def _shaped_target(module: Any, *args: Any) -> Params:
  """The parameter tree `module.init(rng, *args)` would make, as ShapeDtypeStructs (nothing computed)."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))['params']


def _unet_target(module: models.UNet2DConditionModel) -> Params:
  side = models.unet_downsample_factor(module)
  return _shaped_target(
    module,
    jnp.zeros((1, side, side, module.in_channels)),
    jnp.zeros((1,)),
    jnp.zeros((1, 1, module.cross_attention_dim)),
  )


def _vae_target(module: models.AutoencoderKL) -> Params:
  side = models.vae_downsample_factor(module)
  return jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, side, side, module.in_channels)), sample_posterior=False)
  )['params']


def _text_target(module: models.CLIPTextTransformer | models.T5EncoderModel) -> Params:
  return _shaped_target(module, jnp.zeros((1, 1), jnp.int32))


def _build(factory: Any, target_fn: Any, fields: dict[str, Any], source: str) -> tuple[Any, Params]:
  """(module, its parameter shapes) for `factory(ConfigDict(fields))`; a config the module refuses is the
  user's error, reported with `source`."""
  try:
    module = factory(ml_collections.ConfigDict(fields))
    return module, target_fn(module)
  except (ValueError, TypeError, ZeroDivisionError) as e:
    raise UserError(f'{source}: {e}') from None


def load_unet_config(path: str) -> ml_collections.ConfigDict:
  """Our `config.model.unet` for a diffusers UNet2DConditionModel directory, pipeline directory or hub id."""
  directory = files.model_directory(path, 'unet', files.DIFFUSERS_WEIGHTS)
  source = os.path.join(directory, 'config.json')
  return ml_collections.ConfigDict(
    {
      **configs.unet_from_diffusers(files.read_json(source), source),
      'dtype': 'float32',
      'remat': False,
      'remat_policy': 'nothing_saveable',
    }
  )


def load_unet(
  path: str, *, dtype: str = 'float32', param_dtype: Any = np.float32
) -> tuple[models.UNet2DConditionModel, Params]:
  """(module, params) of a diffusers UNet2DConditionModel (model directory, pipeline directory or hub id).

  `module.apply({'params': params}, sample, timesteps, encoder_hidden_states)`: sample NHWC, timesteps (B,)
  in diffusers units (0 ... 999); returns the NHWC output. `dtype` is the compute dtype.
  """
  directory = files.model_directory(path, 'unet', files.DIFFUSERS_WEIGHTS)
  config = load_unet_config(directory)
  config.dtype = dtype
  module, target = _build(models.create_unet, _unet_target, config.to_dict(), os.path.join(directory, 'config.json'))
  state = files.read_state_dict(directory, files.DIFFUSERS_WEIGHTS)
  params = naming.torch_to_flax(state, target, naming.UNET, source=directory, dtype=param_dtype)
  return module, params


def load_vae_config(path: str) -> ml_collections.ConfigDict:
  """Our `config.model.vae` (with `scaling_factor`) for a diffusers AutoencoderKL directory or hub id."""
  directory = files.model_directory(path, 'vae', files.DIFFUSERS_WEIGHTS)
  source = os.path.join(directory, 'config.json')
  return ml_collections.ConfigDict({**configs.vae_from_diffusers(files.read_json(source), source), 'dtype': 'float32'})


def load_vae(
  path: str, *, dtype: str = 'float32', param_dtype: Any = np.float32
) -> tuple[models.AutoencoderKL, Params]:
  """(module, params) of a diffusers AutoencoderKL (model directory, pipeline directory or hub id).

  `module.apply(v, x, method='encode')` -> unscaled posterior (mean, logvar) of NHWC images in [-1, 1];
  `module.apply(v, z, method='decode')` -> images. The latent scale is `load_vae_config(path).scaling_factor`.
  """
  directory = files.model_directory(path, 'vae', files.DIFFUSERS_WEIGHTS)
  config = load_vae_config(directory)
  config.dtype = dtype
  module, target = _build(models.create_vae, _vae_target, config.to_dict(), os.path.join(directory, 'config.json'))
  state = files.read_state_dict(directory, files.DIFFUSERS_WEIGHTS)
  params = naming.torch_to_flax(state, target, naming.VAE, source=directory, dtype=param_dtype)
  return module, params


def _text_config(directory: str, names: Any) -> ml_collections.ConfigDict:
  """Our text config; `names`: the weight file's tensor names (a projection exists iff it is stored)."""
  source = os.path.join(directory, 'config.json')
  fields = configs.text_from_transformers(
    files.read_json(source), source, has_projection='text_projection.weight' in names
  )
  return ml_collections.ConfigDict({'type': 'clip', 'tokenizer': '', **fields, 'trainable': False, 'dtype': 'float32'})


def load_text_encoder_config(path: str) -> ml_collections.ConfigDict:
  """Our `config.model.text` (type 'clip', frozen) for a transformers CLIPTextModel(WithProjection) or CLIPModel
  directory, a pipeline directory (its `text_encoder/`) or a hub id."""
  directory = files.model_directory(path, 'text_encoder', files.TRANSFORMERS_WEIGHTS)
  return _text_config(directory, files.read_state_keys(directory, files.TRANSFORMERS_WEIGHTS))


def load_text_encoder(
  path: str, *, dtype: str = 'float32', param_dtype: Any = np.float32, state: dict[str, np.ndarray] | None = None
) -> tuple[models.CLIPTextTransformer | models.T5EncoderModel, Params]:
  """(module, params) of a transformers CLIP text model (see `load_text_encoder_config` for the sources) or
  T5EncoderModel (config.json model_type 't5'; a full T5 model's encoder).

  CLIP: `module.apply({'params': params}, input_ids)` -> (last_hidden_state, pooled_output);
  `output_hidden_state_index=-2` takes the penultimate layer (clip skip 1). A CLIPModel's vision tower is
  not loaded. `state`: the directory's tensors if already read (`interop.clip` reads a CLIPModel once).
  T5: `module.apply({'params': params}, input_ids, attention_mask, output_hidden_states=False)` ->
  `models.TextEncoderOutput` (pooler_output None). Tokenizers: `diffusion.data.tokenizer.load_tokenizer(path)`.
  """
  directory = files.model_directory(path, 'text_encoder', files.TRANSFORMERS_WEIGHTS)
  state = files.read_state_dict(directory, files.TRANSFORMERS_WEIGHTS) if state is None else state
  source = os.path.join(directory, 'config.json')
  config_json = files.read_json(source)
  if configs.is_t5(config_json):
    return _load_t5_encoder(directory, config_json, state, dtype, param_dtype)
  config = _text_config(directory, state)
  config.dtype = dtype
  module, target = _build(
    models.create_text_encoder, _text_target, config.to_dict(), os.path.join(directory, 'config.json')
  )
  params = naming.torch_to_flax(state, target, naming.CLIP_TEXT, source=directory, dtype=param_dtype)
  return module, params


def _load_t5_encoder(
  directory: str, config_json: dict[str, Any], state: dict[str, np.ndarray], dtype: str, param_dtype: Any
) -> tuple[models.T5EncoderModel, Params]:
  source = os.path.join(directory, 'config.json')
  fields = configs.t5_from_transformers(config_json, source)
  try:
    module = models.T5EncoderModel(**fields, dtype=jnp.dtype(dtype))
    target = _text_target(module)
  except (ValueError, TypeError) as e:
    raise UserError(f'{source}: {e}') from None
  state = dict(state)
  tied = state.pop('encoder.embed_tokens.weight', None)  # transformers 4's copy of `shared.weight` (tied).
  if tied is not None and 'shared.weight' not in state:
    state['shared.weight'] = tied
  params = naming.torch_to_flax(state, target, naming.T5_ENCODER, source=directory, dtype=param_dtype)
  return module, params


def _checked_state(
  params: Params, target: Params, layout: naming.Layout, what: str, dtype: Any
) -> dict[str, np.ndarray]:
  """The PyTorch state dict of `params`, after checking they fill exactly the module's parameters."""
  shapes = lambda tree: {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}
  got, expected = shapes(params), shapes(target)
  if got != expected:
    missing = sorted('/'.join(k) for k in set(expected) - set(got))
    extra = sorted('/'.join(k) for k in set(got) - set(expected))
    wrong = sorted('/'.join(k) for k in set(got) & set(expected) if got[k] != expected[k])
    raise UserError(
      f'the {what} params do not match its config: missing {missing[:5]}, left over {extra[:5]}, '
      f'wrong shapes {wrong[:5]}'
    )
  return naming.flax_to_torch(params, layout, dtype)


def _as_dict(config: Any) -> dict[str, Any]:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def save_unet(directory: str, unet_config: Any, params: Params, dtype: Any = np.float32) -> None:
  """Writes a diffusers UNet2DConditionModel directory (config.json + diffusion_pytorch_model.safetensors)."""
  module = models.create_unet(ml_collections.ConfigDict(_as_dict(unet_config)))
  state = _checked_state(params, _unet_target(module), naming.UNET, 'U-Net', dtype)
  files.write_state_dict(directory, files.DIFFUSERS_WEIGHTS, state)
  files.write_json(os.path.join(directory, 'config.json'), configs.unet_to_diffusers(unet_config))


def save_vae(directory: str, vae_config: Any, params: Params, dtype: Any = np.float32) -> None:
  """Writes a diffusers AutoencoderKL directory (config.json with scaling_factor + safetensors)."""
  module = models.create_vae(ml_collections.ConfigDict(_as_dict(vae_config)))
  state = _checked_state(params, _vae_target(module), naming.VAE, 'VAE', dtype)
  files.write_state_dict(directory, files.DIFFUSERS_WEIGHTS, state)
  files.write_json(os.path.join(directory, 'config.json'), configs.vae_to_diffusers(vae_config))


def save_text_encoder(
  directory: str, text_config: Any, params: Params, dtype: Any = np.float32, special_ids: dict[str, int] | None = None
) -> None:
  """Writes a transformers CLIPTextModel (or CLIPTextModelWithProjection) directory."""
  module = models.create_text_encoder(ml_collections.ConfigDict(_as_dict(text_config)))
  state = _checked_state(params, _text_target(module), naming.CLIP_TEXT, 'text encoder', dtype)
  files.write_state_dict(directory, files.TRANSFORMERS_WEIGHTS, state)
  configs.text_to_transformers(text_config, special_ids).save_pretrained(directory)
