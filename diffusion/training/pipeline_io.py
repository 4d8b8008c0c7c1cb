"""A diffusers Stable-Diffusion pipeline directory <-> one of our stage-2 workdirs.

Import writes what a training run would have written at step 0 (see diffusion/training/ldm_task.py):
`config.json` (configs/ldm_base.py:base filled from the pipeline's configs), `tokenizer/`, `frozen/vae`
and `checkpoints/0` holding a fresh TrainState of the pretrained U-Net and text encoder (EMA = params), so
`sample.py --workdir W` samples from it and `train.py` resumes it as a fine-tuning run. Export writes the
pipeline layout diffusers reads (`model_index.json`, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion import checkpoint, models
from diffusion import workdir as workdir_lib
from diffusion.config import validate_config
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.errors import UserError
from diffusion.interop import configs, files, loaders
from diffusion.training.ldm_task import frozen_param_groups
from diffusion.training.state import create_optimizer, create_train_state
from diffusion.workdir import load_workdir_config

COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')


def _pipeline_directory(source: str) -> str:
  """A local pipeline directory with every component (hub ids are fetched into huggingface_hub's cache)."""
  if not os.path.isdir(source):
    if not files.looks_like_hub_id(source):
      raise UserError(f'pipeline directory {source!r} does not exist')
    weights = [
      f'{sub}/{stem}{suffix}'
      for sub, stem in (
        ('unet', files.DIFFUSERS_WEIGHTS),
        ('vae', files.DIFFUSERS_WEIGHTS),
        ('text_encoder', files.TRANSFORMERS_WEIGHTS),
      )
      for suffix in ('.safetensors', '*.safetensors.index.json', '-*.safetensors')
    ]
    patterns = ['model_index.json', 'scheduler/*.json', 'tokenizer/*', '*/config.json', *weights]
    source = files.hub_download(source, patterns)
  missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(source, c))]
  if missing:
    listed = ', '.join(f'{m}/' for m in missing)
    raise UserError(f'{source!r} is not a Stable Diffusion pipeline directory: missing {listed}')
  return source


def _load_tokenizer(directory: str) -> Any:
  try:
    return tokenizer_lib.load_tokenizer(directory)
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f'cannot load the tokenizer in {directory}: {e}') from None


def _scheduler_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'scheduler_config.json')
  return configs.diffusion_from_scheduler(files.read_json(path), path)


def _workdir_config(
  base: ml_collections.ConfigDict,
  unet: Any,
  vae: Any,
  text: Any,
  diffusion: dict[str, Any],
  max_text_length: int,
  source: str,
) -> ml_collections.ConfigDict:
  """`base` (e.g. configs/ldm_base.py:base) with the imported model, process and tokenizer settings."""
  config = ml_collections.ConfigDict(base.to_dict())
  if unet.sample_size is None:
    raise UserError(f'{source}/unet/config.json: sample_size is not set (needed for the image size)')
  config.model.unet = ml_collections.ConfigDict({**base.model.unet.to_dict(), **unet.to_dict()})
  config.model.vae = vae
  config.model.text = ml_collections.ConfigDict(
    {**base.model.text.to_dict(), **text.to_dict(), 'tokenizer': os.path.join(source, 'tokenizer')}
  )
  for key, value in diffusion.items():
    config.diffusion[key] = value
  config.data.image_size = unet.sample_size * models.vae_downsample_factor(vae)
  config.data.max_text_length = max_text_length
  validate_config(config)
  return config


