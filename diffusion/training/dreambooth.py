"""DreamBooth runs: the set-up a stage-2 task (full fine-tuning from `init_from`, or LoRA on `base_workdir`) does
before it builds its networks when `config.dreambooth.instance_dir` is set (the data side: `diffusion.data.dreambooth`).

1. The tokenizer gains `dreambooth.new_words` (spare slots of a word-level tokenizer), and every instance caption and
   class prompt must then be known word for word: an unknown word is an error, never a silent <unk>.
2. Prior preservation: the base model draws `num_class_images` images for `class_prompts` once, into
   `<workdir>/dreambooth/class/` (image i from seed `config.seed` and index i, with the base's sampling settings);
   images already there are kept, so an interrupted start resumes and a resumed run draws nothing.
3. The combined captions file is written and the run's data section reads it (data.name='folder').
The run's tokenizer is saved into its workdir, so sample.py and every reader of the workdir know the new words.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from diffusion import lora as lora_lib
from diffusion import workdir as workdir_lib
from diffusion.data import dreambooth as data_lib
from diffusion.data import tokenizer as tokenizer_lib
from diffusion.images import save_png
from diffusion.pipeline import LatentDiffusionPipeline

enabled = data_lib.enabled


def base_workdir(config: ml_collections.ConfigDict) -> str:
  """The model a DreamBooth run fine-tunes: its LoRA base, else the workdir its params start from."""
  return config.base_workdir if lora_lib.trains_lora(config) else config.init_from


def _draw_priors(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any) -> list[tuple[str, str]]:
  """(path, prompt) of every prior image, drawing the missing ones with the base model (all processes draw, the
  same images; process 0 writes them)."""
  prompts = data_lib.class_prompt_list(config.dreambooth)
  paths = [data_lib.class_image_path(workdir, i) for i in range(len(prompts))]
  missing = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
  if missing:
    pipeline = LatentDiffusionPipeline.from_workdir(base_workdir(config))
    pipeline.tokenizer = tokenizer  # The base's ids, and the new words' spare slots (which the prior never uses).
    print(f'DreamBooth: drawing {len(missing)} prior images with {base_workdir(config)}', flush=True)
    images = pipeline.generate([prompts[i] for i in missing], seed=config.seed, indices=np.asarray(missing))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
      for i, image in zip(missing, images):
        save_png(image, paths[i] + '.tmp.png')
        os.replace(paths[i] + '.tmp.png', paths[i])
  return list(zip([os.path.abspath(p) for p in paths], prompts))


def prepare(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any) -> Any:
  """Sets up a DreamBooth run in its resolved `config` (see the module docstring); returns its tokenizer."""
  section = config.dreambooth
  if workdir_lib.has_tokenizer(workdir):
    tokenizer = workdir_lib.load_tokenizer(workdir)  # A resumed run keeps the ids it trained with.
  tokenizer = tokenizer_lib.add_words(tokenizer, list(section.new_words))  # Words it knows already keep their ids.
  instances = data_lib.instance_examples(section)
  tokenizer_lib.check_known_words(tokenizer, [c for _, c in instances], 'dreambooth instance captions')
  tokenizer_lib.check_known_words(tokenizer, data_lib.class_prompts(section), 'dreambooth class prompts')
  if jax.process_index() == 0:
    tokenizer_lib.save_tokenizer(tokenizer, workdir_lib.tokenizer_path(workdir))
  priors = _draw_priors(config, workdir, tokenizer)
  folder = data_lib.data_dir(workdir)
  if jax.process_index() == 0:
    folder = data_lib.write_captions_file(workdir, instances, priors, section.prior_loss_weight)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('dreambooth data')
  data_lib.read_folder(config, folder)
  return tokenizer
