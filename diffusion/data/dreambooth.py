"""DreamBooth's data (Ruiz et al. 2023): a few instance images of a new concept with their prompt, plus the prior's
images (what the base model draws for class prompts), in one captions file that the folder source reads.

`config.dreambooth` (validated here; a run is a DreamBooth run when `instance_dir` is set):

  instance_dir       a folder of instance images: with a captions file (metadata.jsonl / .csv, as data.name='folder'
                     reads) or plain images, each then captioned `instance_prompt`
  instance_prompt    '' = the folder's captions; else every instance image's caption
  class_prompts      prior preservation: prompts the base model draws `num_class_images` images for, once, into
                     `<workdir>/dreambooth/class/` (empty: no prior preservation)
  class_prompts_file more class prompts, one per line (a prompts file as sample.py reads; seeds ignored)
  num_class_images   images of the prior, spread evenly over `class_prompts`
  prior_loss_weight  the prior's examples' weight in the loss (instance examples weigh 1)
  new_words          words the base's tokenizer does not know yet (a word-level tokenizer gives them spare slots)

`<workdir>/dreambooth/metadata.jsonl` lists every instance image, repeated so that instance and prior examples are
about equally many, and every prior image, with a `loss_weight` column. The loss is then the mean of
`loss_weight * loss` over a batch: in expectation half diffusers' `instance loss + prior_loss_weight * prior loss`,
which draws both halves into every batch (a constant factor, which Adam does not see).
"""

from __future__ import annotations

import json
import os

import ml_collections

from diffusion import prompts as prompts_lib
from diffusion.data import folder as folder_lib
from diffusion.errors import ConfigError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a DreamBooth run (`dreambooth.instance_dir` set)."""
  return bool(config.get('dreambooth') and config.dreambooth.instance_dir)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """The dreambooth section: a run built on a base, a readable instance folder, a sane prior."""
  if not enabled(config):
    return
  d = config.dreambooth
  if not (config.get('base_workdir') or config.get('init_from')):
    raise ConfigError(
      'dreambooth.instance_dir',
      'a DreamBooth run fine-tunes a trained model: set config.base_workdir with '
      'lora.rank > 0 (LoRA), or config.init_from (full fine-tuning)',
    )
  if not os.path.isdir(d.instance_dir):
    raise ConfigError('dreambooth.instance_dir', f'{d.instance_dir!r} is not a folder')
  if d.num_class_images < 0:
    raise ConfigError('dreambooth.num_class_images', f'must be >= 0, got {d.num_class_images!r}')
  if d.class_prompts_file and not os.path.isfile(d.class_prompts_file):
    raise ConfigError('dreambooth.class_prompts_file', f'{d.class_prompts_file!r} is not a file')
  num_prompts = len(class_prompts(d))
  if num_prompts and d.num_class_images < num_prompts:
    raise ConfigError(
      'dreambooth.num_class_images', f'{d.num_class_images} is fewer than the {num_prompts} class prompts'
    )
  if not d.prior_loss_weight >= 0:
    raise ConfigError('dreambooth.prior_loss_weight', f'must be >= 0, got {d.prior_loss_weight!r}')


def instance_examples(section: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(absolute image path, caption) of every instance image, in file-name order."""
  directory = section.instance_dir
  has_captions = any(os.path.isfile(os.path.join(directory, n)) for n in ('metadata.jsonl', 'metadata.csv'))
  if has_captions:
    source = folder_lib.FolderDataSource(directory)
    captions = [source[i]['caption'] for i in range(len(source))]
    examples = list(zip(source.file_names, captions))
  else:
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
    examples = [(os.path.join(directory, n), '') for n in names]
  if not examples:
    raise ConfigError('dreambooth.instance_dir', f'no images in {directory!r} ({", ".join(IMAGE_SUFFIXES)})')
  if section.instance_prompt:
    return [(os.path.abspath(path), section.instance_prompt) for path, _ in examples]
  if not has_captions:
    raise ConfigError('dreambooth.instance_prompt', f'is empty and {directory!r} has no captions file')
  return [(os.path.abspath(path), caption if isinstance(caption, str) else caption[0]) for path, caption in examples]


def class_prompts(section: ml_collections.ConfigDict) -> list[str]:
  """`class_prompts`, then the prompts of `class_prompts_file`."""
  from_file = prompts_lib.read_prompts_file(section.class_prompts_file)[0] if section.class_prompts_file else []
  return list(section.class_prompts) + from_file


def class_prompt_list(section: ml_collections.ConfigDict) -> list[str]:
  """The prompt of each prior image: the class prompts in turn, `num_class_images` in all ([] without a prior)."""
  prompts = class_prompts(section)
  return [prompts[i % len(prompts)] for i in range(section.num_class_images)] if prompts else []


def data_dir(workdir: str) -> str:
  """Where a DreamBooth run keeps its combined captions file and (under class/) the prior's images."""
  return os.path.join(workdir, 'dreambooth')


def class_image_path(workdir: str, index: int) -> str:
  return os.path.join(data_dir(workdir), 'class', f'{index:05d}.png')


def write_captions_file(
  workdir: str, instances: list[tuple[str, str]], priors: list[tuple[str, str]], prior_weight: float
) -> str:
  """Writes `<workdir>/dreambooth/metadata.jsonl` (instances repeated to about as many as the prior's images, each
  row with its loss weight) and returns the folder the run reads."""
  repeats = max(1, round(len(priors) / len(instances))) if priors else 1
  rows = [{'file_name': p, 'text': c, 'loss_weight': 1.0} for _ in range(repeats) for p, c in instances]
  rows += [{'file_name': p, 'text': c, 'loss_weight': float(prior_weight)} for p, c in priors]
  os.makedirs(data_dir(workdir), exist_ok=True)
  path = os.path.join(data_dir(workdir), 'metadata.jsonl')
  with open(path + '.tmp', 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  os.replace(path + '.tmp', path)
  return data_dir(workdir)


def read_folder(config: ml_collections.ConfigDict, folder: str) -> None:
  """Points the run's data section at the combined folder (its eval split: the same images)."""
  config.data.name = 'folder'
  config.data.folder.path = folder
  config.data.folder.captions_file = 'metadata.jsonl'
  config.data.latent_cache = ''