def import_pipeline(
  source: str, workdir: str, base: ml_collections.ConfigDict, params_fn: Callable[[Any], Any] | None = None
) -> ml_collections.ConfigDict:
  """Converts a diffusers SD pipeline (directory or hub id) into a stage-2 workdir; returns its config.

  `base` is the stage-2 config the imported settings fill in (its training, data and sampling sections are kept).
  `params_fn` maps the imported {'unet', 'text'} params before anything is written (e.g. merging LoRAs into them).
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(os.path.join(workdir, 'config.json')) or os.path.exists(os.path.join(workdir, 'checkpoints')):
    raise UserError(f'workdir {workdir!r} already holds a run (config.json / checkpoints); use a new one')
  root = _pipeline_directory(source)
  tokenizer = _load_tokenizer(os.path.join(root, 'tokenizer'))
  text = loaders.load_text_encoder_config(os.path.join(root, 'text_encoder'))
  if len(tokenizer) > text.vocab_size:
    raise UserError(
      f'{root}/tokenizer has {len(tokenizer)} tokens but text_encoder/config.json has vocab_size={text.vocab_size}'
    )
  max_length = min(int(tokenizer.model_max_length), text.max_position_embeddings)
  config = _workdir_config(
    base,
    loaders.load_unet_config(os.path.join(root, 'unet')),
    loaders.load_vae_config(os.path.join(root, 'vae')),
    text,
    _scheduler_config(os.path.join(root, 'scheduler')),
    max_length,
    root,
  )
  # Configs first (cheap, and every error names its file and key), then the weights.
  _, unet_params = loaders.load_unet(os.path.join(root, 'unet'))
  _, text_params = loaders.load_text_encoder(os.path.join(root, 'text_encoder'))
  _, vae_params = loaders.load_vae(os.path.join(root, 'vae'))
  params = {'unet': unet_params, 'text': text_params}
  params = params if params_fn is None else params_fn(params)
  _write_workdir(workdir, config, tokenizer, vae_params, params, source)
  return config


def _write_workdir(
  workdir: str, config: ml_collections.ConfigDict, tokenizer: Any, vae_params: Any, params: dict[str, Any], source: str
) -> None:
  os.makedirs(workdir, exist_ok=True)
  tokenizer_lib.save_tokenizer(tokenizer, workdir_lib.tokenizer_path(workdir))
  workdir_lib.save_frozen(workdir, 'vae', vae_params)
  tx = create_optimizer(config.optim, config.train.num_steps, frozen=frozen_param_groups(config))  # As the loop.
  _, rng_train = jax.random.split(jax.random.PRNGKey(config.seed))  # As the training loop splits it.
  state = create_train_state(jax.tree.map(jnp.asarray, params), tx, rng_train)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False)
  meta = {'model_type': 'ldm', 'scaling_factor': float(config.model.vae.scaling_factor), 'imported_from': source}
  ckpt.save(0, state, None, meta, force=True)
  ckpt.close()
  workdir_lib.write_config(workdir, config)  # Last: a workdir with a config is complete.


def _special_ids(tokenizer: Any) -> dict[str, int]:
  ids = {'bos': tokenizer.bos_token_id, 'pad': tokenizer.pad_token_id}
  return {k: int(v) for k, v in ids.items() if v is not None}


def export_pipeline(workdir: str, directory: str, *, step: int | None = None, use_ema: bool = True) -> list[str]:
  """Writes a workdir's model as a diffusers SD pipeline directory; returns warnings (e.g. pooled-output
  differences) for the caller to show."""
  config = load_workdir_config(workdir, expect='ldm')
  if os.path.isdir(directory) and os.listdir(directory):
    raise UserError(f'export directory {directory!r} is not empty')
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  trained = ckpt.restore_params(step, 'ema_params' if use_ema else 'params')
  vae_params = checkpoint.load_pytree(os.path.join(workdir, 'frozen', 'vae'))
  tokenizer = _load_tokenizer(os.path.join(workdir, 'tokenizer'))
  scheduler = configs.scheduler_from_diffusion(config.diffusion)
  loaders.save_unet(os.path.join(directory, 'unet'), config.model.unet, trained['unet'])
  loaders.save_vae(os.path.join(directory, 'vae'), config.model.vae, vae_params)
  loaders.save_text_encoder(
    os.path.join(directory, 'text_encoder'), config.model.text, trained['text'], special_ids=_special_ids(tokenizer)
  )
  tokenizer.save_pretrained(os.path.join(directory, 'tokenizer'))
  os.makedirs(os.path.join(directory, 'scheduler'), exist_ok=True)
  files.write_json(os.path.join(directory, 'scheduler', 'scheduler_config.json'), scheduler)
  files.write_json(
    os.path.join(directory, 'model_index.json'),
    {
      '_class_name': 'StableDiffusionPipeline',
      '_diffusers_version': configs.DIFFUSERS_VERSION,
      'unet': ['diffusers', 'UNet2DConditionModel'],
      'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': [
        'transformers',
        'CLIPTextModelWithProjection' if config.model.text.projection_dim else 'CLIPTextModel',
      ],
      'tokenizer': ['transformers', type(tokenizer).__name__],
      'scheduler': ['diffusers', 'DDIMScheduler'],
      'safety_checker': [None, None],
      'feature_extractor': [None, None],
      'requires_safety_checker': False,
    },
  )
  warnings = []
  if not configs.eos_id_representable(config.model.text):
    warnings.append(
      'the text encoder pools at token id 2, which transformers reads as "pool at argmax": '
      'hidden states are exact, the pooled output is not'
    )
  return warnings
