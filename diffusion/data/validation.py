"""Checks of `config.data`, kept free of the input pipeline's imports (grain, TFDS) so that validating a config
stays cheap. `data.name` itself is not checked here: a name that is not a registered source is looked up as a
prepared TFDS dataset when the pipeline is built."""

import os

import ml_collections

from diffusion.errors import ConfigError


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data` (sizes, the chosen source's own keys, the latent cache) before anything is read.
  Raises `ConfigError` naming the key."""
  data = config.data
  for key in ('image_size', 'max_text_length'):
    if not data[key] > 0:
      raise ConfigError(f'data.{key}', f'must be > 0, got {data[key]!r}')
  if not data.worker_count >= 0:
    raise ConfigError('data.worker_count', 'must be >= 0')
  if data.name == 'folder' and not data.folder.path:
    raise ConfigError('data.folder.path', "is empty but data.name is 'folder'")
  if data.name == 'shapes':
    if data.shapes.max_objects not in (1, 2):
      raise ConfigError('data.shapes.max_objects', 'must be 1 or 2')
    for key in ('num_train', 'num_eval'):
      if not data.shapes[key] > 0:
        raise ConfigError(f'data.shapes.{key}', 'must be > 0')
  cache = data.get('latent_cache', '')
  if cache:
    if config.get('model_type') != 'ldm':
      raise ConfigError('data.latent_cache', 'latents are cached for stage 2 (ldm) only')
    if data.random_crop:
      raise ConfigError(
        'data.random_crop', 'random crops cannot be read from a latent cache (data.latent_cache); set it to False'
      )
    if not os.path.isdir(cache):
      raise ConfigError(
        'data.latent_cache',
        f'{cache!r} is not a directory (make it with '
        'scripts/precompute_latents.py, or set it to "" to encode images on the fly)',
      )
