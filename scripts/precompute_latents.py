r"""Encodes a dataset split once with a trained VAE (its EMA params), so stage 2 can train from the stored latents.

  python scripts/precompute_latents.py --vae_workdir workdirs/vae_tiny --out latents/shapes_tiny \
      [--config configs/ldm_base.py:tiny] [--split train] [--flips auto|both|none] [--batch_size 64]
      [--text_embeddings --text_workdir W [--text_embedding_dtype float32|float16|bfloat16]]
  python train.py --config configs/ldm_base.py:tiny --workdir workdirs/ldm_tiny \
      --config.vae_workdir=workdirs/vae_tiny --config.data.latent_cache=latents/shapes_tiny

Images get the training pipeline's decode, resize and centre crop; each record stores the posterior mean and logvar
(float32) of the image and, with flips, of its mirror image, plus the captions. `--config.a.b=value` overrides
apply as in train.py: use the same data settings you will train with (the training run refuses a cache whose
metadata does not match its config). Several machines: run it on each with --process_index i --process_count n;
each writes its own contiguous slice of the split, process 0 also the metadata, and training reads the cache only once
every slice is complete (checked on one machine by writing the slices one after the other).

--text_embeddings also stores the frozen text encoder's hidden states of every caption (and flipped caption) and the
empty prompt's, so a run with that frozen encoder (model.text.trainable=False, e.g. the sd15 preset) never runs it:
--text_workdir names the stage-2 workdir holding it (a scripts/convert.py import, or a run with a frozen text encoder;
its latest checkpoint's params and its tokenizer). Size per caption variant: 77 x 768 x 4 bytes = 231 KiB for CLIP
ViT-L in float32 (exact, the default); --text_embedding_dtype float16 or bfloat16 halves it. The training run
refuses the cache if its frozen text encoder's params hash differs, and refuses a cache with embeddings for a trained
text encoder.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from diffusion import cli
from diffusion.errors import user_errors_exit

_DEFAULT_CONFIG = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'ldm_base.py:tiny'
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', _DEFAULT_CONFIG, 'Stage-2 config file with preset, FILE[:preset].', lock_config=True
)
_VAE_WORKDIR = flags.DEFINE_string('vae_workdir', None, 'Trained VAE workdir (its EMA params encode the images).')
_OUT = flags.DEFINE_string('out', None, 'Cache directory; the split goes into OUT/<split>/.')
_SPLIT = flags.DEFINE_string('split', None, 'Dataset split (default: config.data.train_split).')
_FLIPS = flags.DEFINE_enum(
  'flips',
  'auto',
  ['auto', 'both', 'none'],
  "Also store the flipped image's posterior: auto = when config.data.random_flip.",
)
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per encoder call.')
_TEXT = flags.DEFINE_bool('text_embeddings', False, "Also store the frozen text encoder's caption embeddings.")
_TEXT_WORKDIR = flags.DEFINE_string('text_workdir', None, 'Stage-2 workdir holding the frozen text encoder.')
_TEXT_DTYPE = flags.DEFINE_enum(
  'text_embedding_dtype', 'float32', ['float32', 'float16', 'bfloat16'], 'Storage dtype of the text embeddings.'
)
_PROCESS_INDEX = flags.DEFINE_integer('process_index', None, 'This process (default: jax.process_index()).')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', None, 'Processes (default: jax.process_count()).')


@user_errors_exit
def main(argv: list[str]) -> None:
  cli.parse_flags(argv, doc=__doc__)
  cli.require(bool(_VAE_WORKDIR.value), '--vae_workdir is required (a trained VAE workdir)')
  cli.require(os.path.isdir(_VAE_WORKDIR.value), f'--vae_workdir {_VAE_WORKDIR.value!r} does not exist')
  cli.require(bool(_OUT.value), '--out is required (the cache directory)')
  cli.require(_BATCH.value >= 1, f'--batch_size must be >= 1, got {_BATCH.value}')
  given = (_PROCESS_INDEX.value is not None, _PROCESS_COUNT.value is not None)
  cli.require(given[0] == given[1], '--process_index and --process_count go together')
  if all(given):
    cli.require(
      0 <= _PROCESS_INDEX.value < _PROCESS_COUNT.value,
      f'--process_index must be in [0, --process_count), got {_PROCESS_INDEX.value}',
    )
  if _TEXT.value:
    cli.require(bool(_TEXT_WORKDIR.value), '--text_embeddings needs --text_workdir (the frozen text encoder)')
    cli.require(os.path.isdir(_TEXT_WORKDIR.value), f'--text_workdir {_TEXT_WORKDIR.value!r} does not exist')
  else:
    cli.require(not _TEXT_WORKDIR.value, '--text_workdir is only used with --text_embeddings')
  config = _CONFIG.value
  cli.require(
    config.get('model_type') == 'ldm', '--config must be a stage-2 (ldm) config, e.g. configs/ldm_base.py:tiny'
  )
  from diffusion import latent_cache_writer  # After argument checks: a usage error should not wait for JAX.

  text = latent_cache_writer.load_text_encoder(_TEXT_WORKDIR.value) if _TEXT.value else None
  with config.unlocked():
    meta = latent_cache_writer.precompute(
      config,
      _VAE_WORKDIR.value,
      _OUT.value,
      split=_SPLIT.value,
      flips=_FLIPS.value,
      batch_size=_BATCH.value,
      process_index=_PROCESS_INDEX.value,
      process_count=_PROCESS_COUNT.value,
      log=lambda line: print(line, flush=True),
      text_encoder=text,
      text_embedding_dtype=_TEXT_DTYPE.value,
    )
  print(
    f'latent cache {latent_cache_writer.split_dir(_OUT.value, meta["dataset"]["split"])}: '
    f'{meta["dataset"]["num_records"]} records, latents {tuple(meta["latent_shape"])}, '
    f'variants {", ".join(meta["variants"])}'
    + (f', text embeddings {tuple(meta["text_encoder"]["embedding_shape"])}' if 'text_encoder' in meta else ''),
    flush=True,
  )


if __name__ == '__main__':
  main(sys.argv)
