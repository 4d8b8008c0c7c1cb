"""Checks of `config.data`, kept free of the input pipeline's imports (grain, TFDS) so that validating a config
stays cheap. `data.name` itself is not checked here: a name that is not a registered source is looked up as a
prepared TFDS dataset when the pipeline is built. The streamed sources' shard patterns are expanded here (standard
library only), and a parquet file's schema is read from its footer, so a pattern that matches nothing or a column
that does not exist fails before anything is compiled."""

import os

import ml_collections

from diffusion.data import shards
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
  if data.name == 'webdataset':
    _validate_stream_section(data, 'webdataset', 'urls', ('.tar', '.tar.gz', '.tgz'))
  if data.name == 'parquet':
    first = _validate_stream_section(data, 'parquet', 'files', ('.parquet', '.pq'))
    _validate_parquet_columns(data.parquet, first)
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


def _validate_stream_section(data: ml_collections.ConfigDict, name: str, key: str, suffixes: tuple[str, ...]) -> str:
  """Checks `data.<name>`'s sizes and that its patterns match files; returns the first training file."""
  section = data.get(name)
  if section is None:
    raise ConfigError(f'data.{name}', f'is missing but data.name is {name!r}')
  if data.worker_count:
    raise ConfigError(
      'data.worker_count',
      f'worker processes are not implemented for data.name={name!r}: it decodes in its data.{name}.cycle_length '
      'reader threads; set data.worker_count=0',
    )
  if not section.cycle_length >= 1:
    raise ConfigError(f'data.{name}.cycle_length', f'must be >= 1, got {section.cycle_length!r}')
  if not section.shuffle_buffer >= 0:
    raise ConfigError(f'data.{name}.shuffle_buffer', f'must be >= 0, got {section.shuffle_buffer!r}')
  first = shards.list_shards(section[key], f'data.{name}.{key}', suffixes)[0]
  if section[f'eval_{key}']:
    shards.list_shards(section[f'eval_{key}'], f'data.{name}.eval_{key}', suffixes)
  return first


def _validate_parquet_columns(section: ml_collections.ConfigDict, path: str) -> None:
  """The image and caption columns exist in the first file's schema (its footer) and hold bytes and text."""
  pq = shards.require_pyarrow()
  import pyarrow as pa  # pylint: disable=import-outside-toplevel  (present: pyarrow.parquet imported)

  try:
    schema = pq.read_schema(path)
  except (OSError, pa.ArrowException) as e:
    raise ConfigError('data.parquet.files', f'{path} is not a readable parquet file ({e})') from None
  for key in ('image_column', 'caption_column'):
    if section[key] not in schema.names:
      raise ConfigError(f'data.parquet.{key}', f'{section[key]!r} is not a column of {path} (columns: {schema.names})')
  image = schema.field(section.image_column).type
  is_bytes = pa.types.is_binary(image) or pa.types.is_large_binary(image)
  if not (is_bytes or (pa.types.is_struct(image) and image.get_field_index('bytes') >= 0)):
    raise ConfigError(
      'data.parquet.image_column',
      f"{section.image_column!r} is of type {image}, not image bytes (binary or a struct with 'bytes')",
    )
